"""``surrogate``: gradients through a white-box surrogate kept faithful to the black box.

1. Pretrain the module with MSE (zero queries).
2. The black box labels the clean images of the labelled subset (stability targets) and, every
   ``redistill_every`` steps, ``distill_queries`` images *produced by the current module* from noisy
   inputs (so the surrogate is faithful where the module sends inputs: a surrogate distilled on clean
   images only misleads the module). The surrogate is trained on this buffer (cross-entropy); the
   labels paid for by scoring rounds join the buffer too.
3. Between rounds the module minimises ``w_mse * MSE + w_stab * CE(s(A(x+delta)), f(x))
   [+ w_cls * CE(s(A(x+delta)), y)]`` with gradients through the frozen surrogate ``s``.

Which state is kept is decided by the scoring rounds of :class:`Strategy` (the MSE-pretrained module
is the first candidate): surrogate steps replace it only if the black box itself rates them higher.
Each round also records ``surrogate_fidelity``: how often the surrogate already agreed with the
black box on the module's new outputs, before training on them.

Device: the surrogate and its distillation buffer live on the fit device
(:attr:`FitContext.device`); a surrogate module of yours is moved there for the fit and back to its
own device when the fit ends. Checkpoints hold the surrogate and the buffer on the CPU.
"""

from __future__ import annotations

import hashlib
import math
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, PlainSerializer, WithJsonSchema, field_validator
from torch import nn

from blackbox_rs.binding import hash_state
from blackbox_rs.errors import InvalidParameterError
from blackbox_rs.fitting.checkpoint import optimizer_from_tensors, optimizer_to_tensors
from blackbox_rs.fitting.config import StrategyConfig
from blackbox_rs.fitting.context import module_device
from blackbox_rs.fitting.pilot import scaled
from blackbox_rs.fitting.selection import ScoreRound
from blackbox_rs.fitting.strategies.base import Strategy, register_strategy
from blackbox_rs.surrogates import predict_logits

__all__ = ["SurrogateConfig", "SurrogateStrategy", "build_surrogate", "surrogate_identity"]


def surrogate_identity(spec: str | nn.Module) -> str:
    """What a surrogate setting stands for in hashes and JSON: a spec string as it is; a module as
    ``"module:<module>.<qualname>:sha256:<hex>"`` over its state_dict tensors (names, dtypes, shapes,
    bytes), stable across processes and never its repr."""
    if isinstance(spec, str):
        return spec
    h = hashlib.sha256()
    hash_state(h, spec.state_dict())
    cls = type(spec)
    return f"module:{cls.__module__}.{cls.__qualname__}:sha256:{h.hexdigest()}"


SurrogateSpec = Annotated[
    str | nn.Module,
    PlainSerializer(surrogate_identity, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "description": "'small_cnn', 'timm:<model name>' (from Python also an "
                    "nn.Module)"}),
]


