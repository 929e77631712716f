"""Input modules: a behaviour matrix over the registry, plus per-module specifics."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from blackbox_rs.errors import (
    CompatibilityWarning,
    ConfigError,
    InvalidInputError,
    ModuleCheckpointError,
    RegistryError,
    UnknownModuleError,
)
from blackbox_rs.modules import (
    DnCNN,
    InputModule,
    LoRADnCNN,
    ModuleConfig,
    create_module,
    list_modules,
    load_module,
    register_module,
)
from blackbox_rs.modules.base import CONFIG_FILENAME, WEIGHTS_FILENAME

# Small architectures so the matrix stays fast; every registered module must appear here.
SMALL: dict[str, dict] = {
    "dncnn": {"depth": 4, "width": 8},
    "lora_dncnn": {"depth": 4, "width": 8, "rank": 2},
    "lowres": {"factor": 2, "depth": 2, "width": 4},
    "prompt_full": {},
    "prompt_pad": {"pad": 2},
    "unet": {"widths": (4, 8)},
}
SHAPES = [(1, 12, 12), (3, 10, 14)]


def _make(name: str, shape: tuple[int, int, int]) -> InputModule:
    return create_module(name, input_shape=shape, **SMALL[name])


def _perturb(module: InputModule, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    theta = module.flat_parameters()
    module.set_flat_parameters(theta + 0.05 * torch.randn(theta.shape, generator=g))


# need model files and have no trainable parameters of their own (or equal their denoiser at init):
# covered by tests/test_diffusion_module.py and tests/test_frozen_module.py
FILE_BACKED = {"diffusion", "frozen", "denoiser_adapter"}


def test_every_registered_module_is_in_the_matrix() -> None:
    assert set(list_modules()) == set(SMALL) | FILE_BACKED, "add new modules to SMALL so the matrix covers them"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(SMALL))
def test_identity_at_init(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    m = _make(name, shape)
    x = torch.randn(3, *shape) * 1.5 + 0.5  # noisy inputs, outside [0, 1]
    y = m(x)
    assert torch.equal(y, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert m.config.name == name and m.config.input_shape == shape


@pytest.mark.parametrize("name", sorted(SMALL))
def test_save_load_round_trip(name: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    shape = (3, 10, 14)
    m = _make(name, shape)
    _perturb(m)
    x = torch.randn(2, *shape)
    assert not torch.equal(m(x), x), "perturbation must change the output"
    m.save(tmp_path / "mod")
    assert sorted(p.name for p in (tmp_path / "mod").iterdir()) == sorted([CONFIG_FILENAME, WEIGHTS_FILENAME])
    meta = json.loads((tmp_path / "mod" / CONFIG_FILENAME).read_text())
    assert meta["module"] == name and meta["config"]["name"] == name and "sdk_version" in meta
    m2 = load_module(tmp_path / "mod")
    assert type(m2) is type(m) and m2.config == m.config
    assert torch.equal(m2(x), m(x))
    assert torch.equal(m2.flat_parameters(), m.flat_parameters())
    assert set(load_file(str(tmp_path / "mod" / WEIGHTS_FILENAME))) == set(m.state_dict())


@pytest.mark.parametrize("name", sorted(SMALL))
def test_load_never_unpickles(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = _make(name, (1, 12, 12))
    _perturb(m)
    m.save(tmp_path)

    def forbidden(*a: object, **k: object) -> None:
        raise AssertionError("pickle / torch.load used while loading a module")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.serialization, "load", forbidden)
    m2 = load_module(tmp_path)
    x = torch.rand(2, 1, 12, 12)
    assert torch.equal(m2(x), m(x))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_flat_parameters_round_trip(name: str) -> None:
    m = _make(name, (1, 12, 12))
    theta = m.flat_parameters()
    assert theta.dim() == 1 and theta.numel() == m.num_trainable() > 0
    new = torch.randn_like(theta)
    m.set_flat_parameters(new)
    assert torch.equal(m.flat_parameters(), new)
    new[0] += 1.0  # not aliased
    assert not torch.equal(m.flat_parameters(), new)
    with pytest.raises(InvalidInputError, match="1-D tensor of"):
        m.set_flat_parameters(torch.zeros(theta.numel() + 1))
    m.set_flat_gradient(torch.ones_like(theta))
    assert all(p.grad is not None and torch.all(p.grad == 1) for p in m.trainable_parameters())


@pytest.mark.parametrize("name", sorted(SMALL))
def test_gradients_reach_trainable_parameters(name: str) -> None:
    m = _make(name, (1, 12, 12))
    _perturb(m)  # LoRA's A needs a non-zero B (and vice versa) for every adapter to get a gradient
    x = torch.rand(2, 1, 12, 12)
    m(x).square().sum().backward()
    grads = [p.grad for p in m.trainable_parameters()]
    assert all(g is not None for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)  # type: ignore[union-attr]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_is_deterministic_and_per_sample(name: str) -> None:
    """A sample's output must not depend on its batch (no batch statistics): certificates need it."""
    m = _make(name, (1, 12, 12))
    _perturb(m)
    m.train()  # even in training mode
    x = torch.randn(5, 1, 12, 12)
    full = m(x)
    torch.testing.assert_close(m(x[2:3]), full[2:3], rtol=1e-5, atol=1e-6)
    assert torch.equal(m(x), full)


