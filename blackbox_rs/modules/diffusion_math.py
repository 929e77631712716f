"""The pure maths of diffusion denoised smoothing (Carlini et al. 2023), no diffusers needed: the noise
level of each timestep, the timestep ``t*`` whose level matches a smoothing sigma, the one-shot
``x0`` prediction for epsilon / v / sample parametrisations, and deterministic DDIM steps. The
module that loads a diffusers UNet and uses them is :mod:`blackbox_rs.modules.diffusion`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from blackbox_rs.errors import ConfigError

__all__ = ["PREDICTION_TYPES", "PredictionType", "ddim_timesteps", "diffusion_denoise", "noise_levels", "predict_eps", "predict_x0",
           "select_timestep"]

PredictionType = Literal["epsilon", "v_prediction", "sample"]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def noise_levels(alphas_cumprod: Sequence[float] | torch.Tensor) -> list[float]:
    """``sqrt((1 − ᾱ_t) / ᾱ_t)`` for every timestep t (float64): the standard deviation of the noise of
    ``x_t / sqrt(ᾱ_t)``, in the model's units."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).reshape(-1)
    return torch.sqrt((1.0 - abar) / abar).tolist()


def select_timestep(alphas_cumprod: Sequence[float] | torch.Tensor, noise_std: float) -> int:
    """``t*``: the smallest timestep whose noise level (:func:`noise_levels`) is ``>= noise_std``, i.e.
    closest to and not below it (noise levels grow with t). ``noise_std`` is σ times the input scale.

    Raises :class:`ConfigError` if even the last timestep is less noisy (σ too large for the schedule).
    """
    if not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and noise_std > 0):
        raise ConfigError(f"noise_std must be a positive finite number, got {noise_std!r}")
    levels = noise_levels(alphas_cumprod)
    for t, level in enumerate(levels):
        if level >= noise_std:
            return t
    raise ConfigError(
        f"noise level {noise_std:g} (sigma times the input scale) is above the schedule's largest, "
        f"{levels[-1]:.4g} at t={len(levels) - 1}: this diffusion model cannot denoise at that sigma"
    )


def predict_x0(model_output: torch.Tensor, x_t: torch.Tensor, abar: float, prediction_type: str) -> torch.Tensor:
    """The one-shot clean-image estimate from a UNet output at a timestep with ``ᾱ = abar``:
    ``epsilon``: ``(x_t − sqrt(1−ᾱ)·ε̂) / sqrt(ᾱ)``; ``v_prediction``: ``sqrt(ᾱ)·x_t − sqrt(1−ᾱ)·v̂``;
    ``sample``: the output itself."""
    a, b = math.sqrt(abar), math.sqrt(1.0 - abar)
    if prediction_type == "epsilon":
        return (x_t - b * model_output) / a
    if prediction_type == "v_prediction":
        return a * x_t - b * model_output
    if prediction_type == "sample":
        return model_output
    raise ConfigError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")


def predict_eps(model_output: torch.Tensor, x_t: torch.Tensor, abar: float, prediction_type: str) -> torch.Tensor:
    """The noise estimate ``ε̂`` implied by a UNet output (used by the DDIM steps)."""
    a, b = math.sqrt(abar), math.sqrt(1.0 - abar)
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return a * model_output + b * x_t
    if prediction_type == "sample":
        return (x_t - a * model_output) / b
    raise ConfigError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")


def ddim_timesteps(t_star: int, steps: int) -> list[int]:
    """The decreasing timesteps a ``steps``-step deterministic DDIM run visits from ``t*``:
    ``round(t*·(steps − k) / steps)`` for k = 0 .. steps−1, duplicates dropped. ``steps=1``: ``[t*]``."""
    if steps < 1 or t_star < 0:
        raise ConfigError(f"need steps >= 1 and t* >= 0, got steps={steps}, t*={t_star}")
    out: list[int] = []
    for k in range(steps):
        t = round(t_star * (steps - k) / steps)
        if not out or t < out[-1]:
            out.append(t)
    return out


def diffusion_denoise(
    net: Callable[[torch.Tensor, int], torch.Tensor],
    x: torch.Tensor,
    *,
    alphas_cumprod: Sequence[float] | torch.Tensor,
    timesteps: Sequence[int],
    prediction_type: str,
    input_range: tuple[float, float] = (-1.0, 1.0),
    clip_sample: bool = False,
) -> torch.Tensor:
    """Denoise ``x`` (noisy images in [0, 1] units) with ``net(x_t, t) -> model output``.

    ``x_t = sqrt(ᾱ_t0) · (lo + s·x)`` at ``t0 = timesteps[0]``; each step predicts ``x̂0``; between
    steps the deterministic DDIM update ``x_t' = sqrt(ᾱ_t')·x̂0 + sqrt(1−ᾱ_t')·ε̂`` runs (``x̂0``
    clamped to ``[lo, hi]`` there when ``clip_sample``). Returns ``(x̂0 − lo) / s`` of the last step,
    not clipped, in ``x``'s dtype. Pure: no randomness, no state.
    """
    if not timesteps:
        raise ConfigError("timesteps must not be empty")
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).reshape(-1).tolist()
    lo, hi = float(input_range[0]), float(input_range[1])
    scale = hi - lo
    x_t = math.sqrt(abar[timesteps[0]]) * (lo + scale * x)
    x0 = x_t
    for i, t in enumerate(timesteps):
        out = net(x_t, int(t))
        x0 = predict_x0(out, x_t, abar[t], prediction_type)
        if i + 1 < len(timesteps):
            eps = predict_eps(out, x_t, abar[t], prediction_type)
            if clip_sample:
                x0 = x0.clamp(lo, hi)
            a_next = abar[timesteps[i + 1]]
            x_t = math.sqrt(a_next) * x0 + math.sqrt(1.0 - a_next) * eps
    return (x0 - lo) / scale


# ---------------------------------------------------------------------------------------- files
