"""Typed configuration of :func:`blackbox_rs.robust.robustify` (:class:`RobustifyConfig`).

Every field is described and validated; unknown keys are errors. :func:`make_config` turns a
pydantic validation failure into :class:`~blackbox_rs.errors.ConfigError` naming the field and the
problem (e.g. ``sigmas: sigma 5.0 is outside (0, 4]``), which is what :func:`robustify` raises.

The training mixture (Qiu et al. 2023, arXiv 2312.09020): each training image is, independently,
left clean with probability ``clean_weight / W`` or noised at ``sigmas[i]`` with probability
``sigma_weights[i] / W`` (``W``: the sum of all weights; ``sigma_weights`` default to 1 each), so one
model is trained for every listed sigma.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from blackbox_rs.errors import ConfigError

__all__ = ["MAX_SIGMA", "Method", "RobustifyConfig", "make_config"]

#: largest accepted noise level: inputs live in [0, 1], so sigma > 4 is noise that drowns any image
MAX_SIGMA = 4.0

Method = Literal["lora", "adapter", "prompt"]


class RobustifyConfig(BaseModel):
    """Settings of one robustify run (what is wrapped, the noise mixture, the optimiser, checkpoints).

    The defaults suit a small model on a CPU; ``steps`` x ``batch_size`` images are drawn (with
    replacement) from the training data.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method = Field(default="lora", description=(
        "which PEFT modules are trained: 'lora' (peft LoRA on Linear/Conv2d modules), 'adapter' "
        "(zero-initialised residual bottleneck adapters after target modules), 'prompt' (learnable "
        "prompt tokens prepended to a timm VisionTransformer's token sequence)"))
    sigmas: tuple[float, ...] = Field(default=(0.25,), min_length=1, description=(
        "noise levels trained for, each in (0, 4]; one model serves all of them"))
    clean_weight: float = Field(default=0.0, ge=0, description=(
        "mixture weight of clean (un-noised) images, relative to sigma_weights"))
    sigma_weights: tuple[float, ...] | None = Field(default=None, description=(
        "mixture weight of each sigma (same length as sigmas, each >= 0); None: 1 each"))
    steps: int = Field(default=200, ge=1, description="optimiser steps")
    batch_size: int = Field(default=64, ge=1, description="images per step (drawn with replacement)")
    lr: float = Field(default=1e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay of the trained parameters")
    lr_schedule: Literal["constant", "cosine"] = Field(default="constant", description=(
        "constant, or cosine decay from lr to 5% of lr at the last step"))
    seed: int = Field(default=0, ge=0, description=(
        "seed of every random draw (initial PEFT weights, batches, noise, mixture, dropout); step k's draws "
        "depend on (seed, k) only, so a resumed run draws what the uninterrupted run would"))
    checkpoint_every: int = Field(default=50, ge=1, description=(
        "steps between checkpoints (with checkpoint_dir); the last step is always checkpointed"))
    # LoRA
    lora_rank: int = Field(default=8, ge=1, description="LoRA rank r")
    lora_alpha: float = Field(default=16.0, gt=0, description="LoRA scaling alpha (the update is alpha/r * B A)")
    lora_dropout: float = Field(default=0.0, ge=0, lt=1, description="dropout on the LoRA branch's input")
    # targets
    target_modules: tuple[str, ...] | None = Field(default=None, description=(
        "names of the Linear/Conv2d modules that get LoRA or an adapter (a full name from named_modules() "
        "or a dotted suffix of one; each must match); None: auto-detect (lora: every Linear/Conv2d except "
        "the head; adapter: a ViT's attn.proj and mlp.fc2, else every Linear/Conv2d except the head)"))
    head: str | None = Field(default=None, description=(
        "name of the classifier head module; None: auto-detect (timm get_classifier(), else the last "
        "Linear/Conv2d)"))
    train_head: bool = Field(default=False, description="also train the classifier head (its weights are saved too)")
    # adapter
    adapter_bottleneck: int = Field(default=16, ge=1, description="hidden width of each bottleneck adapter")
    # prompt
    prompt_tokens: int = Field(default=8, ge=1, description="learnable prompt tokens prepended (prompt method)")

    @field_validator("sigmas")
    @classmethod
    def _sigmas(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        for s in v:
            if not math.isfinite(s) or not (0.0 < s <= MAX_SIGMA):
                raise ValueError(f"sigma {s!r} is outside (0, {MAX_SIGMA:g}]")
        if len(set(v)) != len(v):
            raise ValueError(f"sigmas {list(v)} repeat a value")
        return v

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is not None and (not v or any(not t.strip() for t in v)):
            raise ValueError("target_modules must be None or a non-empty list of non-empty module names")
        return v

    @model_validator(mode="after")
    def _mixture(self) -> RobustifyConfig:
        if self.sigma_weights is not None:
            if len(self.sigma_weights) != len(self.sigmas):
                raise ValueError(f"sigma_weights has {len(self.sigma_weights)} entries for {len(self.sigmas)} sigmas")
            if any(not math.isfinite(w) or w < 0 for w in self.sigma_weights):
                raise ValueError(f"sigma_weights {list(self.sigma_weights)} must be finite and >= 0")
        if not math.isfinite(self.clean_weight) or sum(self.weights()) <= 0:
            raise ValueError("the mixture weights (clean_weight and sigma_weights) must not all be zero")
        return self

    def weights(self) -> list[float]:
        """Unnormalised mixture weights: ``[clean_weight, w(sigma_1), ..., w(sigma_k)]``."""
        sw = list(self.sigma_weights) if self.sigma_weights is not None else [1.0] * len(self.sigmas)
        return [float(self.clean_weight), *map(float, sw)]


def make_config(config: RobustifyConfig | Mapping[str, Any] | None = None, **overrides: Any) -> RobustifyConfig:
    """``config`` (an object, a mapping or ``None`` for the defaults) with ``overrides`` applied and
    validated; an override of ``None`` sets the field to ``None`` (e.g. ``target_modules=None``: back to
    auto-detection), it is not ignored. Raises :class:`ConfigError` naming each bad field and why."""
    base: dict[str, Any] = {}
    if isinstance(config, RobustifyConfig):
        base = config.model_dump()
    elif isinstance(config, Mapping):
        base = dict(config)
    elif config is not None:
        raise ConfigError(f"config must be a RobustifyConfig or a mapping, got {type(config).__name__}")
    base.update(overrides)
    try:
        return RobustifyConfig(**base)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid robustify config: {problems}") from None
