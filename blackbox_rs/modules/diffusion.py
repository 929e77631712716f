"""Diffusion denoised smoothing: an off-the-shelf pixel-space diffusion model as a frozen denoiser.

Carlini et al. (2023), "(Certified!!) Adversarial Robustness for Free!": put an unconditional diffusion
model in front of an off-the-shelf classifier and certify the composition; no fitting queries at all.
For smoothing noise ``δ ~ N(0, σ² I)`` on images in ``[0, 1]`` and a diffusion model that works on
``[lo, hi]`` (``[-1, 1]`` for diffusers models; input scale ``s = hi − lo``):

1. ``t*`` is the smallest training timestep whose noise level ``sqrt((1 − ᾱ_t) / ᾱ_t)`` is not below
   ``σ·s`` (:func:`select_timestep`): the timestep whose noise is closest to, and not weaker than, the
   smoothing noise seen in the model's own units.
2. ``x_t = sqrt(ᾱ_t*) · (lo + s·(x + δ))``: the noisy image is then (up to the rounding of ``t*``) a
   sample of the forward process at ``t*``.
3. One UNet call predicts ``x̂0`` (``epsilon``, ``v_prediction`` or ``sample`` parametrisation, read
   from the scheduler config, :func:`predict_x0`), mapped back to ``[0, 1]`` by ``(x̂0 − lo) / s``.
   With ``steps > 1`` deterministic DDIM steps (``η = 0``, :func:`ddim_timesteps`) run from ``t*``
   to a small timestep instead: no fresh randomness anywhere.

Guarantees:

- The module is a deterministic, per-sample function of ``x + δ`` (UNet2DModel uses group norm, is run
  in eval mode and under ``no_grad``; DDIM with ``η = 0`` draws nothing), so it is part of a fixed base
  classifier and the smoothing certificate stays valid. One model serves every σ: the module is built
  for the σ it is certified at (``config.sigma``).
- Loading never unpickles and never reaches a hub: the directory must hold safetensors weights
  (``.bin``/``.pt``/``.ckpt`` alone are refused with :class:`~blackbox_rs.errors.UnsafeModelFileError`),
  and ``UNet2DModel.from_pretrained(dir, use_safetensors=True, local_files_only=True)`` reads them.
- Identity: at creation the content digest of exactly the files that are used (the UNet's
  ``config.json``, its safetensors weights, the ``scheduler_config.json``) is computed, before and after
  loading (a directory that changes meanwhile is refused), and recorded in the config together with
  ``t*``, the parametrisation and the input range. :meth:`DiffusionDenoiser.digest` covers all of them
  but not the directory's location, so certificates and resume files bind to the exact weights and
  settings wherever the directory lies. A saved module (``module_config.json``; the weights are *not*
  copied) re-checks the digest when it is loaded: a changed directory raises
  :class:`~blackbox_rs.errors.DenoiserModelError`.
- No trainable parameters (``num_trainable() == 0``); put a ``denoiser_adapter``
  (:mod:`blackbox_rs.modules.adapter`) after it to fit something through the black box.

Accepted layouts: a directory written by ``UNet2DModel.save_pretrained`` plus
``scheduler.save_pretrained`` into the same folder (``config.json``, ``scheduler_config.json``,
``diffusion_pytorch_model.safetensors``), or a pipeline folder with ``unet/`` and ``scheduler/``
subfolders (``DDPMPipeline.save_pretrained``). Bad directories, a scheduler that does not match the
model (timesteps, learned variance, parametrisation), class-conditional or latent models, and an
image size or channel count the UNet cannot take raise :class:`~blackbox_rs.errors.DenoiserModelError`.

``diffusers`` is an optional extra (``pip install 'blackbox-rs[diffusion]'``), imported only when a
module is built; ``transformers`` is not needed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from blackbox_rs.binding import hash_state
from blackbox_rs.errors import DenoiserModelError, MissingDependencyError, UnsafeModelFileError
from blackbox_rs.modules.base import InputModule, ModuleConfig
from blackbox_rs.modules.diffusion_math import (
    PREDICTION_TYPES,
    PredictionType,
    ddim_timesteps,
    diffusion_denoise,
    noise_levels,
    predict_eps,
    predict_x0,
    select_timestep,
)
from blackbox_rs.modules.registry import register_module
from blackbox_rs.paths import file_sha256

__all__ = [
    "DiffusionDenoiser",
    "DiffusionDenoiserConfig",
    "alphas_cumprod_from_config",
    "ddim_timesteps",
    "diffusion_denoise",
    "directory_digest",
    "noise_levels",
    "predict_eps",
    "predict_x0",
    "select_timestep",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHTS = "diffusion_pytorch_model.safetensors"
_WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_PICKLED_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
_INSTALL = "pip install diffusers (or pip install 'blackbox-rs[diffusion]')"


def _import_diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise MissingDependencyError(f"the 'diffusion' input module needs the 'diffusers' package: {_INSTALL}") from None
    return diffusers


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DenoiserModelError(f"{path}: file not found (expected a diffusers directory written by save_pretrained)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DenoiserModelError(f"{path}: cannot read JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DenoiserModelError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _layout(model_dir: Path) -> tuple[Path, Path]:
    """(UNet folder, scheduler folder) of a diffusers directory."""
    if not model_dir.is_dir():
        raise DenoiserModelError(f"{model_dir}: not a directory (expected a diffusers model directory)")
    if (model_dir / "unet").is_dir():
        return model_dir / "unet", model_dir / "scheduler"
    return model_dir, model_dir


def _weight_files(unet_dir: Path) -> list[Path]:
    """The safetensors files ``from_pretrained(use_safetensors=True)`` reads (single file, or an index
    and its shards). Refuses pickled-only weights and directories without weights."""
    single, index = unet_dir / _WEIGHTS, unet_dir / _WEIGHTS_INDEX
    if single.is_file() and index.is_file():  # diffusers would load the shards: refuse the ambiguity
        raise DenoiserModelError(f"{unet_dir}: holds both {_WEIGHTS} and {_WEIGHTS_INDEX}; keep one, so the "
                                 f"weights that run are the weights the module's digest names")
    if single.is_file():
        return [single]
    if index.is_file():
        data = _read_config(index)
        shards = sorted({str(v) for v in (data.get("weight_map") or {}).values()})
        if not shards:
            raise DenoiserModelError(f"{index}: has no weight_map")
        files = []
        for s in shards:
            p = unet_dir / s
            if Path(s).name != s or p.suffix != ".safetensors" or not p.is_file():
                raise DenoiserModelError(f"{index}: shard {s!r} is not a safetensors file in {unet_dir}")
            files.append(p)
        return [index, *files]
    pickled = sorted(p.name for p in unet_dir.iterdir() if p.suffix in _PICKLED_SUFFIXES)
    if pickled:
        raise UnsafeModelFileError(
            f"{unet_dir}: holds pickled weights only ({', '.join(pickled)}), which loading would unpickle; "
            f"convert them to safetensors (save_pretrained(..., safe_serialization=True)) first",
            path=str(unet_dir / pickled[0]), reason="pickled weights",
        )
    other = sorted(p.name for p in unet_dir.glob("*.safetensors"))
    extra = f" (found {', '.join(other)}: variant files are not loaded; rename to {_WEIGHTS})" if other else ""
    raise DenoiserModelError(f"{unet_dir}: no {_WEIGHTS} (safetensors weights of a UNet2DModel){extra}")


def _used_files(model_dir: Path) -> list[Path]:
    unet_dir, sched_dir = _layout(model_dir)
    files = [unet_dir / "config.json", *_weight_files(unet_dir), sched_dir / "scheduler_config.json"]
    for f in files:
        if not f.is_file():
            raise DenoiserModelError(f"{f}: file not found (expected a diffusers directory written by save_pretrained)")
    return files


def directory_digest(model_dir: str | os.PathLike[str]) -> str:
    """``"sha256:<hex>"`` over the relative name and SHA-256 of every file the module reads from
    ``model_dir`` (UNet ``config.json``, safetensors weights, ``scheduler_config.json``), in name order.
    Independent of where the directory lies; other files in it do not count."""
    d = Path(model_dir)
    h = hashlib.sha256(b"blackbox-rs/diffusion-dir/v1\0")
    for f in sorted(_used_files(d), key=lambda p: p.relative_to(d).as_posix()):
        h.update(f"{f.relative_to(d).as_posix()}\0{file_sha256(f)}\n".encode())
    return f"sha256:{h.hexdigest()}"


_NOT_VP = frozenset({"ScoreSdeVeScheduler", "KarrasVeScheduler", "ScoreSdeVpScheduler"})  # no DDPM betas
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "rescale_betas_zero_snr")


def alphas_cumprod_from_config(scheduler_config: dict[str, Any], *, source: str = "scheduler config") -> torch.Tensor:
    """``ᾱ_t`` (float64) of the training schedule a diffusers scheduler config describes, computed by
    diffusers' own ``DDPMScheduler`` from the schedule keys only (beta_start/end/schedule, trained
    betas; absent keys take DDPMScheduler's defaults): the definition of every variance-preserving
    (DDPM-family) diffusers scheduler. The score-SDE / Karras schedulers (``ScoreSdeVe``, ``KarrasVe``,
    ``ScoreSdeVp``, or a config with sigma_min/sigma_max and no betas) are refused: their noise levels
    are not ``sqrt((1 - ᾱ) / ᾱ)`` of a beta schedule."""
    _import_diffusers()
    from diffusers import DDPMScheduler

    name = scheduler_config.get("_class_name", "")
    if not (isinstance(name, str) and name.endswith("Scheduler")) or not isinstance(
        scheduler_config.get("num_train_timesteps"), int
    ):
        raise DenoiserModelError(
            f"{source}: not a diffusers noise-scheduler config (_class_name {name!r}, "
            f"num_train_timesteps {scheduler_config.get('num_train_timesteps')!r})"
        )
    no_betas = "beta_schedule" not in scheduler_config and "trained_betas" not in scheduler_config
    if name in _NOT_VP or (no_betas and ({"sigma_min", "sigma_max"} & set(scheduler_config))):
        raise DenoiserModelError(
            f"{source}: {name} has no beta schedule (beta_schedule or trained_betas): only variance-preserving "
            f"DDPM-family schedulers are supported, whose noise levels are sqrt((1 - abar) / abar)"
        )
    kwargs = {k: scheduler_config[k] for k in _SCHEDULE_KEYS if k in scheduler_config}
    try:
        sched = DDPMScheduler(**kwargs)
    except (NotImplementedError, ValueError, TypeError) as exc:
        raise DenoiserModelError(f"{source}: unsupported noise schedule: {exc}") from None
    abar = sched.alphas_cumprod.to(torch.float64)
    if abar.numel() < 1 or not torch.isfinite(abar).all() or (abar <= 0).any() or (abar > 1).any():
        raise DenoiserModelError(f"{source}: the schedule's cumulative alphas are not in (0, 1]")
    return abar


# ---------------------------------------------------------------------------------------- module
class DiffusionDenoiserConfig(ModuleConfig):
    """Configuration of :class:`DiffusionDenoiser`. ``model_digest``, ``timestep``, ``prediction_type``
    and ``input_range`` may be left out: they are filled in at creation and recorded."""

    name: Literal["diffusion"] = "diffusion"
    model_dir: str = Field(description="diffusers directory (save_pretrained layout, safetensors weights)")
    model_digest: str | None = Field(
        default=None, description="content digest of the directory's used files; None: computed at creation, "
        "otherwise checked against the directory"
    )
    sigma: float = Field(gt=0, le=100, description="the smoothing noise level this denoiser is certified at")
    input_range: tuple[float, float] | None = Field(
        default=None, description="value range the diffusion model works on; None: (-1, 1), the diffusers "
        "convention (input scale 2)"
    )
    steps: int = Field(default=1, ge=1, le=1000, description="1: one-shot x0 prediction; more: deterministic DDIM steps")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="dtype the UNet runs in")
    timestep: int | None = Field(default=None, ge=0, description="t* (recorded at creation; checked when given)")
    prediction_type: PredictionType | None = Field(
        default=None, description="parametrisation of the UNet output; None: read from the scheduler config "
        "(recorded at creation)"
    )

    @field_validator("input_range")
    @classmethod
    def _ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not (math.isfinite(v[0]) and math.isfinite(v[1]) and v[0] < v[1]):
            raise ValueError(f"input_range must be (lo, hi) with lo < hi, got {v}")
        return v

    @property
    def input_scale(self) -> float:
        """``hi − lo`` of the model's value range (2 for [-1, 1])."""
        lo, hi = self.input_range or (-1.0, 1.0)
        return hi - lo


