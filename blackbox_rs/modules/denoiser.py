"""Residual DnCNN-style denoiser (Zhang et al. 2017; as used by denoised smoothing, Salman et al. 2020).

``A(x) = x + net(x)``, ``net = conv(C→W) → ReLU → [conv(W→W) → (GroupNorm) → ReLU] × (depth − 2) → conv(W→C)``
with 3×3 convolutions and "same" padding. With ``downsample=s > 1`` the head convolution has stride s
and the tail predicts ``C·s²`` channels that a pixel shuffle puts back at full resolution: the body
runs on an (H/s)×(W/s) grid, so each layer costs s² times less and sees s times further (a cheaper
way to buy the receptive field that denoising at large sigma needs; H and W must be multiples of s).
The last convolution (weights and bias) is zero-initialised,
so an unfitted denoiser is exactly the identity map. No batch normalisation: the output for one
sample never depends on the rest of its batch (a requirement for a valid smoothing certificate).
The network is fully convolutional, so any H, W is accepted (multiples of s with ``downsample=s``);
C must match ``input_shape``.

Defaults are small, for 1-channel 28×28 and 3-channel 32×32 images: ``depth=6, width=32`` for one
channel and ``depth=8, width=64`` otherwise (chosen from ``input_shape`` when left unset).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from blackbox_rs.errors import ConfigError, InvalidInputError
from blackbox_rs.modules.base import InputModule, ModuleConfig
from blackbox_rs.modules.registry import register_module

__all__ = ["ConvStack", "DnCNN", "DnCNNArchConfig", "DnCNNConfig", "DnCNNNet", "build_dncnn_net", "group_count",
           "init_residual_branch"]


class DnCNNArchConfig(ModuleConfig):
    """Architecture fields shared by every DnCNN-based module (not registered itself).

    ``depth``/``width`` left unset are resolved from the channel count when the config is validated,
    so a saved config always records the resolved values.
    """

    depth: int | None = Field(
        default=None, ge=2, le=64, description="Number of conv layers (>= 2). None: 6 for C=1, else 8."
    )
    width: int | None = Field(
        default=None, ge=1, le=1024, description="Hidden channels. None: 32 for C=1, else 64."
    )
    kernel_size: int = Field(default=3, ge=1, le=9, description="Odd kernel size of every conv.")
    norm: Literal["none", "group"] = Field(
        default="none", description="Per-sample normalisation of hidden layers ('group' = GroupNorm)."
    )
    downsample: int = Field(
        default=1, ge=1, le=8,
        description="Stride of the head conv; the tail pixel-shuffles back (H, W must be multiples).",
    )

    def architecture(self) -> dict[str, object]:
        """The fields shared by every DnCNN-based config (everything but ``name`` and the subclass's
        own settings): what two configs must agree on to describe the same network."""
        return {k: getattr(self, k) for k in DnCNNArchConfig.model_fields if k != "name"}

    @model_validator(mode="after")
    def _resolve(self) -> DnCNNArchConfig:
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {self.kernel_size}")
        c = self.input_shape[0]
        h, w = self.input_shape[1], self.input_shape[2]
        if self.downsample > 1 and (h % self.downsample or w % self.downsample):
            raise ValueError(
                f"downsample={self.downsample} needs H and W divisible by it; input_shape is {tuple(self.input_shape)}"
            )
        if self.depth is None:
            object.__setattr__(self, "depth", 6 if c == 1 else 8)
        if self.width is None:
            object.__setattr__(self, "width", 32 if c == 1 else 64)
        return self


class DnCNNConfig(DnCNNArchConfig):
    """Configuration of :class:`DnCNN`."""

    name: Literal["dncnn"] = "dncnn"


def group_count(width: int) -> int:
    """GroupNorm groups for ``width`` channels: the largest of 8, 4, 2 that divides it, else 1."""
    for g in (8, 4, 2):
        if width % g == 0:
            return g
    return 1


def init_residual_branch(net: nn.Module, tail: nn.Conv2d) -> None:
    """Kaiming-initialise every convolution of ``net`` (zero biases), then zero ``tail`` entirely, so
    ``x + net(x)`` is exactly the identity until fitted."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    nn.init.zeros_(tail.weight)
    nn.init.zeros_(tail.bias)


