"""Offline image datasets for the demo, the benchmarks and the tests (private): nothing is ever downloaded.

Both loaders return ``(x, y)``: ``x`` a float32 tensor ``N x C x H x W`` with values in ``[0, 1]``
(the input contract of every connector) and ``y`` an int64 tensor of ``N`` labels.

* :func:`load_digits` -- scikit-learn's bundled 1,797 real 8x8 handwritten digits (10 classes), with a
  deterministic stratified train/test split. scikit-learn is needed (a dev dependency of the SDK).
* :func:`load_fashion_mnist` -- the real Fashion-MNIST (60,000 train + 10,000 test, 28x28, 10 classes)
  read from the four standard IDX ``.gz`` files that the Debian package ``dataset-fashion-mnist``
  installs in ``/usr/share/datasets/fashion-mnist`` (``sudo apt-get install dataset-fashion-mnist``).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from blackbox_rs.errors import DatasetCorruptedError, DatasetNotFoundError, InvalidParameterError

__all__ = [
    "DIGITS_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DEFAULT_DIRS",
    "FASHION_MNIST_ENV",
    "FASHION_MNIST_FILES",
    "find_fashion_mnist",
    "load_digits",
    "load_fashion_mnist",
]

DIGITS_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: Environment variable naming a directory holding the four Fashion-MNIST IDX files.
FASHION_MNIST_ENV = "BLACKBOX_RS_FASHION_MNIST"

#: Directories searched (in order) when neither ``root`` nor the environment variable is given.
#: The first is where Debian's ``dataset-fashion-mnist`` package installs the files.
FASHION_MNIST_DEFAULT_DIRS: tuple[Path, ...] = (
    Path("/usr/share/datasets/fashion-mnist"),
    Path("/usr/local/share/datasets/fashion-mnist"),
    Path("/usr/share/dataset-fashion-mnist"),
    Path("/usr/share/fashion-mnist"),
)

#: split -> (images file, labels file, number of examples). ``.gz`` is optional on disk.
FASHION_MNIST_FILES: dict[str, tuple[str, str, int]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}

_INSTALL_HINT = "sudo apt-get install dataset-fashion-mnist"
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
_FMNIST_HW = (28, 28)


# --------------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------------


def load_digits(
    split: str = "train", *, seed: int = 0, test_fraction: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled handwritten digits as ``(x, y)``: ``x`` is ``N x 1 x 8 x 8`` in ``[0, 1]``.

    The raw pixel values 0..16 are divided by 16. The split is stratified and deterministic: within
    each class, ``round(test_fraction * n_class)`` examples chosen by a permutation from
    ``numpy.random.default_rng(seed)`` go to ``"test"``, the rest to ``"train"``; both keep the
    original order of the data set. ``split="all"`` returns all 1,797 images in the original order.
    The same ``(seed, test_fraction)`` always gives the same disjoint split.

    Raises:
        InvalidParameterError: unknown split, or ``test_fraction`` outside ``(0, 1)``.
        DatasetNotFoundError: scikit-learn is not installed (``pip install scikit-learn``).
    """
    if split not in ("train", "test", "all"):
        raise InvalidParameterError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise InvalidParameterError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:
        raise DatasetNotFoundError(
            "load_digits needs scikit-learn, which bundles the digits data set: "
            "pip install scikit-learn (or pip install -e .[dev])"
        ) from exc

    bunch = _sk_load_digits()
    data = np.asarray(bunch.data, dtype=np.float32)
    labels = np.asarray(bunch.target, dtype=np.int64)
    if split == "all":
        idx = np.arange(labels.shape[0])
    else:
        rng = np.random.default_rng(int(seed))
        test_parts = []
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            k = int(round(float(test_fraction) * members.size))
            test_parts.append(rng.permutation(members)[:k])
        is_test = np.zeros(labels.shape[0], dtype=bool)
        is_test[np.concatenate(test_parts)] = True
        idx = np.flatnonzero(is_test if split == "test" else ~is_test)
    x = torch.from_numpy(data[idx] / 16.0).reshape(-1, 1, 8, 8).clamp_(0.0, 1.0).contiguous()
    y = torch.from_numpy(labels[idx]).contiguous()
    return x, y


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)
# --------------------------------------------------------------------------------------------------


