"""Measured fit-time estimates for dry runs: a few real optimisation steps, timed, on this machine.

:func:`estimate_fit_time` runs ``probe_steps`` real steps (after ``warmup_steps`` untimed ones) of each
phase the configured strategy runs, with the strategy's own code, on a deep copy of the module and on
synthetic images of the input shape, and scales the measured seconds per step (the median of the timed
steps) by the configured step counts. Phases:

- ``mse``: MSE denoising steps (``pretrain_steps``; for ``denoise`` every step);
- ``<strategy> steps``: the strategy's own steps after pretraining (a ``surrogate`` step goes through
  the surrogate, a ``zeroth_order`` step evaluates ``2 * zo_directions`` perturbed losses, a
  ``passthrough`` step runs a differentiable forward and backward);
- ``scoring rounds``: the module's outputs on ``score_images * score_draws`` noisy images per round;
- ``distillation rounds`` (``surrogate``): the module's outputs on ``distill_queries`` images and the
  surrogate's training steps over the growing buffer, per round.

Guarantees: **no black-box query is ever sent or counted**: every step that would query the model
asks a local stand-in classifier of the same input shape and number of classes (by default a pooled
linear layer whose cost is negligible), through an engine of its own. The caller's module, its
training mode and torch's global random state are untouched. What is *excluded* is the black box's
own answer time (network and vendor latency, or a local model's inference) unless
``seconds_per_query`` is given (then ``queries * seconds_per_query`` is added), or the real model is
passed as ``stand_in``. The figures are for the current torch thread count and the load on the
machine at the time of the probe.

Use it from a dry run as::

    est = estimate_fit_time(module, config, info.input_shape, info.num_classes, n_images=len(x))
    print(est.summary())
    check_fit_time(est, limit_s)  # FitTooSlowError naming the estimate, the limit and the cures
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from blackbox_rs.errors import FitTooSlowError, InvalidParameterError
from blackbox_rs.modules.base import InputModule

__all__ = ["FitTimeEstimate", "FitTimeWarning", "PhaseTime", "check_fit_time", "estimate_fit_time", "format_seconds"]

_NEVER = 10**9  # a period longer than any probe: no periodic round inside the timed steps


class FitTimeWarning(UserWarning):
    """Issued by :func:`check_fit_time` with ``action="warn"`` when the estimate exceeds the limit."""


class PhaseTime(BaseModel):
    """One phase of the fit: how many units it runs and what one unit costs here."""

    name: str
    count: int = Field(description="steps (or rounds) of this phase in the configured fit")
    seconds_per_step: float = Field(description="measured seconds per step (or per round) on this machine")
    seconds: float = Field(description="count * seconds_per_step")
    measured_steps: int = Field(description="timed steps behind seconds_per_step (0: derived from per-image timings)")
    queries: int = Field(default=0, description="black-box images this phase sends in the real fit (time excluded)")


class FitTimeEstimate(BaseModel):
    """What :func:`estimate_fit_time` measured, per phase, and the total for the configured fit."""

    strategy: str
    module: str
    input_shape: tuple[int, int, int]
    batch_size: int
    phases: list[PhaseTime]
    local_seconds: float = Field(description="sum of the phases: compute on this machine")
    queries: int = Field(description="black-box images of the configured fit (upper bound, before the cache)")
    seconds_per_query: float | None = None
    query_seconds: float = Field(default=0.0, description="queries * seconds_per_query (0 when not given)")
    total_seconds: float = Field(description="local_seconds + query_seconds")
    threads: int = Field(description="torch intra-op threads during the probe")
    excluded: str = Field(description="what the estimate does not include")

    def phase(self, name: str) -> PhaseTime:
        """The phase called ``name`` (:class:`InvalidParameterError` listing the phases otherwise)."""
        for p in self.phases:
            if p.name == name:
                return p
        raise InvalidParameterError(f"no phase {name!r}; phases: {[p.name for p in self.phases]}")

    def summary(self) -> str:
        """Human-readable lines for a dry run (one per phase, then the total and what is excluded)."""
        lines = [f"expected fit time on this machine ({self.threads} torch threads; measured, not guessed):"]
        for p in self.phases:
            unit = "round" if "round" in p.name else "step"
            lines.append(f"  {p.name}: {p.count:,} x {p.seconds_per_step:.3g} s/{unit} = {format_seconds(p.seconds)}")
        if self.seconds_per_query is not None:
            lines.append(f"  black-box answers: {self.queries:,} x {self.seconds_per_query:g} s = "
                         f"{format_seconds(self.query_seconds)}")
        lines.append(f"  total: {format_seconds(self.total_seconds)}")
        lines.append(f"  excluded: {self.excluded}")
        return "\n".join(lines)


def format_seconds(s: float) -> str:
    """``s`` as ``"42 s"``, ``"12 min 5 s"`` or ``"50 h 3 min"``."""
    if not math.isfinite(s):
        return str(s)
    if s < 60:
        return f"{s:.3g} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


class _StandIn(nn.Module):
    """Local classifier standing in for the black box: global average pool + linear (negligible cost)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.lin = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.mean(dim=(2, 3)))


