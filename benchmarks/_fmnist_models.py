"""Cached Fashion-MNIST base models for the benchmarks and the demo.

Builds (once; later calls reuse the cache) three :class:`blackbox_rs.surrogates.SmallCNN` classifiers on the
real Fashion-MNIST training set, exported as TorchScript files:

* ``clean``      -- trained on clean images: the opaque base model to be certified;
* ``gauss_0.25`` -- trained with Gaussian noise augmentation at sigma = 0.25;
* ``gauss_0.5``  -- the same at sigma = 0.5;
* ``gauss_1.0``  -- the same at sigma = 1.0 (these three are the white-box ceiling).

Next to the files, ``fmnist_models.json`` records the build config, each file's SHA-256, its clean
test accuracy (and its accuracy under one draw of its training noise), training time and thread count,
and the throughput of the exported file. A cached model is reused only when its config matches and
its file's SHA-256 still matches the manifest; anything else is rebuilt.

Use from another benchmark script (run from ``benchmarks/`` or with it on ``sys.path``)::

    from _fmnist_models import get_models
    models = get_models()                      # default cache: ~/.cache/blackbox-rs/bench
    path = models["models"]["clean"]["path"]   # TorchScript, input 1x28x28 in [0, 1], logits out

From the command line (prints the manifest as JSON; progress goes to stderr)::

    python benchmarks/_fmnist_models.py [--cache-dir DIR] [--threads 2] [--rebuild]

Needs the Debian package ``dataset-fashion-mnist`` (``sudo apt-get install dataset-fashion-mnist``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from blackbox_rs._demo.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    find_fashion_mnist,
    load_fashion_mnist,
)
from blackbox_rs._demo.zoo import SmallCNN, accuracy, export_torchscript, train_classifier
from blackbox_rs.connectors.torchscript import file_sha256

__all__ = ["CACHE_ENV", "CONFIG", "MODELS", "default_cache_dir", "get_models", "measure_throughput"]

MANIFEST_VERSION = 1
MANIFEST_NAME = "fmnist_models.json"
CACHE_ENV = "BLACKBOX_RS_BENCH_CACHE"
INPUT_SHAPE = (1, 28, 28)

#: Everything that determines the trained weights. Changing any of it invalidates the cache.
CONFIG: dict[str, Any] = {
    "arch": "SmallCNN",
    "width": 16,
    "hidden": 0,
    "epochs": 5,
    "batch_size": 128,
    "lr": 2e-3,
    "schedule": "cosine",
    "seed": 0,
    "clip_noisy": True,  # the SDK certifies f(clip(x + delta)): train on that distribution
}

#: model name -> Gaussian augmentation sigma (0: clean training).
MODELS: dict[str, float] = {"clean": 0.0, "gauss_0.25": 0.25, "gauss_0.5": 0.5, "gauss_1.0": 1.0}


def default_cache_dir() -> Path:
    """``$BLACKBOX_RS_BENCH_CACHE`` if set, else ``~/.cache/blackbox-rs/bench``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "blackbox-rs" / "bench"


