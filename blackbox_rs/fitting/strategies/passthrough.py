"""``passthrough``: true gradients through a differentiable connector (a local model file).

Each step runs the module on noisy images and the base model's differentiable forward on the result;
the loss is the configured weighted sum of MSE, stability (CE against the model's own clean label)
and classification (CE against the true label). Every forward is charged through the engine.
"""

from __future__ import annotations

import torch.nn.functional as F

from blackbox_rs.errors import InvalidParameterError
from blackbox_rs.fitting.objectives import mse_loss
from blackbox_rs.fitting.strategies.base import Strategy, register_strategy


@register_strategy
class PassthroughStrategy(Strategy):
    name = "passthrough"

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
        ctx, cfg = self.ctx, self.ctx.config
        ctx.module.train()
        idx = ctx.batch_indices(k, cfg.batch_size, labelled_only=True)
        clean = ctx.data.x[idx].repeat(cfg.noise_draws, 1, 1, 1)
        out = ctx.module(ctx.noisy(clean, k))
        logits = ctx.engine.forward_logits(out.clamp(0.0, 1.0), tally=ctx.tally)
        w = cfg.weights
        parts = {}
        if w.get("mse", 0) > 0:
            parts["mse"] = mse_loss(out, clean)
        if w.get("stability", 0) > 0:
            parts["stability"] = F.cross_entropy(logits, ctx.targets(idx).repeat(cfg.noise_draws))
        if w.get("classification", 0) > 0:
            parts["classification"] = F.cross_entropy(logits, ctx.data.y[idx].repeat(cfg.noise_draws))
        loss = sum(w[name] * v for name, v in parts.items())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        self.opt.step()
        agree = float((logits.argmax(1) == ctx.targets(idx).repeat(cfg.noise_draws)).float().mean())
        self._agree = agree if k == self.pretrain_steps else 0.9 * getattr(self, "_agree", agree) + 0.1 * agree
        if (k - self.pretrain_steps) % 25 == 24:
            ctx.offer(k, self._agree, agreement=self._agree)
        return {"loss": float(loss.detach()), "agreement": agree, **{n: float(v.detach()) for n, v in parts.items()}}
