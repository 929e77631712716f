"""One image check (connectors.base.check_images) behind every place that accepts images (issue #17).

Every caller rejects the same bad inputs with the same wording, starting with the name it gives the
tensor ("batch", "input", "fit data", "<module>: input", "x"); the callers that do not check a range
(input modules: noisy inputs lie outside [0, 1]; surrogate training data) accept such values. The
engine's hot path stays one torch.aminmax pass.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from blackbox_rs.connectors import CallableConnector
from blackbox_rs.connectors.base import ConnectorInfo, validate_batch
from blackbox_rs.core import certify, validate_input
from blackbox_rs.engine import QueryEngine
from blackbox_rs.errors import InvalidInputError
from blackbox_rs.fitting.data import as_fit_data
from blackbox_rs.modules import create_module
from blackbox_rs.surrogates import check_batch

SHAPE = (3, 4, 4)
INFO = ConnectorInfo(input_shape=SHAPE, class_names=("a", "b"), fingerprint="test:image-checks")


class _Counting:
    def __init__(self) -> None:
        self.sent = 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.sent += len(batch)
        return torch.zeros(len(batch), dtype=torch.int64)


def _conn(fn: _Counting) -> CallableConnector:
    return CallableConnector(fn, input_shape=SHAPE, num_classes=2, fingerprint="test:image-checks")


def _certify(x: object) -> None:
    fn = _Counting()
    try:
        certify(_conn(fn), x, sigma=0.25, n0=10, n=100, alpha=0.01, seed=0)  # type: ignore[arg-type]
    except InvalidInputError:
        assert fn.sent == 0  # a bad input is found before any query
        raise


def _engine(x: object) -> None:
    fn = _Counting()
    try:
        QueryEngine(_conn(fn)).query(x)  # type: ignore[arg-type]
    except InvalidInputError:
        assert fn.sent == 0
        raise


_MODULE = create_module("dncnn", input_shape=SHAPE, depth=2, width=4)  # spatially flexible: any H x W


@dataclass(frozen=True)
class Caller:
    call: Callable[[object], object]
    what: str  # how its messages name the tensor
    batched: bool = True
    shape: bool = True  # checks the model's image shape
    value_range: bool = True  # checks finite values in [0, 1]
    tensors_only: bool = False  # a non-tensor takes another path before the image check
    expects: str = "N x 3 x 4 x 4"


CALLERS = {
    "validate_batch": Caller(lambda x: validate_batch(x, INFO), "batch"),
    "connector.query": Caller(lambda x: _conn(_Counting()).query(x), "batch"),  # type: ignore[arg-type]
    "engine.query": Caller(_engine, "batch"),
    "validate_input": Caller(lambda x: validate_input(x, INFO), "input", batched=False, expects="3 x 4 x 4"),
    "certify": Caller(_certify, "input", batched=False, expects="3 x 4 x 4"),
    "as_fit_data": Caller(lambda x: as_fit_data(x, INFO), "fit data", tensors_only=True),
    "module.check_input": Caller(_MODULE.check_input, "dncnn: input", value_range=False,  # type: ignore[arg-type]
                                 expects="N x 3 x H x W"),
    "surrogates.check_batch": Caller(check_batch, "x", shape=False, value_range=False),  # type: ignore[arg-type]
}


def _good(batched: bool) -> torch.Tensor:
    x = torch.full((2, *SHAPE), 0.5)
    return x if batched else x[0].clone()


def _with(batched: bool, value: float, other: float | None = None) -> torch.Tensor:
    x = _good(batched)
    x.view(-1)[5] = value
    if other is not None:
        x.view(-1)[7] = other
    return x


def _cases(c: Caller) -> list[tuple[str, object, str | None]]:
    """(case, bad input, regex its message must match in full; None: the caller accepts it)."""
    w = re.escape(c.what)
    b = c.batched
    wrong_rank = torch.full(SHAPE, 0.5) if b else torch.full((1, *SHAPE), 0.5)
    wrong_channels = torch.full((2, 2, 4, 4) if b else (2, 4, 4), 0.5)
    got = re.escape(str(tuple(wrong_channels.shape)))
    return [
        ("not a tensor", _good(b).tolist(), None if c.tensors_only else rf"{w} must be a torch\.Tensor, got list"),
        ("integer dtype", _good(b).to(torch.int64),
         rf"{w} must be a float tensor \(floating-point dtype[^)]*\)( with values in \[0, 1\])?, got dtype torch\.int64"),
        ("wrong rank", wrong_rank,
         rf"{w} must be N×C×H×W \(4-D\), got shape \(3, 4, 4\)" if b
         else rf"{w} must be C×H×W \(3-D\), got shape \(1, 3, 4, 4\)"),
        ("wrong shape", wrong_channels,
         rf"{w} has shape {got}, the (model|module \(input_shape=\(3, 4, 4\)\)) expects {re.escape(c.expects)}"
         if c.shape else None),
        ("NaN", _with(b, float("nan")), rf"{w} contains NaN or inf values" if c.value_range else None),
        ("-inf", _with(b, float("-inf")), rf"{w} contains NaN or inf values" if c.value_range else None),
        ("above 1", _with(b, 1.5, 0.25),
         rf"{w} values must lie in \[0, 1\], got \[0\.25, 1\.5\]" if c.value_range else None),
        ("below 0", _with(b, -0.5, 0.75),
         rf"{w} values must lie in \[0, 1\], got \[-0\.5, 0\.75\]" if c.value_range else None),
    ]


@pytest.mark.parametrize("name", sorted(CALLERS))
def test_every_caller_rejects_the_same_bad_inputs_with_the_same_wording(name: str) -> None:
    c = CALLERS[name]
    c.call(_good(c.batched))  # a good input passes
    wrong = []
    for case, bad, pattern in _cases(c):
        if pattern is None:
            if case == "not a tensor":
                continue  # as_fit_data reads a list as a dataset of items: not an image check
            c.call(bad)  # accepted: this caller does not check it
            continue
        try:
            c.call(bad)
        except InvalidInputError as exc:
            if not re.fullmatch(pattern, str(exc)):
                wrong.append(f"{case}: {exc}")
        else:
            wrong.append(f"{case}: accepted")
    assert not wrong, f"{name} ({c.what!r}):\n" + "\n".join(wrong)


def test_check_images_options() -> None:
    from blackbox_rs.connectors.base import check_images

    x = torch.full((2, 3, 5, 7), 0.5)
    assert check_images(x, shape=(3, None, None)) is x  # None: any size; no copy unless asked
    with pytest.raises(InvalidInputError, match=r"^img has shape \(2, 3, 5, 7\), the model expects N x 3 x 4 x W$"):
        check_images(x, shape=(3, 4, None), what="img")
    assert check_images(torch.empty(0, *SHAPE), shape=SHAPE).shape == (0, *SHAPE)  # no values to check
    with pytest.raises(InvalidInputError, match=r"values must lie in \[-1, 1\], got \[-2, 0\.5\]"):
        check_images(torch.tensor([[[[-2.0, 0.5]]]]), value_range=(-1.0, 1.0))
    # the range is checked on the float32 CPU copy: the values the model will see
    y = torch.full(SHAPE, 1.0, dtype=torch.float64)
    y[0, 0, 0] = 1.0 + 1e-12
    out = check_images(y, shape=SHAPE, batched=False, as_float32_cpu=True)
    assert out.dtype == torch.float32 and out.is_contiguous() and out is not y
    with pytest.raises(InvalidInputError, match=r"got \[1, 1\]"):
        check_images(y, batched=False)
    with pytest.raises(InvalidInputError, match=r"floating-point dtype float32\), got dtype torch\.float64"):
        check_images(y, batched=False, dtypes=(torch.float32,), value_range=None)
    xg = torch.full((1, *SHAPE), 0.5, requires_grad=True)
    assert check_images(xg) is xg


def test_the_hot_path_is_one_aminmax_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"aminmax": 0, "isfinite": 0}
    aminmax, isfinite = torch.aminmax, torch.isfinite

    def counting(name: str, fn: Callable) -> Callable:
        def wrapped(*a: object, **k: object) -> object:
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(torch, "aminmax", counting("aminmax", aminmax))
    monkeypatch.setattr(torch, "isfinite", counting("isfinite", isfinite))
    validate_batch(torch.rand(64, *SHAPE), INFO)
    assert calls == {"aminmax": 1, "isfinite": 0}  # one pass over a good batch, no per-sample loop


def _before(batch: torch.Tensor, info: ConnectorInfo) -> torch.Tensor:
    """validate_batch as it was before check_images (ae2a8e0), the yardstick for the timing test."""
    if not isinstance(batch, torch.Tensor):
        raise InvalidInputError(f"batch must be a torch.Tensor, got {type(batch).__name__}")
    if batch.dtype != torch.float32:
        raise InvalidInputError(f"batch must be float32, got {batch.dtype}")
    if batch.ndim != 4:
        raise InvalidInputError(f"batch must be N x C x H x W (4-D), got shape {tuple(batch.shape)}")
    if tuple(batch.shape[1:]) != tuple(info.input_shape):
        raise InvalidInputError("shape")
    if batch.numel():
        lo, hi = (float(v) for v in torch.aminmax(batch))
        if not (lo >= 0.0 and hi <= 1.0):
            if not bool(torch.isfinite(batch).all()):
                raise InvalidInputError("batch contains NaN or inf values")
            raise InvalidInputError(f"batch values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")
    return batch


def test_the_hot_path_takes_no_longer_than_before() -> None:
    info = ConnectorInfo(input_shape=(3, 224, 224), class_names=("a", "b"), fingerprint="test:timing")
    x = torch.rand(64, 3, 224, 224)
    small = torch.rand(1, 3, 224, 224)
    best = {"before": float("inf"), "now": float("inf"), "before_small": float("inf"), "now_small": float("inf")}
    for _ in range(12):  # interleaved, best of many: robust to a busy machine
        for key, fn, arg in (("before", _before, x), ("now", validate_batch, x),
                             ("before_small", _before, small), ("now_small", validate_batch, small)):
            reps = 1 if arg is x else 50
            t = time.perf_counter()
            for _ in range(reps):
                fn(arg, info)
            best[key] = min(best[key], (time.perf_counter() - t) / reps)
    assert best["now"] <= 1.3 * best["before"] + 1e-3, best  # a second pass over the batch would double it
    assert best["now_small"] <= 1.5 * best["before_small"] + 20e-6, best  # per-call overhead stays microseconds
