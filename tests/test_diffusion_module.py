"""The ``diffusion`` input module (diffusion denoised smoothing) on a tiny random UNet2DModel (CPU)."""

from __future__ import annotations

import json
import math
import pickle
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from blackbox_rs.connectors import CallableConnector
from blackbox_rs.errors import (
    ConfigError,
    DenoiserModelError,
    MissingDependencyError,
    ModuleCheckpointError,
    UnsafeModelFileError,
)
from blackbox_rs.modules import DenoiserAdapter, DiffusionDenoiser, create_module, load_module
from blackbox_rs.modules.diffusion import (
    alphas_cumprod_from_config,
    ddim_timesteps,
    diffusion_denoise,
    directory_digest,
    noise_levels,
    select_timestep,
)
from blackbox_rs.smoother import BlackBoxSmoother

diffusers = pytest.importorskip("diffusers")

SHAPE = (3, 16, 16)
SIGMA = 0.25


def _unet(out_channels: int = 3, seed: int = 0, blocks: tuple[int, ...] = (8, 16)):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=out_channels, block_out_channels=blocks, layers_per_block=1,
        down_block_types=("DownBlock2D",) * len(blocks), up_block_types=("UpBlock2D",) * len(blocks),
        norm_num_groups=4,
    )


def _save(d: Path, unet, **sched) -> Path:
    unet.save_pretrained(str(d))
    diffusers.DDPMScheduler(**sched).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("ddpm") / "tiny", _unet())


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _make(model_dir: Path, **kw) -> DiffusionDenoiser:
    return create_module("diffusion", **{"input_shape": SHAPE, "model_dir": str(model_dir), "sigma": SIGMA, **kw})  # type: ignore[return-value]


# ----------------------------------------------------------------------------------- t* rule
def _hand_t_star(abar: list[float], target: float) -> int:
    return next(t for t, a in enumerate(abar) if math.sqrt((1 - a) / a) >= target)


def _cumprod(betas: list[float]) -> list[float]:
    out, p = [], 1.0
    for b in betas:
        p *= 1.0 - b
        out.append(p)
    return out


