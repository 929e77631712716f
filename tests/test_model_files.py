"""Opening a local model file never runs Python from it (issue #16, item 1).

The crafted archives below are built from a genuine ``torch.export.save`` archive and changed only
where torch's own loader would unpickle: a weight flagged ``use_pickle``, an opaque-object constant,
and the sample inputs (which ``torch.export.load`` unpickles with a ``weights_only=False`` fallback).
Each payload's ``__reduce__`` writes a marker file and returns a valid value, so the model would still
answer normally: the marker is the only trace of the code that ran.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from blackbox_rs.connectors import TorchScriptConnector
from blackbox_rs.connectors.torchscript import inspect_exported_program
from blackbox_rs.errors import ConnectorError, UnsafeModelFileError

SHAPE = (3, 4, 4)
K = 3


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class _Payload:
    """Unpickles by calling ``eval``: writes ``marker`` and evaluates to ``value_expr``."""

    def __init__(self, marker: Path, value_expr: str) -> None:
        self.code = f"(open({str(marker)!r}, 'w').write('pwned'), {value_expr})[1]"

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, (self.code,))


def _model() -> Tiny:
    torch.manual_seed(0)
    return Tiny().eval()


def _batch(n: int = 6) -> torch.Tensor:
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def good(tmp_path: Path) -> Path:
    p = tmp_path / "good.pt2"
    prog = torch.export.export(_model(), (_batch(2),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(prog, str(p))
    return p


def _rewrite(src: Path, dst: Path, change: dict[str, bytes | None]) -> Path:
    """Copy a zip, replacing (bytes) or deleting (None) entries named by their path under the root."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        root = zin.namelist()[0].split("/", 1)[0] + "/"
        seen = set()
        for info in zin.infolist():
            rel = info.filename[len(root):]
            seen.add(rel)
            data = change.get(rel, zin.read(info)) if rel in change else zin.read(info)
            if data is not None:
                zout.writestr(info.filename, data)
        for rel, data in change.items():
            if rel not in seen and data is not None:
                zout.writestr(root + rel, data)
    return dst


def _saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _config(src: Path, rel: str) -> dict:
    with zipfile.ZipFile(src) as z:
        root = z.namelist()[0].split("/", 1)[0] + "/"
        return json.loads(z.read(root + rel))


def _pickled_weight(good: Path, tmp_path: Path, marker: Path) -> Path:
    cfg = _config(good, "data/weights/model_weights_config.json")
    bias = cfg["config"]["fc.bias"]
    bias["use_pickle"] = True
    value = _model().fc.bias.detach().tolist()
    payload = _saved(_Payload(marker, f"__import__('torch').nn.Parameter(__import__('torch').tensor({value}))"))
    return _rewrite(good, tmp_path / "weight.pt2", {
        "data/weights/model_weights_config.json": json.dumps(cfg).encode(),
        f"data/weights/{bias['path_name']}": payload,
    })


def _pickled_sample_inputs(good: Path, tmp_path: Path, marker: Path) -> Path:
    payload = _saved(_Payload(marker, "((__import__('torch').zeros(2, 3, 4, 4),), {})"))
    return _rewrite(good, tmp_path / "inputs.pt2", {"data/sample_inputs/model.pt": payload})


def _opaque_constant(good: Path, tmp_path: Path, marker: Path) -> Path:
    import pickle

    cfg = _config(good, "data/constants/model_constants_config.json")
    cfg["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    return _rewrite(good, tmp_path / "opaque.pt2", {
        "data/constants/model_constants_config.json": json.dumps(cfg).encode(),
        "data/constants/opaque_obj_0": pickle.dumps(_Payload(marker, "0")),
    })


CRAFTED = {"pickled_weight": _pickled_weight, "opaque_constant": _opaque_constant}


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_crafted_pt2_is_refused_and_runs_nothing(kind: str, good: Path, tmp_path: Path) -> None:
    marker = tmp_path / f"marker-{kind}"
    crafted = CRAFTED[kind](good, tmp_path, marker)
    with pytest.raises(UnsafeModelFileError) as info:
        TorchScriptConnector(crafted, input_shape=SHAPE, num_classes=K)
    assert not marker.exists(), "loading the archive ran code from it"
    assert str(crafted) in str(info.value) and info.value.path == str(crafted) and info.value.reason
    assert isinstance(info.value, ConnectorError)


def test_crafted_sample_inputs_are_never_unpickled(good: Path, tmp_path: Path) -> None:
    """torch.export.load unpickles the sample inputs (weights_only=False on fallback); they are not
    needed to run the model, so the connector never reads them: it loads and answers, nothing runs."""
    marker = tmp_path / "marker"
    crafted = _pickled_sample_inputs(good, tmp_path, marker)
    conn = TorchScriptConnector(crafted, input_shape=SHAPE, num_classes=K)
    assert not marker.exists(), "loading the archive ran code from its sample inputs"
    x = _batch(4)
    with torch.no_grad():
        assert torch.equal(conn.query(x).labels, _model()(x).argmax(1))


