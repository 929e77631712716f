"""Offline dataset loaders: scikit-learn digits and Fashion-MNIST IDX files."""

from __future__ import annotations

import gzip
import os
import struct
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from blackbox_rs._demo import datasets
from blackbox_rs._demo.datasets import (
    FASHION_MNIST_ENV,
    find_fashion_mnist,
    load_digits,
    load_fashion_mnist,
)
from blackbox_rs.errors import (
    BlackBoxRSError,
    DatasetCorruptedError,
    DatasetNotFoundError,
    InvalidParameterError,
)

INSTALL_HINT = "sudo apt-get install dataset-fashion-mnist"


# --------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------


def _rows(x: torch.Tensor) -> Counter:
    return Counter(bytes(r.numpy().tobytes()) for r in x.reshape(x.shape[0], -1))


def test_digits_shapes_range_and_dtypes():
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape[1:] == (1, 8, 8) and xt.shape[1:] == (1, 8, 8)
    assert x.shape[0] == y.shape[0] and xt.shape[0] == yt.shape[0]
    assert x.shape[0] + xt.shape[0] == 1797
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(y.tolist()) == set(range(10)) == set(yt.tolist())
    # raw values are integers 0..16 divided by 16
    assert torch.equal(x * 16, torch.round(x * 16))


def test_digits_split_is_a_disjoint_stratified_partition():
    xa, ya = load_digits("all")
    x, y = load_digits("train", seed=3, test_fraction=0.2)
    xt, yt = load_digits("test", seed=3, test_fraction=0.2)
    assert _rows(x) + _rows(xt) == _rows(xa)
    all_counts = torch.bincount(ya, minlength=10)
    test_counts = torch.bincount(yt, minlength=10)
    assert torch.equal(torch.bincount(y, minlength=10) + test_counts, all_counts)
    expected = torch.tensor([round(0.2 * int(c)) for c in all_counts])
    assert torch.equal(test_counts, expected)


def test_digits_deterministic_per_seed():
    a = load_digits("test", seed=0)
    b = load_digits("test", seed=0)
    c = load_digits("test", seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("kwargs", [{"split": "val"}, {"test_fraction": 0.0}, {"test_fraction": 1.0}])
def test_digits_bad_arguments(kwargs):
    with pytest.raises(InvalidParameterError):
        load_digits(**kwargs)


def test_digits_without_sklearn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import raise ImportError
    with pytest.raises(DatasetNotFoundError, match="scikit-learn"):
        load_digits()


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST on synthetic IDX files
# --------------------------------------------------------------------------------------------------


def _idx_images(
    n: int, h: int = 28, w: int = 28, magic: int = 0x803, seed: int = 0
) -> tuple[bytes, np.ndarray]:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(n, h, w), dtype=np.uint8)
    return struct.pack(">IIII", magic, n, h, w) + pixels.tobytes(), pixels


def _idx_labels(labels: list[int], magic: int = 0x801) -> bytes:
    return struct.pack(">II", magic, len(labels)) + bytes(labels)


def _write(path: Path, payload: bytes, compress: bool = True) -> None:
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _fake_fmnist(root: Path, n_train: int = 5, n_test: int = 3, compress: bool = True) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, stem_i, stem_l in (
        ("train", n_train, "train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        ("test", n_test, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    ):
        payload, pixels = _idx_images(n, seed=n)
        labels = [(3 * i + 1) % 10 for i in range(n)]
        suffix = ".gz" if compress else ""
        _write(root / f"{stem_i}{suffix}", payload, compress)
        _write(root / f"{stem_l}{suffix}", _idx_labels(labels), compress)
        out[split] = (pixels, labels)
    return out


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(FASHION_MNIST_ENV, raising=False)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_synthetic_roundtrip(tmp_path, no_env, compress):
    truth = _fake_fmnist(tmp_path, compress=compress)
    for split in ("train", "test"):
        x, y = load_fashion_mnist(split, root=tmp_path)
        pixels, labels = truth[split]
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape == (len(labels), 1, 28, 28)
        assert torch.equal(x, torch.from_numpy(pixels).float().div(255).unsqueeze(1))
        assert y.tolist() == labels
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_fashion_limit(tmp_path, no_env):
    truth = _fake_fmnist(tmp_path, n_train=6)
    x, y = load_fashion_mnist("train", root=tmp_path, limit=2)
    assert x.shape[0] == 2 and y.tolist() == truth["train"][1][:2]
    assert load_fashion_mnist("train", root=tmp_path, limit=100)[0].shape[0] == 6
    assert load_fashion_mnist("train", root=tmp_path, limit=0)[0].shape == (0, 1, 28, 28)
    with pytest.raises(InvalidParameterError):
        load_fashion_mnist("train", root=tmp_path, limit=-1)
    with pytest.raises(InvalidParameterError):
        load_fashion_mnist("validation", root=tmp_path)


def test_fashion_env_var(tmp_path, monkeypatch):
    _fake_fmnist(tmp_path / "fm")
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "fm"))
    assert find_fashion_mnist() == tmp_path / "fm"
    assert load_fashion_mnist("test")[0].shape[0] == 3
    # an explicit root wins over the environment variable
    _fake_fmnist(tmp_path / "other", n_test=4)
    assert load_fashion_mnist("test", root=tmp_path / "other")[0].shape[0] == 4
    # the environment variable is not silently ignored when it points nowhere
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "empty"))
    with pytest.raises(DatasetNotFoundError, match=FASHION_MNIST_ENV):
        load_fashion_mnist("test")


