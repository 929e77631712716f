"""``passthrough``: true gradients through a differentiable connector (a local model file).

Each step runs the module on noisy images and the base model's differentiable forward on the result;
the loss is the configured weighted sum of MSE, stability (CE against the model's own clean label)
and classification (CE against the true label). Every forward is charged through the engine; scoring
rounds (see :class:`Strategy`) decide which state is kept.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from blackbox_rs.errors import InvalidParameterError
from blackbox_rs.fitting.config import StrategyConfig
from blackbox_rs.fitting.strategies.base import Strategy, register_strategy

__all__ = ["PassthroughConfig", "PassthroughStrategy"]


class PassthroughConfig(StrategyConfig):
    """Settings of ``passthrough``: the shared ones only (``batch_size``, ``noise_draws`` and
    ``weights`` shape its steps).

    Query cost: the shared clean labels and scoring rounds (:class:`StrategyConfig`), plus
    ``batch_size * noise_draws`` differentiable forwards per step."""

    strategy: Literal["passthrough"] = Field(
        default="passthrough", description="true gradients through a differentiable connector")


@register_strategy
class PassthroughStrategy(Strategy):
    name = "passthrough"
    config_class = PassthroughConfig

    @classmethod
    def step_queries(cls, config: Any) -> int:
        """``batch_size * noise_draws`` differentiable forwards per step."""
        return config.steps * config.batch_size * config.noise_draws

    def check(self) -> None:
        info = self.ctx.engine.info
        if not info.differentiable:
            raise InvalidParameterError(
                "strategy 'passthrough' needs a differentiable connector (a local TorchScript/torch.export "
                "model); this connector only answers queries: use 'surrogate' or 'zeroth_order'"
            )
        if self.ctx.config.weights.get("classification", 0) > 0 and self.ctx.data.y is None:
            raise InvalidParameterError("the classification objective needs labels; the dataset has none")

    def main_step(self, k: int) -> dict[str, float]:
        ctx = self.ctx
        info, logits, targets = self.objective_step(k, lambda z: ctx.engine.forward_logits(z, tally=ctx.tally))
        agree = float((logits.argmax(1) == targets).float().mean())
        return {**info, "agreement": agree}
