"""Fit input modules in front of an opaque Fashion-MNIST CNN and certify them (prints JSON + a table).

The black box is a SmallCNN trained on clean images only, exported to TorchScript and used only
through a *label-only* connector (every query through the QueryEngine, counted). For each sigma:

* ``none``          the bare black box, smoothed;
* ``denoise``       MSE denoiser (zero queries);
* ``surrogate``     MSE pretraining + stability through a surrogate kept faithful to the black box;
* ``zeroth_order``  MSE pretraining + LoRA tuned by zeroth-order estimates from black-box labels;
                    (both keep the state that query-paid scoring rounds rate best, the pretrained
                    one included: ``--score-images`` x ``--score-draws`` queries per round;
                    ``fits.*.scored`` in the JSON lists every round)
* ``multi_sigma``   one surrogate-fitted module for all sigmas (fitted once, certified at each; its MSE
                    pretraining has len(sigmas) times the steps, the compute of one module per sigma,
                    and the same query budget);
* ``ceiling``       the same CNN architecture trained with Gaussian augmentation at that sigma
                    (white-box retraining: what fitting a module tries to approach).

Certified accuracy at r = 0, 0.25, 0.5, 0.75, 1.0 on the first ``--images`` test images with Cohen's
CERTIFY (n0, n, alpha). Defaults follow the issue (500 images, n = 10,000, alpha = 0.001); on a
2-core CPU that is hours, so ``--n 1000`` (radius capped at 2.46 sigma) is the quick setting.

    sudo apt-get install dataset-fashion-mnist
    python benchmarks/fit_fashion_mnist.py [--images 500] [--n 10000] [--sigmas 0.25 0.5]
        [--methods none denoise surrogate zeroth_order multi_sigma ceiling] [--fit-budget 100000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import RADII, add_certify_args, certify_run, emit, for_sigma, print_table  # noqa: E402
from _fmnist_models import get_models  # noqa: E402

from blackbox_rs import QueryEngine  # noqa: E402
from blackbox_rs._demo.datasets import load_fashion_mnist  # noqa: E402
from blackbox_rs.connectors import TorchScriptConnector  # noqa: E402
from blackbox_rs.fitting.config import FitConfig  # noqa: E402
from blackbox_rs.smoother import BlackBoxSmoother  # noqa: E402

SHAPE = (1, 28, 28)


def fit_config(args: argparse.Namespace, strategy: str) -> FitConfig:
    common = {"pretrain_steps": args.pretrain_steps, "pretrain_lr": args.pretrain_lr, "batch_size": 64,
              "seed": 0, "clean_queries": 10_000, "lr_schedule": args.lr_schedule,
              "score_images": args.score_images, "score_draws": args.score_draws}
    if strategy != "denoise":  # the documented figures were measured without the early stop (patience 0)
        common["patience"] = args.patience
    if strategy == "denoise":  # the same number of MSE steps as pretraining + the surrogate's steps
        return FitConfig(strategy="denoise", steps=args.steps, lr=args.pretrain_lr, **common)
    if strategy in ("surrogate", "passthrough"):  # passthrough: the proxy's true-gradient bound
        own = ({"distill_queries": args.distill_queries, "redistill_every": args.redistill_every}
               if strategy == "surrogate" else {})  # settings of the surrogate strategy alone
        return FitConfig(strategy=strategy, steps=args.steps, score_every=args.redistill_every, lr=args.surrogate_lr,
                         weights={"mse": 1.0, "stability": args.stability_weight}, **own, **common)
    if strategy == "zeroth_order":
        return FitConfig(strategy="zeroth_order", steps=args.zo_steps, zo_batch=32, zo_directions=4,
                         zo_rank=2, lr=args.pretrain_lr, score_every=args.zo_score_every, **common)
    raise ValueError(strategy)


def parser() -> argparse.ArgumentParser:
    """The command line; its defaults are the benchmark's fitting settings (also used by fit_proxy)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_certify_args(ap, images=500, n=10_000, sigmas=[0.25, 0.5])
    ap.add_argument("--methods", nargs="+",
                    default=["none", "denoise", "surrogate", "zeroth_order", "multi_sigma", "ceiling"])
    ap.add_argument("--fit-budget", type=int, default=100_000)
    ap.add_argument("--patience", type=int, default=0,
                    help="scoring rounds without a gain before a query-paid fit stops (the library's default is 2; "
                         "0 here, so the documented figures reproduce)")
    ap.add_argument("--fit-images", type=int, default=60_000)
    ap.add_argument("--pretrain-steps", type=int, default=6000, help="MSE steps before each strategy")
    ap.add_argument("--pretrain-lr", type=float, default=2e-3)
    ap.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine")
    ap.add_argument("--steps", type=int, default=3000, help="surrogate steps (denoise: more MSE steps)")
    ap.add_argument("--surrogate-lr", type=float, default=2e-4)
    ap.add_argument("--stability-weight", type=float, default=0.1)
    ap.add_argument("--zo-steps", type=int, default=150)
    ap.add_argument("--distill-queries", type=int, default=10_000)
    ap.add_argument("--redistill-every", type=int, default=500, help="surrogate: also the steps between scorings")
    ap.add_argument("--score-images", type=int, default=384, help="images per scoring round (module selection)")
    ap.add_argument("--score-draws", type=int, default=8, help="noise draws per scoring image")
    ap.add_argument("--zo-score-every", type=int, default=50, help="zeroth_order steps between scoring rounds")
    ap.add_argument("--module", default='{"name": "unet", "widths": [16, 32, 32]}',
                    help="module of denoise / surrogate / multi_sigma (JSON spec)")
    ap.add_argument("--zo-module", default='{"name": "dncnn", "depth": 5, "width": 32, "downsample": 2}',
                    help="module of zeroth_order: a DnCNN, tuned as a rank-2 LoRA after MSE pretraining")
    ap.add_argument("--batch-size", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=None, help="where the base models are cached")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    return ap


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    module_spec = json.loads(args.module)
    zo_spec = json.loads(args.zo_module)

    models = get_models(args.cache_dir, threads=args.threads, log=lambda *a: None)
    paths = {k: Path(v["path"]) for k, v in models["models"].items()}
    xtr, ytr = load_fashion_mnist("train", limit=args.fit_images)
    xte, yte = load_fashion_mnist("test", limit=args.images)

    black_box = TorchScriptConnector(paths["clean"], input_shape=SHAPE, num_classes=10, label_only=True,
                                     max_batch=args.batch_size)
    results: dict[str, dict[str, dict[str, object]]] = {}
    fits: dict[str, dict[str, object]] = {}
    t_all = time.perf_counter()

    def fitted(strategy: str, sigmas: list[float]) -> BlackBoxSmoother:
        engine = QueryEngine(black_box)
        sm = BlackBoxSmoother(engine, module=zo_spec if strategy == "zeroth_order" else module_spec, sigmas=sigmas)
        t = time.perf_counter()
        cfg = fit_config(args, strategy)
        if len(sigmas) > 1:  # the MSE compute of one module per sigma (zero queries); same query budget
            cfg = cfg.model_copy(update={"pretrain_steps": cfg.pretrain_steps * len(sigmas)})
        rep = sm.fit((xtr, ytr), config=cfg, budget=args.fit_budget)
        name = strategy if len(sigmas) == 1 else "multi_sigma"
        fits[f"{name}@{','.join(map(str, sigmas))}"] = {
            "fit_queries": rep.queries, "engine_queries": engine.stats.queries, "stopped": rep.stopped,
            "trainable_parameters": rep.trainable_parameters, "fit_seconds": round(time.perf_counter() - t, 1),
            "best_score": rep.best_score, "best_step": rep.best_step, "pretrain_steps": cfg.pretrain_steps,
            "scored": [h for h in rep.history if "robust_score" in h]}
        return sm

    multi = fitted("surrogate", list(args.sigmas)) if "multi_sigma" in args.methods else None
    for sigma in args.sigmas:
        row: dict[str, dict[str, object]] = {}
        for method in args.methods:
            if method == "none":
                sm = BlackBoxSmoother(black_box, module=None, sigma=sigma)
            elif method == "ceiling":
                key = f"gauss_{sigma}"
                if key not in paths:
                    continue
                white = TorchScriptConnector(paths[key], input_shape=SHAPE, num_classes=10, label_only=True,
                                             max_batch=args.batch_size)
                sm = BlackBoxSmoother(white, module=None, sigma=sigma)
            elif method == "multi_sigma":
                assert multi is not None
                sm = multi
            else:
                sm = fitted(method, [sigma])
            row[method] = certify_run(sm, xte, yte, sigma, args)
            print(json.dumps({"sigma": sigma, "method": method, **row[method]}), file=sys.stderr, flush=True)
        results[str(sigma)] = row

    out = {"benchmark": "fit_fashion_mnist", "images": len(xte), "n0": args.n0, "n": args.n, "alpha": args.alpha,
           "radii": RADII, "fit_budget": args.fit_budget, "module": module_spec, "zo_module": zo_spec, "results": results, "fits": fits,
           "base_models": {k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in models["models"].items()},
           "total_seconds": round(time.perf_counter() - t_all, 1)}
    emit(out, args.out)
    print_table(results, {"fit queries": lambda m, sg: for_sigma(fits, m, sg).get("fit_queries", 0)})


if __name__ == "__main__":
    main()
