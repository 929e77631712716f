"""``zeroth_order``: gradient estimates from black-box answers only (no surrogate, no gradients).

1. Pretrain the module with MSE (zero queries).
2. If it is a DnCNN, wrap it as a LoRA module (``LoRADnCNN.from_denoiser``, rank ``zo_rank``): the
   estimate lives in the low-dimensional LoRA parametrisation, which is what makes zeroth order
   feasible (ZO-AE-DS, BlackVIP). Prompts are tuned directly.
3. Each step: two-sided random-direction estimate over ``zo_directions`` directions with common
   random numbers (the same noisy batch for every perturbation). The loss is the black box's
   disagreement with its own clean label (label-only), or the cross-entropy of its returned
   probabilities when the connector returns scores. All ``2 * q`` perturbed batches go to the engine
   as one query: ``2 * q * zo_batch * noise_draws`` images per step. Momentum SGD (Nesterov), fp32.
4. Scoring rounds (see :class:`Strategy`) decide which state is kept, the MSE-pretrained one included.

Device: the module (its LoRA form included) runs on the fit device (:attr:`FitContext.device`); the
estimator does not: the flat parameter vector, the random directions, the perturbations, the
momentum and the update are float32 CPU tensors (:mod:`blackbox_rs.fitting.zo`), copied into the
module's parameters for each evaluation. Its arithmetic is therefore the same on every device; the
perturbed outputs are computed on the device and sent to the black box as CPU tensors.

A module with more than ``zo_max_parameters`` trainable parameters in the tuned parametrisation
(e.g. a ``unet``, which has no LoRA form) is refused before any query: random-direction estimates
in tens of thousands of dimensions are noise at any affordable query count.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from pydantic import Field

from blackbox_rs.errors import InvalidParameterError
from blackbox_rs.fitting.checkpoint import optimizer_from_tensors, optimizer_to_tensors
from blackbox_rs.fitting.config import StrategyConfig
from blackbox_rs.fitting.draws import repeat_draws
from blackbox_rs.fitting.pilot import scaled
from blackbox_rs.fitting.strategies.base import Strategy, register_strategy
from blackbox_rs.fitting.zo import ZOSGD, rge_gradient
from blackbox_rs.modules.denoiser import DnCNN

__all__ = ["ZerothOrderConfig", "ZerothOrderStrategy"]


class ZerothOrderConfig(StrategyConfig):
    """Settings of ``zeroth_order``: the shared ones plus the ``zo_*`` settings of the estimator.

    Query cost: the shared clean labels and scoring rounds (:class:`StrategyConfig`), plus
    ``2 * zo_directions * zo_batch * noise_draws`` per step (antithetic directions)."""

    strategy: Literal["zeroth_order"] = Field(
        default="zeroth_order", description="gradient estimates from black-box answers only")
    zo_max_parameters: int = Field(
        default=20_000, ge=1,
        description="most trainable parameters the tuned parametrisation may have (a larger one is refused "
        "before any query)")
    zo_rank: int = Field(default=2, ge=1, description="LoRA rank of the DnCNN tuned by zeroth order")
    zo_directions: int = Field(
        default=4, ge=1,
        description="random directions per gradient estimate (each costs 2 * zo_batch * noise_draws queries)")
    zo_mu: float = Field(default=0.05, gt=0,
                         description="perturbation size: scale of each random direction, in parameter units")
    zo_batch: int = Field(default=32, ge=1, description="labelled images per loss evaluation")
    zo_lr: float = Field(
        default=0.002, gt=0,
        description="step size of the zeroth-order updates (parameter units per unit of estimated gradient; "
        "with momentum m the steady-state step is zo_lr / (1 - m))",
    )
    zo_momentum: float = Field(default=0.9, ge=0, lt=1,
                               description="Nesterov momentum of the zeroth-order updates (0 <= m < 1)")
    zo_loss: Literal["auto", "labels", "scores"] = Field(
        default="auto",
        description="black-box loss: label disagreement, score cross-entropy, or (auto) scores if the "
        "connector returns them")


@register_strategy
class ZerothOrderStrategy(Strategy):
    name = "zeroth_order"
    config_class = ZerothOrderConfig

    @classmethod
    def step_queries(cls, config: Any) -> int:
        """``2 * zo_directions * zo_batch * noise_draws`` per step (antithetic directions)."""
        return config.steps * 2 * config.zo_directions * config.zo_batch * config.noise_draws

    @classmethod
    def pilot_settings(cls, config: Any, factor: float) -> dict[str, Any]:
        """``ceil(factor * score_every)`` steps between a pilot's rounds (at least 2): its estimates
        stay as accurate as the full fit's, it takes fewer of them."""
        return {"score_every": scaled(config.score_every, factor, 2)}

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        cfg = ctx.config
        self.zo = ZOSGD(cfg.zo_lr, momentum=cfg.zo_momentum, nesterov=True, max_grad_norm=10.0)
        self._ema: float | None = None

    def tuned_parameters(self) -> int:
        """Trainable parameters of the parametrisation that zeroth order will tune."""
        module = self.ctx.module
        if isinstance(module, DnCNN):
            from blackbox_rs.modules.lora_denoiser import LoRADnCNN

            return LoRADnCNN.from_denoiser(copy.deepcopy(module), rank=self.ctx.config.zo_rank).num_trainable()
        return module.num_trainable()

    def check(self) -> None:
        cap = self.ctx.config.zo_max_parameters
        tuned = self.tuned_parameters()
        if tuned > cap:
            raise InvalidParameterError(
                f"zeroth_order would tune {tuned:,} parameters of module {self.ctx.module.name!r} "
                f"(zo_max_parameters={cap:,}): use a 'dncnn' (tuned as a rank-{self.ctx.config.zo_rank} LoRA) "
                "or a prompt, the 'surrogate' strategy, or raise zo_max_parameters"
            )
        if self.ctx.config.zo_loss == "scores" and not self.ctx.engine.info.returns_scores:
            raise InvalidParameterError(
                "zo_loss='scores' needs a connector that returns scores; this one is label-only "
                "(use zo_loss='labels' or 'auto')"
            )

    def prepare_for_step(self, k: int) -> None:
        ctx = self.ctx
        if k >= self.pretrain_steps and isinstance(ctx.module, DnCNN):
            from blackbox_rs.modules.lora_denoiser import LoRADnCNN

            # the MSE phase's best state (DnCNN keys) is dropped by the first scoring round (Strategy.score)
            ctx.module = LoRADnCNN.from_denoiser(ctx.module, rank=ctx.config.zo_rank).to(ctx.device)
            self.opt = torch.optim.Adam(ctx.module.trainable_parameters(), lr=ctx.config.lr)

    def main_step(self, k: int) -> dict[str, float]:
        ctx, cfg = self.ctx, self.ctx.config
        module = ctx.module
        module.eval()
        idx = ctx.batch_indices(k, cfg.zo_batch, labelled_only=True)
        clean = repeat_draws(ctx.data.x[idx], cfg.noise_draws)
        noisy = ctx.noisy(clean, k)
        target = repeat_draws(ctx.targets(idx), cfg.noise_draws).cpu()  # compared with the answers, on the CPU
        use_scores = ctx.engine.info.returns_scores and cfg.zo_loss != "labels"

        def batched_loss(thetas: torch.Tensor) -> torch.Tensor:
            saved = module.flat_parameters()
            outs = []
            with torch.no_grad():
                for theta in thetas:
                    module.set_flat_parameters(theta)
                    outs.append(module(noisy).clamp(0.0, 1.0))
            module.set_flat_parameters(saved)
            pred = ctx.engine.query(torch.cat(outs).cpu(), tally=ctx.tally)
            m = noisy.shape[0]
            tgt = target.repeat(len(thetas))
            if use_scores and pred.scores is not None:
                p = pred.scores.clamp_min(1e-12)
                per = -torch.log(p.gather(1, tgt[:, None]).squeeze(1))
            else:
                per = (pred.labels != tgt).to(torch.float64)
            return per.view(len(thetas), m).mean(1).to(torch.float64)

        theta = module.flat_parameters().cpu()  # the estimator's arithmetic: fp32 on the CPU
        est = rge_gradient(batched_loss, theta, q=cfg.zo_directions, mu=cfg.zo_mu, distribution="gaussian",
                           generator=ctx.generator(k, "zo-directions"), batched=True)
        module.set_flat_parameters(self.zo.step(theta, est.grad))
        self._ema = est.loss if self._ema is None else 0.9 * self._ema + 0.1 * est.loss
        return {"zo_loss": est.loss, "zo_loss_ema": self._ema, "grad_norm": float(est.grad.norm())}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        t, m = optimizer_to_tensors(self.opt, "opt")
        zs = self.zo.state_dict()
        if zs["momentum_buffer"] is not None:
            t["zo_momentum"] = zs["momentum_buffer"]
        return t, {"opt": m, "mse_ema": self._mse_ema, "zo_step": zs["step_count"], "zo_ema": self._ema}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        optimizer_from_tensors(self.opt, "opt", tensors, meta["opt"])
        self._mse_ema = meta.get("mse_ema")
        self._ema = meta.get("zo_ema")
        self.zo.load_state_dict({"step_count": meta["zo_step"], "momentum_buffer": tensors.get("zo_momentum")})