def _log(msg: str) -> None:
    print(f"[fmnist-models] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """Exclusive lock on the cache directory, so concurrent benchmark scripts build only once."""
    with open(cache_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _load_module(path: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    return module.eval()


def measure_throughput(
    path: str | os.PathLike[str], *, batch: int = 1000, threads: int = 2, repeats: int = 10, rounds: int = 5
) -> float:
    """Images per second of the exported model file: forward passes at ``batch`` on ``threads`` torch
    threads under ``torch.inference_mode``, best of ``rounds`` rounds of ``repeats`` batches (after
    3 warm-up batches). Best-of reduces the effect of other processes sharing the CPU."""
    module = _load_module(Path(path))
    x = torch.rand((batch, *INPUT_SHAPE), generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        best = 0.0
        with torch.inference_mode():
            for _ in range(3):
                module(x)
            for _ in range(rounds):
                t0 = time.perf_counter()
                for _ in range(repeats):
                    module(x)
                best = max(best, repeats * batch / (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(before)
    return best


def _dataset_info(data_root: str | os.PathLike[str] | None) -> dict[str, Any]:
    directory = find_fashion_mnist(data_root, "train")
    find_fashion_mnist(directory, "test")
    files = {}
    for split in ("train", "test"):
        for stem in FASHION_MNIST_FILES[split][:2]:
            p = directory / f"{stem}.gz"
            if not p.is_file():
                p = directory / stem
            files[p.name] = file_sha256(p)
    return {"name": "fashion-mnist", "dir": str(directory), "sha256": files}


def _entry_valid(entry: Any, cache_dir: Path, name: str) -> bool:
    if not isinstance(entry, dict):
        return False
    path = cache_dir / f"fmnist_{name}.pt"
    return path.is_file() and entry.get("sha256") == file_sha256(path)


def get_models(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    rebuild: bool = False,
    threads: int = 2,
    data_root: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = _log,
) -> dict[str, Any]:
    """The manifest of the cached Fashion-MNIST models, building whatever is missing or stale.

    Args:
        cache_dir: where the ``.pt`` files and ``fmnist_models.json`` live (default
            :func:`default_cache_dir`); created if needed.
        rebuild: retrain every model even if the cache is valid.
        threads: torch threads for training and for the throughput measurement.
        data_root: Fashion-MNIST directory (default: the Debian package location).
        log: progress messages (default: stderr); ``None`` for silence.

    Returns:
        ``{"manifest_version", "config", "input_shape", "class_names", "dataset", "torch_version",
        "models": {name: {"path", "sha256", "noise_sigma", "clean_accuracy", "noisy_accuracy",
        "train_seconds", "train_threads", "final_train_loss", "images_per_s", "images_per_s_1_thread"}}, "throughput": {...}}``.
        ``path`` is absolute; the file takes ``1 x 28 x 28`` float32 images in ``[0, 1]`` and returns
        10 logits.

    Raises:
        blackbox_rs.errors.DatasetNotFoundError: a model must be built and Fashion-MNIST is missing.
    """
    say = log if log is not None else (lambda _msg: None)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    manifest_path = cache / MANIFEST_NAME
    with _locked(cache):
        old: dict[str, Any] = {}
        if manifest_path.is_file() and not rebuild:
            try:
                old = json.loads(manifest_path.read_text())
            except (OSError, ValueError):
                old = {}
        same_config = old.get("manifest_version") == MANIFEST_VERSION and old.get("config") == CONFIG
        old_models = old.get("models", {}) if same_config else {}
        todo = [n for n in MODELS if not _entry_valid(old_models.get(n), cache, n)]
        if not todo:
            say(f"cache valid: {manifest_path}")
            for name in MODELS:  # the cache directory may have been moved or copied
                old["models"][name]["path"] = str((cache / f"fmnist_{name}.pt").resolve())
            return old

        say(f"building {', '.join(todo)} in {cache} ({threads} threads)")
        dataset = _dataset_info(data_root)
        x_train, y_train = load_fashion_mnist("train", root=dataset["dir"])
        x_test, y_test = load_fashion_mnist("test", root=dataset["dir"])
        models: dict[str, Any] = {n: old_models[n] for n in MODELS if n not in todo}
        for name in todo:
            sigma = MODELS[name]
            model = SmallCNN(
                INPUT_SHAPE[0],
                len(FASHION_MNIST_CLASSES),
                INPUT_SHAPE[1:],
                CONFIG["width"],
                hidden=CONFIG["hidden"],
                seed=CONFIG["seed"],
            )
            losses: list[float] = []

            def _progress(s: Any, name: str = name, losses: list[float] = losses) -> None:
                losses.append(s.loss)
                say(
                    f"{name}: epoch {s.epoch}/{s.epochs} loss {s.loss:.4f} "
                    f"train acc {s.train_accuracy:.4f} ({s.seconds:.1f} s)"
                )

            t0 = time.perf_counter()
            train_classifier(
                model,
                x_train,
                y_train,
                epochs=CONFIG["epochs"],
                batch_size=CONFIG["batch_size"],
                lr=CONFIG["lr"],
                noise_sigma=sigma,
                clip_noisy=CONFIG["clip_noisy"],
                seed=CONFIG["seed"],
                threads=threads,
                progress=_progress,
            )
            train_seconds = time.perf_counter() - t0
            path = export_torchscript(model, cache / f"fmnist_{name}.pt", INPUT_SHAPE)
            exported = _load_module(path)  # accuracies are those of the file, not of the Python model
            clean_acc = accuracy(exported, x_test, y_test, threads=threads)
            noisy_acc = (
                accuracy(exported, x_test, y_test, noise_sigma=sigma, seed=1, threads=threads)
                if sigma > 0
                else None
            )
            models[name] = {
                "path": str(path.resolve()),
                "sha256": file_sha256(path),
                "noise_sigma": sigma,
                "clean_accuracy": round(clean_acc, 4),
                "noisy_accuracy": None if noisy_acc is None else round(noisy_acc, 4),
                "train_seconds": round(train_seconds, 1),
                "train_threads": threads,
                "final_train_loss": round(losses[-1], 4) if losses else None,
                "images_per_s": round(measure_throughput(path, threads=threads)),
                "images_per_s_1_thread": round(measure_throughput(path, threads=1)),
            }
            say(
                f"{name}: clean test accuracy {clean_acc:.4f}"
                + ("" if noisy_acc is None else f", under sigma={sigma} noise {noisy_acc:.4f}")
                + f", trained in {train_seconds:.1f} s, {models[name]['images_per_s']} images/s"
            )

        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "config": CONFIG,
            "input_shape": list(INPUT_SHAPE),
            "class_names": list(FASHION_MNIST_CLASSES),
            "dataset": dataset,
            "torch_version": torch.__version__,
            "models": {n: models[n] for n in MODELS},
            "throughput": {
                "batch": 1000,
                "threads": threads,
                "note": "best of 5 rounds of 10 forward passes of the TorchScript file; shared CPU",
            },
        }
        tmp = manifest_path.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, manifest_path)
        return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", default=None, help=f"default: ${CACHE_ENV} or ~/.cache/blackbox-rs/bench")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (training and throughput)")
    ap.add_argument("--data-root", default=None, help="Fashion-MNIST directory (default: Debian location)")
    ap.add_argument("--rebuild", action="store_true", help="retrain even if the cache is valid")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = ap.parse_args(argv)
    manifest = get_models(
        args.cache_dir,
        rebuild=args.rebuild,
        threads=args.threads,
        data_root=args.data_root,
        log=None if args.quiet else _log,
    )
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