def _check_unet_config(cfg: dict[str, Any], sched: dict[str, Any], shape: tuple[int, int, int],
                       where: Path) -> bool:
    """Check the UNet fits the scheduler and the image shape; return True when its output carries a
    learned variance in its second half (to be dropped)."""
    name = cfg.get("_class_name")
    if name != "UNet2DModel":
        raise DenoiserModelError(
            f"{where}: the model is a {name!r}, not a UNet2DModel (pixel-space, unconditional): latent or "
            f"text-conditional diffusion models are not supported"
        )
    if cfg.get("num_class_embeds") is not None or cfg.get("class_embed_type") is not None:
        raise DenoiserModelError(f"{where}: the UNet is class-conditional; an unconditional model is needed")
    c, h, w = shape
    cin, cout = cfg.get("in_channels"), cfg.get("out_channels")
    if cin != c:
        raise DenoiserModelError(f"{where}: the UNet takes {cin} channels, the images have {c} (input_shape={shape})")
    variance = sched.get("variance_type")
    learned = variance in ("learned", "learned_range")
    if cout == 2 * c and learned:
        split = True
    elif cout == c and not learned:
        split = False
    else:
        raise DenoiserModelError(
            f"{where}: the scheduler ({sched.get('_class_name')}, variance_type={variance!r}) does not match the "
            f"UNet's {cout} output channels for {c} input channels (expected {2 * c if learned else c})"
        )
    t_model, t_sched = cfg.get("num_train_timesteps"), sched.get("num_train_timesteps")
    if t_model is not None and t_model != t_sched:
        raise DenoiserModelError(
            f"{where}: the UNet was trained for {t_model} timesteps, the scheduler has {t_sched}"
        )
    blocks = cfg.get("block_out_channels") or []
    factor = 2 ** max(len(blocks) - 1, 0)
    if h % factor or w % factor:
        raise DenoiserModelError(
            f"{where}: the UNet downsamples {len(blocks) - 1} times and needs H and W divisible by {factor}; "
            f"input_shape={shape} is not (resize or crop the images)"
        )
    return split


