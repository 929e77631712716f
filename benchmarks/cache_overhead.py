"""Certify throughput with the query cache on vs off, on a local TorchScript model (prints JSON).

Target (issue 3): cache-on throughput >= 0.85 of cache-off. Runs alternate on/off several times in
one process and report the median ratio, so machine noise affects both sides alike. Throughput is
given both per wall-clock second and per CPU second of this process (``time.process_time``, all
threads): on a shared machine the CPU-time ratio is the stable one.

    python benchmarks/cache_overhead.py [--n 2000] [--inputs 4] [--reps 3] [--width 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from blackbox_rs.connectors import TorchScriptConnector
from blackbox_rs.core import certify
from blackbox_rs.engine import QueryEngine


def build_model(path: Path, width: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(4 * width, 10),
    ).eval()
    torch.jit.save(torch.jit.trace(model, torch.rand(2, 3, 32, 32)), str(path))


def run(conn: TorchScriptConnector, xs: torch.Tensor, n: int, batch: int, cache_dir: Path | None) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second)."""
    engine = QueryEngine(conn, cache=cache_dir)
    t, c = time.perf_counter(), time.process_time()
    for i, x in enumerate(xs):
        certify(engine, x, sigma=0.25, n0=100, n=n, alpha=0.001, batch_size=batch, seed=i)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    engine.close()
    samples = len(xs) * (n + 100)
    return samples / dt, samples / dc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--inputs", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        build_model(tmp_path / "m.pt", args.width)
        conn = TorchScriptConnector(tmp_path / "m.pt", input_shape=(3, 32, 32), num_classes=10,
                                    max_batch=args.batch_size)
        xs = torch.rand(args.inputs, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        run(conn, xs[:1], 500, args.batch_size, None)  # warm-up
        on, off, ratios, cpu_ratios, hit = [], [], [], [], []
        for r in range(args.reps):
            off.append(run(conn, xs, args.n, args.batch_size, None))
            cache = tmp_path / f"cache{r}"
            on.append(run(conn, xs, args.n, args.batch_size, cache))
            hit.append(run(conn, xs, args.n, args.batch_size, cache))
            ratios.append(on[-1][0] / off[-1][0])
            cpu_ratios.append(on[-1][1] / off[-1][1])
    print(json.dumps({
        "benchmark": "cache_overhead",
        "n": args.n, "n0": 100, "inputs": args.inputs, "batch_size": args.batch_size, "reps": args.reps,
        "samples_per_wall_s_cache_off": round(statistics.median(o[0] for o in off), 1),
        "samples_per_wall_s_cache_on_cold": round(statistics.median(o[0] for o in on), 1),
        "samples_per_wall_s_cache_on_all_hits": round(statistics.median(o[0] for o in hit), 1),
        "ratio_on_over_off_wall_median": round(statistics.median(ratios), 3),
        "ratio_on_over_off_cpu_median": round(statistics.median(cpu_ratios), 3),
        "wall_ratios": [round(r, 3) for r in ratios],
        "cpu_ratios": [round(r, 3) for r in cpu_ratios],
        "target": ">= 0.85",
    }, indent=2))


if __name__ == "__main__":
    main()
