"""Fitting objective terms for input modules.

``mse``: the denoising loss ``mean((A(x+δ) − x)²)`` of :func:`mse_loss`; it needs no classifier and no
queries, and autograd flows through it. The other terms of a fit (``stability``, ``classification``,
and the zeroth-order black-box losses) are computed by the strategies in
:mod:`blackbox_rs.fitting.strategies`, next to the queries they need.

Row convention: one row per *noisy sample*: ``clean[r]`` is the clean image of row ``r`` of
``outputs``. Expand per-image tensors with :func:`blackbox_rs.fitting.draws.repeat_draws` (the
image-major layout); the MSE is a mean over rows, so any layout shared by both arguments gives it.

Losses are returned in at least float32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from blackbox_rs.errors import InvalidInputError

__all__ = ["mse_loss"]


# ---------------------------------------------------------------------------- checks
def _as_loss_dtype(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _check_float(name: str, t: Any, dims: int | tuple[int, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    allowed = (dims,) if isinstance(dims, int) else dims
    if t.dim() not in allowed:
        raise InvalidInputError(
            f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}"
        )
    if not t.is_floating_point():
        raise InvalidInputError(f"{name} must be floating point, got {t.dtype}")
    if not torch.isfinite(t.detach()).all():
        raise InvalidInputError(f"{name} contains non-finite values")
    return t


def _check_nonempty(name: str, t: torch.Tensor) -> None:
    if t.shape[0] == 0:
        raise InvalidInputError(f"{name} is empty: a loss needs at least one sample")


# ---------------------------------------------------------------------------- terms
def mse_loss(outputs: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Denoising loss ``mean((outputs − clean)²)`` over every element. Needs no classifier and no queries.

    ``outputs`` is the (unclamped) module output on noisy inputs; ``clean`` the matching clean images.
    """
    _check_float("outputs", outputs, 4)
    _check_float("clean", clean, 4)
    if outputs.shape != clean.shape:
        raise InvalidInputError(
            f"outputs {tuple(outputs.shape)} and clean {tuple(clean.shape)} must have the same shape"
        )
    _check_nonempty("outputs", outputs)
    return F.mse_loss(_as_loss_dtype(outputs), _as_loss_dtype(clean))