def _fit_config(config: Any, **fields: Any) -> Any:
    """``config`` with ``fields`` replaced, keeping only fields the config has (read defensively:
    per-strategy configs may lack some), built as ``FitConfig(strategy=..., **fields)``."""
    from blackbox_rs.fitting.config import FitConfig

    data = config.model_dump() if isinstance(config, BaseModel) else dict(config)
    data.update({k: v for k, v in fields.items() if k in data})
    return FitConfig(**data)


def _timed(fn: Any, warmup: int, probe: int) -> float:
    """Median seconds of ``fn(i)`` over ``probe`` calls after ``warmup`` untimed ones (the median:
    one call slowed by another process on a shared machine does not set the estimate)."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(warmup, warmup + probe):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def estimate_fit_time(
    module: InputModule,
    config: Any,
    input_shape: Sequence[int],
    num_classes: int,
    probe_steps: int = 3,
    *,
    n_images: int | None = None,
    sigmas: Sequence[float] = (0.25,),
    seconds_per_query: float | None = None,
    stand_in: nn.Module | None = None,
    surrogate: nn.Module | None = None,
    warmup_steps: int = 1,
) -> FitTimeEstimate:
    """Measure what fitting ``module`` with ``config`` (a ``FitConfig`` or a mapping of its fields)
    takes on this machine, without sending a single black-box query (see the module docstring).

    ``n_images``: images of the fit data (sizes the labelled subset; default ``clean_queries``);
    ``sigmas``: the fit's noise levels; ``seconds_per_query``: black-box seconds per image, added as
    ``queries * seconds_per_query`` when given; ``stand_in``: a local classifier used instead of the
    default pooled linear one (e.g. the local model itself, so a pass-through estimate includes its
    forward and backward); ``surrogate``: the user surrogate a ``surrogate`` fit would get.
    Raises what the fit itself would raise for settings the strategy refuses (before any timing).
    """
    from blackbox_rs.connectors import CallableConnector
    from blackbox_rs.engine import QueryEngine
    from blackbox_rs.fitting.config import FitConfig
    from blackbox_rs.fitting.context import FitContext, fit_device
    from blackbox_rs.fitting.data import FitData
    from blackbox_rs.fitting.pilot import plan_pilot
    from blackbox_rs.fitting.strategies import estimate_fit_queries, get_strategy

    if not isinstance(module, InputModule):
        raise InvalidParameterError(f"module must be an InputModule, got {type(module).__name__}")
    if int(probe_steps) < 1 or int(warmup_steps) < 0:
        raise InvalidParameterError(f"probe_steps must be >= 1 and warmup_steps >= 0, got {probe_steps}, {warmup_steps}")
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or any(d < 1 for d in shape):
        raise InvalidParameterError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    cfg = config if isinstance(config, BaseModel) else FitConfig(**dict(config))
    strategy = str(cfg.strategy)
    cls = get_strategy(strategy)
    probe, warm = int(probe_steps), int(warmup_steps)
    get = lambda name, default: getattr(cfg, name, default)  # noqa: E731 - fields read defensively
    batch = int(get("batch_size", 64))
    steps = int(get("steps", 0))
    pretrain = int(get("pretrain_steps", 0))
    clean_q = int(get("clean_queries", 10_000))
    n_img = int(n_images) if n_images is not None else max(1, clean_q)
    subset = max(1, min(n_img, clean_q))

    m = max(batch, int(get("zo_batch", 1)), 2)  # probe images: enough for one batch of any kind
    threads = torch.get_num_threads()
    phases: list[PhaseTime] = []
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):  # manual_seed seeds every device
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        x = torch.rand((m, *shape), generator=g)
        y = torch.randint(0, int(num_classes), (m,), generator=g)
        data = FitData(x=x, y=y)
        clf = copy.deepcopy(stand_in) if stand_in is not None else _StandIn(shape[0], int(num_classes))
        dev = fit_device(cfg, None)  # the configured device (else the CPU); an unusable one raises here
        fn: Any = clf
        if dev.type != "cpu":  # the stand-in runs on the fit device, answering where it was asked
            clf.to(dev)
            fn = lambda b: clf(b.to(dev)).to(b.device)  # noqa: E731
        conn = CallableConnector(fn, input_shape=shape, num_classes=int(num_classes), differentiable=True,
                                 fingerprint="blackbox-rs/fit-timing-stand-in", max_batch=1 << 20)

        def context(probe_cfg: Any) -> Any:
            ctx = FitContext(QueryEngine(conn), copy.deepcopy(module), data, list(sigmas), probe_cfg)
            if surrogate is not None:
                ctx.surrogate_module = copy.deepcopy(surrogate)  # type: ignore[attr-defined]
            return ctx

        mse_count = pretrain + steps if strategy == "denoise" else pretrain
        main_count = 0 if strategy == "denoise" else steps
        if mse_count > 0:
            ctx = context(_fit_config(cfg, pretrain_steps=warm + probe, steps=0, clean_queries=m))
            strat = cls(ctx)
            strat.check()
            t = _timed(strat.step, warm, probe)
            phases.append(PhaseTime(name="mse", count=mse_count, seconds_per_step=t, seconds=t * mse_count,
                                    measured_steps=probe))
        if main_count > 0:
            ctx = context(_fit_config(cfg, pretrain_steps=0, steps=1 + warm + probe, clean_queries=m,
                                      score_images=m, score_draws=1, distill_queries=m, score_every=_NEVER,
                                      redistill_every=_NEVER))
            strat = cls(ctx)
            strat.check()
            strat.step(0)  # the strategy's set-up (clean labels, first scoring/distillation round): untimed
            t = _timed(lambda i: strat.step(1 + i), warm, probe)
            q_main = int(cls.step_queries(cfg)) if strategy != "surrogate" else 0
            phases.append(PhaseTime(name=f"{strategy} steps", count=main_count, seconds_per_step=t,
                                    seconds=t * main_count, measured_steps=probe, queries=q_main))
            plan = plan_pilot(cls, cfg, n_img)
            if plan is not None:  # the pilot's own steps come first (their queries are in the total)
                pc = int(plan.config.steps)
                phases.append(PhaseTime(name="pilot steps", count=pc, seconds_per_step=t, seconds=t * pc,
                                        measured_steps=probe, queries=0))
            if cls.needs_queries:
                phases.extend(_periodic(ctx, strat, cfg, strategy, subset, steps, warm, probe))
    local = sum(p.seconds for p in phases)
    queries = int(estimate_fit_queries(cfg, n_img))
    q_s = queries * float(seconds_per_query) if seconds_per_query is not None else 0.0
    if stand_in is not None:
        excluded = ("the black box's answer time beyond the given stand_in model's compute (network and vendor "
                    "latency)")
    else:
        excluded = ("the black box's own answer time (network and vendor latency, or a local model's inference) "
                    f"for {queries:,} queried images")
    if seconds_per_query is not None:
        excluded = f"nothing measured for the black box: its answers are counted at the given {seconds_per_query:g} s per image"
    if queries == 0:
        excluded = "no black-box time: this fit sends no query (data loading and checkpoint writes are not timed)"
    return FitTimeEstimate(
        strategy=strategy, module=module.name, input_shape=shape, batch_size=batch, phases=phases,  # type: ignore[arg-type]
        local_seconds=local, queries=queries, seconds_per_query=seconds_per_query, query_seconds=q_s,
        total_seconds=local + q_s, threads=threads, excluded=excluded,
    )


def _periodic(ctx: Any, strat: Any, cfg: Any, strategy: str, subset: int, steps: int, warm: int,
              probe: int) -> list[PhaseTime]:
    """Scoring and distillation rounds, from measured per-image costs (module outputs; the
    surrogate's inference) and measured surrogate training steps."""
    get = lambda name, default: getattr(cfg, name, default)  # noqa: E731
    probe_x = ctx.noisy(ctx.data.x[:16], 0)  # per-image costs: a few images suffice
    m = len(probe_x)
    per_out = _timed(lambda i: ctx.module_outputs(probe_x), warm, probe) / m
    sur = getattr(strat, "surrogate", None) if strategy == "surrogate" else None
    per_inf = 0.0
    if isinstance(sur, nn.Module):
        out = ctx.module_outputs(probe_x)
        from blackbox_rs.surrogates import predict_logits

        per_inf = _timed(lambda i: predict_logits(sur, out, batch_size=512), warm, probe) / m
    phases: list[PhaseTime] = []
    score_every = max(1, int(get("score_every", 150)))
    score_n = min(int(get("score_images", 256)), subset) * int(get("score_draws", 8))
    rounds = math.ceil(steps / score_every) + 1
    per_round = score_n * (per_out + per_inf)
    phases.append(PhaseTime(name="scoring rounds", count=rounds, seconds_per_step=per_round, seconds=rounds * per_round,
                            measured_steps=0, queries=rounds * score_n))
    if isinstance(sur, nn.Module):
        every = max(1, int(get("redistill_every", 150)))
        dq = int(get("distill_queries", 10_000))
        cap = int(get("surrogate_buffer", 60_000))
        epochs = float(get("surrogate_epochs", 2.0))
        # the buffer grows as SurrogateStrategy fills it: scoring outputs, the clean subset, each round
        buf, train_steps, n_rounds = 0, 0, 0
        for j in sorted(set(range(0, steps, score_every)) | set(range(0, steps, every))):
            if j % score_every == 0:
                buf = min(cap, buf + score_n)
            if j == 0 and buf == 0:
                buf = min(cap, subset)
            if j % every == 0:
                buf = min(cap, buf + dq)
                train_steps += max(1, int(epochs * buf / 128))
                n_rounds += 1
        bsz = min(128, cap)
        s_copy = copy.deepcopy(sur).train()
        opt = torch.optim.Adam(s_copy.parameters(), lr=float(get("surrogate_lr", 2e-3)))
        reps = math.ceil(bsz / m)
        bx = ctx.module_outputs(probe_x).repeat(reps, 1, 1, 1)[:bsz]
        by = torch.randint(0, ctx.engine.info.num_classes, (bsz,), generator=torch.Generator().manual_seed(1))

        def train_step(i: int) -> None:
            loss = F.cross_entropy(s_copy(bx), by)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        per_train = _timed(train_step, warm, probe)
        total = n_rounds * dq * (per_out + per_inf) + train_steps * per_train
        phases.append(PhaseTime(name="distillation rounds", count=n_rounds,
                                seconds_per_step=total / n_rounds if n_rounds else 0.0, seconds=total,
                                measured_steps=probe, queries=n_rounds * dq))
    return phases


def check_fit_time(estimate: FitTimeEstimate, limit_s: float, *,
                   action: Literal["raise", "warn"] = "raise") -> FitTimeEstimate:
    """Return ``estimate`` if its total is within ``limit_s`` seconds; otherwise raise
    :class:`~blackbox_rs.errors.FitTooSlowError` (or, ``action="warn"``, issue a :class:`FitTimeWarning`)
    whose message names the estimate (total and slowest phase), the limit, and how to cut it:
    fewer steps (how many fit at the measured rate), a smaller batch, the ``lowres`` module."""
    if not (isinstance(limit_s, (int, float)) and limit_s > 0):
        raise InvalidParameterError(f"limit_s must be a positive number of seconds, got {limit_s!r}")
    if action not in ("raise", "warn"):
        raise InvalidParameterError(f"action must be 'raise' or 'warn', got {action!r}")
    if estimate.total_seconds <= limit_s:
        return estimate
    worst = max(estimate.phases, key=lambda p: p.seconds, default=None)
    step_phases = [p for p in estimate.phases if p.measured_steps and "round" not in p.name]
    per_step = sum(p.seconds for p in step_phases) / max(1, sum(p.count for p in step_phases))
    fits = int(limit_s / per_step) if per_step > 0 else 0
    where = (f"; slowest phase {worst.name!r}: {worst.count:,} x {worst.seconds_per_step:.3g} s = "
             f"{format_seconds(worst.seconds)}") if worst is not None else ""
    cures = [f"fewer steps (pretrain_steps + steps: about {fits:,} fit at the measured {per_step:.3g} s/step)"
             if per_step > 0 else "fewer steps",
             f"a smaller batch_size (now {estimate.batch_size})"]
    if estimate.module != "lowres":
        cures.append("the 'lowres' module for large inputs (module={'name': 'lowres', 'factor': 4}; "
                     "see docs/large-inputs.md)")
    msg = (f"the fit is estimated at {format_seconds(estimate.total_seconds)} ({estimate.total_seconds:,.0f} s) "
           f"on this machine for module {estimate.module!r} with strategy {estimate.strategy!r} at "
           f"{tuple(estimate.input_shape)}{where}, over the limit of {format_seconds(float(limit_s))} "
           f"({float(limit_s):,.0f} s); cut it with " + ", ".join(cures)
           + f" (excluded from the estimate: {estimate.excluded})")
    if action == "warn":
        warnings.warn(msg, FitTimeWarning, stacklevel=2)
        return estimate
    raise FitTooSlowError(msg)
