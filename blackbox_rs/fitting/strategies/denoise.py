"""``denoise``: MSE denoising only (Salman et al.'s "denoising" objective). Zero queries."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from blackbox_rs.fitting.config import StrategyConfig
from blackbox_rs.fitting.strategies.base import Strategy, phase_lr, register_strategy

__all__ = ["DenoiseConfig", "DenoiseStrategy"]


class DenoiseConfig(StrategyConfig):
    """Settings of ``denoise``: the shared ones only.

    Query cost: 0 (it never queries; the query-paid shared settings are not used)."""

    strategy: Literal["denoise"] = Field(default="denoise", description="MSE denoising only, zero queries")


@register_strategy
class DenoiseStrategy(Strategy):
    """All ``pretrain_steps + steps`` steps minimise ``mean((A(x + delta) - x)^2)``; never queries.
    They form one phase: one learning rate (``pretrain_lr``, else ``lr``) and one cosine decay."""

    name = "denoise"
    needs_queries = False
    config_class = DenoiseConfig

    def learning_rate(self, k: int) -> float:
        cfg = self.ctx.config
        return phase_lr(cfg.pretrain_lr or cfg.lr, k, self.total_steps, cfg.lr_schedule)

    def main_step(self, k: int) -> dict[str, float]:
        return self.mse_step(k)
