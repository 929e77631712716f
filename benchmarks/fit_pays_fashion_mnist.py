"""Does a query-paid fit beat the zero-query denoiser? sigma = 1.0 and a brittle classifier (prints JSON).

Issue #23's question, on the settings the first benchmark left open: at sigma = 0.25 and 0.5 the
scoring rounds of every query-paid fit kept the free MSE denoiser. Here, per black box and sigma (default
1.0, where MSE reconstructions blur and a classifier trained on clean images misreads them):

* ``none``        the bare black box, smoothed;
* ``denoise``     the per-sigma U-Net, MSE only: zero queries (the same cached weights as
                  ``diffusion_fashion_mnist.py``'s ``unet`` row, in front of every black box);
* ``surrogate``   that U-Net fine-tuned through the black box with the SDK's defaults for stopping (the
                  pilot and the early stop on), ``pretrain_steps=0``, under a fit budget of
                  ``--fit-budget`` queries (default 20,000: the issue's bar);
* ``surrogate_nostop``  the same fit with the pilot and the early stop off (``pilot=0, patience=0``):
                  what the budget buys when nothing stops it;
* ``ceiling``     the clean black box's architecture trained with Gaussian noise at that sigma
                  (white-box retraining; for the ``clean`` black box only).

Black boxes (label-only, through the QueryEngine): ``clean``, the fitting benchmark's SmallCNN (width 16);
``brittle``, a SmallCNN with a 256-unit hidden layer trained three times as long on clean images, without
any augmentation (cached here). Certified accuracy at r = 0 .. 1.0 (Cohen's CERTIFY, n0, n, alpha),
fit queries, queries saved by the stop, and what the pilot did.

    sudo apt-get install dataset-fashion-mnist
    python benchmarks/fit_pays_fashion_mnist.py [--images 200] [--n 1000] [--sigmas 1.0]
        [--classifiers clean brittle] [--fit-budget 20000] [--cache-dir DIR]
    # smoke run: --images 4 --n 100 --n0 10 --unet-steps 10 --steps 20 --brittle-epochs 1 --fit-images 2000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import (  # noqa: E402
    RADII,
    add_certify_args,
    add_run_args,
    certify_run,
    emit,
    fmnist_setup,
    for_sigma,
    print_table,
)
from diffusion_fashion_mnist import SHAPE, _tag, unet_smoother  # noqa: E402

from blackbox_rs import QueryEngine  # noqa: E402
from blackbox_rs._demo.datasets import load_fashion_mnist  # noqa: E402
from blackbox_rs._demo.zoo import SmallCNN, accuracy, export_torchscript, train_classifier  # noqa: E402
from blackbox_rs.connectors import TorchScriptConnector  # noqa: E402
from blackbox_rs.fitting.config import FitConfig  # noqa: E402
from blackbox_rs.smoother import BlackBoxSmoother  # noqa: E402

METHODS = ["none", "denoise", "surrogate", "surrogate_nostop", "ceiling"]


def _log(msg: str) -> None:
    print(f"[fit-pays] {msg}", file=sys.stderr, flush=True)


def brittle_model(args: argparse.Namespace, xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor,
                  yte: torch.Tensor, cache: Path) -> tuple[Path, dict]:
    """A SmallCNN with a wide hidden layer trained long on clean images, no augmentation (cached TorchScript)."""
    settings = {"v": 1, "arch": "SmallCNN", "width": 16, "hidden": 256, "epochs": args.brittle_epochs,
                "batch_size": 128, "lr": 2e-3, "seed": 0, "noise": 0.0, "images": len(xtr)}
    out = cache / f"fmnist_brittle-{_tag(settings)}.pt"
    info_path = out.with_suffix(".json")
    if out.is_file() and info_path.is_file():
        return out, json.loads(info_path.read_text())
    t = time.perf_counter()
    model = SmallCNN(1, 10, SHAPE[1:], 16, hidden=256, seed=0)
    train_classifier(model, xtr, ytr, epochs=args.brittle_epochs, batch_size=128, lr=2e-3, noise_sigma=0.0, seed=0,
                     threads=args.threads)
    export_torchscript(model, out, SHAPE)
    info = {"settings": settings, "clean_accuracy": accuracy(model, xte, yte),
            "parameters": sum(p.numel() for p in model.parameters()), "train_seconds": round(time.perf_counter() - t, 1)}
    info_path.write_text(json.dumps(info, indent=1))
    return out, info


def fit_config(args: argparse.Namespace, stop: bool) -> FitConfig:
    """Fine-tuning the cached U-Net through the black box (no MSE pretraining: it is pretrained)."""
    settings = {"steps": args.steps, "pretrain_steps": 0, "lr": args.lr, "lr_schedule": "cosine", "batch_size": 64,
                "seed": 0, "weights": {"mse": 1.0, "stability": args.stability_weight},
                "clean_queries": args.clean_queries, "distill_queries": args.distill_queries,
                "redistill_every": args.redistill_every, "score_every": args.redistill_every,
                "score_images": args.score_images, "score_draws": 8}
    if not stop:
        settings.update(pilot=0.0, patience=0)
    return FitConfig(strategy="surrogate", **settings)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_certify_args(ap, images=200, n=1_000, sigmas=[1.0])
    ap.add_argument("--classifiers", nargs="+", default=["clean", "brittle"], choices=["clean", "brittle"])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--fit-images", type=int, default=60_000)
    ap.add_argument("--unet-steps", type=int, default=3000, help="the per-sigma U-Net's MSE steps (as diffusion_fashion_mnist)")
    ap.add_argument("--fit-budget", type=int, default=20_000)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--stability-weight", type=float, default=0.1)
    ap.add_argument("--clean-queries", type=int, default=2_000)
    ap.add_argument("--distill-queries", type=int, default=3_000)
    ap.add_argument("--redistill-every", type=int, default=100, help="also the steps between scoring rounds")
    ap.add_argument("--score-images", type=int, default=256)
    ap.add_argument("--brittle-epochs", type=int, default=15)
    add_run_args(ap)
    args = ap.parse_args()
    t_all = time.perf_counter()
    cache, models, paths, xtr, ytr, xte, yte = fmnist_setup(args)
    boxes = {"clean": (paths["clean"], {"clean_accuracy": models["models"]["clean"]["clean_accuracy"]})}
    if "brittle" in args.classifiers:
        x_all, y_all = load_fashion_mnist("test")
        boxes["brittle"] = brittle_model(args, xtr, ytr, x_all, y_all, cache)
        _log(f"brittle black box: {json.dumps(boxes['brittle'][1])}")
    results: dict[str, dict] = {}
    fits: dict[str, dict] = {}
    for name in args.classifiers:
        path = boxes[name][0]
        box = TorchScriptConnector(path, input_shape=SHAPE, num_classes=10, label_only=True, max_batch=args.batch_size)
        for sigma in args.sigmas:
            row: dict[str, dict] = {}
            for method in args.methods:
                engine = QueryEngine(box)
                if method == "none":
                    sm = BlackBoxSmoother(engine, module=None, sigma=sigma)
                elif method == "ceiling":
                    if name != "clean" or f"gauss_{sigma}" not in paths:
                        continue
                    white = TorchScriptConnector(paths[f"gauss_{sigma}"], input_shape=SHAPE, num_classes=10,
                                                 label_only=True, max_batch=args.batch_size)
                    sm = BlackBoxSmoother(white, module=None, sigma=sigma)
                else:
                    sm, info = unet_smoother(engine, sigma, args, xtr, ytr, cache)  # a fresh copy of the cached U-Net
                    if method != "denoise":
                        t = time.perf_counter()
                        rep = sm.fit((xtr, ytr), config=fit_config(args, stop=method == "surrogate"),
                                     budget=args.fit_budget, progress=None)
                        info = {"fit_queries": rep.queries, "stopped": rep.stopped, "queries_saved": rep.queries_saved,
                                "best_step": rep.best_step, "steps_done": rep.steps_done,
                                "pilot": None if rep.pilot is None else rep.pilot.model_dump(),
                                "scored": [h for h in rep.history if "robust_score" in h],
                                "fit_seconds": round(time.perf_counter() - t, 1)}
                    else:
                        info = {"fit_queries": 0, **info}
                    fits[f"{method}@{name}:{sigma}"] = info
                row[method] = certify_run(sm, xte, yte, sigma, args)
                _log(json.dumps({"classifier": name, "sigma": sigma, "method": method, **row[method],
                                 **{k: v for k, v in fits.get(f"{method}@{name}:{sigma}", {}).items() if k != "scored"}}))
            results[f"{name}:{sigma}"] = row
    out = {"benchmark": "fit_pays_fashion_mnist", "images": len(xte), "n0": args.n0, "n": args.n,
           "alpha": args.alpha, "radii": RADII, "settings": vars(args),
           "classifiers": {k: v[1] for k, v in boxes.items()}, "results": results, "fits": fits,
           "total_seconds": round(time.perf_counter() - t_all, 1)}
    emit(out, args.out)
    print_table(results, {"fit queries": lambda m, key: for_sigma(fits, m, key).get("fit_queries", 0),
                          "saved": lambda m, key: for_sigma(fits, m, key).get("queries_saved") or 0},
                label="method")


if __name__ == "__main__":
    main()
