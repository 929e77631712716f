"""Small CNNs: training (determinism, accuracy on real digits) and export to TorchScript / torch.export."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from blackbox_rs._demo.datasets import load_digits
from blackbox_rs._demo.zoo import (
    EpochStats,
    SmallCNN,
    accuracy,
    export_program,
    export_torchscript,
    predict_logits,
    train_classifier,
)
from blackbox_rs.connectors import TorchScriptConnector
from blackbox_rs.errors import InvalidInputError, InvalidParameterError

DIGITS_SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


@pytest.fixture(scope="module")
def trained(digits):
    (x, y), _ = digits
    model = SmallCNN(1, 10, (8, 8), 16, seed=0)
    t0 = time.perf_counter()
    train_classifier(model, x, y, epochs=2, batch_size=32, lr=5e-3, seed=0, threads=1)
    return model, time.perf_counter() - t0


@pytest.mark.parametrize(
    "shape,width,hidden", [((1, 8, 8), 16, 0), ((1, 28, 28), 16, 0), ((3, 32, 32), 8, 64), ((1, 9, 7), 4, 0)]
)
def test_small_cnn_shapes(shape, width, hidden):
    model = SmallCNN(shape[0], 7, shape[1:], width, hidden=hidden, seed=1)
    assert model.input_shape == shape
    out = model(torch.rand(5, *shape))
    assert out.shape == (5, 7) and out.dtype == torch.float32


def test_small_cnn_seeded_init_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = SmallCNN(1, 10, 28, 16, seed=5)
    assert torch.equal(torch.rand(3), expected)
    b = SmallCNN(1, 10, 28, 16, seed=5)
    c = SmallCNN(1, 10, 28, 16, seed=6)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.head.weight, c.head.weight)


@pytest.mark.parametrize("kwargs", [{"num_classes": 1}, {"width": 0}, {"input_hw": (8,)}, {"hidden": -1}])
def test_small_cnn_bad_arguments(kwargs):
    with pytest.raises(InvalidParameterError):
        SmallCNN(**kwargs)


def test_train_on_digits_is_accurate_and_fast(trained, digits):
    model, seconds = trained
    _, (xt, yt) = digits
    assert not model.training
    acc = accuracy(model, xt, yt)
    assert acc > 0.80, acc
    assert seconds < 30, seconds  # ~0.1-1 s on one thread; generous for a shared CI machine


def test_training_is_deterministic_given_seed(digits):
    (x, y), _ = digits
    x, y = x[:400], y[:400]

    def run(seed: int, sigma: float = 0.0) -> dict:
        m = SmallCNN(1, 10, 8, 8, seed=0)
        train_classifier(m, x, y, epochs=1, batch_size=50, lr=1e-2, seed=seed, noise_sigma=sigma, threads=1)
        return m.state_dict()

    a, b, c = run(7, 0.25), run(7, 0.25), run(8, 0.25)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    d = run(7, 0.0)
    assert not all(torch.equal(a[k], d[k]) for k in a)  # the noise changes training


def test_noise_augmentation_clips_by_default_like_the_certifier(digits):
    """The SDK certifies f(clip(x + delta)); the default augmentation must train on that distribution."""
    (x, y), _ = digits
    x, y = x[:300], y[:300]

    def run(**kw: bool) -> dict:
        m = SmallCNN(1, 10, 8, 8, seed=0)
        train_classifier(m, x, y, epochs=1, batch_size=50, lr=1e-2, seed=3, noise_sigma=0.5, threads=1, **kw)
        return m.state_dict()

    default, clipped, raw = run(), run(clip_noisy=True), run(clip_noisy=False)
    assert all(torch.equal(default[k], clipped[k]) for k in default)
    assert not all(torch.equal(default[k], raw[k]) for k in default)


def test_train_progress_threads_and_noise_options(digits):
    (x, y), _ = digits
    before = torch.get_num_threads()
    stats: list[EpochStats] = []
    m = SmallCNN(1, 10, 8, 8, seed=0)
    train_classifier(
        m,
        x[:200],
        y[:200],
        epochs=2,
        batch_size=64,
        lr=1e-2,
        noise_sigma=0.5,
        clip_noisy=True,
        seed=0,
        threads=1,
        progress=stats.append,
    )
    assert torch.get_num_threads() == before
    assert [s.epoch for s in stats] == [1, 2] and all(s.epochs == 2 for s in stats)
    assert all(s.loss > 0 and 0 <= s.train_accuracy <= 1 and s.seconds >= 0 for s in stats)


def test_train_bad_arguments(digits):
    (x, y), _ = digits
    m = SmallCNN(1, 10, 8, 8, seed=0)
    with pytest.raises(InvalidParameterError):
        train_classifier(m, x, y, epochs=1, noise_sigma=-0.1)
    with pytest.raises(InvalidParameterError):
        train_classifier(m, x, y, epochs=1, batch_size=0)
    with pytest.raises(InvalidInputError):
        train_classifier(m, x, y[:-1], epochs=1)
    with pytest.raises(InvalidInputError):
        train_classifier(m, x[:, 0], y, epochs=1)
    with pytest.raises(InvalidInputError):
        train_classifier(m, x, y.float(), epochs=1)


def test_noisy_accuracy_is_deterministic(trained, digits):
    model, _ = trained
    _, (xt, yt) = digits
    a = accuracy(model, xt, yt, noise_sigma=0.25, seed=3)
    assert a == accuracy(model, xt, yt, noise_sigma=0.25, seed=3)
    assert 0.0 <= a <= 1.0


def _no_jit_future_warning(fn, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args)
    leaked = [w for w in caught if issubclass(w.category, FutureWarning)]
    assert not leaked, [str(w.message) for w in leaked]
    return out


@pytest.mark.parametrize("kind", ["torchscript", "program"])
def test_export_reproduces_logits_and_labels(trained, digits, tmp_path, kind):
    model, _ = trained
    _, (xt, yt) = digits
    model.train()  # export must use eval mode and leave the caller's mode alone
    if kind == "torchscript":
        path = _no_jit_future_warning(export_torchscript, model, tmp_path / "digits.pt", DIGITS_SHAPE)
    else:
        path = export_program(model, tmp_path / "digits.pt2", DIGITS_SHAPE)
    assert model.training
    model.eval()
    assert path.is_file() and not list(tmp_path.glob(".*.tmp"))
    ref = predict_logits(model, xt)

    connector = TorchScriptConnector(path, input_shape=DIGITS_SHAPE)
    assert connector.info.num_classes == 10
    for n in (1, 7, xt.shape[0]):  # any batch size: the batch dimension is dynamic
        with torch.no_grad():
            got = connector.forward_logits(xt[:n])
        torch.testing.assert_close(got, ref[:n], rtol=1e-5, atol=1e-5)
    pred = connector.query(xt)
    assert torch.equal(pred.labels, ref.argmax(1))
    assert pred.scores is not None
    torch.testing.assert_close(pred.scores, torch.softmax(ref, 1), rtol=1e-5, atol=1e-6)
    assert accuracy(model, xt, yt) == float((pred.labels == yt).double().mean())


def test_export_bad_shape(trained, tmp_path):
    model, _ = trained
    with pytest.raises(InvalidParameterError):
        export_torchscript(model, tmp_path / "m.pt", (8, 8))