def test_group_norm_denoiser_is_identity_at_init_and_per_sample() -> None:
    m = create_module("dncnn", input_shape=(3, 8, 8), depth=4, width=8, norm="group")
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(m(x), x)
    _perturb(m)
    torch.testing.assert_close(m(x[:1]), m(x)[:1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_wrong_input_shape_is_a_typed_error(name: str) -> None:
    m = _make(name, (1, 12, 12))
    with pytest.raises(InvalidInputError, match="channels|input_shape"):
        m(torch.zeros(1, 3, 12, 12))
    with pytest.raises(InvalidInputError, match="N×C×H×W"):
        m(torch.zeros(1, 12, 12))
    with pytest.raises(InvalidInputError, match="floating"):
        m(torch.zeros(1, 1, 12, 12, dtype=torch.int64))
    with pytest.raises(InvalidInputError, match="float64"):
        m(torch.zeros(1, 1, 12, 12, dtype=torch.float64))
    m64 = _make(name, (1, 12, 12)).double()
    x64 = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    assert torch.equal(m64(x64), x64)


@pytest.mark.parametrize("name", ["dncnn", "lora_dncnn"])
def test_downsampling_denoiser_identity_round_trip_and_shapes(name: str, tmp_path: Path) -> None:
    m = create_module(name, input_shape=(3, 12, 16), depth=3, width=8, downsample=2)
    x = torch.rand(2, 3, 12, 16)
    assert torch.equal(m(x), x)  # zero tail: identity even through the pixel shuffle
    _perturb(m)
    y = m(x)
    assert y.shape == x.shape and not torch.equal(y, x)
    torch.testing.assert_close(m(x[:1]), y[:1], rtol=1e-5, atol=1e-6)  # per sample
    m.save(tmp_path / "m")
    back = load_module(tmp_path / "m")
    assert back.config.downsample == 2 and torch.equal(back(x), y)
    with pytest.raises(InvalidInputError, match="divisible by 2"):
        m(torch.rand(1, 3, 13, 16))
    with pytest.raises(ConfigError, match="downsample"):
        create_module(name, input_shape=(3, 12, 15), downsample=2)


def test_lora_from_downsampling_denoiser_keeps_its_architecture() -> None:
    base = create_module("dncnn", input_shape=(1, 12, 12), depth=3, width=8, downsample=2)
    _perturb(base)
    lora = LoRADnCNN.from_denoiser(base, rank=2)
    x = torch.rand(3, 1, 12, 12)
    assert lora.config.downsample == 2 and lora.config.base_config() == base.config
    torch.testing.assert_close(lora(x), base(x))


def test_downsampling_runs_the_body_at_lower_resolution() -> None:
    m = create_module("dncnn", input_shape=(1, 28, 28), depth=4, width=8, downsample=4)
    seen: list[tuple[int, ...]] = []
    m.net.body[0].conv.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    m(torch.rand(1, 1, 28, 28))
    assert seen == [(1, 8, 7, 7)]


def test_unet_sees_the_whole_image_and_checks_divisibility(tmp_path: Path) -> None:
    m = create_module("unet", input_shape=(1, 16, 16), widths=(4, 8, 8))
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(m(x), x)
    _perturb(m, seed=3)
    far = x.clone()
    far[:, :, 0, 0] += 1.0  # one corner pixel: the opposite corner's output must move (global context)
    assert (m(far) - m(x))[:, :, -1, -1].abs().min() > 0
    no_ctx = create_module("unet", input_shape=(1, 16, 16), widths=(4, 8), global_context=False, norm="none")
    _perturb(no_ctx, seed=3)
    assert torch.equal((no_ctx(far) - no_ctx(x))[:, :, -1, -1], torch.zeros(2, 1))  # local receptive field
    m.save(tmp_path / "u")
    assert torch.equal(load_module(tmp_path / "u")(x), m(x))
    with pytest.raises(InvalidInputError, match="divisible by 4"):
        m(torch.rand(1, 1, 18, 16))
    with pytest.raises(ConfigError, match="divisible by 4"):
        create_module("unet", input_shape=(1, 18, 16), widths=(4, 8, 8))
    with pytest.raises(ConfigError, match="widths"):
        create_module("unet", input_shape=(1, 16, 16), widths=(4,))


def test_denoisers_accept_other_spatial_sizes_prompts_do_not() -> None:
    x = torch.rand(1, 1, 20, 16)
    assert torch.equal(_make("dncnn", (1, 12, 12))(x), x)
    with pytest.raises(InvalidInputError, match="input_shape"):
        _make("prompt_full", (1, 12, 12))(x)


# ---------------------------------------------------------------------------- registry and configs
def test_unknown_name_lists_known_modules() -> None:
    with pytest.raises(UnknownModuleError, match="dncnn") as ei:
        create_module("unet9000", input_shape=(1, 8, 8))
    assert "unet9000" in str(ei.value) and isinstance(ei.value, ConfigError)


@pytest.mark.parametrize(
    ("name", "kwargs", "field"),
    [
        ("dncnn", {"input_shape": (1, 8, 8), "depth": 1}, "depth"),
        ("dncnn", {"input_shape": (1, 8, 8), "kernel_size": 4}, "kernel_size"),
        ("dncnn", {"input_shape": (1, 8, 8), "dept": 4}, "dept"),  # typo: extra="forbid"
        ("dncnn", {"input_shape": (0, 8, 8)}, "input_shape"),
        ("dncnn", {}, "input_shape"),
        ("prompt_pad", {"input_shape": (1, 8, 8), "pad": 4}, "pad"),
        ("prompt_pad", {"input_shape": (1, 8, 8), "pad": 0}, "pad"),
        ("lora_dncnn", {"input_shape": (1, 8, 8), "rank": 0}, "rank"),
        (
            "lora_dncnn",
            {"input_shape": (1, 8, 8), "depth": 3, "target_modules": ["body.7.conv"]},
            "body.7.conv",
        ),
    ],
)
def test_bad_configs_raise_config_error(name: str, kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        create_module(name, **kwargs)


def test_create_from_config_and_mapping_with_overrides() -> None:
    m = create_module("dncnn", input_shape=(3, 8, 8))
    assert (m.config.depth, m.config.width) == (8, 64)  # resolved defaults for RGB
    g = create_module("dncnn", input_shape=(1, 28, 28))
    assert (g.config.depth, g.config.width) == (6, 32)  # resolved defaults for grayscale
    m2 = create_module(m.config, depth=3, width=4)
    assert (m2.config.depth, m2.config.width, m2.config.input_shape) == (3, 4, (3, 8, 8))
    m3 = create_module({"name": "prompt_pad", "input_shape": [1, 8, 8], "pad": 1})
    assert m3.num_trainable() == 1 * (2 * 1 * 8 + 2 * 1 * 6)
    with pytest.raises(ConfigError, match="name"):
        create_module(m.config, name="prompt_full")
    with pytest.raises(ConfigError, match="name"):
        create_module({"input_shape": [1, 8, 8]})


def test_config_is_immutable() -> None:
    m = _make("dncnn", (1, 8, 8))
    with pytest.raises(ValueError):
        m.config.depth = 9  # type: ignore[misc]


def test_registration_is_validated() -> None:
    class BadCfg(ModuleConfig):
        name: str = "other"

    with pytest.raises(RegistryError, match="already registered"):

        @register_module("dncnn")
        class Dup(DnCNN):
            pass

    with pytest.raises(RegistryError, match="Literal"):

        @register_module("brand_new")
        class Bad(InputModule):
            config_class = BadCfg

    with pytest.raises(RegistryError, match="InputModule"):
        register_module("not_a_module")(nn.Identity)  # type: ignore[type-var]
    assert "brand_new" not in list_modules() and "not_a_module" not in list_modules()


# ---------------------------------------------------------------------------- loading failures
def _saved(tmp_path: Path, name: str = "dncnn") -> tuple[InputModule, Path]:
    m = _make(name, (1, 12, 12))
    _perturb(m)
    return m, m.save(tmp_path / name)


def test_unknown_config_keys_warn_not_crash(tmp_path: Path) -> None:
    m, d = _saved(tmp_path)
    meta = json.loads((d / CONFIG_FILENAME).read_text())
    meta["config"]["future_knob"] = 3
    meta["sdk_version"] = "9.0.0"
    (d / CONFIG_FILENAME).write_text(json.dumps(meta))
    with pytest.warns(CompatibilityWarning, match="future_knob"):
        m2 = load_module(d)
    x = torch.rand(1, 1, 12, 12)
    assert torch.equal(m2(x), m(x))


def test_known_but_invalid_config_value_is_an_error(tmp_path: Path) -> None:
    _, d = _saved(tmp_path)
    meta = json.loads((d / CONFIG_FILENAME).read_text())
    meta["config"]["depth"] = -1
    (d / CONFIG_FILENAME).write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="depth"):
        load_module(d)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    _, d = _saved(tmp_path)
    tensors = load_file(str(d / WEIGHTS_FILENAME))
    del tensors["net.tail.weight"]
    save_file(tensors, str(d / WEIGHTS_FILENAME))
    with pytest.raises(ModuleCheckpointError, match="net.tail.weight"):
        load_module(d)


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    _, d = _saved(tmp_path)
    tensors = load_file(str(d / WEIGHTS_FILENAME))
    tensors["net.head.bias"] = torch.zeros(3)
    save_file(tensors, str(d / WEIGHTS_FILENAME))
    with pytest.raises(ModuleCheckpointError, match=r"net\.head\.bias.*\(3,\)"):
        load_module(d)


def test_unexpected_tensor_and_missing_files(tmp_path: Path) -> None:
    _, d = _saved(tmp_path)
    tensors = load_file(str(d / WEIGHTS_FILENAME))
    tensors["net.extra"] = torch.zeros(1)
    save_file(tensors, str(d / WEIGHTS_FILENAME))
    with pytest.raises(ModuleCheckpointError, match="net.extra"):
        load_module(d)
    (d / WEIGHTS_FILENAME).write_bytes(b"not safetensors")
    with pytest.raises(ModuleCheckpointError, match="safetensors"):
        load_module(d)
    (d / WEIGHTS_FILENAME).unlink()
    with pytest.raises(ModuleCheckpointError, match=WEIGHTS_FILENAME):
        load_module(d)
    with pytest.raises(ModuleCheckpointError, match=CONFIG_FILENAME):
        load_module(tmp_path / "nothing_here")


def test_unknown_module_name_in_saved_file(tmp_path: Path) -> None:
    _, d = _saved(tmp_path)
    meta = json.loads((d / CONFIG_FILENAME).read_text())
    meta["module"] = meta["config"]["name"] = "from_the_future"
    (d / CONFIG_FILENAME).write_text(json.dumps(meta))
    with pytest.raises(UnknownModuleError, match="from_the_future"):
        load_module(d)


def test_typed_load_checks_class(tmp_path: Path) -> None:
    _, d = _saved(tmp_path, "prompt_full")
    with pytest.raises(ModuleCheckpointError, match="not a DnCNN"):
        DnCNN.load(d)


# ---------------------------------------------------------------------------- LoRA specifics
def test_lora_has_far_fewer_trainable_parameters() -> None:
    base = create_module("dncnn", input_shape=(3, 32, 32))
    lora = create_module("lora_dncnn", input_shape=(3, 32, 32), rank=2)
    total = sum(p.numel() for p in lora.parameters())
    assert lora.num_trainable() * 10 < base.num_trainable()
    assert total - lora.num_trainable() == base.num_trainable()  # the frozen base is the whole DnCNN
    assert all(".lora_" in n for n, _ in lora.named_trainable_parameters())


def test_lora_from_fitted_denoiser_starts_exactly_at_the_base(tmp_path: Path) -> None:
    torch.manual_seed(2)
    base = _make("dncnn", (1, 12, 12))
    _perturb(base)  # stands for a fitted denoiser (non-identity)
    base.save(tmp_path / "base")
    x = torch.rand(2, 1, 12, 12)
    for src in (base, tmp_path / "base"):
        lora = LoRADnCNN.from_denoiser(src, rank=2, target_modules=("head", "tail"))
        assert torch.equal(lora(x), base(x))
        assert lora.targets == ("head", "tail")
    _perturb(lora, seed=5)
    merged = lora.merged()
    assert isinstance(merged, DnCNN)
    torch.testing.assert_close(merged(x), lora(x), rtol=1e-5, atol=1e-5)
    lora.save(tmp_path / "lora")
    assert torch.equal(load_module(tmp_path / "lora")(x), lora(x))


def test_peft_is_imported_lazily() -> None:
    """``import peft`` costs seconds: no file of the package may import it at module level."""
    import ast

    import blackbox_rs

    root = Path(blackbox_rs.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module-level statements only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "peft"]
    assert offenders == []


def test_no_warnings_on_construction() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in SMALL:
            _make(name, (1, 12, 12))
