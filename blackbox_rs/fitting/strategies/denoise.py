"""``denoise``: MSE denoising only (Salman et al.'s "denoising" objective). Zero queries."""

from __future__ import annotations

import math

from blackbox_rs.fitting.strategies.base import Strategy, register_strategy


@register_strategy
class DenoiseStrategy(Strategy):
    """All ``pretrain_steps + steps`` steps minimise ``mean((A(x + delta) - x)^2)``; never queries.
    They form one phase: one learning rate (``pretrain_lr``, else ``lr``) and one cosine decay."""

    name = "denoise"
    needs_queries = False

    def learning_rate(self, k: int) -> float:
        cfg = self.ctx.config
        base, length = (cfg.pretrain_lr or cfg.lr), self.total_steps
        if cfg.lr_schedule == "constant" or length <= 1:
            return base
        return base * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * k / (length - 1))))

    def main_step(self, k: int) -> dict[str, float]:
        return self.mse_step(k)