@register_module("diffusion")
class DiffusionDenoiser(InputModule):
    """A frozen diffusers ``UNet2DModel`` denoising at the noise level ``config.sigma`` (see the module
    docstring). ``max_batch`` (attribute, not part of the identity) caps the images per UNet call."""

    config_class = DiffusionDenoiserConfig
    spatially_flexible = False
    config: DiffusionDenoiserConfig

    def __init__(self, config: DiffusionDenoiserConfig) -> None:
        super().__init__(config)
        _import_diffusers()
        from diffusers import UNet2DModel

        model_dir = Path(config.model_dir).expanduser().resolve()
        digest = directory_digest(model_dir)
        if config.model_digest is not None and config.model_digest != digest:
            raise DenoiserModelError(
                f"{model_dir}: its files have digest {digest}, not the recorded {config.model_digest}: the "
                f"diffusion model changed since this module was created"
            )
        unet_dir, sched_dir = _layout(model_dir)
        sched = _read_config(sched_dir / "scheduler_config.json")
        unet_cfg = _read_config(unet_dir / "config.json")
        self._split = _check_unet_config(unet_cfg, sched, config.input_shape, unet_dir)
        abar = alphas_cumprod_from_config(sched, source=str(sched_dir / "scheduler_config.json"))
        prediction = config.prediction_type or sched.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise DenoiserModelError(
                f"{sched_dir / 'scheduler_config.json'}: prediction_type {prediction!r} is not one of "
                f"{list(PREDICTION_TYPES)}"
            )
        input_range = config.input_range or (-1.0, 1.0)
        t_star = select_timestep(abar, config.sigma * (input_range[1] - input_range[0]))
        if config.timestep is not None and config.timestep != t_star:
            raise DenoiserModelError(
                f"{model_dir}: t* for sigma={config.sigma} is {t_star} under this schedule, the config records "
                f"{config.timestep}"
            )
        try:
            unet = UNet2DModel.from_pretrained(str(unet_dir), use_safetensors=True, local_files_only=True,
                                               torch_dtype=_DTYPES[config.dtype])
        except Exception as exc:  # diffusers raises OSError, ValueError, EnvironmentError, ... for bad files
            raise DenoiserModelError(f"{unet_dir}: cannot load the UNet2DModel: {type(exc).__name__}: {exc}") from None
        if directory_digest(model_dir) != digest:
            raise DenoiserModelError(f"{model_dir}: the files changed while they were being loaded; try again")
        unet.eval()
        unet.requires_grad_(False)
        object.__setattr__(self, "_unet", unet)  # not a submodule: not in state_dict, never trained
        self._abar = abar
        self._clip = bool(sched.get("clip_sample", False))
        self.timesteps: list[int] = ddim_timesteps(t_star, config.steps)
        self.max_batch: int | None = None
        self.config = config.model_copy(update={
            "model_dir": str(model_dir), "model_digest": digest, "timestep": t_star,
            "prediction_type": prediction, "input_range": tuple(input_range),
        })

    # ------------------------------------------------------------------ device
    @property
    def device(self) -> torch.device:
        """Where the UNet runs (move it with ``module.to(device)``; the dtype stays ``config.dtype``)."""
        return next(self._unet.parameters()).device

    def _apply(self, fn: Any, recurse: bool = True) -> DiffusionDenoiser:  # type: ignore[override]
        out = super()._apply(fn, recurse)
        target = fn(torch.zeros(1))  # .to(device) / .cuda() / .cpu() move the UNet; dtype casts do not
        if isinstance(target, torch.Tensor) and target.device != self.device:
            self._unet.to(device=target.device)
        return out

    # ------------------------------------------------------------------ forward
    def _net(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        ts = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
        out = self._unet(x_t.to(_DTYPES[self.config.dtype]), ts).sample
        if self._split:
            out = out[:, : x_t.shape[1]]
        return out.to(x_t.dtype)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        assert cfg.prediction_type is not None and cfg.input_range is not None
        chunks = x.split(self.max_batch) if self.max_batch else (x,)
        outs = []
        with torch.no_grad():
            for chunk in chunks:
                u = chunk.detach().to(device=self.device, dtype=torch.float32)
                outs.append(diffusion_denoise(
                    self._net, u, alphas_cumprod=self._abar, timesteps=self.timesteps,
                    prediction_type=cfg.prediction_type, input_range=cfg.input_range, clip_sample=self._clip,
                ))
        return torch.cat(outs).to(device=x.device, dtype=x.dtype)

    # ------------------------------------------------------------------ identity
    def identity_config(self) -> dict[str, Any]:
        """The config as identity: everything but ``model_dir`` (a location; the content is ``model_digest``)."""
        data = self.config.model_dump(mode="json")
        data.pop("model_dir", None)
        return data

    @torch.no_grad()
    def digest(self) -> str:
        """``"module:diffusion:sha256:<hex>"`` over :meth:`identity_config` (model content digest, σ,
        t*, parametrisation, input range, steps, dtype) and the (empty) state dict."""
        h = hashlib.sha256(b"blackbox-rs/module-digest/v1\0")
        h.update(json.dumps(self.identity_config(), sort_keys=True).encode())
        hash_state(h, self.state_dict())
        return f"module:{self.name}:sha256:{h.hexdigest()}"