class SurrogateConfig(StrategyConfig):
    """Settings of ``surrogate``: the shared ones plus the surrogate and its distillation.

    Query cost: the shared clean labels and scoring rounds (:class:`StrategyConfig`), plus
    ``distill_queries`` per distillation round, one every ``redistill_every`` strategy steps
    (``ceil(steps / redistill_every)`` rounds)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    strategy: Literal["surrogate"] = Field(
        default="surrogate", description="gradients through a white-box surrogate distilled from the black box")
    surrogate: SurrogateSpec = Field(
        default="small_cnn",
        description="the white-box surrogate: 'small_cnn', 'timm:<model name>' (randomly initialised, no "
        "download) or an nn.Module mapping [0, 1] images to one logit per class (trained in place)",
    )
    distill_queries: int = Field(default=10_000, ge=1,
                                 description="black-box labels (queries) per distillation round")
    redistill_every: int = Field(default=150, ge=1, description="strategy steps between distillation rounds")
    surrogate_epochs: float = Field(default=2.0, gt=0,
                                    description="passes over the distillation buffer per round (batches of 128)")
    surrogate_lr: float = Field(default=2e-3, gt=0, description="Adam learning rate of the surrogate")
    surrogate_buffer: int = Field(default=60_000, ge=1,
                                  description="most labelled examples kept for distillation (oldest dropped)")

    @field_validator("surrogate")
    @classmethod
    def _spec(cls, v: str | nn.Module) -> str | nn.Module:
        if isinstance(v, str) and not (v == "small_cnn" or (v.startswith("timm:") and len(v) > len("timm:"))):
            raise ValueError(f"unknown surrogate {v!r}: use 'small_cnn', 'timm:<model>' or an nn.Module")
        return v


def build_surrogate(spec: str | nn.Module, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A surrogate classifier for ``[0, 1]`` images: a user module, ``"small_cnn"`` or ``"timm:<name>"``
    (randomly initialised: no weights are downloaded)."""
    if isinstance(spec, nn.Module):
        return spec
    c, h, w = input_shape
    if spec == "small_cnn":
        from blackbox_rs.surrogates import SmallCNN

        return SmallCNN(c, num_classes, (h, w), width=32, hidden=128, seed=0)
    if spec.startswith("timm:"):
        import timm

        name = spec.split(":", 1)[1]
        try:
            net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=c)
        except Exception as exc:  # timm raises RuntimeError for unknown names
            raise InvalidParameterError(f"cannot build timm surrogate {name!r}: {exc}") from exc
        return nn.Sequential(_Standardise(), net)
    raise InvalidParameterError(f"unknown surrogate {spec!r}: use 'small_cnn', 'timm:<model>' or an nn.Module")


class _Standardise(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.5) / 0.5


