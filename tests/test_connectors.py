"""TorchScript / torch.export and callable connectors: answers, fingerprints, typed errors."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from blackbox_rs.connectors import CallableConnector, ConnectorInfo, Prediction, TorchScriptConnector
from blackbox_rs.engine import QueryEngine
from blackbox_rs.errors import (
    BlackBoxRSError,
    ConnectorError,
    InvalidInputError,
    InvalidParameterError,
    InvalidResponseError,
)

SHAPE = (3, 8, 8)
K = 5


class SmallCNN(nn.Module):
    def __init__(self, k: int = K) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _model(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN().eval()


def _batch(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model() -> SmallCNN:
    return _model()


@pytest.fixture(scope="module")
def ts_path(tmp_path_factory, model):
    p = tmp_path_factory.mktemp("ts") / "cnn.pt"
    torch.jit.save(torch.jit.script(model), str(p))
    return p


@pytest.fixture(scope="module")
def pt2_path(tmp_path_factory, model):
    p = tmp_path_factory.mktemp("export") / "cnn.pt2"
    prog = torch.export.export(model, (_batch(2),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(prog, str(p))
    return p


@pytest.fixture(params=["script", "export"])
def model_file(request, ts_path, pt2_path):
    return ts_path if request.param == "script" else pt2_path


# ---------------------------------------------------------------------------------------------
# TorchScript / torch.export
def test_labels_are_argmax_and_scores_softmax(model_file, model):
    conn = TorchScriptConnector(model_file, input_shape=SHAPE)
    assert conn.info.num_classes == K  # inferred from the output width
    assert conn.info.returns_scores
    x = _batch(16)
    with torch.no_grad():
        logits = model(x)
    pred = conn.query(x)
    assert pred.labels.dtype == torch.int64
    assert torch.equal(pred.labels, logits.argmax(1))
    assert torch.allclose(pred.scores, torch.softmax(logits, 1), atol=1e-6)
    assert len(conn.query(_batch(1))) == 1  # any batch size


def test_label_only_hides_scores(model_file, model):
    conn = TorchScriptConnector(model_file, input_shape=SHAPE, num_classes=K, label_only=True)
    assert not conn.info.returns_scores
    pred = conn.query(_batch(4))
    assert pred.scores is None
    with torch.no_grad():
        assert torch.equal(pred.labels, model(_batch(4)).argmax(1))


def test_class_names_and_num_classes(ts_path):
    names = ["a", "b", "c", "d", "e"]
    assert TorchScriptConnector(ts_path, input_shape=SHAPE, class_names=names).info.class_names == tuple(names)
    with pytest.raises(InvalidParameterError, match="num_classes"):
        TorchScriptConnector(ts_path, input_shape=SHAPE, class_names=names, num_classes=4)
    with pytest.raises(InvalidParameterError, match="input_shape"):
        TorchScriptConnector(ts_path, input_shape=(8, 8))


def test_fingerprint_is_file_hash_and_follows_the_file(tmp_path, model):
    p = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(model), str(p))
    fp = TorchScriptConnector(p, input_shape=SHAPE).info.fingerprint
    assert fp == "torchscript:sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
    assert TorchScriptConnector(p, input_shape=SHAPE).info.fingerprint == fp  # stable
    torch.jit.save(torch.jit.script(_model(seed=7)), str(p))  # same architecture, new weights
    assert TorchScriptConnector(p, input_shape=SHAPE).info.fingerprint != fp


def test_differentiable(model_file, model):
    conn = TorchScriptConnector(model_file, input_shape=SHAPE)
    assert conn.info.differentiable
    x = _batch(3).requires_grad_(True)
    logits = conn.forward_logits(x)
    assert logits.shape == (3, K) and logits.requires_grad
    logits[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    x_ref = _batch(3).requires_grad_(True)
    model(x_ref)[:, 0].sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    # the model's own weights stay frozen
    assert all(not p.requires_grad for p in conn._model.parameters())


def _bad_inputs():
    x = _batch(4)
    nan = x.clone()
    nan[1, 0, 2, 2] = float("nan")
    inf = x.clone()
    inf[0, 1, 0, 0] = float("inf")
    hi = x.clone()
    hi[2, 2, 3, 3] = 1.5
    lo = x.clone()
    lo[0, 0, 0, 0] = -0.01
    return [
        (nan, "NaN or inf"),
        (inf, "NaN or inf"),
        (hi, r"\[0, 1\]"),
        (lo, r"\[0, 1\]"),
        (torch.rand(4, 3, 8, 9), "shape"),
        (torch.rand(4, 1, 8, 8), "shape"),
        (torch.rand(3, 8, 8), "4-D"),
        (x.double(), "float32"),
        ((x * 255).to(torch.uint8), "float32"),
        (x.half(), "float32"),
        (x.numpy(), "torch.Tensor"),
        (x.tolist(), "torch.Tensor"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_inputs_raise_typed_errors_naming_the_problem(case, ts_path):
    bad, msg = _bad_inputs()[case]
    conn = TorchScriptConnector(ts_path, input_shape=SHAPE)
    with pytest.raises(InvalidInputError, match=msg):
        conn.query(bad)
    with pytest.raises(InvalidInputError, match=msg):
        QueryEngine(conn).query(bad)
    fn = CallableConnector(lambda b: torch.zeros(len(b), dtype=torch.int64), input_shape=SHAPE, num_classes=2)
    with pytest.raises(InvalidInputError, match=msg):
        fn.query(bad)


def test_missing_and_corrupt_model_files(tmp_path):
    with pytest.raises(ConnectorError, match="not found"):
        TorchScriptConnector(tmp_path / "nope.pt", input_shape=SHAPE)
    with pytest.raises(ConnectorError, match="not found"):
        TorchScriptConnector(tmp_path, input_shape=SHAPE)  # a directory is not a model file
    for name, content in [("junk.pt", b"definitely not a zip archive"), ("junk.pt2", b"\x00" * 64),
                          ("empty.pt", b"")]:
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(ConnectorError, match="cannot load"):
            TorchScriptConnector(p, input_shape=SHAPE)


def test_truncated_model_file(tmp_path, ts_path):
    p = tmp_path / "trunc.pt"
    p.write_bytes(ts_path.read_bytes()[: len(ts_path.read_bytes()) // 2])
    with pytest.raises(ConnectorError):
        TorchScriptConnector(p, input_shape=SHAPE)


def test_model_failures_become_connector_errors(tmp_path, model):
    # a program exported for a fixed batch size is refused at load (the probe batch of 1), with a hint
    p = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(model, (_batch(2),)), str(p))
    with pytest.raises(InvalidParameterError, match="dynamic batch"):
        TorchScriptConnector(p, input_shape=SHAPE, num_classes=K)
    # a model built for another input size: refused at load, in one line
    wrong_size = _save_script(tmp_path, nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, K)))
    with pytest.raises(InvalidParameterError, match=r"input_shape=\(3, 8, 8\)"):
        TorchScriptConnector(wrong_size, input_shape=SHAPE, num_classes=K)
    # a failure inside the model at query time is still a ConnectorError naming the batch shape
    ts = TorchScriptConnector(_save_script(tmp_path, _FailsOnBright()), input_shape=SHAPE, num_classes=K)
    with pytest.raises(ConnectorError, match="failed on a batch"):
        ts.query(torch.ones(2, *SHAPE))
    # a model that does not return N x K logits
    bad = _save_script(tmp_path, nn.Flatten(0))
    with pytest.raises(ConnectorError, match="logits"):
        TorchScriptConnector(bad, input_shape=SHAPE)


class _FailsOnBright(nn.Module):  # runs on the zero probe batch, fails at query time
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.max() > 0.5):
            raise RuntimeError("bright input")
        return x.flatten(1)[:, :5]  # K logits


def _save_script(tmp_path, module: nn.Module):
    p = tmp_path / f"m{id(module)}.pt"
    torch.jit.save(torch.jit.script(module.eval()), str(p))
    return p


# ---------------------------------------------------------------------------------------------
# CallableConnector
def test_callable_returning_labels():
    conn = CallableConnector(lambda b: (b[:, 0, 0, 0] > 0.5).long(), input_shape=SHAPE, num_classes=2)
    x = _batch(20)
    pred = conn.query(x)
    assert torch.equal(pred.labels, (x[:, 0, 0, 0] > 0.5).long()) and pred.scores is None
    assert not conn.info.returns_scores and not conn.info.differentiable


def test_callable_returning_logits(model):
    x = _batch(10)
    with torch.no_grad():
        logits = model(x)
    with_scores = CallableConnector(model, input_shape=SHAPE, num_classes=K, returns_scores=True,
                                    differentiable=True)
    pred = with_scores.query(x)
    assert torch.equal(pred.labels, logits.argmax(1))
    assert torch.allclose(pred.scores, logits)
    assert with_scores.forward_logits(x).requires_grad
    labels_only = CallableConnector(model, input_shape=SHAPE, num_classes=K)
    pred = labels_only.query(x)
    assert torch.equal(pred.labels, logits.argmax(1)) and pred.scores is None
    with pytest.raises(InvalidParameterError, match="differentiable"):
        labels_only.forward_logits(x)


def test_callable_returning_prediction():
    def fn(b):
        s = torch.softmax(b.flatten(1)[:, :3], 1)
        return Prediction(labels=s.argmax(1), scores=s)

    x = _batch(6)
    pred = CallableConnector(fn, input_shape=SHAPE, num_classes=3, returns_scores=True).query(x)
    assert torch.equal(pred.labels, fn(x).labels) and torch.allclose(pred.scores, fn(x).scores)
    assert CallableConnector(fn, input_shape=SHAPE, num_classes=3).query(x).scores is None


def test_callable_fingerprints():
    f = CallableConnector(lambda b: b, input_shape=SHAPE, num_classes=2)
    g = CallableConnector(lambda b: b, input_shape=SHAPE, num_classes=2)
    assert f.info.fingerprint != g.info.fingerprint  # never shared by accident
    h = CallableConnector(lambda b: b, input_shape=SHAPE, num_classes=2, fingerprint="mine:v1")
    assert h.info.fingerprint == "mine:v1"


def test_callable_bad_construction():
    with pytest.raises(InvalidParameterError, match="callable"):
        CallableConnector(42, input_shape=SHAPE, num_classes=2)  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="num_classes"):
        CallableConnector(lambda b: b, input_shape=SHAPE)
    with pytest.raises(ValueError, match="2 classes"):
        CallableConnector(lambda b: b, input_shape=SHAPE, num_classes=1)


# ---------------------------------------------------------------------------------------------
# malformed answers -> InvalidResponseError, from the connector and through the engine
def _bad_answers():
    return [
        ("label == K", lambda b: torch.full((len(b),), K, dtype=torch.int64), "label 5"),
        ("label < 0", lambda b: torch.full((len(b),), -1, dtype=torch.int64), "label -1"),
        ("too few labels", lambda b: torch.zeros(len(b) - 1, dtype=torch.int64), "labels for a batch"),
        ("too many labels", lambda b: torch.zeros(len(b) + 1, dtype=torch.int64), "labels for a batch"),
        ("float labels", lambda b: torch.zeros(len(b)), "integers"),
        ("2-D int labels", lambda b: torch.zeros(len(b), 1, dtype=torch.int64), "labels for a batch"),
        ("not a tensor", lambda b: [0] * len(b), "list"),
        ("scores too narrow", lambda b: Prediction(labels=torch.zeros(len(b), dtype=torch.int64),
                                                   scores=torch.zeros(len(b), K - 1)), "scores must have shape"),
        ("scores too wide", lambda b: torch.zeros(len(b), K + 2), "scores must have shape"),
        ("nan scores", lambda b: Prediction(labels=torch.zeros(len(b), dtype=torch.int64),
                                            scores=torch.full((len(b), K), float("nan"))), "NaN or inf"),
    ]


@pytest.mark.parametrize("case", [c[0] for c in _bad_answers()])
def test_malformed_answers_raise_invalid_response(case):
    name, fn, msg = next(c for c in _bad_answers() if c[0] == case)
    conn = CallableConnector(fn, input_shape=SHAPE, num_classes=K, returns_scores=True)
    with pytest.raises(InvalidResponseError, match=msg):
        conn.query(_batch(4))
    with pytest.raises(InvalidResponseError, match=msg):
        QueryEngine(conn).query(_batch(4))


class RawConnector:
    """Implements the protocol without BaseConnector, so only the engine checks its answers."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.info = ConnectorInfo(input_shape=SHAPE, class_names=tuple("abcde"), returns_scores=True,
                                  fingerprint="raw:test", max_batch=3)

    def query(self, batch):
        return self.answer(batch)


