"""Measured fit-time estimates (blackbox_rs.fitting.timing): real probe steps, no black-box query,
the caller's module untouched, typed refusal above a limit."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch

from blackbox_rs import BlackBoxSmoother, FitConfig, QueryEngine
from blackbox_rs.connectors import CallableConnector
from blackbox_rs.errors import FitTooSlowError, InvalidParameterError
from blackbox_rs.fitting.strategies import estimate_fit_queries
from blackbox_rs.fitting.timing import (
    FitTimeEstimate,
    FitTimeWarning,
    PhaseTime,
    check_fit_time,
    estimate_fit_time,
)
from blackbox_rs.modules import create_module

SHAPE = (3, 32, 32)
K = 4
LOWRES = {"name": "lowres", "factor": 4, "depth": 3, "width": 8}
# small periodic work so the query-paid probes stay fast
SMALL = {"batch_size": 4, "clean_queries": 16, "score_images": 4, "score_draws": 2, "score_every": 10}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread hand-offs would dominate on a shared machine
    try:
        yield
    finally:
        torch.set_num_threads(n)


class Counting(torch.nn.Module):
    """A classifier that logs the batch sizes it is asked about, in a log shared by its copies (the
    estimate works on a deep copy of a stand-in)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, K)
        self.log: dict[str, list[int]] = {"batches": []}

    def __deepcopy__(self, memo: dict) -> Counting:
        twin = Counting()
        twin.lin.load_state_dict(self.lin.state_dict())
        twin.log = self.log  # shared on purpose
        return twin

    @property
    def batches(self) -> list[int]:
        return self.log["batches"]

    @property
    def images(self) -> int:
        return sum(self.batches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log["batches"].append(int(x.shape[0]))
        return self.lin(x.mean(dim=(2, 3)))


def _module(spec: dict | None = None):
    torch.manual_seed(0)
    return create_module({"input_shape": SHAPE, **(spec or LOWRES)})


@pytest.mark.parametrize(
    ("strategy", "extra", "module"),
    [
        ("denoise", {}, LOWRES),
        ("surrogate", {"distill_queries": 8, "redistill_every": 10}, LOWRES),
        ("zeroth_order", {"zo_batch": 3, "zo_directions": 2}, {"name": "dncnn", "depth": 2, "width": 4}),
        ("passthrough", {}, LOWRES),
    ],
)
def test_no_query_is_sent_and_the_module_is_untouched(strategy: str, extra: dict, module: dict) -> None:
    model = Counting()
    engine = QueryEngine(CallableConnector(model, input_shape=SHAPE, num_classes=K, differentiable=True))
    sm = BlackBoxSmoother(engine, module=module, sigma=0.25)
    mod = sm.module
    assert mod is not None
    mod.train()
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    digest = mod.digest()
    rng = torch.get_rng_state()
    cfg = FitConfig(strategy=strategy, steps=20, pretrain_steps=5, **SMALL, **extra)
    stand_in = Counting()
    est = estimate_fit_time(mod, cfg, engine.info.input_shape, engine.info.num_classes, probe_steps=2,
                            warmup_steps=0, n_images=16, stand_in=stand_in)
    # the black box of the smoother saw nothing, its engine charged nothing
    assert model.images == 0
    assert engine.stats.queries == 0 and engine.stats.cache_hits == 0
    # ... the caller's module is the same object, same class, same weights, same mode; the global RNG too
    assert sm.module is mod and type(mod).__name__ == ("DnCNN" if module["name"] == "dncnn" else "LowResDenoiser")
    assert mod.digest() == digest and mod.training
    assert all(torch.equal(before[k], v) for k, v in mod.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    # the steps that would query were answered by the local stand-in (work mirrored, not skipped)
    if strategy == "denoise":
        assert stand_in.images == 0
    else:
        assert stand_in.images > 0
    assert est.queries == estimate_fit_queries(cfg, 16)
    assert est.total_seconds > 0 and est.local_seconds == pytest.approx(sum(p.seconds for p in est.phases))
    for p in est.phases:
        assert p.seconds_per_step > 0 and p.seconds == pytest.approx(p.count * p.seconds_per_step)


def test_phases_follow_the_strategy() -> None:
    common = {"steps": 20, "pretrain_steps": 5, **SMALL}
    d = estimate_fit_time(_module(), FitConfig(strategy="denoise", **common), SHAPE, K, probe_steps=1)
    assert [(p.name, p.count) for p in d.phases] == [("mse", 25)]  # denoise: every step is MSE
    assert d.queries == 0 and "sends no query" in d.excluded
    s = estimate_fit_time(_module(), FitConfig(strategy="surrogate", distill_queries=8, redistill_every=10, **common),
                          SHAPE, K, probe_steps=1, n_images=16)
    assert [(p.name, p.count) for p in s.phases] == [
        ("mse", 5), ("surrogate steps", 20), ("scoring rounds", 3), ("distillation rounds", 2)]
    assert s.phase("scoring rounds").queries == 3 * 4 * 2 and s.phase("distillation rounds").queries == 16
    with pytest.raises(InvalidParameterError, match="no phase 'zeroth_order steps'"):
        s.phase("zeroth_order steps")
    text = s.summary()
    assert "surrogate steps: 20 x" in text and "excluded:" in text and "total:" in text


def test_a_fit_that_runs_a_pilot_counts_its_steps() -> None:
    from blackbox_rs.fitting.pilot import plan_pilot
    from blackbox_rs.fitting.strategies import get_strategy

    cfg = FitConfig(strategy="surrogate", steps=400, pretrain_steps=5, batch_size=4, score_every=10,
                    distill_queries=2000, redistill_every=10)
    plan = plan_pilot(get_strategy("surrogate"), cfg, 5000)
    assert plan is not None
    s = estimate_fit_time(_module(), cfg, SHAPE, K, probe_steps=1, n_images=5000)
    assert s.phase("pilot steps").count == plan.config.steps == 20
    assert s.phase("pilot steps").seconds_per_step == s.phase("surrogate steps").seconds_per_step
    assert s.queries == estimate_fit_queries(cfg, 5000)  # the pilot's queries are in the total


def test_zeroth_order_steps_evaluate_two_losses_per_direction() -> None:
    stand_in = Counting()
    cfg = FitConfig(strategy="zeroth_order", steps=20, pretrain_steps=0, zo_batch=3, zo_directions=2,
                    noise_draws=2, **SMALL)
    estimate_fit_time(_module({"name": "dncnn", "depth": 2, "width": 4}), cfg, SHAPE, K, probe_steps=2,
                      warmup_steps=0, stand_in=stand_in)
    # one query of 2 * q * zo_batch * draws images per step: the untimed set-up step and the 2 timed ones
    assert stand_in.batches.count(2 * 2 * 3 * 2) == 3


def test_seconds_per_query_adds_the_black_box_time() -> None:
    cfg = FitConfig(strategy="passthrough", steps=10, pretrain_steps=0, **SMALL)
    est = estimate_fit_time(_module(), cfg, SHAPE, K, probe_steps=1, n_images=16, seconds_per_query=0.5)
    assert est.query_seconds == pytest.approx(0.5 * est.queries) and est.queries == estimate_fit_queries(cfg, 16)
    assert est.total_seconds == pytest.approx(est.local_seconds + est.query_seconds)


def test_the_estimate_refuses_what_the_fit_refuses() -> None:
    big = _module({"name": "lowres", "factor": 4, "depth": 4, "width": 64})  # > zo_max_parameters
    with pytest.raises(InvalidParameterError, match="zo_max_parameters"):
        estimate_fit_time(big, FitConfig(strategy="zeroth_order", steps=5, pretrain_steps=0, **SMALL), SHAPE, K)
    with pytest.raises(InvalidParameterError, match="probe_steps"):
        estimate_fit_time(_module(), FitConfig(strategy="denoise"), SHAPE, K, probe_steps=0)


def test_the_estimate_is_positive_and_scales_with_steps() -> None:
    few = estimate_fit_time(_module(), FitConfig(strategy="denoise", steps=5, pretrain_steps=5, batch_size=4),
                            SHAPE, K, probe_steps=2)
    many = estimate_fit_time(_module(), FitConfig(strategy="denoise", steps=995, pretrain_steps=5, batch_size=4),
                             SHAPE, K, probe_steps=2)
    assert 0 < few.total_seconds < many.total_seconds
    assert many.phases[0].count == 100 * few.phases[0].count
    # per-step timings of two probes differ by machine noise only, far less than the 100x in steps
    assert many.total_seconds > 10 * few.total_seconds


def _estimate(total_per_step: float = 2.0, count: int = 1200, module: str = "dncnn") -> FitTimeEstimate:
    phase = PhaseTime(name="mse", count=count, seconds_per_step=total_per_step, seconds=count * total_per_step,
                      measured_steps=3)
    return FitTimeEstimate(strategy="denoise", module=module, input_shape=(3, 224, 224), batch_size=64,
                           phases=[phase], local_seconds=phase.seconds, queries=0, total_seconds=phase.seconds,
                           threads=2, excluded="nothing")


def test_check_fit_time_raises_naming_the_estimate_the_limit_and_the_cures() -> None:
    est = _estimate(30.0, 1200)  # 36,000 s = 10 h
    with pytest.raises(FitTooSlowError) as info:
        check_fit_time(est, 1800)
    msg = str(info.value)
    assert "10 h 0 min (36,000 s)" in msg and "30 min 0 s (1,800 s)" in msg
    assert "'mse': 1,200 x 30 s" in msg
    assert "about 60 fit at the measured 30 s/step" in msg  # 1800 / 30
    assert "batch_size (now 64)" in msg and "'lowres' module" in msg
    assert isinstance(info.value, InvalidParameterError)
    assert "lowres' module" not in str(pytest.raises(FitTooSlowError, check_fit_time,
                                                     _estimate(30.0, 1200, module="lowres"), 1800).value)
    # within the limit: returned as is, nothing raised or warned
    ok = _estimate(1.0, 1200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_fit_time(ok, 1800) is ok
    with pytest.warns(FitTimeWarning, match="over the limit of 30 min"):
        assert check_fit_time(est, 1800, action="warn") is est
    with pytest.raises(InvalidParameterError, match="limit_s"):
        check_fit_time(est, 0)