class ConvStack(nn.Module):
    """``head conv(cin -> width) -> ReLU -> [conv(width -> width) -> ReLU] x (depth - 2) -> tail
    conv(width -> cout)``, no normalisation, Kaiming-initialised with a zero tail (so a residual use of
    it is exactly the identity until fitted): the small stack of the ``lowres`` module and of the
    denoiser adapter."""

    def __init__(self, cin: int, cout: int, depth: int, width: int, kernel_size: int) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.head = nn.Conv2d(cin, width, kernel_size, padding=pad)
        self.body = nn.ModuleList(nn.Conv2d(width, width, kernel_size, padding=pad) for _ in range(depth - 2))
        self.tail = nn.Conv2d(width, cout, kernel_size, padding=pad)
        self.act = nn.ReLU()
        init_residual_branch(self, self.tail)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.head(x))
        for conv in self.body:
            h = self.act(conv(h))
        return self.tail(h)


class DnCNNNet(nn.Module):
    """The residual branch ``net`` of the denoiser. Layer names (``head``, ``body.i.conv``, ``tail``)
    are stable: LoRA adapters and saved tensors refer to them."""

    def __init__(
        self, channels: int, depth: int, width: int, kernel_size: int = 3, norm: str = "none", downsample: int = 1
    ) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.downsample = int(downsample)
        self.head = nn.Conv2d(channels, width, kernel_size, stride=self.downsample, padding=pad)
        self.body = nn.ModuleList()
        for _ in range(depth - 2):
            block = nn.Module()
            block.conv = nn.Conv2d(width, width, kernel_size, padding=pad)
            block.norm = nn.GroupNorm(group_count(width), width) if norm == "group" else nn.Identity()
            self.body.append(block)
        self.tail = nn.Conv2d(width, channels * self.downsample**2, kernel_size, padding=pad)
        self.shuffle = nn.PixelShuffle(self.downsample) if self.downsample > 1 else nn.Identity()
        self.act = nn.ReLU()
        init_residual_branch(self, self.tail)

    def conv_names(self) -> list[str]:
        """Qualified names of every ``Conv2d`` in this network, in forward order."""
        return [n for n, m in self.named_modules() if isinstance(m, nn.Conv2d)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.downsample
        if s > 1 and (x.shape[-2] % s or x.shape[-1] % s):
            raise InvalidInputError(f"this denoiser (downsample={s}) needs H and W divisible by {s}, got {tuple(x.shape[-2:])}")
        h = self.act(self.head(x))
        for block in self.body:
            h = self.act(block.norm(block.conv(h)))
        return self.shuffle(self.tail(h))


def build_dncnn_net(config: DnCNNArchConfig) -> DnCNNNet:
    """The (randomly initialised, zero-tail) residual branch described by ``config``."""
    depth, width = config.depth, config.width
    if depth is None or width is None:  # resolved by the validator; guards model_construct()
        raise ConfigError(
            f"{type(config).__name__}.depth/.width must be resolved; build the config with validation"
        )
    return DnCNNNet(config.input_shape[0], depth, width, config.kernel_size, config.norm, config.downsample)


@register_module("dncnn")
class DnCNN(InputModule):
    """Residual DnCNN denoiser ``A(x) = x + net(x)``; exactly the identity at initialisation."""

    config_class = DnCNNConfig
    spatially_flexible = True
    config: DnCNNConfig

    def __init__(self, config: DnCNNConfig) -> None:
        super().__init__(config)
        self.net = build_dncnn_net(config)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)
