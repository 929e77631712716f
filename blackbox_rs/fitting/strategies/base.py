"""Strategy protocol, registry, and the driver loop (checkpointing, budget stop, early stop for no
gain, resume)."""

from __future__ import annotations

import abc
import copy
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from blackbox_rs.binding import hash_state
from blackbox_rs.errors import BudgetExceeded, CacheError, ResumeMismatchError
from blackbox_rs.fitting.checkpoint import (
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
)
from blackbox_rs.fitting.config import StrategyConfig, config_class_for
from blackbox_rs.fitting.context import FitContext, FitReport
from blackbox_rs.fitting.draws import repeat_draws
from blackbox_rs.fitting.objectives import mse_loss
from blackbox_rs.fitting.pilot import (
    MIN_SCORE_IMAGES,
    PilotPlan,
    PilotReport,
    pilot_plan_at,
    plan_pilot,
    scaled,
)
from blackbox_rs.fitting.selection import ScoreRound, gain_test, score_round, worst_gain
from blackbox_rs.fitting.strategy_registry import STRATEGIES

__all__ = ["STRATEGIES", "Strategy", "estimate_fit_queries", "expected_fit_queries", "get_strategy",
           "register_strategy", "run_fit"]


class _NoGain(Exception):  # noqa: N818 - control flow inside run_fit, never escapes it
    """Raised by :meth:`Strategy.step` when ``patience`` scoring rounds in a row showed no gain."""


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator, the one registration call: make ``cls`` usable as ``FitConfig(strategy=cls.name)``
    and ``fit(..., strategy=cls.name)``, with its settings validated by its config class.

    A class that sets its own ``config_class`` must point at a
    :class:`~blackbox_rs.fitting.config.StrategyConfig` subclass whose ``strategy`` is
    ``Literal[cls.name]`` (else :class:`InvalidParameterError` names the mismatch); a class without
    one gets a generated subclass of the config it inherits with that Literal (its ``config_class``
    afterwards). A taken name raises :class:`InvalidParameterError` naming it (nothing is changed)."""
    config = config_class_for(cls.name, cls)
    STRATEGIES.register(cls.name, cls)
    cls.config_class = config
    return cls


def get_strategy(name: str) -> type[Strategy]:
    """The strategy registered as ``name``; :class:`InvalidParameterError` listing the known ones."""
    return STRATEGIES.get(name)


def estimate_fit_queries(config: Any, n_images: int, budget: int | None = None) -> int:
    """Upper bound on the queries of a fit of ``n_images`` images with ``config`` (a ``FitConfig``),
    capped by ``budget``: what the CLI and recipe dry runs print (see :meth:`Strategy.estimate_queries`;
    its pilot included)."""
    q = get_strategy(config.strategy).estimate_queries(config, n_images, budget)
    return q if budget is None else min(q, int(budget))


def expected_fit_queries(config: Any, n_images: int, budget: int | None = None) -> int:
    """The queries of a fit of ``n_images`` images with ``config`` (a ``FitConfig``) *when no scoring
    round shows a gain*: the fit's pilot (:mod:`blackbox_rs.fitting.pilot`), or without one its earliest
    patience point (the pretrained module's round, ``patience`` more rounds and the steps between them;
    see :meth:`Strategy.expected_queries`), capped by ``budget``. Not a bound: a fit whose rounds gain
    spends more, up to :func:`estimate_fit_queries` (the cap), which this never exceeds. Dry runs show
    both."""
    q = get_strategy(config.strategy).expected_queries(config, n_images, budget)
    return q if budget is None else min(q, int(budget))


def phase_lr(base: float, j: int, length: int, schedule: str) -> float:
    """Learning rate of step ``j`` of a phase of ``length`` steps: ``base`` (constant), or a cosine from
    ``base`` at the first step to ``0.05 * base`` at the last."""
    if schedule == "constant" or length <= 1:
        return base
    return base * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * j / (length - 1))))


class Strategy(abc.ABC):
    """One way of fitting the module. Steps ``0 .. pretrain_steps-1`` are MSE denoising (zero
    queries); steps after that are the strategy's own. Subclasses implement :meth:`main_step` and,
    if they hold state, :meth:`state` / :meth:`load_state`; their settings are ``config_class`` (a
    :class:`~blackbox_rs.fitting.config.StrategyConfig` subclass, see :func:`register_strategy`), the
    type of ``self.ctx.config``, and :meth:`estimate_queries` bounds what they spend.

    A strategy that queries is scored by scoring rounds (:func:`~blackbox_rs.fitting.selection.score_round`)
    before its first step (the MSE-pretrained module is a candidate), every ``score_every`` steps and
    after its last step; the fit keeps the best-scoring state, so its own steps can only replace the
    pretrained module by one that scores higher on the black box. Each round after the first is tested
    (:func:`~blackbox_rs.fitting.selection.gain_test`) against the *reference round*: the best round
    so far as of the last significant gain (at first the pretrained module's round). After
    ``patience`` rounds in a row without a significant gain over it the fit stops before the step the
    last of them precedes (``stopped="no_gain"``); the best state is kept either way."""

    name: ClassVar[str]
    needs_queries: ClassVar[bool] = True
    #: the pydantic model of this strategy's settings (``strategy: Literal[name]``; see register_strategy)
    config_class: ClassVar[type[StrategyConfig]] = StrategyConfig

    def __init__(self, ctx: FitContext) -> None:
        self.ctx = ctx
        self.opt = torch.optim.Adam(ctx.module.trainable_parameters(), lr=ctx.config.lr)
        self._mse_ema: float | None = None

    # -- cost -------------------------------------------------------------------------------------
    @classmethod
    def base_queries(cls, config: Any, n_images: int) -> int:
        """Upper bound on the black-box images an uninterrupted fit of ``n_images`` images queries
        *without a pilot* (answers from the cache only lower it; retries that may be billed are charged
        on top by the engine): the clean labels of the labelled subset, every scoring round (one
        before the strategy's first step, one every ``score_every`` steps, one after the last) and
        :meth:`step_queries`. A strategy that never queries costs 0."""
        if not cls.needs_queries or config.steps == 0:
            return 0
        subset = max(1, min(int(n_images), config.clean_queries))
        rounds = math.ceil(config.steps / config.score_every) + 1
        scoring = rounds * min(config.score_images, subset) * config.score_draws
        return subset + scoring + cls.step_queries(config)

    @classmethod
    def estimate_queries(cls, config: Any, n_images: int, budget: int | None = None) -> int:
        """Upper bound on the black-box images an uninterrupted fit queries: :meth:`base_queries` plus,
        when the fit runs a pilot (:func:`~blackbox_rs.fitting.pilot.plan_pilot`; ``budget`` is the fit
        budget it is sized by), the pilot's cap minus the clean labels the full fit reuses from it."""
        base = cls.base_queries(config, n_images)
        plan = plan_pilot(cls, config, n_images, budget)
        return base if plan is None else base + plan.queries - plan.reused

    @classmethod
    def step_queries(cls, config: Any) -> int:
        """Queries of the strategy's own steps (beyond clean labels and scoring rounds)."""
        return 0

    @classmethod
    def base_expected_queries(cls, config: Any, n_images: int) -> int:
        """The black-box images an uncached fit *without a pilot* queries if it stops at its earliest
        patience point, i.e. when no scoring round gains: clean labels, ``patience + 1`` scoring rounds
        (the pretrained module's and ``patience`` more) and :meth:`step_queries` of the
        ``patience * score_every`` steps between them (``config.steps`` replaced by that number). It is
        :meth:`base_queries` when the fit cannot stop early (``patience == 0``, or no round left to
        stop at: ``patience * score_every >= steps``) and never more than it."""
        cap = cls.base_queries(config, n_images)
        p = int(getattr(config, "patience", 0))
        done = p * config.score_every
        if cap == 0 or p == 0 or done >= config.steps:
            return cap
        subset = max(1, min(int(n_images), config.clean_queries))
        scoring = (p + 1) * min(config.score_images, subset) * config.score_draws
        return min(cap, subset + scoring + cls.step_queries(config.model_copy(update={"steps": done})))

    @classmethod
    def expected_queries(cls, config: Any, n_images: int, budget: int | None = None) -> int:
        """The black-box images an uncached fit queries when no scoring round gains: the cap of its pilot
        (:func:`~blackbox_rs.fitting.pilot.plan_pilot`, sized with the fit ``budget``) when it runs one,
        else :meth:`base_expected_queries`. The expected spend when the steps do not help, not a bound:
        a fit whose rounds gain spends more, up to :meth:`estimate_queries`."""
        plan = plan_pilot(cls, config, n_images, budget)
        return cls.base_expected_queries(config, n_images) if plan is None else plan.queries

    @classmethod
    def pilot_settings(cls, config: Any, factor: float) -> dict[str, Any]:
        """Hook: this strategy's own settings at pilot scale ``factor`` (0..1), e.g. a smaller
        distillation round; the shared ones are scaled by :meth:`pilot_config`."""
        return {}

    @classmethod
    def pilot_config(cls, config: Any, n_images: int, factor: float) -> Any:
        """``config`` at pilot scale ``factor`` (see :mod:`blackbox_rs.fitting.pilot`): the scoring set
        ``ceil(factor * score_images)`` images (at least ``MIN_SCORE_IMAGES``, at most the full set),
        the clean labels ``ceil(factor * subset)`` (at least twice the scoring set, which the pilot
        holds out of its training draws, at most the subset), the strategy's own
        settings by :meth:`pilot_settings`, ``patience * score_every`` steps (the pilot's rounds: the
        pretrained module's and ``patience`` more) and no pilot of its own. Everything else (seed, sigma
        mixture, learning rates, draws per image, patience, test level) is the fit's."""
        subset = max(1, min(int(n_images), config.clean_queries))
        score_images = scaled(min(config.score_images, subset), factor, MIN_SCORE_IMAGES)
        clean = scaled(subset, factor, 2 * score_images)  # the pilot holds its scoring set out of training
        update: dict[str, Any] = {"clean_queries": clean, "score_images": score_images, "pilot": 0.0}
        update.update(cls.pilot_settings(config, factor))
        every = int(update.get("score_every", config.score_every))
        update["steps"] = min(config.steps, int(config.patience) * every)
        return config.model_copy(update=update)

    # -- phases ----------------------------------------------------------------------------------
    @property
    def pretrain_steps(self) -> int:
        return self.ctx.config.pretrain_steps

    @property
    def total_steps(self) -> int:
        return self.pretrain_steps + self.ctx.config.steps

    def check(self) -> None:  # noqa: B027 - optional hook
        """Refuse settings this strategy cannot work with (before any query)."""

    def prepare_for_step(self, k: int) -> None:  # noqa: B027 - optional hook
        """Make the module's structure the one step ``k`` works on (before loading a checkpoint)."""

    def step(self, k: int) -> dict[str, float]:
        self.prepare_for_step(k)
        lr = self.learning_rate(k)
        for group in self.opt.param_groups:
            group["lr"] = lr
        if k < self.pretrain_steps:
            return self.mse_step(k)
        j = k - self.pretrain_steps
        if self.needs_queries and j % self.ctx.config.score_every == 0 and self.ctx.scored_step != k:
            self.score(k)  # (a fit resumed inside step k has its round already: it is not re-run)
            if self.no_gain():
                raise _NoGain
        return self.main_step(k)

    def no_gain(self) -> bool:
        """True when ``patience`` (> 0) scoring rounds in a row showed no significant gain."""
        patience = int(getattr(self.ctx.config, "patience", 0))
        return patience > 0 and self.ctx.no_gain_rounds >= patience

    def score(self, k: int) -> None:
        """Run a scoring round on the module's current state and offer it as a candidate. A round
        after the first is tested against the reference round (same images and noise): a
        significant gain (level ``gain_alpha``) restarts the patience counter and makes the best
        round so far the new reference; any other round adds one to the counter (history:
        ``gain_over_reference``, ``gain_p``, ``no_gain_rounds``). Comparing with the reference rather
        than the latest best lets gains that accumulate over several rounds, each too small to be
        told from noise, count (the best state is still the best-scoring one)."""
        ctx = self.ctx
        first = k == self.pretrain_steps
        if first:  # MSE-phase scores (-mse) are not comparable with robustness scores
            ctx.forget_best()
        r = score_round(ctx)
        extra = self.on_scored(k, r)
        selection = r.score
        if len(r.by_sigma) > 1:  # multi-sigma: the worst per-sigma gain over the pretrained module
            extra.update({f"robust_score@{sg!r}": v for sg, v in r.by_sigma.items()})
            selection = worst_gain(r.by_sigma, r.by_sigma if first else self._baseline())
        gained = first or ctx.gain_reference is None
        if not gained:
            assert ctx.gain_reference is not None
            t = gain_test(r.per_image, ctx.gain_reference, len(ctx.sigmas))
            gained = t.significant(ctx.config.gain_alpha)
            ctx.no_gain_rounds = 0 if gained else ctx.no_gain_rounds + 1
            extra.update(gain_over_reference=t.gain, gain_p=t.p_value, no_gain_rounds=float(ctx.no_gain_rounds))
        ctx.offer(k, selection, per_image=r.per_image, robust_score=r.score, agreement=r.agreement, **extra)
        if gained and ctx.best_per_image is not None:
            ctx.gain_reference = ctx.best_per_image.clone()
        ctx.scored_step = k

    def _baseline(self) -> dict[float, float]:
        """Per-sigma scores of the first scoring round of the strategy's steps (read back from the
        history, so a resumed fit compares against the same round)."""
        for h in self.ctx.history:
            if int(h["step"]) == self.pretrain_steps and "robust_score" in h and "pilot" not in h:
                return {float(key.split("@", 1)[1]): v for key, v in h.items() if key.startswith("robust_score@")}
        raise CacheError("the fit checkpoint has no scoring round of the pretrained module (written by an older "
                         "version?); use a new checkpoint_dir")

    def on_scored(self, k: int, r: ScoreRound) -> dict[str, float]:
        """Hook: use a scoring round's paid labels (e.g. as distillation data); returns extra
        history fields."""
        return {}

    def learning_rate(self, k: int) -> float:
        """Learning rate of step ``k``: a function of ``k`` alone, so a resumed fit repeats the
        uninterrupted one. Pretraining uses ``pretrain_lr`` (or ``lr``), later steps ``lr``; with the
        cosine schedule each phase decays from its rate to 5 % of it."""
        cfg = self.ctx.config
        if k < self.pretrain_steps:
            base, j, length = (cfg.pretrain_lr or cfg.lr), k, self.pretrain_steps
        else:
            base, j, length = cfg.lr, k - self.pretrain_steps, cfg.steps
        return phase_lr(base, j, length, cfg.lr_schedule)

    def mse_step(self, k: int) -> dict[str, float]:
        ctx = self.ctx
        ctx.module.train()
        idx = ctx.batch_indices(k, ctx.config.batch_size)
        clean = repeat_draws(ctx.data.x[idx], ctx.config.noise_draws)
        loss = mse_loss(ctx.module(ctx.noisy(clean, k)), clean)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        v = float(loss.detach())
        self._mse_ema = v if self._mse_ema is None else 0.95 * self._mse_ema + 0.05 * v
        if k % 50 == 49 or k == self.pretrain_steps - 1:
            ctx.offer(k, -self._mse_ema, mse=self._mse_ema)
        return {"mse": v}

    def objective_step(self, k: int, classify: Any) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        """One optimiser step of ``w_mse * MSE + w_stab * CE(classify(A(x+d)), f(x)) + w_cls * CE(.., y)``
        where ``classify`` maps clipped module outputs to logits (a surrogate or the model itself).
        Returns the loss terms, the logits and the stability targets."""
        ctx, cfg = self.ctx, self.ctx.config
        ctx.module.train()
        idx = ctx.batch_indices(k, cfg.batch_size, labelled_only=True)
        clean = repeat_draws(ctx.data.x[idx], cfg.noise_draws)
        out = ctx.module(ctx.noisy(clean, k))
        logits = classify(out.clamp(0.0, 1.0))
        targets = repeat_draws(ctx.targets(idx), cfg.noise_draws)
        w = cfg.weights
        parts: dict[str, torch.Tensor] = {}
        if w.get("mse", 0) > 0:
            parts["mse"] = mse_loss(out, clean)
        if w.get("stability", 0) > 0:
            parts["stability"] = F.cross_entropy(logits, targets)
        if w.get("classification", 0) > 0:
            assert ctx.data.y is not None
            parts["classification"] = F.cross_entropy(logits, repeat_draws(ctx.data.y[idx], cfg.noise_draws))
        loss = sum(w[name] * v for name, v in parts.items())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        self.opt.step()
        info = {"loss": float(loss.detach()), **{n: float(v.detach()) for n, v in parts.items()}}  # type: ignore[union-attr]
        return info, logits.detach(), targets

    @abc.abstractmethod
    def main_step(self, k: int) -> dict[str, float]:
        """One step after pretraining."""

    def finish(self) -> None:
        """Called once after the last step: a strategy that queries scores its final state."""
        if self.needs_queries and self.ctx.config.steps > 0:
            self.score(self.total_steps)

    # -- state -----------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        t, m = optimizer_to_tensors(self.opt, "opt")
        return t, {"opt": m, "mse_ema": self._mse_ema}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore :meth:`state` (checkpointed tensors arrive on the CPU; the optimizer places its
        state on its parameters' device)."""
        optimizer_from_tensors(self.opt, "opt", tensors, meta["opt"])
        self._mse_ema = meta.get("mse_ema")

    def release(self) -> None:  # noqa: B027 - optional hook
        """Called once when the fit ends (or fails): put back what the strategy moved to the fit
        device (the module itself is put back by :meth:`FitContext.release`)."""


def _config_digest(ctx: FitContext, strategy: str) -> str:
    """What a fit checkpoint is bound to: the settings, strategy, sigmas, model fingerprint, module
    config and the fit data itself (images and labels, by content), so a rerun on other data of the
    same size never resumes it; and the fit device's type when it is not the CPU (its training noise
    comes from that device's generator; a CPU fit's digest is the one it had before fits had a device,
    so older CPU checkpoints still resume). The ``device`` setting itself is not bound: ``None`` and
    ``'cpu'`` on a CPU connector, or ``'cuda'`` and ``'cuda:0'``, are the same fit."""
    # pilot: its scale and outcome are in the checkpoint itself (a resumed fit never re-plans it)
    cfg = ctx.config.model_dump(mode="json", exclude={"checkpoint_every", "steps", "device", "pilot"})  # a module surrogate: its digest
    bound: dict[str, Any] = {"cfg": cfg, "strategy": strategy, "sigmas": ctx.sigmas,
                             "fingerprint": ctx.engine.info.fingerprint, "n": len(ctx.data),
                             "module": ctx.module.config.model_dump(mode="json")}
    if ctx.device.type != "cpu":
        bound["device_type"] = ctx.device.type
    blob = json.dumps(bound, sort_keys=True)
    h = hashlib.sha256(blob.encode())
    data = {"x": ctx.data.x}
    if ctx.data.y is not None:
        data["y"] = ctx.data.y
    hash_state(h, data)
    return h.hexdigest()[:16]


def _checkpoint(ctx: FitContext, strat: Strategy, directory: str | os.PathLike[str], step: int, digest: str,
                finished: bool = False, *, stopped: str = "completed", spent: int = 0,
                pilot: dict[str, Any] | None = None) -> None:
    """Save the fit state after ``step`` steps; ``stopped`` and ``spent`` (the queries charged by all
    calls of this fit so far) let a rerun report a finished fit as it ended."""
    tensors, smeta = strat.state()
    tensors = {f"s.{k}": v for k, v in tensors.items()}
    tensors.update({f"m.{k}": v for k, v in ctx.module.state_dict().items()})
    if ctx.best_state is not None:
        tensors.update({f"b.{k}": v for k, v in ctx.best_state.items()})
    if ctx.best_per_image is not None:
        tensors["best_per_image"] = ctx.best_per_image
    if ctx.gain_reference is not None:
        tensors["gain_reference"] = ctx.gain_reference
    if ctx.clean_labels is not None:
        tensors["clean_labels"] = ctx.clean_labels
    if ctx.known_labels is not None:
        tensors["known_labels"] = ctx.known_labels
    meta = {"step": step, "finished": finished, "digest": digest, "strategy": smeta, "best_score": ctx.best_score,
            "best_step": ctx.best_step, "history": ctx.history, "module_name": ctx.module.name,
            "no_gain_rounds": ctx.no_gain_rounds, "scored_step": ctx.scored_step, "stopped": stopped,
            "queries_spent": spent, "device_type": ctx.device.type}
    meta["pilot"] = pilot  # None: this fit runs no pilot (a checkpoint without the key predates pilots)
    save_checkpoint(directory, tensors, meta)


def _restore(ctx: FitContext, strat: Strategy, directory: str | os.PathLike[str],
             digest: str) -> tuple[int, bool, dict[str, Any]]:
    """Load the checkpoint in ``directory`` into ``ctx`` and ``strat``: the step reached, whether the
    fit finished, and how it stopped and what it spent (``{"stopped": .., "spent": ..}``).

    A checkpoint written on another device type (``"cpu"`` for one that does not say: fits ran on the
    CPU only before) raises :class:`ResumeMismatchError` naming both: its training noise came from
    that device type's generator, so continuing here would not be the fit it describes."""
    found = load_checkpoint(directory)
    if found is None:
        return 0, False, {"stopped": "completed", "spent": 0, "pilot": None, "restored": False}
    tensors, meta = found
    saved_type, now_type = str(meta.get("device_type", "cpu")), ctx.device.type
    if saved_type != now_type:
        raise ResumeMismatchError(
            f"the fit checkpoint in {directory} was written by a fit on device type {saved_type!r}, this fit "
            f"runs on {now_type!r} (device={str(ctx.device)!r}); the training noise comes from that device's "
            f"generator, so it would not continue the same fit: use device={saved_type!r} or another "
            "checkpoint_dir", {"device_type": (saved_type, now_type)})
    if meta.get("digest") != digest:
        raise CacheError(
            f"the fit checkpoint in {directory} was written with other settings (config, data, sigmas, "
            "module or model); use another checkpoint_dir or the original settings"
        )
    sub = lambda p: {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}  # noqa: E731
    if set(sub("m.")) != set(ctx.module.state_dict()):  # saved after the strategy changed the module's form
        strat.prepare_for_step(int(meta["step"]))
    ctx.module.load_state_dict(sub("m."))  # CPU tensors copied into the module where it is (the fit device)
    best = sub("b.")
    ctx.best_state = best or None
    ctx.best_score, ctx.best_step = meta["best_score"], meta["best_step"]
    ctx.history = list(meta["history"])
    if "clean_labels" in tensors:
        ctx.clean_labels = tensors["clean_labels"]
    if "known_labels" in tensors:  # a pilot's clean labels: never bought again
        ctx.known_labels = tensors["known_labels"]
    ctx.best_per_image = tensors.get("best_per_image")
    ctx.gain_reference = tensors.get("gain_reference")
    ctx.no_gain_rounds = int(meta.get("no_gain_rounds", 0))  # the patience counter: resume decides alike
    ctx.scored_step = None if meta.get("scored_step") is None else int(meta["scored_step"])
    strat.load_state(sub("s."), meta["strategy"])
    ended = {"stopped": str(meta.get("stopped", "completed")), "spent": int(meta.get("queries_spent", 0)),
             "pilot": meta.get("pilot"), "restored": True}
    return int(meta["step"]), bool(meta.get("finished", False)), ended


def run_fit(ctx: FitContext, strategy: str, *, checkpoint_dir: str | os.PathLike[str] | None = None) -> FitReport:
    """Run ``strategy`` to completion, until the budget stops it, or until ``patience`` scoring rounds
    in a row show no significant gain (``stopped="no_gain"``, with ``queries_saved``: the
    strategy's :meth:`~Strategy.estimate_queries` cap minus the queries charged over all calls of the
    fit); the module ends in its best tracked state, in eval mode, back on the device it was on
    before the fit (:meth:`FitContext.release`, also when the fit fails). With ``checkpoint_dir``
    the state (the patience counter included) is saved every ``checkpoint_every`` steps and at the
    end, on the CPU, and a rerun resumes from it onto the fit device: a fit that stopped for no gain
    stays stopped (its rerun spends nothing); one written on another device type is refused
    (:class:`ResumeMismatchError`, see :func:`_restore`). A fit whose config plans a pilot
    (:func:`~blackbox_rs.fitting.pilot.plan_pilot`) runs it before the strategy's first step
    (:func:`_run_pilot`; its checkpoints in ``checkpoint_dir/pilot``)."""
    cls = get_strategy(strategy)
    try:
        strat = cls(ctx)
        try:
            return _drive(ctx, strat, cls, strategy, checkpoint_dir)
        finally:
            strat.release()
    finally:
        ctx.release()


class _PilotRun:
    """A pilot that ran (:func:`_run_pilot`): its context (module, best state, history), its report, and
    whether one of its rounds gained significantly (no budget stop and a patience counter below
    ``patience`` after its ``patience`` rounds)."""

    def __init__(self, ctx: FitContext, report: FitReport, queries: int, plan: PilotPlan) -> None:
        self.ctx, self.report = ctx, report
        cfg = plan.config
        self.gained = report.stopped != "budget" and ctx.no_gain_rounds < int(cfg.patience)
        self.summary = PilotReport(factor=plan.factor, cap=plan.queries, queries=queries, gained=self.gained,
                                   stopped=report.stopped, steps=report.steps_done - cfg.pretrain_steps,
                                   score_images=cfg.score_images, clean_queries=cfg.clean_queries)


def _run_pilot(ctx: FitContext, strat: Strategy, cls: type[Strategy], strategy: str, plan: PilotPlan,
               checkpoint_dir: str | os.PathLike[str] | None) -> _PilotRun:
    """Run the pilot ``plan`` (see :mod:`blackbox_rs.fitting.pilot`) from the fit's state at the
    strategy's first step: a copy of the module, a fresh strategy with the pilot's config that takes
    over copies of ``strat``'s state (optimizer, surrogate, buffers), the same engine and tally, its
    scoring set held out of its training draws. Neither ``ctx`` nor ``strat`` nor the global random
    state (forked for the pilot: a module's own initialisation may draw from it) is changed, so a full
    fit after a gaining pilot is the fit without one; a module in the config (your surrogate) is
    copied too, so the pilot never trains it. With ``checkpoint_dir`` the pilot checkpoints in its
    ``pilot`` subfolder and a rerun resumes it (a finished pilot spends nothing again)."""
    cfg = plan.config
    modules = {k: copy.deepcopy(v) for k, v in cfg.__dict__.items() if isinstance(v, torch.nn.Module)}
    if modules:
        cfg = cfg.model_copy(update=modules)
    main_progress = ctx.progress
    progress = None if main_progress is None else (
        lambda k, _total, info: main_progress(k, strat.total_steps, {**info, "pilot": 1.0}))
    cuda = [ctx.device.index if ctx.device.index is not None else torch.cuda.current_device()] \
        if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        pctx = FitContext(ctx.engine, copy.deepcopy(ctx.module), ctx.data, ctx.sigmas, cfg, progress)
        pctx.tally = ctx.tally
        pctx.budget_cap = ctx.budget_cap
        pctx.holdout = True  # its rounds score images it never trained on: a small pool would flatter them
        pstrat = cls(pctx)
        before = ctx.tally.queries
        try:
            tensors, meta = strat.state()
            pstrat.load_state({k: v.detach().clone() for k, v in tensors.items()}, copy.deepcopy(meta))
            pdir = None if checkpoint_dir is None else Path(checkpoint_dir) / "pilot"
            report = _drive(pctx, pstrat, cls, strategy, pdir, start_at=strat.pretrain_steps)
        finally:
            pstrat.release()
    return _PilotRun(pctx, report, ctx.tally.queries - before, plan)


def _keep_pretrained(ctx: FitContext, pilot_ctx: FitContext, pretrain_steps: int) -> None:
    """A pilot that showed no significant gain ends the fit with the pretrained module, the state its
    first round scored (the fit's module as it is: the pilot trained a copy). A pilot state that merely
    scored higher on the pilot's small scoring set is not kept: the best of a few noisy rounds on 64
    images is biased upwards (on the demo such a state certified 7 points less at r = 0.5)."""
    first = next((h for h in pilot_ctx.history if int(h["step"]) == pretrain_steps and "robust_score" in h), None)
    ctx.best_state = None  # the module's current state is the one to keep (not an MSE-phase best)
    ctx.best_score = None if first is None else float(first["score"])
    ctx.best_step = pretrain_steps


def _drive(ctx: FitContext, strat: Strategy, cls: type[Strategy], strategy: str,
           checkpoint_dir: str | os.PathLike[str] | None, *, start_at: int = 0) -> FitReport:
    """The driver loop of :func:`run_fit` (resume, pilot, steps, checkpoints, stop), on the fit device;
    ``start_at``: the first step when there is no checkpoint to resume (a pilot starts at the
    strategy's first step).

    The pilot is planned once, by a fit that starts afresh, and its scale and outcome are recorded in
    every checkpoint of the fit (``meta["pilot"]``; written before the pilot spends anything), so a
    resumed fit never re-plans it: after a gain the full fit goes on (the pilot's clean labels are in
    the checkpoint, never bought again); after no gain or a budget stop inside the pilot the fit's own
    checkpoint stays at the strategy's first step with the pretrained module, and a rerun reads the
    pilot back from its finished checkpoint (no query) or continues it (a raised budget). A rerun with
    ``pilot=0`` of a fit its pilot ended runs the full fit instead. A checkpoint written before pilots
    existed resumes without one, as it would have."""
    strat.check()
    digest = _config_digest(ctx, strategy)
    if checkpoint_dir is not None:
        start, finished, ended = _restore(ctx, strat, checkpoint_dir, digest)
    else:
        start, finished, ended = 0, False, {"stopped": "completed", "spent": 0, "pilot": None, "restored": False}
    if not ended["restored"]:
        start = start_at
    resumed = start if start > start_at else None
    total = strat.total_steps
    n = len(ctx.data)
    stopped = "no_gain" if ended["stopped"] == "no_gain" else "completed"
    # the pilot: as the checkpoint recorded it, else planned now (a fresh fit)
    pilot: dict[str, Any] | None = ended.get("pilot")
    plan = None
    if pilot is not None:
        plan = pilot_plan_at(cls, ctx.config, n, float(pilot["factor"]))
    elif not ended["restored"]:
        plan = plan_pilot(cls, ctx.config, n, ctx.budget_cap)
        pilot = None if plan is None else {"factor": plan.factor, "outcome": None}
    if pilot is not None and float(ctx.config.pilot) == 0 and pilot["outcome"] in (None, "no_gain"):
        pilot["outcome"] = "skipped"  # pilot=0 on a rerun: the full fit, from the pretrained module
        stopped, finished = "completed", False
    pending = pilot is not None and pilot["outcome"] in (None, "no_gain")
    run: _PilotRun | None = None
    k = start
    try:
        if stopped != "no_gain" or pending:
            while k < total:
                if pending and k == strat.pretrain_steps:
                    assert plan is not None and pilot is not None
                    if checkpoint_dir is not None:  # the plan is on disk before the pilot spends anything
                        _checkpoint(ctx, strat, checkpoint_dir, k, digest, spent=ended["spent"] + ctx.tally.queries,
                                    pilot=pilot)
                    run = _run_pilot(ctx, strat, cls, strategy, plan, checkpoint_dir)
                    pending = False
                    ctx.known_labels = run.ctx.clean_labels
                    pilot["summary"] = run.summary.model_dump()
                    pilot["history"] = [{**h, "pilot": 1.0} for h in run.ctx.history]
                    if run.gained:
                        pilot["outcome"] = "gain"
                        if checkpoint_dir is not None:  # its outcome and spend on disk before the full fit's steps
                            _checkpoint(ctx, strat, checkpoint_dir, k, digest,
                                        spent=ended["spent"] + ctx.tally.queries, pilot=pilot)
                    elif run.report.stopped == "budget":
                        stopped = "budget"
                        break
                    else:
                        pilot["outcome"] = "no_gain"
                        raise _NoGain
                info = strat.step(k)
                k += 1
                ctx.report(k, total, info)
                if checkpoint_dir is not None and (k % ctx.config.checkpoint_every == 0):
                    _checkpoint(ctx, strat, checkpoint_dir, k, digest, spent=ended["spent"] + ctx.tally.queries,
                                pilot=pilot)
            if not finished and stopped != "budget":
                strat.finish()
                finished = True
    except BudgetExceeded:
        stopped = "budget"
    except _NoGain:
        stopped, finished = "no_gain", True
    finally:
        if checkpoint_dir is not None:
            _checkpoint(ctx, strat, checkpoint_dir, k, digest, finished, stopped=stopped,
                        spent=ended["spent"] + ctx.tally.queries, pilot=pilot)
    steps_done = k
    history = list(ctx.history)
    summary: PilotReport | None = None
    if pilot is not None and pilot.get("summary") is not None:
        summary = run.summary if run is not None else PilotReport(**{**pilot["summary"], "queries": 0})
        summary = summary.model_copy(update={"outcome": pilot["outcome"] or "budget"})
        # the pilot's entries (marked pilot=1) go where they happened: before the strategy's own rounds
        at = next((i for i, h in enumerate(history) if int(h["step"]) >= strat.pretrain_steps), len(history))
        history[at:at] = [h for h in pilot.get("history", []) if int(h["step"]) >= strat.pretrain_steps]
    if run is not None and not run.gained:  # the pilot ended the fit: the pretrained module is kept
        _keep_pretrained(ctx, run.ctx, strat.pretrain_steps)
        steps_done = run.report.steps_done
    ctx.restore_best()
    ctx.module.eval()
    saved = None
    if stopped == "no_gain":
        cap = cls.base_queries(ctx.config, n)
        if plan is not None and pilot is not None and (pilot["outcome"] != "skipped" or pilot.get("summary")):
            cap += plan.queries - plan.reused  # the pilot that ran (or was planned) is part of the fit's cap
        if ctx.budget_cap is not None:
            cap = min(cap, ctx.budget_cap)
        saved = max(0, cap - ended["spent"] - ctx.tally.queries)
    return FitReport(
        strategy=strategy, sigmas=ctx.sigmas, steps_done=steps_done, steps_total=total, stopped=stopped,  # type: ignore[arg-type]
        queries=ctx.tally.queries, cache_hits=ctx.tally.cache_hits, cost=ctx.tally.cost,
        trainable_parameters=ctx.module.num_trainable(), best_score=ctx.best_score, best_step=ctx.best_step,
        history=history, resumed_from=resumed, queries_saved=saved, pilot=summary,
    )
