"""Fitting on a device (issue 19): the ``device`` setting, where the module and data live, checkpoints
bound to the device type. CPU tests run everywhere (tiny, seconds); CUDA tests need a CUDA device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.devices import cuda_only
from safetensors.torch import load_file

from blackbox_rs.connectors import ModuleConnector
from blackbox_rs.errors import ConfigError, InvalidParameterError, ResumeMismatchError
from blackbox_rs.fitting.config import FitConfig
from blackbox_rs.smoother import BlackBoxSmoother
from blackbox_rs.surrogates import SmallCNN

CUDA = cuda_only  # marked cuda (benchmarks/device_check.sh runs -m cuda), skipped without a device
SHAPE = (1, 8, 8)
MODULE = {"name": "dncnn", "depth": 3, "width": 8}
PROMPT = {"name": "prompt_full"}
TINY = {"pretrain_steps": 4, "steps": 4, "batch_size": 8, "clean_queries": 48, "score_images": 8, "score_draws": 2,
        "score_every": 2, "checkpoint_every": 2, "patience": 0, "lr": 3e-3}
OWN = {"surrogate": {"distill_queries": 24, "redistill_every": 2, "surrogate_buffer": 200},
       "zeroth_order": {"zo_batch": 4, "zo_directions": 2}}


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand((48, *SHAPE), generator=g), torch.randint(0, 4, (48,), generator=g)


def _smoother(device: str = "cpu", module: dict[str, object] | None = None) -> BlackBoxSmoother:
    net = SmallCNN(1, 4, (8, 8), width=4, seed=0)
    return BlackBoxSmoother(ModuleConnector(net, input_shape=SHAPE, device=device), module=module or MODULE,
                            sigma=0.5)


def _cfg(strategy: str, **kw: object) -> FitConfig:
    return FitConfig(strategy=strategy, **{**TINY, **OWN.get(strategy, {}), **kw})


def _params_on(sm: BlackBoxSmoother) -> set[str]:
    assert sm.module is not None
    return {p.device.type for p in sm.module.parameters()}


# ---------------------------------------------------------------------------- the setting
@pytest.mark.parametrize("strategy", ["denoise", "surrogate", "zeroth_order", "passthrough"])
def test_device_cpu_is_exactly_the_default_fit(strategy: str) -> None:
    """device='cpu' on a CPU connector is the fit the default (None: the connector's device) runs:
    the same final module (digest), history and query count."""
    data = _data()
    module = PROMPT if strategy == "zeroth_order" else MODULE  # (a DnCNN's LoRA form: the CUDA test below)
    a, b = _smoother(module=module), _smoother(module=module)
    torch.manual_seed(0)  # (a LoRA form is initialised from the global RNG)
    ra = a.fit(data, config=_cfg(strategy), progress=None)
    torch.manual_seed(0)
    rb = b.fit(data, config=_cfg(strategy, device="cpu"), progress=None)
    assert a.module is not None and b.module is not None
    assert a.module.digest() == b.module.digest()
    assert ra.history == rb.history and ra.queries == rb.queries and ra.best_step == rb.best_step
    assert ra.steps_done == ra.steps_total


def test_the_setting_is_validated_and_described() -> None:
    for name in ("denoise", "surrogate", "zeroth_order", "passthrough"):
        field = FitConfig.config_class(name).model_fields["device"]
        assert field.default is None and "connector's device" in (field.description or "")
    assert FitConfig(device=torch.device("cpu")).device == "cpu"  # a torch.device is taken as its string
    assert FitConfig(device="cuda:1").device == "cuda:1"  # portable: availability is checked when a fit starts
    for bad in ("gpu0", "meta", 3):
        with pytest.raises(ValueError, match="device"):
            FitConfig(device=bad)


@pytest.mark.parametrize("strategy", ["denoise", "surrogate"])
def test_a_bad_device_string_is_refused_before_any_query(strategy: str) -> None:
    sm = _smoother()
    with pytest.raises(ConfigError, match="device=.gpu0. is not a torch device"):
        sm.fit(_data(), config=_cfg(strategy), device="gpu0", progress=None)
    assert sm.engine.stats.queries == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_refused_before_any_query(device: str) -> None:
    sm = _smoother()
    before = sm.module.digest()  # type: ignore[union-attr]
    with pytest.raises(InvalidParameterError, match=f"device='{device}'.*no CUDA"):
        sm.fit(_data(), config=_cfg("surrogate", device=device), progress=None)
    assert sm.engine.stats.queries == 0 and sm.module.digest() == before  # type: ignore[union-attr]


def test_a_cuda_index_beyond_the_devices_is_refused() -> None:
    sm = _smoother()
    with pytest.raises(InvalidParameterError, match="cuda:99"):
        sm.fit(_data(), config=_cfg("denoise", device="cuda:99"), progress=None)


def test_the_module_ends_on_the_device_it_started_on_and_saves(tmp_path: Path) -> None:
    sm = _smoother()
    seen: set[str] = set()
    sm.fit(_data(), config=_cfg("surrogate", device="cpu"),
           progress=lambda k, total, info: seen.update(_params_on(sm)))
    assert seen == {"cpu"} and _params_on(sm) == {"cpu"}
    assert sm.module is not None and sm.module.device == torch.device("cpu")
    sm.module.save(tmp_path / "m")
    assert all(t.device.type == "cpu" for t in load_file(str(tmp_path / "m" / "module.safetensors")).values())


# ---------------------------------------------------------------------------- checkpoints
def _interrupted(tmp_path: Path, strategy: str, **kw: object) -> tuple[Path, BlackBoxSmoother]:
    """A fit stopped at a small budget, with its checkpoint in ``tmp_path / 'ck'``."""
    ck = tmp_path / "ck"
    sm = _smoother()
    report = sm.fit(_data(), config=_cfg(strategy, **kw), checkpoint_dir=ck, budget=60, progress=None)
    assert report.stopped == "budget" and (ck / "fit_state.json").exists()
    return ck, sm


def test_a_checkpoint_says_its_device_type_and_holds_cpu_tensors(tmp_path: Path) -> None:
    ck, _ = _interrupted(tmp_path, "surrogate")
    assert json.loads((ck / "fit_state.json").read_text())["device_type"] == "cpu"
    assert all(t.device.type == "cpu" for t in load_file(str(ck / "fit_state.safetensors")).values())


def test_a_checkpoint_of_another_device_type_is_refused(tmp_path: Path) -> None:
    """Training noise from a CUDA generator differs from the CPU's: a CUDA checkpoint never continues
    on the CPU (faked here by editing the checkpoint's device type)."""
    ck, _ = _interrupted(tmp_path, "surrogate")
    meta_path = ck / "fit_state.json"
    meta = json.loads(meta_path.read_text())
    meta["device_type"] = "cuda"
    meta_path.write_text(json.dumps(meta))
    sm = _smoother()
    with pytest.raises(ResumeMismatchError, match="'cuda'.*'cpu'") as err:
        sm.fit(_data(), config=_cfg("surrogate"), checkpoint_dir=ck, budget=10_000, progress=None)
    assert err.value.differences == {"device_type": ("cuda", "cpu")}
    assert sm.engine.stats.queries == 0


def test_a_checkpoint_resumes_whatever_the_device_spelling_and_one_without_a_device_type_is_a_cpu_one(
        tmp_path: Path) -> None:
    """The device *type* is bound, not the setting: a fit started with the default resumes with
    device='cpu' and ends where the uninterrupted fit ends; a checkpoint that names no device type
    (written before fits had one: on the CPU) resumes on the CPU."""
    full = _smoother()
    full.fit(_data(), config=_cfg("surrogate"), budget=10_000, progress=None)
    ck, _ = _interrupted(tmp_path, "surrogate")
    meta_path = ck / "fit_state.json"
    meta = json.loads(meta_path.read_text())
    del meta["device_type"]
    meta_path.write_text(json.dumps(meta))
    sm = _smoother()
    report = sm.fit(_data(), config=_cfg("surrogate", device="cpu"), checkpoint_dir=ck, budget=10_000, progress=None)
    assert report.resumed_from is not None and report.resumed_from > 0
    assert sm.module.digest() == full.module.digest()  # type: ignore[union-attr]


# ---------------------------------------------------------------------------- CUDA
@CUDA
@pytest.mark.parametrize("strategy", ["denoise", "surrogate"])
def test_a_cuda_fit_trains_on_cuda_and_hands_the_module_back_on_the_cpu(strategy: str, tmp_path: Path) -> None:
    sm = _smoother()  # a CPU connector: the fit device is the setting
    during: set[str] = set()
    report = sm.fit(_data(), config=_cfg(strategy, device="cuda"), checkpoint_dir=tmp_path / "ck",
                    progress=lambda k, total, info: during.update(_params_on(sm)))
    assert report.steps_done == report.steps_total
    assert during == {"cuda"}  # the module's parameters lived on CUDA through every step
    assert _params_on(sm) == {"cpu"}  # ... and came back where they were
    assert sm.module is not None
    sm.module.save(tmp_path / "m")
    ck = tmp_path / "ck"
    assert json.loads((ck / "fit_state.json").read_text())["device_type"] == "cuda"
    assert all(t.device.type == "cpu" for t in load_file(str(ck / "fit_state.safetensors")).values())
    with pytest.raises(ResumeMismatchError, match="device type 'cuda'"):
        _smoother().fit(_data(), config=_cfg(strategy, device="cpu"), checkpoint_dir=ck, progress=None)


@CUDA
def test_a_cuda_connector_is_the_default_fit_device_and_a_cuda_fit_resumes_on_cuda(tmp_path: Path) -> None:
    sm = _smoother("cuda")
    during: set[str] = set()
    ck = tmp_path / "ck"
    report = sm.fit(_data(), config=_cfg("surrogate"), checkpoint_dir=ck, budget=60,
                    progress=lambda k, total, info: during.update(_params_on(sm)))
    assert report.stopped == "budget" and during == {"cuda"} and _params_on(sm) == {"cpu"}
    again = _smoother("cuda")
    resumed = again.fit(_data(), config=_cfg("surrogate", device="cuda:0"), checkpoint_dir=ck, budget=10_000,
                        progress=None)
    assert resumed.resumed_from is not None and resumed.steps_done == resumed.steps_total
    again.certify(_data()[0][0], n0=10, n=50, seed=0)  # certification runs the fitted CPU module on the model's device


@CUDA
def test_a_surrogate_module_of_yours_is_trained_on_cuda_and_handed_back() -> None:
    mine = SmallCNN(1, 4, (8, 8), width=4, seed=3)
    before = {k: v.clone() for k, v in mine.state_dict().items()}
    sm = _smoother()
    sm.fit(_data(), config=_cfg("surrogate", device="cuda"), surrogate=mine, progress=None)
    assert {p.device.type for p in mine.parameters()} == {"cpu"}
    assert any(not torch.equal(before[k], v) for k, v in mine.state_dict().items())  # trained in place


@CUDA
def test_zeroth_order_tunes_the_lora_form_on_cuda() -> None:
    """The DnCNN's LoRA form (built on the CPU by from_denoiser) is moved to the fit device: left on
    the CPU it would refuse the CUDA training batches (InputModule.check_input), so a completed fit
    shows it ran there. The estimator's arithmetic stays on the CPU; the module comes back on the CPU."""
    sm = _smoother()
    during: set[str] = set()
    report = sm.fit(_data(), config=_cfg("zeroth_order", device="cuda"),
                    progress=lambda k, total, info: during.update(_params_on(sm)))
    assert report.steps_done == report.steps_total and report.queries > 0
    assert during == {"cuda"}
    assert sm.module is not None and sm.module.name == "lora_dncnn" and _params_on(sm) == {"cpu"}
