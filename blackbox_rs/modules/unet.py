"""Residual U-Net denoiser with a global-context bottleneck: ``A(x) = x + net(x)``.

Why a second denoiser: at large sigma (0.5 on 28×28 images) a DnCNN sees a few pixels at a time,
but deciding what a noisy image *is* (a shirt or a pullover) needs the whole image. The U-Net halves
the resolution at each level (stride-2 convolutions), and at the coarsest level adds a per-channel
offset computed from the global average of its features (a squeeze-and-excitation style context), so
every output pixel can depend on the whole input. Upsampling is nearest-neighbour followed by a
convolution; each decoder level concatenates the encoder features of the same resolution (skip
connections), so fine detail is still reconstructed locally.

Guarantees (the :class:`~blackbox_rs.modules.base.InputModule` contract):

- the last convolution is zero-initialised (weights and bias): an unfitted U-Net is exactly the
  identity map;
- normalisation is per sample (GroupNorm, whose statistics also span the whole image) or none,
  never batch statistics: one sample's output never depends on its batch, as a smoothing
  certificate requires;
- H and W must be multiples of ``2 ** (len(widths) - 1)`` (28×28 and 32×32 work with 3 levels).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from blackbox_rs.errors import InvalidInputError
from blackbox_rs.modules.base import InputModule, ModuleConfig
from blackbox_rs.modules.denoiser import group_count, init_residual_branch
from blackbox_rs.modules.registry import register_module

__all__ = ["UNet", "UNetConfig"]


class UNetConfig(ModuleConfig):
    """Configuration of :class:`UNet`: one width per resolution level (finest first)."""

    name: Literal["unet"] = "unet"
    widths: tuple[int, ...] = Field(
        default=(32, 64, 64), min_length=2, max_length=5,
        description="channels per level, finest first; each further level halves H and W",
    )
    convs_per_level: int = Field(default=2, ge=1, le=4, description="3x3 convolutions per level and path")
    norm: Literal["none", "group"] = Field(default="group", description="per-sample GroupNorm, or none")
    global_context: bool = Field(
        default=True, description="add a per-channel offset from the global mean at the coarsest level"
    )

    @field_validator("widths")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(w < 1 or w > 1024 for w in v):
            raise ValueError(f"every width must be in 1..1024, got {v}")
        return v

    @model_validator(mode="after")
    def _divisible(self) -> UNetConfig:
        f = 2 ** (len(self.widths) - 1)
        h, w = self.input_shape[1], self.input_shape[2]
        if h % f or w % f:
            raise ValueError(
                f"a U-Net with {len(self.widths)} levels needs H and W divisible by {f}; "
                f"input_shape is {tuple(self.input_shape)} (use fewer widths)"
            )
        return self


class _Stage(nn.Sequential):
    """``convs`` × (3×3 conv → norm → ReLU); the first conv maps ``cin`` to ``cout`` with ``stride``."""

    def __init__(self, cin: int, cout: int, convs: int, norm: str, stride: int = 1) -> None:
        layers: list[nn.Module] = []
        for i in range(convs):
            layers.append(nn.Conv2d(cin if i == 0 else cout, cout, 3, stride=stride if i == 0 else 1, padding=1))
            layers.append(nn.GroupNorm(group_count(cout), cout) if norm == "group" else nn.Identity())
            layers.append(nn.ReLU())
        super().__init__(*layers)


class UNetNet(nn.Module):
    """The residual branch: encoder stages, global context, decoder stages with skips, zero tail."""

    def __init__(self, channels: int, widths: tuple[int, ...], convs: int, norm: str, global_context: bool) -> None:
        super().__init__()
        self.levels = len(widths)
        self.down = nn.ModuleList()
        for i, w in enumerate(widths):
            self.down.append(_Stage(channels if i == 0 else widths[i - 1], w, convs, norm, stride=1 if i == 0 else 2))
        deepest = widths[-1]
        self.context = (
            nn.Sequential(nn.Linear(deepest, deepest), nn.ReLU(), nn.Linear(deepest, deepest))
            if global_context else None
        )
        self.up = nn.ModuleList()
        for i in range(self.levels - 2, -1, -1):  # coarse to fine
            self.up.append(_Stage(widths[i + 1] + widths[i], widths[i], convs, norm))
        self.tail = nn.Conv2d(widths[0], channels, 3, padding=1)
        init_residual_branch(self, self.tail)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = 2 ** (self.levels - 1)
        if x.shape[-2] % f or x.shape[-1] % f:
            raise InvalidInputError(f"this U-Net needs H and W divisible by {f}, got {tuple(x.shape[-2:])}")
        skips = []
        h = x
        for stage in self.down:
            h = stage(h)
            skips.append(h)
        if self.context is not None:
            h = h + self.context(h.mean(dim=(2, 3)))[:, :, None, None]
        for i, stage in enumerate(self.up):
            skip = skips[self.levels - 2 - i]
            h = nn.functional.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = stage(torch.cat([h, skip], dim=1))
        return self.tail(h)


@register_module("unet")
class UNet(InputModule):
    """Residual U-Net denoiser ``A(x) = x + net(x)`` with whole-image context; the identity at
    initialisation."""

    config_class = UNetConfig
    spatially_flexible = True
    config: UNetConfig

    def __init__(self, config: UNetConfig) -> None:
        super().__init__(config)
        c = config.input_shape[0]
        self.net = UNetNet(c, tuple(config.widths), config.convs_per_level, config.norm, config.global_context)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)
