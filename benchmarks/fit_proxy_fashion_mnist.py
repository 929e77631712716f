"""A fast white-box diagnostic for fitting on Fashion-MNIST (prints JSON lines): no certificate.

For the ceiling (the CNN trained with clipped Gaussian augmentation) and for modules fitted with given
FitConfig variants in front of the clean CNN (label-only connector, budget 100,000 queries), it draws
``--draws`` noise samples for each of the first ``--images`` test images, feeds ``clip(A(x + delta))``
to the model (``clip(x + delta)`` for the ceiling) and reports the mean probability of the *true* class
and the share of images whose probability reaches 0.74 / 0.875 / 0.95. It uses white-box access to the
black box for evaluation only; the fits themselves go through the query engine as in
``fit_fashion_mnist.py``.

Thresholds: Cohen's certificate at radius r needs the Clopper-Pearson lower bound of p above
Phi(r / sigma); with n = 1,000 and alpha = 0.001 that is p_hat >= about 0.74 for r = sigma / 2 and
0.875 for r = sigma. This proxy is ~4x cheaper than certifying and has no selection noise, so it ranks
fitting variants quickly; the benchmark's table is what is reported.

    python benchmarks/fit_proxy_fashion_mnist.py --sigma 0.5 \\
        '{"strategy": "denoise", "steps": 3000, "lr": 0.002}' '{}' '{"clean_queries": 30000}'

Each variant is a JSON object of FitConfig fields applied on top of the fit benchmark's own settings
for its strategy (``fit_fashion_mnist.parser()`` defaults and ``fit_config``; ``{}`` is its surrogate
fit, ``{"strategy": "denoise"}`` its denoiser); ``"module"`` overrides the module spec. Every forward
of a base model goes through a QueryEngine; the evaluation queries are reported apart from the fit's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fmnist_models import get_models  # noqa: E402
from fit_fashion_mnist import SHAPE, fit_config, parser  # noqa: E402

from blackbox_rs import QueryEngine  # noqa: E402
from blackbox_rs._demo.datasets import load_fashion_mnist  # noqa: E402
from blackbox_rs.connectors import TorchScriptConnector  # noqa: E402
from blackbox_rs.fitting.config import FitConfig  # noqa: E402
from blackbox_rs.smoother import BlackBoxSmoother  # noqa: E402

THRESHOLDS = (0.74, 0.875, 0.95)


def true_class_probability(labels: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                           sigma: float, draws: int, chunk: int = 20) -> torch.Tensor:
    """Per image, the share of ``draws`` noisy copies ``x + delta`` (seeded) that ``labels`` assigns to
    the true class."""
    g = torch.Generator().manual_seed(7)
    hits = torch.zeros(len(y))
    with torch.inference_mode():
        for start in range(0, draws, chunk):
            m = min(chunk, draws - start)
            z = x.repeat(m, 1, 1, 1) + sigma * torch.randn((m * len(y), *x.shape[1:]), generator=g)
            hits += (labels(z).view(m, -1) == y[None]).float().sum(0)
    return hits / draws


def summary(p: torch.Tensor) -> dict[str, float]:
    return {"mean_p": round(float(p.mean()), 4),
            **{f"share_p>={t:g}": round(float((p >= t).float().mean()), 4) for t in THRESHOLDS}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", help="JSON FitConfig overrides, one fit each")
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fit-budget", type=int, default=None,
                    help="fit query budget (default: the fit benchmark's; 0: none, e.g. a long passthrough fit)")
    args = ap.parse_args()
    bench = parser().parse_args([])  # the fit benchmark's settings
    torch.set_num_threads(args.threads)
    models = get_models(None, threads=args.threads, log=None)["models"]
    xte, yte = load_fashion_mnist("test", limit=args.images)

    def engine(name: str) -> QueryEngine:
        return QueryEngine(TorchScriptConnector(models[name]["path"], input_shape=SHAPE, num_classes=10,
                                                label_only=True, max_batch=4000))

    if f"gauss_{args.sigma}" in models:
        ceiling = engine(f"gauss_{args.sigma}")
        p = true_class_probability(lambda z: ceiling.query(z.clamp(0, 1)).labels, xte, yte, args.sigma, args.draws)
        print(json.dumps({"sigma": args.sigma, "variant": "ceiling", **summary(p),
                          "eval_queries": ceiling.stats.queries}), flush=True)
    if not args.variants:
        return
    xtr, ytr = load_fashion_mnist("train", limit=bench.fit_images)
    for spec in args.variants:
        over = json.loads(spec)
        default = bench.zo_module if over.get("strategy") == "zeroth_order" else bench.module
        module = over.pop("module", json.loads(default))
        base = fit_config(bench, over.get("strategy", "surrogate")).model_dump()
        cfg = FitConfig(**{**base, **over})
        black_box = engine("clean")
        t = time.perf_counter()
        sm = BlackBoxSmoother(black_box, module=module, sigmas=[args.sigma])
        budget = bench.fit_budget if args.fit_budget is None else (args.fit_budget or None)
        rep = sm.fit((xtr, ytr), config=cfg, budget=budget)
        fit_queries = black_box.stats.queries
        mod = sm.module.eval()
        p = true_class_probability(lambda z, mod=mod, bb=black_box: bb.query(mod(z).clamp(0, 1)).labels,
                                   xte, yte, args.sigma, args.draws)
        print(json.dumps({"sigma": args.sigma, "variant": spec, **summary(p), "fit_queries": rep.queries,
                          "engine_fit_queries": fit_queries, "eval_queries": black_box.stats.queries - fit_queries,
                          "best_step": rep.best_step, "seconds": round(time.perf_counter() - t, 1)}), flush=True)


if __name__ == "__main__":
    main()
