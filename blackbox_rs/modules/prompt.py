"""Additive visual prompts (input-independent reprogramming, as in BAR / visual prompting).

- ``prompt_full``: ``A(x) = x + P`` with a learnable ``C×H×W`` delta ``P`` (zero init).
- ``prompt_pad``: ``A(x) = x + P`` where ``P`` is zero except on a border of width ``pad``; only the
  border pixels are parameters (``C·(2·pad·W + 2·pad·(H − 2·pad))`` scalars), which keeps the
  dimension small for zeroth-order fitting.

Both are exactly the identity at initialisation and need the exact ``input_shape`` (C, H, W).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from blackbox_rs.modules.base import InputModule, ModuleConfig
from blackbox_rs.modules.registry import register_module

__all__ = ["FullFramePrompt", "FullFramePromptConfig", "PaddingPrompt", "PaddingPromptConfig"]


class FullFramePromptConfig(ModuleConfig):
    """Configuration of :class:`FullFramePrompt` (only ``input_shape``)."""

    name: Literal["prompt_full"] = "prompt_full"


@register_module("prompt_full")
class FullFramePrompt(InputModule):
    """``A(x) = x + P``, ``P`` a learnable ``C×H×W`` tensor, zero at initialisation."""

    config_class = FullFramePromptConfig

    def __init__(self, config: FullFramePromptConfig) -> None:
        super().__init__(config)
        self.delta = nn.Parameter(torch.zeros(*config.input_shape))

    def prompt(self) -> torch.Tensor:
        """The additive prompt ``P`` (``C×H×W``)."""
        return self.delta

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.delta.to(x.dtype)


class PaddingPromptConfig(ModuleConfig):
    """Configuration of :class:`PaddingPrompt`: ``pad`` is the border width in pixels."""

    name: Literal["prompt_pad"] = "prompt_pad"
    pad: int = Field(default=2, ge=1, description="Border width in pixels; 2*pad must be < H and < W.")

    @model_validator(mode="after")
    def _fits(self) -> PaddingPromptConfig:
        _, h, w = self.input_shape
        if 2 * self.pad >= min(h, w):
            raise ValueError(
                f"pad={self.pad} leaves no interior in a {h}x{w} image (need 2*pad < min(H, W)); "
                "use 'prompt_full' for a full-frame prompt"
            )
        return self


@register_module("prompt_pad")
class PaddingPrompt(InputModule):
    """``A(x) = x + P`` with ``P`` non-zero only on a border of width ``pad``; zero at initialisation."""

    config_class = PaddingPromptConfig
    config: PaddingPromptConfig

    def __init__(self, config: PaddingPromptConfig) -> None:
        super().__init__(config)
        c, h, w = config.input_shape
        p = config.pad
        self.top = nn.Parameter(torch.zeros(c, p, w))
        self.bottom = nn.Parameter(torch.zeros(c, p, w))
        self.left = nn.Parameter(torch.zeros(c, h - 2 * p, p))
        self.right = nn.Parameter(torch.zeros(c, h - 2 * p, p))

    def prompt(self) -> torch.Tensor:
        """The full ``C×H×W`` additive prompt (zeros in the interior)."""
        c, h, w = self.config.input_shape
        p = self.config.pad
        interior = self.top.new_zeros(c, h - 2 * p, w - 2 * p)
        middle = torch.cat([self.left, interior, self.right], dim=2)
        return torch.cat([self.top, middle, self.bottom], dim=1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.prompt().to(x.dtype)
