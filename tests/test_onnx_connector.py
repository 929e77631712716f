"""ONNXConnector (issue #19): an ONNX file exported in the test, run by onnxruntime on the CPU.

Labels and scores equal the model's own argmax/softmax; label_only hides scores; a dynamic batch
dimension takes any batch up to max_batch and the engine splits larger ones; a fixed batch dimension
caps max_batch (and pads); files that are not ONNX, truncated files, external data, wrong input
shapes, types and class counts are typed errors naming the problem. CUDA cases skip without a GPU.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from blackbox_rs.connectors import ONNXConnector, build_connector, list_connectors
from blackbox_rs.engine import QueryEngine
from blackbox_rs.errors import (
    ConfigError,
    ConnectorError,
    InvalidParameterError,
    MissingDependencyError,
    UnsafeModelFileError,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SHAPE = (3, 4, 4)
K = 5


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _model() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def _batch(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


def _export(model: nn.Module, path: Path, *, dynamic: bool = True, batch: int = 2) -> Path:
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the legacy (TorchScript-based) exporter needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (_batch(batch),), buf, dynamo=False, input_names=["x"], output_names=["logits"],
            dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}} if dynamic else None,
        )
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(_model(), tmp_path_factory.mktemp("onnx") / "net.onnx")


def _linear_graph(path: Path, *, in_shape: list, out_k: int = K, elem: int = TensorProto.FLOAT,
                  inputs: int = 1, external: bool = False) -> Path:
    """A Flatten + MatMul graph built with onnx.helper (fixed batch, odd types, external data)."""
    d = int(np.prod(SHAPE))
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((d, out_k)).astype(np.float32), "W")
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "W"], ["y"])]
    ins = [helper.make_tensor_value_info("x", elem, in_shape)]
    if elem != TensorProto.FLOAT:
        nodes[0] = helper.make_node("Cast", ["x"], ["xc"], to=TensorProto.FLOAT)
        nodes.insert(1, helper.make_node("Flatten", ["xc"], ["f"]))
    ins += [helper.make_tensor_value_info(f"extra{i}", TensorProto.FLOAT, [1]) for i in range(inputs - 1)]
    out_rows = in_shape[0]
    g = helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [out_rows, out_k])],
                          [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    if external:
        onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0)
    else:
        onnx.save_model(m, str(path))
    return path


def test_registered_and_lazy() -> None:
    assert "onnx" in list_connectors()


def test_labels_and_scores_are_the_models_own(onnx_file: Path) -> None:
    model = _model()
    conn = ONNXConnector(onnx_file, input_shape=SHAPE)
    x = _batch(7)
    pred = conn.query(x)
    with torch.no_grad():
        logits = model(x)
    assert pred.labels.dtype == torch.int64 and pred.labels.device.type == "cpu"
    assert torch.equal(pred.labels, logits.argmax(1))
    assert pred.scores is not None and torch.allclose(pred.scores, torch.softmax(logits, 1), atol=1e-5)
    info = conn.info
    assert info.num_classes == K and info.returns_scores and not info.differentiable
    assert info.fingerprint == "onnx:sha256:" + hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    assert conn.providers[0] == "CPUExecutionProvider"
    conn.close()
    with pytest.raises(ConnectorError, match="closed"):
        conn.query(x)


def test_label_only_hides_scores_and_changes_the_fingerprint(onnx_file: Path) -> None:
    full = ONNXConnector(onnx_file, input_shape=SHAPE)
    lo = ONNXConnector(onnx_file, input_shape=SHAPE, label_only=True)
    pred = lo.query(_batch(3))
    assert pred.scores is None and not lo.info.returns_scores
    assert torch.equal(pred.labels, full.query(_batch(3)).labels)
    assert lo.info.fingerprint == full.info.fingerprint + "|label_only"


def test_dynamic_batch_every_size_and_engine_splits_larger(onnx_file: Path) -> None:
    model = _model()
    conn = ONNXConnector(onnx_file, input_shape=SHAPE, max_batch=4)
    assert conn.info.max_batch == 4
    for n in range(1, 5):
        x = _batch(n, seed=n)
        with torch.no_grad():
            assert torch.equal(conn.query(x).labels, model(x).argmax(1))
    sizes: list[int] = []
    run = conn._run

    def spy(batch: np.ndarray) -> np.ndarray:
        sizes.append(int(batch.shape[0]))
        return run(batch)

    conn._run = spy  # type: ignore[method-assign]
    x = _batch(10, seed=9)
    pred = QueryEngine(conn).query(x)
    with torch.no_grad():
        assert torch.equal(pred.labels, model(x).argmax(1))
    assert sizes and max(sizes) <= 4 and sum(sizes) == 10


def test_fixed_batch_dimension(tmp_path: Path) -> None:
    one = ONNXConnector(_linear_graph(tmp_path / "b1.onnx", in_shape=[1, *SHAPE]), input_shape=SHAPE)
    assert one.info.max_batch == 1
    fixed = ONNXConnector(_linear_graph(tmp_path / "b4.onnx", in_shape=[4, *SHAPE]), input_shape=SHAPE)
    assert fixed.info.max_batch == 4
    dyn = ONNXConnector(_linear_graph(tmp_path / "bn.onnx", in_shape=["N", *SHAPE]), input_shape=SHAPE)
    x = _batch(3)
    padded = fixed.query(x)  # 3 rows padded to the fixed 4, the blank row's answer dropped
    assert len(padded) == 3 and torch.equal(padded.labels, dyn.query(x).labels)
    assert torch.allclose(padded.scores, dyn.query(x).scores)  # type: ignore[arg-type]
    engine = QueryEngine(fixed)
    assert torch.equal(engine.query(_batch(9)).labels, dyn.query(_batch(9)).labels)
    assert ONNXConnector(tmp_path / "b4.onnx", input_shape=SHAPE, max_batch=2).info.max_batch == 2


@pytest.mark.parametrize("content", [b"definitely not an onnx model", b"\x00" * 64, b""])
def test_not_onnx_is_a_connector_error(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "junk.onnx"
    p.write_bytes(content)
    with pytest.raises(ConnectorError, match=r"cannot load ONNX model file .*junk\.onnx"):
        ONNXConnector(p, input_shape=SHAPE)


def test_truncated_and_missing_files(tmp_path: Path, onnx_file: Path) -> None:
    data = onnx_file.read_bytes()
    for cut in (len(data) // 2, len(data) - 7):
        p = tmp_path / f"trunc{cut}.onnx"
        p.write_bytes(data[:cut])
        with pytest.raises(ConnectorError, match="cannot load ONNX model file"):
            ONNXConnector(p, input_shape=SHAPE)
    with pytest.raises(ConnectorError, match="not found"):
        ONNXConnector(tmp_path / "nope.onnx", input_shape=SHAPE)


def test_external_data_is_refused(tmp_path: Path) -> None:
    p = _linear_graph(tmp_path / "ext.onnx", in_shape=["N", *SHAPE], external=True)
    with pytest.raises(UnsafeModelFileError, match="external data"):
        ONNXConnector(p, input_shape=SHAPE)


def test_input_shape_mismatch_names_both_shapes(onnx_file: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidParameterError, match=r"\[N, 3, 4, 4\].*input_shape=\(3, 8, 8\)"):
        ONNXConnector(onnx_file, input_shape=(3, 8, 8))
    with pytest.raises(InvalidParameterError, match=r"\[N, 3, 4, 4\].*input_shape=\(1, 4, 4\)"):
        ONNXConnector(onnx_file, input_shape=(1, 4, 4))
    rank3 = _linear_graph(tmp_path / "r3.onnx", in_shape=["N", 3, 16])
    with pytest.raises(InvalidParameterError, match=r"\[N, 3, 16\]"):
        ONNXConnector(rank3, input_shape=SHAPE)


def test_input_type_and_count(tmp_path: Path) -> None:
    f16 = _linear_graph(tmp_path / "f16.onnx", in_shape=["N", *SHAPE], elem=TensorProto.FLOAT16)
    with pytest.raises(InvalidParameterError, match=r"tensor\(float16\), not tensor\(float\)"):
        ONNXConnector(f16, input_shape=SHAPE)
    two = _linear_graph(tmp_path / "two.onnx", in_shape=["N", *SHAPE], inputs=2)
    with pytest.raises(InvalidParameterError, match="2 inputs"):
        ONNXConnector(two, input_shape=SHAPE)


def test_wrong_number_of_classes(onnx_file: Path) -> None:
    with pytest.raises(InvalidParameterError, match=f"returns {K} logits per image, not the declared num_classes=4"):
        ONNXConnector(onnx_file, input_shape=SHAPE, num_classes=4)
    with pytest.raises(InvalidParameterError, match="2 class_names"):
        ONNXConnector(onnx_file, input_shape=SHAPE, class_names=["a", "b"])
    names = [f"c{i}" for i in range(K)]
    assert ONNXConnector(onnx_file, input_shape=SHAPE, class_names=names).info.class_names == tuple(names)


def test_device_and_providers(onnx_file: Path) -> None:
    with pytest.raises(InvalidParameterError, match="not both"):
        ONNXConnector(onnx_file, input_shape=SHAPE, device="cpu", providers=["CPUExecutionProvider"])
    with pytest.raises(InvalidParameterError, match="'mps'"):
        ONNXConnector(onnx_file, input_shape=SHAPE, device="mps")
    with pytest.raises(ConnectorError, match="NoSuchExecutionProvider"):
        ONNXConnector(onnx_file, input_shape=SHAPE, providers=["NoSuchExecutionProvider"])
    conn = ONNXConnector(onnx_file, input_shape=SHAPE, providers=["CPUExecutionProvider"])
    assert conn.info.fingerprint == ONNXConnector(onnx_file, input_shape=SHAPE).info.fingerprint
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ConnectorError, match="onnxruntime-gpu"):
            ONNXConnector(onnx_file, input_shape=SHAPE, device="cuda")


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available(),
                    reason="needs onnxruntime-gpu and a CUDA device")
def test_cuda_provider(onnx_file: Path) -> None:
    conn = ONNXConnector(onnx_file, input_shape=SHAPE, device="cuda")
    assert conn.providers[0] == "CUDAExecutionProvider"
    x = _batch(6)
    pred = conn.query(x)
    assert pred.labels.device.type == "cpu"
    with torch.no_grad():
        assert torch.equal(pred.labels, _model()(x).argmax(1))


def test_build_from_config(onnx_file: Path) -> None:
    conn = build_connector("onnx", {"path": str(onnx_file), "input_shape": [3, 4, 4], "num_classes": K,
                                    "device": "cpu"})
    assert isinstance(conn, ONNXConnector) and conn.info.num_classes == K
    with pytest.raises(ConfigError, match="unknown setting 'gpu'"):
        build_connector("onnx", {"path": str(onnx_file), "input_shape": [3, 4, 4], "gpu": True})


def test_missing_onnxruntime_names_the_install(onnx_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(MissingDependencyError, match="pip install onnxruntime"):
        ONNXConnector(onnx_file, input_shape=SHAPE)