def test_t_star_rule_on_a_hand_made_schedule() -> None:
    abar = [0.9, 0.5, 0.2]  # noise levels 1/3, 1, 2
    assert [round(v, 6) for v in noise_levels(abar)] == [0.333333, 1.0, 2.0]
    assert select_timestep(abar, 0.3) == 0
    assert select_timestep(abar, 0.34) == 1  # not below: the next noisier timestep, not the nearer one
    assert select_timestep(abar, 1.0) == 1  # equal counts as not below
    assert select_timestep(abar, 1.5) == 2
    with pytest.raises(ConfigError, match="above the schedule's largest"):
        select_timestep(abar, 2.5)


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0])
def test_t_star_linear_schedule_by_hand(sigma: float) -> None:
    T, b0, b1 = 1000, 1e-4, 0.02
    abar = _cumprod([b0 + (b1 - b0) * i / (T - 1) for i in range(T)])
    cfg = {"_class_name": "DDPMScheduler", "num_train_timesteps": T, "beta_start": b0, "beta_end": b1,
           "beta_schedule": "linear"}
    t = select_timestep(alphas_cumprod_from_config(cfg), 2 * sigma)
    assert t == _hand_t_star(abar, 2 * sigma)
    assert math.sqrt((1 - abar[t - 1]) / abar[t - 1]) < 2 * sigma <= math.sqrt((1 - abar[t]) / abar[t])


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0])
def test_t_star_cosine_schedule_by_hand(sigma: float) -> None:
    T = 1000

    def f(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    abar = _cumprod([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])
    cfg = {"_class_name": "DDIMScheduler", "num_train_timesteps": T, "beta_schedule": "squaredcos_cap_v2"}
    t = select_timestep(alphas_cumprod_from_config(cfg), 2 * sigma)
    assert t == _hand_t_star(abar, 2 * sigma)


def test_ddim_timesteps() -> None:
    assert ddim_timesteps(100, 1) == [100]
    assert ddim_timesteps(100, 4) == [100, 75, 50, 25]
    assert ddim_timesteps(2, 5) == [2, 1, 0]  # duplicates dropped, strictly decreasing


# ----------------------------------------------------------------------------------- x0 prediction
def _schedule() -> torch.Tensor:
    return alphas_cumprod_from_config({"_class_name": "DDPMScheduler", "num_train_timesteps": 1000})


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_oracle_model_recovers_the_clean_image_exactly(prediction_type: str, steps: int) -> None:
    """A stub model that returns the true noise (or true v / true x0) makes the one-shot prediction, and
    the DDIM steps, return exactly the clean image."""
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(4, *SHAPE, generator=g, dtype=torch.float64)
    noisy = clean + SIGMA * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    abar = _schedule().tolist()
    u0 = 2 * clean - 1  # the clean image in the model's [-1, 1] units
    t_star = select_timestep(abar, 2 * SIGMA)
    seen = []

    def oracle(x_t: torch.Tensor, t: int) -> torch.Tensor:
        seen.append(t)
        a = abar[t]
        if not seen[1:]:  # first call: x_t must be sqrt(abar_t*) * scale(x + delta)
            torch.testing.assert_close(x_t, math.sqrt(a) * (2 * noisy - 1), rtol=0, atol=1e-12)
        eps = (x_t - math.sqrt(a) * u0) / math.sqrt(1 - a)
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "v_prediction":
            return math.sqrt(a) * eps - math.sqrt(1 - a) * u0
        return u0

    out = diffusion_denoise(oracle, noisy, alphas_cumprod=abar, timesteps=ddim_timesteps(t_star, steps),
                            prediction_type=prediction_type, input_range=(-1.0, 1.0))
    assert seen == ddim_timesteps(t_star, steps)
    torch.testing.assert_close(out, clean, rtol=0, atol=1e-12)
    assert out.dtype == torch.float64


class _OracleUNet(nn.Module):
    """Stands in for the UNet inside the module: returns the true noise of the clean image it knows."""

    def __init__(self, clean: torch.Tensor, abar: torch.Tensor) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.clean, self.abar = clean, abar.tolist()
        self.calls: list[int] = []

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        ti = int(t[0])
        self.calls.append(ti)
        a = self.abar[ti]
        u0 = (2 * self.clean - 1).to(x_t.dtype)
        return SimpleNamespace(sample=(x_t - math.sqrt(a) * u0) / math.sqrt(1 - a))


def test_module_with_oracle_unet_recovers_the_clean_image(model_dir: Path) -> None:
    m = _make(model_dir)
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(3, *SHAPE, generator=g)
    noisy = clean + SIGMA * torch.randn(clean.shape, generator=g)
    oracle = _OracleUNet(clean, _schedule())
    object.__setattr__(m, "_unet", oracle)
    out = m(noisy)
    assert oracle.calls == [m.config.timestep]
    torch.testing.assert_close(out, clean, rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------------- real tiny UNet
def test_tiny_unet_loads_runs_and_records_its_identity(model_dir: Path) -> None:
    m = _make(model_dir)
    cfg = m.config
    assert cfg.model_digest == directory_digest(model_dir) and cfg.model_digest.startswith("sha256:")
    assert cfg.timestep == select_timestep(_schedule(), 2 * SIGMA) and cfg.prediction_type == "epsilon"
    assert cfg.input_range == (-1.0, 1.0) and cfg.model_dir == str(model_dir.resolve())
    assert m.num_trainable() == 0 and m.state_dict() == {}
    x = torch.rand(4, *SHAPE) + SIGMA * torch.randn(4, *SHAPE)
    y = m(x)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    assert not torch.equal(y, x)
    assert torch.equal(m(x), y)  # deterministic
    torch.testing.assert_close(m(x[1:2]), y[1:2], rtol=1e-5, atol=1e-6)  # per sample
    m.max_batch = 3  # micro-batching changes nothing
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-6)
    m.max_batch = None
    m.train()
    assert torch.equal(m(x), y)  # the UNet stays in eval mode


def test_ddim_steps_are_deterministic_and_bf16_is_opt_in(model_dir: Path) -> None:
    x = torch.rand(2, *SHAPE)
    m4 = _make(model_dir, steps=4)
    assert m4.timesteps == ddim_timesteps(m4.config.timestep, 4) and len(m4.timesteps) == 4
    assert torch.equal(m4(x), m4(x))
    assert m4.digest() != _make(model_dir).digest()
    one = _make(model_dir)(x)
    bf = _make(model_dir, dtype="bfloat16")
    yb = bf(x)
    assert yb.dtype == torch.float32 and torch.isfinite(yb).all()
    assert (yb - one).abs().max() < 0.5  # same model in lower precision


def test_learned_variance_unet_uses_the_first_half(tmp_path: Path) -> None:
    d = _save(tmp_path / "lv", _unet(out_channels=6), variance_type="learned_range")
    m = _make(d)
    x = torch.rand(2, *SHAPE)
    assert m(x).shape == x.shape


def test_one_model_serves_every_sigma(model_dir: Path) -> None:
    ts = [_make(model_dir, sigma=s).config.timestep for s in (0.12, 0.25, 0.5)]
    assert ts == sorted(ts) and len(set(ts)) == 3
    with pytest.raises(ConfigError, match="above the schedule's largest"):
        _make(model_dir, sigma=100.0)


# ----------------------------------------------------------------------------------- typed errors
def test_bad_directories_are_typed_errors(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(DenoiserModelError, match="not a directory"):
        _make(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DenoiserModelError, match="safetensors"):
        _make(tmp_path / "empty")
    pickled = _copy(model_dir, tmp_path / "pickled")
    (pickled / "diffusion_pytorch_model.safetensors").unlink()
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(UnsafeModelFileError, match="pickled weights") as info:
        _make(pickled)
    assert info.value.path.endswith("diffusion_pytorch_model.bin")
    no_sched = _copy(model_dir, tmp_path / "nosched")
    (no_sched / "scheduler_config.json").unlink()
    with pytest.raises(DenoiserModelError, match="scheduler_config.json"):
        _make(no_sched)
    broken = _copy(model_dir, tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(DenoiserModelError, match="cannot read JSON"):
        _make(broken)
    latent = _copy(model_dir, tmp_path / "latent")
    _edit_json(latent / "config.json", _class_name="UNet2DConditionModel")
    with pytest.raises(DenoiserModelError, match="not a UNet2DModel"):
        _make(latent)
    cond = _copy(model_dir, tmp_path / "cond")
    _edit_json(cond / "config.json", num_class_embeds=10)
    with pytest.raises(DenoiserModelError, match="class-conditional"):
        _make(cond)
    bad_weights = _copy(model_dir, tmp_path / "badweights")
    (bad_weights / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DenoiserModelError, match="cannot load the UNet2DModel"):
        _make(bad_weights)


def test_scheduler_model_mismatch_is_a_typed_error(tmp_path: Path, model_dir: Path) -> None:
    learned = _copy(model_dir, tmp_path / "learned")
    _edit_json(learned / "scheduler_config.json", variance_type="learned_range")
    with pytest.raises(DenoiserModelError, match="does not match the UNet's 3 output channels"):
        _make(learned)
    wide = _save(tmp_path / "wide", _unet(out_channels=6))  # learned-variance UNet, fixed-variance scheduler
    with pytest.raises(DenoiserModelError, match="does not match"):
        _make(wide)
    steps = _copy(model_dir, tmp_path / "steps")
    _edit_json(steps / "config.json", num_train_timesteps=500)
    with pytest.raises(DenoiserModelError, match="500 timesteps, the scheduler has 1000"):
        _make(steps)
    param = _copy(model_dir, tmp_path / "param")
    _edit_json(param / "scheduler_config.json", prediction_type="flow")
    with pytest.raises(DenoiserModelError, match="prediction_type 'flow'"):
        _make(param)
    not_sched = _copy(model_dir, tmp_path / "notsched")
    (not_sched / "scheduler_config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(DenoiserModelError, match="not a diffusers noise-scheduler config"):
        _make(not_sched)
    schedule = _copy(model_dir, tmp_path / "schedule")
    _edit_json(schedule / "scheduler_config.json", beta_schedule="wiggly")
    with pytest.raises(DenoiserModelError, match="unsupported noise schedule"):
        _make(schedule)


def test_image_sizes_the_unet_cannot_take_are_typed_errors(model_dir: Path) -> None:
    with pytest.raises(DenoiserModelError, match="divisible by 2"):
        create_module("diffusion", input_shape=(3, 15, 16), model_dir=str(model_dir), sigma=SIGMA)
    with pytest.raises(DenoiserModelError, match="takes 3 channels, the images have 1"):
        create_module("diffusion", input_shape=(1, 16, 16), model_dir=str(model_dir), sigma=SIGMA)
    m = _make(model_dir)
    from blackbox_rs.errors import InvalidInputError

    with pytest.raises(InvalidInputError):
        m(torch.zeros(1, 3, 8, 8))


def test_missing_diffusers_is_a_typed_error(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(MissingDependencyError, match="pip install diffusers"):
        _make(model_dir)


# ----------------------------------------------------------------------------------- identity, save, load
def test_digest_binds_to_the_weights_not_the_location(tmp_path: Path, model_dir: Path) -> None:
    m = _make(model_dir)
    moved = _make(_copy(model_dir, tmp_path / "moved"))
    assert moved.digest() == m.digest() and moved.config.model_dir != m.config.model_dir
    other = _make(_save(tmp_path / "other", _unet(seed=1)))
    assert other.digest() != m.digest() and other.config.model_digest != m.config.model_digest
    assert _make(model_dir, sigma=0.5).digest() != m.digest()
    assert m.digest().startswith("module:diffusion:sha256:")
    # a directory that changed after the digest was recorded is refused
    changed = _copy(model_dir, tmp_path / "changed")
    recorded = _make(changed).config
    _edit_json(changed / "scheduler_config.json", beta_end=0.03)
    with pytest.raises(DenoiserModelError, match="changed since this module was created"):
        DiffusionDenoiser(recorded)


def test_save_load_round_trip_through_the_smoother(tmp_path: Path, model_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    own = _copy(model_dir, tmp_path / "weights")
    conn = CallableConnector(lambda b: (b.mean(dim=(1, 2, 3)) > 0.5).long(), input_shape=SHAPE, num_classes=2,
                             fingerprint="toy:v1")
    sm = BlackBoxSmoother(conn, module=_make(own), sigma=SIGMA)
    x = torch.rand(3, *SHAPE)
    y = sm.transform(x)
    sm.save(tmp_path / "sm")
    meta = json.loads((tmp_path / "sm" / "module" / "module_config.json").read_text())
    assert meta["config"]["model_digest"] == directory_digest(own)
    assert meta["config"]["timestep"] == sm.module.config.timestep and meta["config"]["prediction_type"] == "epsilon"

    def forbidden(*a: object, **k: object) -> None:
        raise AssertionError("pickle / torch.load used while loading")

    with monkeypatch.context() as mp:
        for mod, name in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")):
            mp.setattr(mod, name, forbidden)
        back = BlackBoxSmoother.load(tmp_path / "sm", conn)
    assert back.module.digest() == sm.module.digest()
    assert back.transform.identity == sm.transform.identity
    assert torch.equal(back.transform(x), y)
    _edit_json(own / "config.json", act_fn="relu")  # the weights' directory changes after saving
    with pytest.raises(DenoiserModelError, match="changed since"):
        BlackBoxSmoother.load(tmp_path / "sm", conn)
    with pytest.raises(ModuleCheckpointError):  # DenoiserModelError is also a ModuleCheckpointError
        load_module(tmp_path / "sm" / "module")


def test_adapter_after_diffusion_is_the_denoiser_at_init(tmp_path: Path, model_dir: Path) -> None:
    den = _make(model_dir)
    ad = create_module("denoiser_adapter", input_shape=SHAPE, denoiser=den.config.model_dump(), width=4)
    x = torch.rand(2, *SHAPE) + SIGMA * torch.randn(2, *SHAPE)
    assert isinstance(ad, DenoiserAdapter) and torch.equal(ad(x), den(x))
    assert ad.num_trainable() > 0 and all(n.startswith("net.") for n, _ in ad.named_trainable_parameters())
    ad.set_flat_parameters(ad.flat_parameters() + 0.05)
    y = ad(x)
    assert not torch.equal(y, den(x))
    ad.save(tmp_path / "ad")
    back = load_module(tmp_path / "ad")
    assert back.digest() == ad.digest() and torch.equal(back(x), y)


def test_weights_the_digest_cannot_name_and_variance_exploding_schedules_are_refused(model_dir: Path, tmp_path: Path) -> None:
    from blackbox_rs.errors import DenoiserModelError
    from blackbox_rs.modules.diffusion import alphas_cumprod_from_config, directory_digest

    both = _copy(model_dir, tmp_path / "both")
    (both / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "diffusion_pytorch_model.safetensors"}}))
    with pytest.raises(DenoiserModelError, match="holds both"):
        directory_digest(both)
    ve = {"_class_name": "ScoreSdeVeScheduler", "num_train_timesteps": 2000, "sigma_min": 0.01, "sigma_max": 1348.0}
    with pytest.raises(DenoiserModelError, match="no beta schedule"):
        alphas_cumprod_from_config(ve)