@register_strategy
class SurrogateStrategy(Strategy):
    """The surrogate strategy (see the module docstring); its surrogate is ``config.surrogate``."""

    name = "surrogate"
    config_class = SurrogateConfig

    @classmethod
    def step_queries(cls, config: Any) -> int:
        """``distill_queries`` per distillation round, one every ``redistill_every`` steps."""
        return math.ceil(config.steps / config.redistill_every) * config.distill_queries

    @classmethod
    def pilot_settings(cls, config: Any, factor: float) -> dict[str, Any]:
        """Distillation rounds of ``ceil(factor * distill_queries)`` labels (at least 128) in a pilot."""
        return {"distill_queries": scaled(config.distill_queries, factor, 128)}

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        info = ctx.engine.info
        self.surrogate = build_surrogate(ctx.config.surrogate, info.input_shape, info.num_classes)
        self._surrogate_home = module_device(self.surrogate)  # a surrogate of yours goes back there
        try:
            self.surrogate.to(ctx.device)
        except Exception as exc:  # torch raises many unrelated types for a failed move
            raise InvalidParameterError(f"cannot move the surrogate to the fit device {str(ctx.device)!r}: "
                                        f"{type(exc).__name__}: {exc}") from None
        self.s_opt = torch.optim.Adam(self.surrogate.parameters(), lr=ctx.config.surrogate_lr)
        self.buf_x = torch.empty((0, *info.input_shape), device=ctx.device)
        self.buf_y = torch.empty(0, dtype=torch.int64, device=ctx.device)

    def release(self) -> None:
        """Move the surrogate back to the device it was built or given on."""
        if module_device(self.surrogate) != self._surrogate_home:
            self.surrogate.to(self._surrogate_home)

    def check(self) -> None:
        ctx = self.ctx
        with torch.no_grad():
            out = self.surrogate(ctx.data.x[:2])
        k = ctx.engine.info.num_classes
        if out.ndim != 2 or out.shape[1] != k:
            raise InvalidParameterError(
                f"the surrogate returns {tuple(out.shape[1:])} outputs per image, the connector has {k} classes"
            )
        if ctx.config.weights.get("classification", 0) > 0 and ctx.data.y is None:
            raise InvalidParameterError("the classification objective needs labels; the dataset has none")

    # -- distillation -------------------------------------------------------------------------------
    def _add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        cap = self.ctx.config.surrogate_buffer
        self.buf_x = torch.cat([self.buf_x, x])[-cap:]
        self.buf_y = torch.cat([self.buf_y, y])[-cap:]

    def _fidelity(self, out: torch.Tensor, labels: torch.Tensor) -> float:
        mimic = predict_logits(self.surrogate, out, batch_size=512).argmax(1)
        return float((mimic == labels).float().mean())

    def on_scored(self, k: int, r: ScoreRound) -> dict[str, float]:
        fidelity = self._fidelity(r.outputs, r.labels)
        if not self.ctx.holdout:  # a held-out scoring set stays out of the surrogate's training data too
            self._add(r.outputs, r.labels)
        return {"surrogate_fidelity": fidelity}

    def _distill_round(self, k: int, size: int) -> None:
        """Query the black box on the module's outputs for ``size`` noisy inputs and train the
        surrogate on the buffer; records the labels' agreement with the clean labels (noisy inputs)
        and the surrogate's fidelity on them before training."""
        ctx = self.ctx
        idx = ctx.batch_indices(k, size, labelled_only=True, salt="distill")
        clean = ctx.data.x[idx]
        noisy = ctx.noisy(clean, k, salt="distill-noise")
        out = ctx.module_outputs(noisy)
        labels = ctx.query(out)
        target = ctx.targets(idx)
        is_noisy = (noisy - clean).flatten(1).abs().amax(1) > 0
        mask = is_noisy if bool(is_noisy.any()) else torch.ones_like(is_noisy)
        agreement = float((labels[mask] == target[mask]).float().mean())
        fidelity = self._fidelity(out, labels)  # before training on them: faithful where the module goes?
        ctx.record(k, distill_agreement=agreement, surrogate_fidelity=fidelity, buffer=float(len(self.buf_y)))
        self._add(out, labels)
        self._train_surrogate(k)

    def _train_surrogate(self, k: int) -> None:
        cfg = self.ctx.config
        n = len(self.buf_y)
        steps = max(1, int(cfg.surrogate_epochs * n / 128))
        g = self.ctx.generator(k, "surrogate")
        self.surrogate.train()
        for _ in range(steps):
            b = torch.randint(0, n, (min(128, n),), generator=g)
            loss = F.cross_entropy(self.surrogate(self.buf_x[b]), self.buf_y[b])
            self.s_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.s_opt.step()
        self.surrogate.eval()

    # -- steps ----------------------------------------------------------------------------------------
    def main_step(self, k: int) -> dict[str, float]:
        ctx, cfg = self.ctx, self.ctx.config
        j = k - self.pretrain_steps
        if j == 0 and len(self.buf_y) == 0:
            pool = ctx.labelled_pool()  # the subset (a pilot: less its held-out scoring set)
            self._add(ctx.data.x[pool], ctx.targets(pool))  # the clean labels, on the fit device
        if j % cfg.redistill_every == 0:
            self._distill_round(k, cfg.distill_queries)
        for p in self.surrogate.parameters():
            p.requires_grad_(False)
        try:
            info, _, _ = self.objective_step(k, self.surrogate)
        finally:
            for p in self.surrogate.parameters():
                p.requires_grad_(True)
        return info

    # -- state ------------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        t, m = super().state()
        st, sm = optimizer_to_tensors(self.s_opt, "sopt")
        t.update(st)
        t.update({f"sur.{k}": v for k, v in self.surrogate.state_dict().items()})
        t["buf_x"], t["buf_y"] = self.buf_x, self.buf_y
        return t, {**m, "sopt": sm}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().load_state(tensors, meta)
        self.surrogate.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sur.")})
        optimizer_from_tensors(self.s_opt, "sopt", tensors, meta["sopt"])
        self.buf_x, self.buf_y = tensors["buf_x"].to(self.ctx.device), tensors["buf_y"].to(self.ctx.device)
