"""``denoise``: MSE denoising only (Salman et al.'s "denoising" objective). Zero queries."""

from __future__ import annotations

from blackbox_rs.fitting.strategies.base import Strategy, register_strategy


@register_strategy
class DenoiseStrategy(Strategy):
    """All ``pretrain_steps + steps`` steps minimise ``mean((A(x + delta) - x)^2)``; never queries."""

    name = "denoise"
    needs_queries = False

    def main_step(self, k: int) -> dict[str, float]:
        return self.mse_step(k)
