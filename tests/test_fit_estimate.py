"""The dry-run fit estimate is exact for an uninterrupted fit without a cache: every round type
(clean labels, scoring rounds, distillation rounds, ZO steps, pass-through forwards) is counted, so
leaving one out makes these tests fail (on the main of 2026-12-01 the CLI's estimate omitted the
scoring rounds: 23,400 printed, 27,544 spent)."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

from blackbox_rs import BlackBoxSmoother, FitConfig, QueryEngine
from blackbox_rs.connectors import CallableConnector
from blackbox_rs.fitting.strategies import (
    STRATEGIES,
    Strategy,
    estimate_fit_queries,
    expected_fit_queries,
    register_strategy,
)

SHAPE = (1, 6, 6)


class Logits(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(36, 3)

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return self.lin(b.flatten(1))


def _fit(strategy: str, n_images: int = 24, **cfg: Any) -> tuple[int, int]:
    model = Logits()
    conn = CallableConnector(model, input_shape=SHAPE, num_classes=3, differentiable=True)
    engine = QueryEngine(conn)  # no cache: every query is charged
    sm = BlackBoxSmoother(engine, module={"name": "dncnn", "depth": 2, "width": 4}, sigma=0.25)
    x = torch.rand(n_images, *SHAPE, generator=torch.Generator().manual_seed(1))
    config = FitConfig(strategy=strategy, **cfg)
    est = estimate_fit_queries(config, n_images)
    sm.fit(x, config=config)
    return engine.stats.queries, est


SMALL = {"pretrain_steps": 2, "batch_size": 4, "clean_queries": 10, "score_images": 6, "score_draws": 2,
         "score_every": 3, "patience": 0}  # uninterrupted fits: no early stop for no gain (tests/test_fit_early_stop.py)


@pytest.mark.parametrize("strategy,extra", [
    ("surrogate", {"steps": 7, "distill_queries": 9, "redistill_every": 4, "surrogate_epochs": 0.5}),
    ("zeroth_order", {"steps": 4, "zo_batch": 3, "zo_directions": 2, "noise_draws": 2}),
    ("passthrough", {"steps": 5, "noise_draws": 2}),
    ("denoise", {"steps": 3}),
])
def test_the_estimate_is_what_each_strategy_spends(strategy: str, extra: dict[str, Any]) -> None:
    spent, est = _fit(strategy, **SMALL, **extra)
    assert spent == est  # an upper bound that is tight: no round type is left out
    if strategy != "denoise":
        cfg = FitConfig(strategy=strategy, **SMALL, **extra)
        rounds = -(-cfg.steps // cfg.score_every) + 1
        assert est > rounds * cfg.score_images * cfg.score_draws > 0


def test_the_estimate_is_capped_by_the_budget_and_never_below_a_capped_spend() -> None:
    cfg = FitConfig(strategy="zeroth_order", steps=50)
    assert estimate_fit_queries(cfg, 100, budget=500) == 500
    assert estimate_fit_queries(cfg, 100) > 500
    assert estimate_fit_queries(FitConfig(strategy="surrogate", steps=0), 100) == 0


@pytest.mark.parametrize("strategy,extra,per_step", [
    ("surrogate", {"distill_queries": 9, "redistill_every": 4}, None),
    ("zeroth_order", {"zo_batch": 3, "zo_directions": 2, "noise_draws": 2}, 2 * 2 * 3 * 2),
    ("passthrough", {"noise_draws": 2}, 4 * 2),
])
def test_the_expected_spend_is_the_earliest_patience_point_and_never_above_the_cap(
        strategy: str, extra: dict[str, Any], per_step: int | None) -> None:
    """With no gain the fit stops after the pretrained module's round and ``patience`` more rounds:
    clean labels + (patience + 1) rounds + the steps between them. It equals the cap when the fit
    cannot stop early and is never above it."""
    base = {**SMALL, **extra}
    for steps in (0, 1, 3, 6, 7, 40):
        for patience in (0, 1, 2, 5):
            cfg = FitConfig(strategy=strategy, **{**base, "steps": steps, "patience": patience})
            cap, exp = estimate_fit_queries(cfg, 24), expected_fit_queries(cfg, 24)
            assert exp <= cap
            done = patience * cfg.score_every
            if patience == 0 or done >= steps:
                assert exp == cap, (steps, patience)
                continue
            own = -(-done // 4) * 9 if per_step is None else done * per_step
            assert exp == 10 + (patience + 1) * 6 * 2 + own < cap, (steps, patience)
    cfg = FitConfig(strategy=strategy, **{**base, "steps": 40, "patience": 2})
    assert expected_fit_queries(cfg, 24, budget=20) == 20  # capped by the budget like the estimate
    assert expected_fit_queries(FitConfig(strategy="denoise", steps=40), 24) == 0


def test_a_registered_third_party_strategy_runs_a_fit_and_is_estimated() -> None:
    class Probe(Strategy):
        """Queries one noisy batch per step through the black box (and is estimated so)."""

        name: ClassVar[str] = "probe_test_strategy"

        @classmethod
        def step_queries(cls, config: Any) -> int:
            return config.steps * config.batch_size

        def main_step(self, k: int) -> dict[str, float]:
            ctx = self.ctx
            idx = ctx.batch_indices(k, ctx.config.batch_size, labelled_only=True)
            labels = ctx.query(ctx.module_outputs(ctx.noisy(ctx.data.x[idx], k)))
            return {"agreement": float((labels == ctx.targets(idx)).float().mean())}

    with pytest.raises(ValueError, match="unknown strategy"):
        FitConfig(strategy="probe_test_strategy")
    register_strategy(Probe)
    try:
        spent, est = _fit("probe_test_strategy", **SMALL, steps=4)
        assert spent == est > 0
    finally:
        STRATEGIES.pop("probe_test_strategy", None)


def test_a_third_party_strategy_with_its_own_config_runs_end_to_end() -> None:
    """One registration call: the strategy's own setting is validated by its own config, reaches the
    strategy through ``fit(**overrides)``, and its ``estimate_queries`` bounds what it spends."""
    from typing import Literal

    from pydantic import Field

    from blackbox_rs.errors import ConfigError
    from blackbox_rs.fitting.config import StrategyConfig

    class ProbeConfig(StrategyConfig):
        """Query cost: the shared rounds plus ``probe_images`` per step."""

        strategy: Literal["probe_cfg_strategy"] = "probe_cfg_strategy"
        probe_images: int = Field(default=2, ge=1, le=50, description="images queried per step")

    class ConfiguredProbe(Strategy):
        name: ClassVar[str] = "probe_cfg_strategy"
        config_class = ProbeConfig
        seen: ClassVar[list[int]] = []

        @classmethod
        def step_queries(cls, config: Any) -> int:
            return config.steps * config.probe_images

        def main_step(self, k: int) -> dict[str, float]:
            ctx = self.ctx
            type(self).seen.append(ctx.config.probe_images)
            idx = ctx.batch_indices(k, ctx.config.probe_images, labelled_only=True)
            labels = ctx.query(ctx.module_outputs(ctx.noisy(ctx.data.x[idx], k)))
            return {"agreement": float((labels == ctx.targets(idx)).float().mean())}

    register_strategy(ConfiguredProbe)
    try:
        assert ConfiguredProbe.config_class is ProbeConfig
        cfg = FitConfig(strategy="probe_cfg_strategy", steps=4, probe_images=5, **SMALL)
        assert isinstance(cfg, ProbeConfig) and isinstance(cfg, FitConfig) and cfg.probe_images == 5
        est = estimate_fit_queries(cfg, 24)
        model = Logits()
        engine = QueryEngine(CallableConnector(model, input_shape=SHAPE, num_classes=3))
        sm = BlackBoxSmoother(engine, module={"name": "dncnn", "depth": 2, "width": 4}, sigma=0.25)
        x = torch.rand(24, *SHAPE, generator=torch.Generator().manual_seed(1))
        report = sm.fit(x, strategy="probe_cfg_strategy", steps=4, probe_images=5, **SMALL)
        assert ConfiguredProbe.seen == [5, 5, 5, 5]  # every step read the fit's own setting
        assert report.queries == engine.stats.queries == est > 4 * 5  # the estimate bounds (here: is) the spend
        with pytest.raises(ConfigError, match="probe_images is not a setting of strategy 'surrogate'; "
                                              "it belongs to 'probe_cfg_strategy'"):
            sm.fit(x, probe_images=5)
        with pytest.raises(ConfigError, match="probe_images"):  # its own validation (le=50)
            sm.fit(x, strategy="probe_cfg_strategy", probe_images=500)
    finally:
        STRATEGIES.pop("probe_cfg_strategy", None)
    with pytest.raises(ValueError, match="unknown strategy 'probe_cfg_strategy'"):
        FitConfig(strategy="probe_cfg_strategy")
