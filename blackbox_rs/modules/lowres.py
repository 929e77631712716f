"""Reduced-resolution denoiser for large inputs (224×224 and up): the network runs on an area-downsampled
image, so fitting it in front of an ImageNet-size model takes minutes on a CPU, not days.

``d = avgpool_f(x)`` (area downsampling by ``factor`` f), ``h = body(d)`` (a small DnCNN-style stack of
3×3 convolutions and ReLUs at (H/f)×(W/f); no normalisation), ``up`` = bilinear upsampling back to H×W.
Two output forms (``output``):

- ``"gated"`` (default): ``A(x) = x + up(g) ⊙ (up(d + r) − x)`` where the tail predicts, per pixel of
  the low-resolution grid, a residual ``r`` (C channels) and a gate ``g`` (C channels). Where the gate
  is 1 the output is the denoised low-resolution image brought back to full size (the pixel noise of
  ``x`` is gone); where it is 0 the input passes unchanged (detail is kept).
- ``"residual"``: ``A(x) = x + up(r)``: only a smooth correction is added, the full-resolution pixel noise
  of ``x`` passes through (kept for comparison; see docs/large-inputs.md for the measurement).

Guarantees (the :class:`~blackbox_rs.modules.base.InputModule` contract): the tail convolution is
zero-initialised, so an unfitted module is exactly the identity (``g = 0``, ``r = 0``); every operation is
per sample (no batch statistics), so one sample's output never depends on its batch; the work per image
of the convolution stack is ``factor²`` times smaller than a DnCNN of the same depth and width at full
resolution. H and W must be multiples of ``factor`` (checked when the config is validated, and again on
every input of another size).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator

from blackbox_rs.errors import InvalidInputError
from blackbox_rs.modules.base import InputModule, ModuleConfig
from blackbox_rs.modules.denoiser import ConvStack
from blackbox_rs.modules.registry import register_module

__all__ = ["LowResDenoiser", "LowResDenoiserConfig"]


class LowResDenoiserConfig(ModuleConfig):
    """Configuration of :class:`LowResDenoiser`. Defaults are the documented setting for 3×224×224."""

    name: Literal["lowres"] = "lowres"
    factor: int = Field(default=4, ge=1, le=32, description="area-downsampling factor; must divide H and W")
    depth: int = Field(default=8, ge=2, le=64, description="conv layers of the low-resolution stack (>= 2)")
    width: int = Field(default=32, ge=1, le=1024, description="hidden channels of the low-resolution stack")
    kernel_size: int = Field(default=3, ge=1, le=9, description="odd kernel size of every conv")
    output: Literal["gated", "residual"] = Field(
        default="gated",
        description="'gated': x + up(g) * (up(d + r) - x); 'residual': x + up(r) (see the module docstring)",
    )

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {v}")
        return v

    @field_validator("factor")
    @classmethod
    def _divides(cls, v: int, info: ValidationInfo) -> int:
        shape = info.data.get("input_shape")
        if shape is not None and (shape[1] % v or shape[2] % v):
            raise ValueError(
                f"factor={v} must divide H and W, but input_shape is {tuple(shape)} "
                f"(H % {v} = {shape[1] % v}, W % {v} = {shape[2] % v}); pick a factor that divides both"
            )
        return v


@register_module("lowres")
class LowResDenoiser(InputModule):
    """Denoiser working at ``1/factor`` resolution (see the module docstring); exactly the identity at
    initialisation."""

    config_class = LowResDenoiserConfig
    spatially_flexible = True
    config: LowResDenoiserConfig

    def __init__(self, config: LowResDenoiserConfig) -> None:
        super().__init__(config)
        c = config.input_shape[0]
        self.net = ConvStack(c, c * (2 if config.output == "gated" else 1), config.depth, config.width,
                             config.kernel_size)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.config.factor
        h, w = x.shape[-2], x.shape[-1]
        if h % f or w % f:
            raise InvalidInputError(f"{self.name}: factor={f} needs H and W divisible by {f}, got {(h, w)}")
        d = F.avg_pool2d(x, f) if f > 1 else x
        out = self.net(d)
        c = x.shape[1]

        def up(t: torch.Tensor) -> torch.Tensor:
            return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False) if f > 1 else t

        if self.config.output == "residual":
            return x + up(out)
        r, g = out[:, :c], out[:, c:]
        return x + up(g) * (up(d + r) - x)
