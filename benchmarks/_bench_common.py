"""What the Fashion-MNIST certification benchmarks share: their certification flags, one certify call,
the JSON output, and the markdown table (run from ``benchmarks/`` or with it on ``sys.path``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RADII = [0.0, 0.25, 0.5, 0.75, 1.0]


def add_certify_args(ap: argparse.ArgumentParser, *, images: int, n: int, sigmas: Sequence[float]) -> None:
    """``--images --n0 --n --alpha --sigmas`` with this benchmark's defaults."""
    ap.add_argument("--images", type=int, default=images)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--n", type=int, default=n)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--sigmas", type=float, nargs="+", default=list(sigmas))


def add_run_args(ap: argparse.ArgumentParser, *, device: bool = False) -> None:
    """``--batch-size --threads [--device] --cache-dir --out``: how a Fashion-MNIST benchmark runs."""
    ap.add_argument("--batch-size", type=int, default=500, help="certification batch")
    ap.add_argument("--threads", type=int, default=2)
    if device:
        ap.add_argument("--device", default="cpu", help="where the black box, the DDPM's training and every denoiser run")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=None, help="also write the JSON here")


def fmnist_setup(args: argparse.Namespace) -> tuple[Path, dict[str, Any], dict[str, Path], Any, Any, Any, Any]:
    """Threads set, the cache folder made, the cached base models (built if missing) and the data:
    ``(cache, manifest, paths by model name, x_train, y_train, x_test, y_test)`` (``--fit-images`` training
    images, the first ``--images`` test images)."""
    import torch
    from _fmnist_models import default_cache_dir, get_models

    from blackbox_rs._demo.datasets import load_fashion_mnist

    torch.set_num_threads(args.threads)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    models = get_models(cache, threads=args.threads, log=lambda *a: None)
    paths = {k: Path(v["path"]) for k, v in models["models"].items()}
    xtr, ytr = load_fashion_mnist("train", limit=args.fit_images)
    xte, yte = load_fashion_mnist("test", limit=args.images)
    return cache, models, paths, xtr, ytr, xte, yte


def certify_run(smoother: Any, x: Any, y: Any, sigma: float, args: argparse.Namespace) -> dict[str, Any]:
    """Cohen's CERTIFY on every input (seed 0), certified accuracy at :data:`RADII`, queries and time."""
    t = time.perf_counter()
    res = smoother.certify_dataset(x, y.tolist(), n0=args.n0, n=args.n, alpha=args.alpha, sigma=sigma, seed=0,
                                   batch_size=args.batch_size, radii=RADII, progress=None)
    return {"certified_accuracy": res.certified_accuracy, "certify_queries": res.queries,
            "certify_seconds": round(time.perf_counter() - t, 1)}


def emit(out: dict[str, Any], path: str | None) -> None:
    """Print the result JSON (stdout) and also write it to ``path`` when given."""
    text = json.dumps(out, indent=1)
    print(text)
    if path:
        Path(path).write_text(text)


def print_table(results: dict[str, dict[str, dict[str, Any]]], extra: dict[str, Callable[[str, str], Any]],
                label: str = "method") -> None:
    """A markdown table on stderr: one line per (sigma, row) with the certified accuracy at each radius
    and one column per ``extra`` entry (``name -> f(row, sigma)``)."""
    print(f"\n| sigma | {label} | " + " | ".join(f"r={r:g}" for r in RADII) + "".join(f" | {k}" for k in extra)
          + " |", file=sys.stderr)
    print("|---|---|" + "---|" * (len(RADII) + len(extra)), file=sys.stderr)
    for sigma, row in results.items():
        for name, r in row.items():
            acc = r["certified_accuracy"]
            cells = [f"{acc[f'{x:g}']:.3f}" for x in RADII] + [str(f(name, sigma)) for f in extra.values()]
            print(f"| {sigma} | {name} | " + " | ".join(cells) + " |", file=sys.stderr)


def for_sigma(table: dict[str, dict[str, Any]], name: str, sigma: str) -> dict[str, Any]:
    """The entry ``"<name>@<sigma>[,<sigma>...]"`` of ``table`` that covers ``sigma`` (``{}`` if none)."""
    return next((v for k, v in table.items() if k.split("@")[0] == name and sigma in k.split("@")[1].split(",")), {})
