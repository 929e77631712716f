"""Does the surrogate phase improve on the MSE-pretrained module? (Fashion-MNIST; prints JSON lines.)

The fit benchmark's surrogate fits keep the MSE-pretrained U-Net: their scoring rounds rate it above
every state their surrogate steps produce. This diagnostic pretrains the module once (the benchmark's
6,000 MSE steps, zero queries) and then runs surrogate-phase variants from that same state, each
with its own query engine and a 100,000-query budget, scoring every ``--score-every`` steps. Each
line gives a variant's scoring history: ``[step, robust_score, surrogate_fidelity]`` (step 0 is the
pretrained module; fidelity there is the undistilled surrogate's), the step the fit kept and its
queries.

    python benchmarks/surrogate_phase_fashion_mnist.py --sigma 0.5 '{}' '{"lr": 5e-5}'

Each variant is a JSON object of FitConfig fields applied on top of the fit benchmark's surrogate
settings (``fit_fashion_mnist.parser()`` defaults and ``fit_config``), with ``pretrain_steps`` 0,
``steps`` ``--phase-steps`` and ``score_every`` ``--score-every``.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fmnist_models import get_models  # noqa: E402
from fit_fashion_mnist import SHAPE, fit_config, parser  # noqa: E402

from blackbox_rs import QueryEngine  # noqa: E402
from blackbox_rs._demo.datasets import load_fashion_mnist  # noqa: E402
from blackbox_rs.connectors import TorchScriptConnector  # noqa: E402
from blackbox_rs.smoother import BlackBoxSmoother  # noqa: E402

DEFAULT_VARIANTS = ['{}', '{"surrogate_epochs": 10.0}', '{"lr": 5e-5}',
                    '{"lr": 5e-5, "surrogate_epochs": 10.0, "weights": {"mse": 1.0, "stability": 1.0}}']


def main() -> None:
    ap = parser()
    ap.description = __doc__
    ap.add_argument("variants", nargs="*", default=DEFAULT_VARIANTS, help="FitConfig overrides (JSON objects)")
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--phase-steps", type=int, default=1500)
    ap.add_argument("--score-every", type=int, default=250)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = get_models(args.cache_dir, threads=args.threads, log=lambda *a: None)
    black_box = TorchScriptConnector(Path(models["models"]["clean"]["path"]), input_shape=SHAPE, num_classes=10,
                                     label_only=True, max_batch=args.batch_size)
    xtr, ytr = load_fashion_mnist("train", limit=args.fit_images)

    t = time.perf_counter()
    pre = BlackBoxSmoother(black_box, module=json.loads(args.module), sigma=args.sigma)
    pre_cfg = fit_config(args, "denoise").model_copy(update={"steps": 0})
    pre.fit((xtr, ytr), config=pre_cfg)
    print(json.dumps({"pretrained": {"steps": pre_cfg.pretrain_steps, "seconds": round(time.perf_counter() - t)}}),
          flush=True)
    base = fit_config(args, "surrogate").model_copy(
        update={"pretrain_steps": 0, "steps": args.phase_steps, "score_every": args.score_every})
    lines = []
    for spec in args.variants:
        t = time.perf_counter()
        cfg = base.model_validate({**base.model_dump(), **json.loads(spec)})
        sm = BlackBoxSmoother(QueryEngine(black_box), module=copy.deepcopy(pre.module), sigma=args.sigma)
        rep = sm.fit((xtr, ytr), config=cfg, budget=args.fit_budget)
        scored = [[int(h["step"]), round(h["robust_score"], 3), round(h.get("surrogate_fidelity", -1.0), 3)]
                  for h in rep.history if "robust_score" in h]
        lines.append({"variant": json.loads(spec), "sigma": args.sigma, "scored": scored,
                      "best_step": rep.best_step, "fit_queries": rep.queries,
                      "seconds": round(time.perf_counter() - t)})
        print(json.dumps(lines[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(lines, indent=1))


if __name__ == "__main__":
    main()
