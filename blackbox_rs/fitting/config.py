"""Typed configuration of :meth:`BlackBoxSmoother.fit` (one pydantic model; unknown keys are errors)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from blackbox_rs.fitting.strategy_registry import STRATEGIES

__all__ = ["FitConfig", "StrategyName"]

StrategyName = str
"""A registered strategy name (built in: denoise, surrogate, zeroth_order, passthrough; more with
:func:`blackbox_rs.fitting.strategies.register_strategy`)."""


class FitConfig(BaseModel):
    """How to fit the input module. Defaults suit small images (28×28, 32×32) on a CPU.

    Query cost (black-box images) per strategy, before the budget caps it:

    * ``denoise``: 0.
    * ``surrogate``: ``clean_queries`` once, then ``distill_queries`` per distillation round
      (one round every ``redistill_every`` module steps).
    * ``zeroth_order``: ``clean_queries`` once, then ``2 * zo_directions * zo_batch * noise_draws``
      per step.
    * ``passthrough``: ``batch_size * noise_draws`` differentiable forwards per step (+ clean labels).
    * every strategy that queries: ``score_images * score_draws`` per scoring round, one when its
      own steps begin (the MSE-pretrained module), one every ``score_every`` steps and one after
      the last step. The fit keeps the best-scoring module state (:mod:`blackbox_rs.fitting.selection`;
      with several sigmas: the state whose worst sigma gained most over the pretrained module).
    """

    model_config = ConfigDict(extra="forbid")

    strategy: StrategyName = Field(default="surrogate", description="a registered strategy name")
    steps: int = Field(default=600, ge=0, description="module optimisation steps (after pretraining)")
    pretrain_steps: int = Field(default=600, ge=0, description="MSE denoising steps first (zero queries)")
    batch_size: int = Field(default=64, ge=1, description="clean images per step")
    noise_draws: int = Field(default=1, ge=1, description="noise draws per image per step")
    lr: float = Field(default=1e-3, gt=0, description="learning rate of the module steps after pretraining")
    pretrain_lr: float | None = Field(default=None, gt=0, description="learning rate of MSE pretraining (None: lr)")
    lr_schedule: Literal["constant", "cosine"] = Field(
        default="constant",
        description="per phase (pretraining, then the strategy's steps): constant, or cosine decay from the "
        "phase's learning rate to 5% of it at the phase's last step",
    )
    clean_fraction: float = Field(default=0.1, ge=0, lt=1, description="share of un-noised inputs in the mix")
    weights: dict[str, float] = Field(
        default_factory=lambda: {"mse": 1.0, "stability": 1.0},
        description="objective weights (mse, stability, classification)",
    )
    seed: int = Field(default=0, ge=0)
    checkpoint_every: int = Field(default=50, ge=1)
    # black-box labels
    clean_queries: int = Field(default=10_000, ge=0, description="most clean images labelled by the black box")
    # selection of the kept module state (query-paid; see blackbox_rs.fitting.selection)
    score_images: int = Field(default=256, ge=1, description="images of the fixed scoring set (labelled subset)")
    score_draws: int = Field(default=8, ge=1, description="noise draws per scoring image")
    score_every: int = Field(default=150, ge=1, description="strategy steps between scoring rounds")
    # surrogate
    surrogate: str = Field(default="small_cnn", description="'small_cnn', 'timm:<model name>', or a user nn.Module")
    distill_queries: int = Field(default=10_000, ge=1, description="black-box labels per distillation round")
    redistill_every: int = Field(default=150, ge=1, description="module steps between distillation rounds")
    surrogate_epochs: float = Field(default=2.0, gt=0, description="passes over the distillation buffer per round")
    surrogate_lr: float = Field(default=2e-3, gt=0)
    surrogate_buffer: int = Field(default=60_000, ge=1, description="most labelled examples kept for distillation")
    # zeroth order
    zo_max_parameters: int = Field(default=20_000, ge=1, description="most parameters zeroth order may tune")
    zo_rank: int = Field(default=2, ge=1, description="LoRA rank of the module tuned by zeroth order")
    zo_directions: int = Field(default=4, ge=1, description="random directions per gradient estimate")
    zo_mu: float = Field(default=0.05, gt=0, description="perturbation size")
    zo_batch: int = Field(default=32, ge=1, description="images per loss evaluation")
    zo_lr: float = Field(
        default=0.002, gt=0,
        description="step size of the zeroth-order updates (with momentum 0.9 the effective step is 10x; "
        "see docs/fitting.md for how it was chosen)",
    )
    zo_momentum: float = Field(default=0.9, ge=0, lt=1)
    zo_loss: Literal["auto", "labels", "scores"] = Field(
        default="auto", description="black-box loss: label disagreement, score cross-entropy, or scores if returned"
    )

    @field_validator("strategy")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in STRATEGIES:
            raise ValueError(f"unknown strategy {v!r}; registered: {sorted(STRATEGIES)}")
        return v

    @model_validator(mode="after")
    def _weights(self) -> FitConfig:
        known = {"mse", "stability", "classification"}
        unknown = set(self.weights) - known
        if unknown:
            raise ValueError(f"unknown objective weight(s) {sorted(unknown)}; known: {sorted(known)}")
        if any(w < 0 for w in self.weights.values()) or not any(w > 0 for w in self.weights.values()):
            raise ValueError("objective weights must be >= 0 with at least one > 0")
        return self