@pytest.mark.parametrize("case", [c[0] for c in _bad_answers() if c[0] not in {"not a tensor"}])
def test_engine_validates_answers_of_any_connector(case):
    name, fn, msg = next(c for c in _bad_answers() if c[0] == case)

    def as_prediction(b):
        out = fn(b)
        if isinstance(out, Prediction):
            return out
        if out.ndim == 2 and out.dtype.is_floating_point:
            return Prediction(labels=torch.zeros(len(b), dtype=torch.int64), scores=out)
        return Prediction(labels=out)

    engine = QueryEngine(RawConnector(as_prediction))
    with pytest.raises(InvalidResponseError, match=msg):
        engine.query(_batch(7))  # split into requests of 3, 3, 1
    assert engine.stats.failed_requests == 1 and engine.stats.queries == 0


def test_engine_rejects_non_prediction_answers():
    engine = QueryEngine(RawConnector(lambda b: torch.zeros(len(b), dtype=torch.int64)))
    with pytest.raises(InvalidResponseError, match="Prediction"):
        engine.query(_batch(2))


def test_engine_splits_and_reassembles_requests(model):
    conn = RawConnector(lambda b: Prediction(labels=model(b).argmax(1), scores=torch.softmax(model(b), 1)))
    x = _batch(10)
    pred = QueryEngine(conn).query(x)
    with torch.no_grad():
        assert torch.equal(pred.labels, model(x).argmax(1))
        assert pred.scores.shape == (10, K)


def test_all_errors_share_the_base_class():
    for e in (InvalidInputError, InvalidResponseError, ConnectorError, InvalidParameterError):
        assert issubclass(e, BlackBoxRSError)
    assert issubclass(InvalidResponseError, ConnectorError)