def test_crafted_weight_is_refused_before_anything_is_read(good: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    crafted = _pickled_weight(good, tmp_path, marker)
    with pytest.raises(UnsafeModelFileError, match="pickled"):
        inspect_exported_program(crafted)
    assert not marker.exists()


@pytest.mark.parametrize(("entry", "data", "reason"), [
    ("data/aotinductor/model/model.so", b"\x7fELF", "native code"),
    ("extra/evil.pkl", b"\x80\x04N.", "pickle"),
    ("extra/notes.bin", b"\x80\x02N.", "pickle"),
])
def test_pickles_and_native_code_anywhere_are_refused(good: Path, tmp_path: Path, entry: str, data: bytes,
                                                      reason: str) -> None:
    crafted = _rewrite(good, tmp_path / "x.pt2", {entry: data})
    with pytest.raises(UnsafeModelFileError, match=reason):
        TorchScriptConnector(crafted, input_shape=SHAPE, num_classes=K)


def test_symbolic_expression_that_would_be_evaluated_is_refused(good: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    with zipfile.ZipFile(good) as z:
        root = z.namelist()[0].split("/", 1)[0] + "/"
        text = z.read(root + "models/model.json").decode()
    assert "Symbol(" in text  # the dynamic batch dimension
    evil = f"(open({str(marker)!r}, 'w').write('x'), Symbol('s0'))[1]"
    doc = json.loads(text)

    def swap(o: object) -> None:
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "expr_str":
                    o[k] = evil
                else:
                    swap(v)
        elif isinstance(o, list):
            for v in o:
                swap(v)

    swap(doc)
    crafted = _rewrite(good, tmp_path / "expr.pt2", {"models/model.json": json.dumps(doc).encode()})
    with pytest.raises(UnsafeModelFileError, match="symbolic shape expression"):
        TorchScriptConnector(crafted, input_shape=SHAPE, num_classes=K)
    assert not marker.exists()


def test_graph_calling_a_non_operator_is_refused(good: Path, tmp_path: Path) -> None:
    doc = json.loads(json.dumps(_config(good, "models/model.json")))
    doc["graph_module"]["graph"]["nodes"][0]["target"] = "torch.hub.load"
    crafted = _rewrite(good, tmp_path / "target.pt2", {"models/model.json": json.dumps(doc).encode()})
    with pytest.raises(UnsafeModelFileError, match="torch.hub.load"):
        TorchScriptConnector(crafted, input_shape=SHAPE, num_classes=K)


def test_legitimate_exported_program_loads_and_answers(good: Path) -> None:
    conn = TorchScriptConnector(good, input_shape=SHAPE)
    assert conn.info.num_classes == K
    x = _batch(6)
    with torch.no_grad():
        logits = _model()(x)
    pred = conn.query(x)
    assert torch.equal(pred.labels, logits.argmax(1))
    assert torch.allclose(pred.scores, torch.softmax(logits, 1), atol=1e-6)
    assert conn.forward_logits(x).shape == (6, K)


def test_legitimate_exported_program_with_a_buffer_constant_loads(tmp_path: Path) -> None:
    class WithBuffer(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("shift", torch.full((K,), 0.5))
            self.scale = torch.tensor(2.0)  # a lifted tensor constant

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1)) * self.scale + self.shift

    torch.manual_seed(0)
    m = WithBuffer().eval()
    p = tmp_path / "buf.pt2"
    torch.export.save(torch.export.export(m, (_batch(2),), dynamic_shapes=({0: torch.export.Dim("b")},)), str(p))
    x = _batch(4)
    with torch.no_grad():
        assert torch.allclose(TorchScriptConnector(p, input_shape=SHAPE).forward_logits(x), m(x), atol=1e-6)


def test_torchscript_file_still_loads(tmp_path: Path) -> None:
    p = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(_model()), str(p))
    x = _batch(3)
    with torch.no_grad():
        assert torch.equal(TorchScriptConnector(p, input_shape=SHAPE).query(x).labels, _model()(x).argmax(1))


def test_not_a_pt2_archive_is_a_connector_error(tmp_path: Path) -> None:
    p = tmp_path / "zip.pt2"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("a.txt", "hello")
    with pytest.raises(ConnectorError, match="torch.export archive"):
        TorchScriptConnector(p, input_shape=SHAPE, num_classes=K)


def test_a_power_tower_in_a_shape_expression_is_refused() -> None:
    """Review finding: `9**9**9**9` passed the grammar and would hang sympy (no code, but no end)."""
    from pathlib import Path

    from blackbox_rs.connectors._pt2 import _check_expr
    from blackbox_rs.errors import UnsafeModelFileError

    _check_expr(Path("m.pt2"), "s0**2 + 2*s1")  # small literal exponents are fine
    for bomb in ("9**9**9**9", "s0**s1", "2**(3)", "s0 + " * 2000):
        with pytest.raises(UnsafeModelFileError):
            _check_expr(Path("m.pt2"), bomb)