def _resolve(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        p = directory / name
        if p.is_file():
            return p
    return None


def _has_split(directory: Path, split: str) -> bool:
    images, labels, _ = FASHION_MNIST_FILES[split]
    return _resolve(directory, images) is not None and _resolve(directory, labels) is not None


def find_fashion_mnist(root: str | os.PathLike[str] | None = None, split: str = "train") -> Path:
    """The directory holding the Fashion-MNIST IDX files of ``split``.

    Looks in ``root`` if given (and nowhere else), else in ``$BLACKBOX_RS_FASHION_MNIST`` if set (and
    nowhere else), else in :data:`FASHION_MNIST_DEFAULT_DIRS`. Files may be gzipped (``*.gz``, as
    distributed) or not.

    Raises:
        DatasetNotFoundError: the files are in none of those places; the message lists them and says
            ``sudo apt-get install dataset-fashion-mnist``.
    """
    if split not in FASHION_MNIST_FILES:
        raise InvalidParameterError(f"split must be 'train' or 'test', got {split!r}")
    env = os.environ.get(FASHION_MNIST_ENV)
    if root is not None:
        candidates: Sequence[Path] = (Path(root).expanduser(),)
        origin = "root argument"
    elif env:
        candidates = (Path(env).expanduser(),)
        origin = f"${FASHION_MNIST_ENV}"
    else:
        candidates = FASHION_MNIST_DEFAULT_DIRS
        origin = "default locations"
    for directory in candidates:
        if _has_split(directory, split):
            return directory
    images, labels, _ = FASHION_MNIST_FILES[split]
    searched = ", ".join(str(d) for d in candidates)
    raise DatasetNotFoundError(
        f"Fashion-MNIST {split} files ({images}.gz, {labels}.gz) not found in {origin}: {searched}. "
        f"Install them with `{_INSTALL_HINT}` (Debian/Ubuntu; files go to "
        f"{FASHION_MNIST_DEFAULT_DIRS[0]}), or point ${FASHION_MNIST_ENV} or root= at a directory "
        "holding the four IDX files."
    )


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115


def _read_idx(path: Path, magic: int, dims: int, count: int | None) -> tuple[tuple[int, ...], bytes]:
    """Read an unsigned-byte IDX file: returns its dimensions and the payload of the first ``count``
    items (all items when ``count`` is None, then also checking that nothing follows them)."""
    try:
        with _open(path) as f:
            header = f.read(4 + 4 * dims)
            if len(header) != 4 + 4 * dims:
                raise DatasetCorruptedError(f"{path}: truncated IDX header ({len(header)} bytes)")
            got_magic = struct.unpack(">I", header[:4])[0]
            if got_magic != magic:
                raise DatasetCorruptedError(
                    f"{path}: bad IDX magic number 0x{got_magic:08x}, expected 0x{magic:08x}"
                )
            shape = struct.unpack(f">{dims}I", header[4:])
            item = 1
            for d in shape[1:]:
                item *= d
            n = shape[0] if count is None else min(count, shape[0])
            want = n * item
            payload = f.read(want)
            if len(payload) != want:
                raise DatasetCorruptedError(
                    f"{path}: truncated payload: {len(payload)} bytes, header {shape} needs {want}"
                )
            if count is None and f.read(1):
                raise DatasetCorruptedError(f"{path}: data after the {shape[0]} items its header declares")
    except DatasetCorruptedError:
        raise
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DatasetCorruptedError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from exc
    return (n, *shape[1:]), payload


def load_fashion_mnist(
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as ``(x, y)``: ``x`` is ``N x 1 x 28 x 28`` float32 in ``[0, 1]`` (bytes / 255).

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        root: directory with the IDX files; default: ``$BLACKBOX_RS_FASHION_MNIST``, else the Debian
            package location ``/usr/share/datasets/fashion-mnist`` (see :func:`find_fashion_mnist`).
        limit: return only the first ``limit`` examples (in file order; all if ``limit`` exceeds the
            split). Only those bytes are decompressed, so the trailing-data and gzip CRC checks of a
            full read are skipped.

    Raises:
        DatasetNotFoundError: files not found (message: ``sudo apt-get install dataset-fashion-mnist``).
        DatasetCorruptedError: bad magic number, image size other than 28x28, truncated or oversized
            payload, bad gzip stream, label outside 0..9, or image/label counts that disagree.
        InvalidParameterError: unknown split or negative ``limit``.
    """
    if split not in FASHION_MNIST_FILES:
        raise InvalidParameterError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and (isinstance(limit, bool) or int(limit) < 0):
        raise InvalidParameterError(f"limit must be a non-negative integer or None, got {limit!r}")
    directory = find_fashion_mnist(root, split)
    images_stem, labels_stem, _expected = FASHION_MNIST_FILES[split]
    images_path = _resolve(directory, images_stem)
    labels_path = _resolve(directory, labels_stem)
    assert images_path is not None and labels_path is not None  # guaranteed by find_fashion_mnist
    count = None if limit is None else int(limit)

    img_shape, img_bytes = _read_idx(images_path, _IDX_IMAGES_MAGIC, 3, count)
    if tuple(img_shape[1:]) != _FMNIST_HW:
        raise DatasetCorruptedError(f"{images_path}: images are {img_shape[1:]}, expected {_FMNIST_HW}")
    lab_shape, lab_bytes = _read_idx(labels_path, _IDX_LABELS_MAGIC, 1, count)
    if lab_shape[0] != img_shape[0]:
        raise DatasetCorruptedError(
            f"{images_path.name} holds {img_shape[0]} images but {labels_path.name} {lab_shape[0]} labels"
        )
    labels = np.frombuffer(lab_bytes, dtype=np.uint8).astype(np.int64)
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DatasetCorruptedError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    pixels = np.frombuffer(img_bytes, dtype=np.uint8).reshape(img_shape[0], 1, *_FMNIST_HW)
    x = torch.from_numpy(pixels.astype(np.float32)).div_(255.0)
    y = torch.from_numpy(labels)
    return x, y