def test_fashion_missing_dir_says_apt_get(tmp_path, no_env, monkeypatch):
    with pytest.raises(DatasetNotFoundError) as info:
        load_fashion_mnist("train", root=tmp_path / "nowhere")
    assert INSTALL_HINT in str(info.value) and str(tmp_path / "nowhere") in str(info.value)
    assert isinstance(info.value, BlackBoxRSError)
    # default locations: none present
    monkeypatch.setattr(datasets, "FASHION_MNIST_DEFAULT_DIRS", (tmp_path / "a", tmp_path / "b"))
    with pytest.raises(DatasetNotFoundError, match="sudo apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test")


def test_fashion_only_one_file_present(tmp_path, no_env):
    _fake_fmnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    load_fashion_mnist("train", root=tmp_path)  # the train split is complete
    with pytest.raises(DatasetNotFoundError, match="t10k-labels"):
        load_fashion_mnist("test", root=tmp_path)


def _corrupt_cases():
    good_images, _ = _idx_images(3)
    good_labels = _idx_labels([1, 2, 3])
    return {
        "image magic": (_idx_images(3, magic=0x801)[0], good_labels, "magic"),
        "label magic": (good_images, _idx_labels([1, 2, 3], magic=0x803), "magic"),
        "image size": (_idx_images(3, h=27)[0], good_labels, "expected"),
        "truncated images": (good_images[:-10], good_labels, "truncated"),
        "truncated header": (good_images[:10], good_labels, "header"),
        "trailing data": (good_images + b"\x00" * 784, good_labels, "after"),
        "count mismatch": (good_images, _idx_labels([1, 2, 3, 4]), "labels"),
        "label range": (good_images, _idx_labels([1, 12, 3]), "outside"),
    }


@pytest.mark.parametrize("case", list(_corrupt_cases()))
def test_fashion_corrupted_files(tmp_path, no_env, case):
    images, labels, match = _corrupt_cases()[case]
    _fake_fmnist(tmp_path)
    _write(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(DatasetCorruptedError, match=match):
        load_fashion_mnist("test", root=tmp_path)


def test_fashion_not_gzip(tmp_path, no_env):
    _fake_fmnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"this is not a gzip stream at all" * 10)
    with pytest.raises(DatasetCorruptedError, match="unreadable"):
        load_fashion_mnist("test", root=tmp_path)
    # a gzip stream cut short
    payload, _ = _idx_images(3)
    blob = gzip.compress(payload)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetCorruptedError):
        load_fashion_mnist("test", root=tmp_path)


# --------------------------------------------------------------------------------------------------
# the real Fashion-MNIST (Debian package dataset-fashion-mnist)
# --------------------------------------------------------------------------------------------------


def _real_fashion_dir() -> Path:
    """The installed real data set; fails when BLACKBOX_RS_REQUIRE_FASHION_MNIST=1, else skips."""
    try:
        return find_fashion_mnist()
    except DatasetNotFoundError as exc:
        if os.environ.get("BLACKBOX_RS_REQUIRE_FASHION_MNIST") == "1":
            pytest.fail(f"BLACKBOX_RS_REQUIRE_FASHION_MNIST=1 but Fashion-MNIST is missing: {exc}")
        pytest.skip(f"Fashion-MNIST not installed ({INSTALL_HINT})")


def test_real_fashion_mnist():
    root = _real_fashion_dir()
    x, y = load_fashion_mnist("train", root=root)
    xt, yt = load_fashion_mnist("test", root=root)
    assert x.shape == (60_000, 1, 28, 28) and xt.shape == (10_000, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(torch.bincount(y), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(yt), torch.full((10,), 1000))
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert abs(float(x.mean()) - 0.2860) < 1e-3  # the published Fashion-MNIST training mean
    assert yt[:5].tolist() == [9, 2, 1, 1, 6]  # first test labels of the official files
    xs, ys = load_fashion_mnist("test", root=root, limit=5)
    assert torch.equal(xs, xt[:5]) and torch.equal(ys, yt[:5])
