"""ModuleConnector (issue #19): an in-memory nn.Module (a timm model you own) as the base model, and
the device= of the local-model connectors (CPU here; CUDA cases skip without a GPU).

Labels and scores equal the model's own argmax/softmax; label_only hides scores; the fingerprint
follows the weights, the classes, ``identity`` and ``label_only`` but not the device; a weight changed
after construction is refused; a wrong input shape, a fixed batch dimension and a wrong class count are
one-line typed errors; certification through the engine equals the same through a TorchScript file of
the same model (same seed): the counts are equal.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers.devices import cuda_only
from torch import nn

from blackbox_rs.connectors import ModuleConnector, TorchScriptConnector
from blackbox_rs.connectors.module import module_digest, resolve_device
from blackbox_rs.core import certify
from blackbox_rs.engine import QueryEngine
from blackbox_rs.errors import ConnectorError, InvalidParameterError

SHAPE = (3, 4, 4)
K = 5
CUDA = cuda_only  # marked cuda (benchmarks/device_check.sh runs -m cuda), skipped without a device


class Net(nn.Module):
    def __init__(self, k: int = K) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class GeluNet(Net):  # same tensors, another class: another model
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.gelu(self.conv(x)).flatten(1))


class OneAtATime(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1:
            raise RuntimeError(f"expected a batch of 1, got {x.shape[0]}")
        return super().forward(x)


def _net(seed: int = 0, cls: type[Net] = Net) -> Net:
    torch.manual_seed(seed)
    return cls().eval()


def _batch(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


def test_labels_and_scores_are_the_models_own() -> None:
    ref = _net()
    conn = ModuleConnector(_net(), input_shape=SHAPE)
    x = _batch(9)
    pred = conn.query(x)
    with torch.no_grad():
        logits = ref(x)
    assert torch.equal(pred.labels, logits.argmax(1)) and pred.labels.dtype == torch.int64
    assert pred.scores is not None and torch.allclose(pred.scores, torch.softmax(logits, 1))
    assert pred.labels.device.type == "cpu" and pred.scores.device.type == "cpu"
    info = conn.info
    assert info.num_classes == K and info.class_names == tuple(str(i) for i in range(K))
    assert info.returns_scores and info.differentiable and info.fingerprint.startswith("module:sha256:")
    assert conn.device == torch.device("cpu")


def test_label_only_hides_scores() -> None:
    full = ModuleConnector(_net(), input_shape=SHAPE)
    lo = ModuleConnector(_net(), input_shape=SHAPE, label_only=True)
    pred = lo.query(_batch(4))
    assert pred.scores is None and not lo.info.returns_scores
    assert torch.equal(pred.labels, full.query(_batch(4)).labels)
    assert lo.info.fingerprint == full.info.fingerprint + "|label_only"


def test_fingerprint_follows_weights_classes_and_identity_not_the_object() -> None:
    fp = ModuleConnector(_net(), input_shape=SHAPE).info.fingerprint
    assert ModuleConnector(_net(), input_shape=SHAPE).info.fingerprint == fp  # another object, same model
    assert ModuleConnector(_net(seed=1), input_shape=SHAPE).info.fingerprint != fp  # other weights
    assert ModuleConnector(_net(cls=GeluNet), input_shape=SHAPE).info.fingerprint != fp  # other class
    with_id = ModuleConnector(_net(), input_shape=SHAPE, identity="pool=avg").info.fingerprint
    assert with_id != fp
    assert ModuleConnector(_net(), input_shape=SHAPE, identity="pool=max").info.fingerprint != with_id
    # settings that do not change an answer do not change it
    for neutral in ({"max_batch": 3}, {"cost_per_query": 0.5}, {"num_classes": K},
                    {"class_names": list("abcde")}, {"device": "cpu"}, {"device": torch.device("cpu")}):
        assert ModuleConnector(_net(), input_shape=SHAPE, **neutral).info.fingerprint == fp, neutral
    # a non-persistent buffer is part of the model too
    a, b = _net(), _net()
    a.register_buffer("scale", torch.ones(1), persistent=False)
    b.register_buffer("scale", torch.full((1,), 2.0), persistent=False)
    assert module_digest(a) != module_digest(b)


def test_the_module_is_frozen_in_place() -> None:
    model = _net().train()
    ModuleConnector(model, input_shape=SHAPE)
    assert not model.training and all(not p.requires_grad for p in model.parameters())


def test_a_weight_changed_afterwards_is_refused() -> None:
    model = _net()
    conn = ModuleConnector(model, input_shape=SHAPE)
    conn.query(_batch(2))
    with torch.no_grad():
        model.fc.bias.add_(1.0)  # an in-place update, as an optimizer step does
    with pytest.raises(ConnectorError, match=r"weight 'fc.bias' changed after the connector was built"):
        conn.query(_batch(2))
    other = _net()
    conn2 = ModuleConnector(other, input_shape=SHAPE)
    other.fc.weight = nn.Parameter(torch.zeros_like(other.fc.weight))  # a replaced parameter
    with pytest.raises(ConnectorError, match="fc.weight"):
        conn2.query(_batch(2))
    model3 = _net()
    conn3 = ModuleConnector(model3, input_shape=SHAPE)
    model3.load_state_dict(_net(seed=5).state_dict())
    with pytest.raises(ConnectorError, match="build a new ModuleConnector"):
        QueryEngine(conn3).query(_batch(2))


def test_input_shape_mismatch_is_one_line() -> None:
    with pytest.raises(InvalidParameterError, match=r"module Net cannot run on the declared input_shape=\(3, 8, 8\)") as e:
        ModuleConnector(_net(), input_shape=(3, 8, 8))
    assert "\n" not in str(e.value)
    with pytest.raises(InvalidParameterError, match="input_shape must be"):
        ModuleConnector(_net(), input_shape=(4, 4))


def test_fixed_batch_dimension_is_named_and_max_batch_1_accepts_it() -> None:
    with pytest.raises(InvalidParameterError, match="batch dimension is not dynamic.*max_batch=1"):
        ModuleConnector(_net(cls=OneAtATime), input_shape=SHAPE)
    conn = ModuleConnector(_net(cls=OneAtATime), input_shape=SHAPE, max_batch=1)
    x = _batch(3)
    with torch.no_grad():
        assert torch.equal(QueryEngine(conn).query(x).labels, _net()(x).argmax(1))


def test_wrong_number_of_classes() -> None:
    with pytest.raises(InvalidParameterError, match=f"module Net returns {K} logits per image, not the declared num_classes=4"):
        ModuleConnector(_net(), input_shape=SHAPE, num_classes=4)
    with pytest.raises(InvalidParameterError, match="disagrees"):
        ModuleConnector(_net(), input_shape=SHAPE, num_classes=4, class_names=list("abcde"))
    with pytest.raises(ConnectorError, match=r"logits of shape \(N, K\)"):
        ModuleConnector(nn.Flatten(0), input_shape=SHAPE)
    with pytest.raises(InvalidParameterError, match="torch.nn.Module"):
        ModuleConnector(lambda x: x, input_shape=SHAPE)  # type: ignore[arg-type]


def test_forward_logits_is_differentiable() -> None:
    conn = ModuleConnector(_net(), input_shape=SHAPE)
    x = _batch(3).requires_grad_(True)
    logits = conn.forward_logits(x)
    logits[:, 0].sum().backward()
    x_ref = _batch(3).requires_grad_(True)
    ref = _net()
    ref(x_ref)[:, 0].sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    assert all(p.grad is None for p in conn._model.parameters())  # the model's weights stay frozen


def test_devices_are_checked() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InvalidParameterError, match="'gpu' is not a torch device"):
        ModuleConnector(_net(), input_shape=SHAPE, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidParameterError, match="no CUDA device"):
            ModuleConnector(_net(), input_shape=SHAPE, device="cuda")


def test_a_timm_model_you_own() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    ref = copy.deepcopy(model)
    conn = ModuleConnector(model, input_shape=(3, 32, 32), identity="timm:test_resnet")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(conn.query(x).labels, ref(x).argmax(1))
    assert conn.info.num_classes == 3


def _script(model: nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.trace(copy.deepcopy(model), _batch(2)), str(path))
    return path


def test_certification_equals_the_torchscript_file_of_the_same_model(tmp_path: Path) -> None:
    model = _net()
    ts = TorchScriptConnector(_script(model, tmp_path / "net.pt"), input_shape=SHAPE)
    mod = ModuleConnector(model, input_shape=SHAPE)
    x = _batch(1, seed=4)[0]
    a = certify(QueryEngine(mod), x, sigma=0.25, n0=32, n=300, alpha=0.01, seed=11)
    b = certify(QueryEngine(ts), x, sigma=0.25, n0=32, n=300, alpha=0.01, seed=11)
    assert a.counts == b.counts and a.selection_counts == b.selection_counts
    assert (a.prediction, a.radius, a.p_lower) == (b.prediction, b.radius, b.p_lower)
    assert a.fingerprint != b.fingerprint  # two connectors, two caches
    assert sum(a.counts) == 300


def test_torchscript_device_cpu_keeps_the_fingerprint(tmp_path: Path) -> None:
    p = _script(_net(), tmp_path / "n.pt")
    fp = TorchScriptConnector(p, input_shape=SHAPE).info.fingerprint
    conn = TorchScriptConnector(p, input_shape=SHAPE, device="cpu")
    assert conn.info.fingerprint == fp and conn.device == torch.device("cpu")
    with pytest.raises(InvalidParameterError, match="not a torch device"):
        TorchScriptConnector(p, input_shape=SHAPE, device="gpu")


@CUDA
def test_module_on_cuda_answers_on_the_cpu() -> None:
    ref = _net()
    conn = ModuleConnector(_net(), input_shape=SHAPE, device="cuda")
    assert next(conn._model.parameters()).device.type == "cuda"
    x = _batch(6)
    pred = conn.query(x)
    assert pred.labels.device.type == "cpu" and pred.scores is not None and pred.scores.device.type == "cpu"
    with torch.no_grad():
        assert torch.allclose(pred.scores, torch.softmax(ref(x), 1), atol=1e-4)
    assert conn.info.fingerprint == ModuleConnector(_net(), input_shape=SHAPE).info.fingerprint
    x.requires_grad_(True)
    logits = conn.forward_logits(x)
    assert logits.device.type == "cpu"
    logits.sum().backward()
    assert x.grad is not None


@CUDA
@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_torchscript_and_export_on_cuda(tmp_path: Path, suffix: str) -> None:
    model = _net()
    p = tmp_path / f"n{suffix}"
    if suffix == ".pt":
        _script(model, p)
    else:
        prog = torch.export.export(model, (_batch(2),), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(prog, str(p))
    cpu = TorchScriptConnector(p, input_shape=SHAPE)
    gpu = TorchScriptConnector(p, input_shape=SHAPE, device="cuda")
    assert next(gpu._model.parameters()).device.type == "cuda"
    x = _batch(5)
    a, b = cpu.query(x), gpu.query(x)
    assert b.labels.device.type == "cpu" and torch.allclose(a.scores, b.scores, atol=1e-4)  # type: ignore[arg-type]
    assert gpu.info.fingerprint == cpu.info.fingerprint


def test_a_data_assignment_or_training_mode_after_construction_is_refused() -> None:
    import torch

    from blackbox_rs.connectors.module import ModuleConnector
    from blackbox_rs.errors import ConnectorError

    x = torch.rand(2, 1, 2, 2)
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    c = ModuleConnector(m, input_shape=(1, 2, 2))
    c.query(x)
    m[1].weight.data = torch.randn(2, 4)
    with pytest.raises(ConnectorError, match="changed after the connector was built"):
        c.query(x)
    m2 = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))
    c2 = ModuleConnector(m2, input_shape=(1, 2, 2))
    m2.train()
    with pytest.raises(ConnectorError, match="training mode"):
        c2.query(x)
