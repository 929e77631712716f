"""Opt-in speed knobs of the local PyTorch connectors (issue #19): precision, channels_last, compile and
max_batch="auto", with their effect on the guarantee (connectors/speed.py).

A reduced precision is another classifier: its fingerprint differs, while fp32 keeps today's exactly;
its labels mostly agree with fp32 and its logits come back float32; the construction probe runs under
it. channels_last and compile answer like the plain model and keep the fingerprint. Bad values are
typed errors at construction. The auto batch size is arithmetic (tested on numbers) plus a thin CUDA
wrapper (tested with torch.cuda's memory calls replaced, and for real when a GPU is present).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.devices import cuda_only
from torch import nn
from torch.export import Dim

from blackbox_rs.connectors import ModuleConnector, TorchScriptConnector
from blackbox_rs.connectors import speed as speed_mod
from blackbox_rs.connectors.registry import build_connector
from blackbox_rs.connectors.speed import auto_max_batch, cuda_auto_max_batch
from blackbox_rs.errors import InvalidParameterError

SHAPE = (3, 8, 8)
K = 5
CUDA = cuda_only  # marked cuda (benchmarks/device_check.sh runs -m cuda), skipped without a device


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class FailsUnderAutocast(CNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            raise RuntimeError("this model cannot run in reduced precision")
        return super().forward(x)


class SeesLayout(CNN):
    """Records whether each batch it got was channels-last."""

    def __init__(self) -> None:
        super().__init__()
        self.layouts: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return super().forward(x)


def _cnn(cls: type[CNN] = CNN, seed: int = 0) -> CNN:
    torch.manual_seed(seed)
    return cls().eval()


def _batch(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


def _script(path: Path) -> Path:
    torch.jit.save(torch.jit.script(_cnn()), str(path))
    return path


def _export(path: Path) -> Path:
    program = torch.export.export(_cnn(), (torch.zeros(2, *SHAPE),), dynamic_shapes={"x": {0: Dim("batch")}})
    torch.export.save(program, str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("speed")
    return {".pt": _script(d / "m.pt"), ".pt2": _export(d / "m.pt2")}


# ---- precision ----------------------------------------------------------------------------------------


def test_precision_is_in_the_fingerprint_and_fp32_keeps_todays() -> None:
    today = ModuleConnector(_cnn(), input_shape=SHAPE).info.fingerprint
    fp32 = ModuleConnector(_cnn(), input_shape=SHAPE, precision="fp32").info.fingerprint
    bf16 = ModuleConnector(_cnn(), input_shape=SHAPE, precision="bf16").info.fingerprint
    fp16 = ModuleConnector(_cnn(), input_shape=SHAPE, precision="fp16").info.fingerprint
    assert fp32 == today and "precision" not in today
    assert bf16 == today + "|precision=bf16" and fp16 == today + "|precision=fp16"
    lo = ModuleConnector(_cnn(), input_shape=SHAPE, precision="bf16", label_only=True).info.fingerprint
    assert lo not in {today, bf16} and "|precision=bf16" in lo and lo.endswith("|label_only")


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_model_file_precision_fingerprint(files: dict[str, Path], suffix: str) -> None:
    today = TorchScriptConnector(files[suffix], input_shape=SHAPE).info.fingerprint
    assert TorchScriptConnector(files[suffix], input_shape=SHAPE, precision="fp32").info.fingerprint == today
    bf16 = TorchScriptConnector(files[suffix], input_shape=SHAPE, precision="bf16")
    assert bf16.info.fingerprint == today + "|precision=bf16"
    x = _batch(32)
    with torch.no_grad():
        ref = _cnn()(x).argmax(1)
    assert (bf16.query(x).labels == ref).float().mean() >= 0.9


def test_bf16_labels_mostly_agree_and_logits_are_float32() -> None:
    fp32 = ModuleConnector(_cnn(), input_shape=SHAPE)
    bf16 = ModuleConnector(_cnn(), input_shape=SHAPE, precision="bf16")
    x = _batch(64)
    agree = (bf16.query(x).labels == fp32.query(x).labels).float().mean().item()
    assert agree >= 0.9
    scores = bf16.query(x).scores
    assert scores is not None and scores.dtype == torch.float32
    logits = bf16.forward_logits(x)
    ref = fp32.forward_logits(x)
    assert logits.dtype == torch.float32 and logits.shape == (64, K)
    assert not torch.equal(logits, ref)  # it really ran in bf16 ...
    assert torch.allclose(logits, ref, atol=0.1)  # ... and is close to fp32


def test_bf16_forward_logits_is_differentiable() -> None:
    conn = ModuleConnector(_cnn(), input_shape=SHAPE, precision="bf16")
    x = _batch(4).requires_grad_(True)
    conn.forward_logits(x).sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0


def test_the_probe_runs_under_the_precision() -> None:
    ModuleConnector(_cnn(FailsUnderAutocast), input_shape=SHAPE)  # fine in fp32
    with pytest.raises(InvalidParameterError, match="cannot run in reduced precision"):
        ModuleConnector(_cnn(FailsUnderAutocast), input_shape=SHAPE, precision="bf16")


@pytest.mark.parametrize("bad", ["fp64", "BF16", "float16", 16, None])
def test_bad_precision_is_refused_naming_it(bad: object) -> None:
    with pytest.raises(InvalidParameterError, match=f"precision={bad!r}"):
        ModuleConnector(_cnn(), input_shape=SHAPE, precision=bad)  # type: ignore[arg-type]


def test_bad_precision_on_a_file_is_refused_before_loading(tmp_path: Path) -> None:
    p = tmp_path / "not-a-model.pt"
    p.write_bytes(b"garbage")  # would be a ConnectorError if it were loaded
    with pytest.raises(InvalidParameterError, match="precision='half'"):
        TorchScriptConnector(p, input_shape=SHAPE, precision="half")


@pytest.mark.parametrize(("key", "bad"), [("channels_last", "yes"), ("compile", 1), ("max_batch", "big"),
                                          ("max_batch", 0), ("max_batch", 2.5)])
def test_bad_knob_is_refused_naming_it(key: str, bad: object) -> None:
    with pytest.raises(InvalidParameterError, match=f"{key}={bad!r}"):
        ModuleConnector(_cnn(), input_shape=SHAPE, **{key: bad})


# ---- channels_last --------------------------------------------------------------------------------------


def test_channels_last_answers_like_the_default() -> None:
    plain = ModuleConnector(_cnn(), input_shape=SHAPE)
    model = _cnn(SeesLayout)
    cl = ModuleConnector(model, input_shape=SHAPE, channels_last=True)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.conv1.weight.is_contiguous()
    x = _batch(16)
    model.layouts.clear()
    a, b = plain.query(x), cl.query(x)
    assert model.layouts == [True]  # the batch reached the model channels-last
    assert torch.equal(a.labels, b.labels)
    assert a.scores is not None and b.scores is not None and torch.allclose(a.scores, b.scores, atol=1e-6)
    assert torch.allclose(plain.forward_logits(x), cl.forward_logits(x), atol=1e-5)
    same = ModuleConnector(_cnn(SeesLayout), input_shape=SHAPE)  # the same class and weights, default layout
    assert cl.info.fingerprint == same.info.fingerprint  # same function: not in the fingerprint


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_model_file_channels_last(files: dict[str, Path], suffix: str) -> None:
    plain = TorchScriptConnector(files[suffix], input_shape=SHAPE)
    cl = TorchScriptConnector(files[suffix], input_shape=SHAPE, channels_last=True)
    x = _batch(16)
    assert torch.equal(plain.query(x).labels, cl.query(x).labels)
    assert torch.allclose(plain.forward_logits(x), cl.forward_logits(x), atol=1e-5)
    assert cl.info.fingerprint == plain.info.fingerprint


def test_channels_last_weights_do_not_count_as_a_changed_model() -> None:
    """The layout move replaces the weights' storage; the change guard's snapshot is taken after it."""
    conn = ModuleConnector(_cnn(), input_shape=SHAPE, channels_last=True)
    conn.query(_batch(3))
    conn.query(_batch(2))


# ---- compile ----------------------------------------------------------------------------------------------


def test_compile_on_a_torchscript_archive_is_refused(files: dict[str, Path]) -> None:
    with pytest.raises(InvalidParameterError, match=r"compile=True.*TorchScript archive.*ScriptModules"):
        TorchScriptConnector(files[".pt"], input_shape=SHAPE, compile=True)


@pytest.fixture
def counting_backend(monkeypatch: pytest.MonkeyPatch) -> Any:
    """torch.compile with a backend that runs the captured graph eagerly and counts compilations
    (inductor takes 5-25 s here; what is tested is the wiring and the dynamic batch dimension)."""
    graphs: list[list[object]] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[object]) -> Any:
        graphs.append(list(example_inputs))
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(speed_mod, "_COMPILE_BACKEND", backend)
    yield graphs
    torch._dynamo.reset()


def test_compile_answers_like_the_module_without_recompiling(counting_backend: list[list[object]]) -> None:
    plain = ModuleConnector(_cnn(), input_shape=SHAPE)
    conn = ModuleConnector(_cnn(), input_shape=SHAPE, compile=True, max_batch=8)
    assert conn._compiled is not None and counting_backend  # compiled on the construction probe
    assert conn.info.fingerprint == plain.info.fingerprint
    built = len(counting_backend)
    for n in (8, 5, 3, 7):  # full batches and a smaller last one
        x = _batch(n, seed=n)
        a, b = plain.query(x), conn.query(x)
        assert torch.equal(a.labels, b.labels)
        assert a.scores is not None and b.scores is not None and torch.allclose(a.scores, b.scores, atol=1e-6)
    assert len(counting_backend) == built  # dynamic batch dimension: no recompile for a new size


def test_compile_an_exported_program_in_bf16(files: dict[str, Path], counting_backend: list[list[object]]) -> None:
    plain = TorchScriptConnector(files[".pt2"], input_shape=SHAPE, precision="bf16")
    conn = TorchScriptConnector(files[".pt2"], input_shape=SHAPE, precision="bf16", compile=True,
                                channels_last=True)
    assert counting_backend and conn.info.fingerprint == plain.info.fingerprint
    x = _batch(12)
    assert torch.allclose(plain.forward_logits(x), conn.forward_logits(x), atol=0.05)
    assert (plain.query(x).labels == conn.query(x).labels).float().mean() >= 0.9


@pytest.mark.slow
def test_compile_with_inductor_answers_like_the_module() -> None:
    """The real backend (5-25 s on this machine's CPU; skipped where torch.compile cannot build)."""
    torch._dynamo.reset()
    try:
        conn = ModuleConnector(_cnn(), input_shape=SHAPE, compile=True)
    except InvalidParameterError as exc:  # the probe reports a compiler that cannot run here
        pytest.skip(f"torch.compile (inductor) does not work on this machine: {exc}")
    plain = ModuleConnector(_cnn(), input_shape=SHAPE)
    x = _batch(10)
    assert torch.equal(plain.query(x).labels, conn.query(x).labels)
    assert torch.allclose(plain.forward_logits(x), conn.forward_logits(x), atol=1e-5)
    torch._dynamo.reset()


# ---- max_batch="auto" ---------------------------------------------------------------------------------


def test_auto_batch_arithmetic() -> None:
    mib = 2**20
    # 100 MiB per image (800 - 200 over 6 images), 10 GiB free: floor(0.7 * 10240 / 100) = 71
    assert auto_max_batch(200 * mib, 800 * mib, 2, 8, 10240 * mib) == 71
    assert auto_max_batch(0, 600, 2, 8, 1000) == 7  # 100 bytes/image, floor(0.7 * 1000 / 100)
    assert auto_max_batch(0, 6, 2, 8, 10**12) == 4096  # clipped above
    assert auto_max_batch(0, 6 * 10**9, 2, 8, 10**9) == 1  # clipped below: never 0
    assert auto_max_batch(500, 500, 2, 8, 10**9) == 4096  # no growth measured: the upper bound
    with pytest.raises(InvalidParameterError, match="grow"):
        auto_max_batch(0, 100, 8, 8, 1000)


def test_cuda_wrapper_measures_two_probe_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA calls replaced by a fake allocator: 1000 bytes fixed + 250 per image, 100,000 free."""
    state = {"peak": 0, "resets": 0, "syncs": 0}
    sizes: list[int] = []

    def run(n: int) -> None:
        sizes.append(n)
        state["peak"] = 1000 + 250 * n

    def reset(device: object = None) -> None:
        state["resets"] += 1
        state["peak"] = 0

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: state.__setitem__("syncs", state["syncs"] + 1))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100_000, 200_000))
    got = cuda_auto_max_batch(run, torch.device("cuda"))
    assert sizes == [2, 8] and state["resets"] == 2 and state["syncs"] == 4
    assert got == 280  # floor(0.7 * 100000 / 250)


def test_auto_on_cpu_is_the_default_batch(files: dict[str, Path]) -> None:
    conn = ModuleConnector(_cnn(), input_shape=SHAPE, max_batch="auto")
    assert conn.info.max_batch == 256 == ModuleConnector(_cnn(), input_shape=SHAPE).info.max_batch
    assert conn.info.fingerprint == ModuleConnector(_cnn(), input_shape=SHAPE).info.fingerprint
    ts = TorchScriptConnector(files[".pt"], input_shape=SHAPE, max_batch="auto")
    assert ts.info.max_batch == 256


def test_config_route_takes_the_knobs(files: dict[str, Path]) -> None:
    """A TOML [connector] table reaches the constructor through the registry: strings included."""
    conn = build_connector("torchscript", {"path": str(files[".pt2"]), "input_shape": list(SHAPE),
                                           "precision": "bf16", "channels_last": True, "max_batch": "auto"})
    assert conn.info.max_batch == 256 and conn.info.fingerprint.endswith("|precision=bf16")
    assert conn.settings == {"device": "cpu", "precision": "bf16", "channels_last": True, "compile": False,
                             "max_batch": 256}


@CUDA
def test_auto_batch_on_cuda() -> None:
    conn = ModuleConnector(_cnn(), input_shape=SHAPE, device="cuda", max_batch="auto", precision="bf16")
    assert 1 <= conn.info.max_batch <= 4096
    x = _batch(min(conn.info.max_batch, 64))
    assert conn.query(x).labels.device.type == "cpu"
    assert conn.settings["max_batch"] == conn.info.max_batch and conn.settings["device"].startswith("cuda")


# ---- what ran -------------------------------------------------------------------------------------------


def test_settings_and_repr_show_the_knobs() -> None:
    conn = ModuleConnector(_cnn(), input_shape=SHAPE, precision="bf16", channels_last=True, max_batch=32)
    assert conn.settings == {"device": "cpu", "precision": "bf16", "channels_last": True, "compile": False,
                             "max_batch": 32}
    text = repr(conn)
    for shown in ("precision='bf16'", "channels_last=True", "compile=False", "device='cpu'", "max_batch=32",
                  conn.info.fingerprint):
        assert shown in text
    assert ModuleConnector(_cnn(), input_shape=SHAPE).settings["precision"] == "fp32"


def test_max_batch_not_given_is_auto_on_cuda_and_the_default_elsewhere() -> None:
    from blackbox_rs.connectors.speed import AUTO, DEFAULT_MAX_BATCH, check_max_batch

    assert check_max_batch(None, torch.device("cuda", 0)) == AUTO
    assert check_max_batch(None, torch.device("cpu")) == DEFAULT_MAX_BATCH == check_max_batch(None)
    assert check_max_batch(7, torch.device("cuda", 0)) == 7  # given: kept
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    assert ModuleConnector(net, input_shape=(3, 2, 2)).info.max_batch == DEFAULT_MAX_BATCH
