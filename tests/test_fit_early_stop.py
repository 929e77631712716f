"""Query-paid fits stop paying when the black box says their steps do not help (issue #23).

After the pretrained module's scoring round each later round is tested (one-sided paired t-test on
per-image scores, same images and noise) against the reference round; ``patience`` rounds in a row
without a significant gain stop the fit (``stopped="no_gain"``), the best state is kept and the report
says what the cap left unspent. Toy problems, tiny modules, fixed seeds, CPU only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers.toy_fit import brightness, center_pixel, one_thread
from scipy.stats import ttest_rel

from blackbox_rs import BlackBoxSmoother, FitConfig, QueryEngine
from blackbox_rs.connectors import CallableConnector
from blackbox_rs.errors import InvalidParameterError
from blackbox_rs.fitting.selection import gain_test, paired_t_pvalue, radius_scores
from blackbox_rs.fitting.strategies import estimate_fit_queries, expected_fit_queries

SHAPE = (1, 6, 6)
N = 64
# scoring rounds of 64 images x 8 draws: enough power to tell a real gain from the rounds' noise
TOY = {"batch_size": 8, "clean_queries": N, "score_images": N, "score_draws": 8, "distill_queries": 32,
       "redistill_every": 20, "surrogate_epochs": 0.5}


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


def images(levels: tuple[float, float]) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    c = torch.tensor(levels).repeat(N // 2)
    return (c.view(-1, 1, 1, 1) + 0.05 * torch.rand(N, *SHAPE, generator=g)).clamp(0, 1)


def smoother(fn: Any, sigma: float, cache: Path | None = None) -> tuple[BlackBoxSmoother, QueryEngine]:
    engine = QueryEngine(CallableConnector(fn, input_shape=SHAPE, num_classes=2, fingerprint=f"toy:{fn.__name__}"),
                         cache=cache)
    return BlackBoxSmoother(engine, module={"name": "dncnn", "depth": 2, "width": 8}, sigma=sigma), engine


def scored(report: Any) -> list[dict[str, float]]:
    return [h for h in report.history if "robust_score" in h]


# the pretrained module is already optimal: far from the threshold (every draw agrees) or near it
OPTIMAL = {
    "saturated": ((0.25, 0.75), 0.25, 20),
    "near_threshold": ((0.42, 0.58), 0.5, 100),
}
STOPPING = {"steps": 400, "score_every": 5, **TOY}  # patience: the default (2), on for every querying strategy


# ------------------------------------------------------------------------------------ the test
def test_the_paired_test_is_scipys_one_sided_paired_t_test() -> None:
    rng = np.random.default_rng(0)
    for n in (2, 3, 10, 64, 256):
        for shift in (-0.3, 0.0, 0.05, 0.4):
            a = rng.normal(size=n)
            b = a - shift + 0.5 * rng.normal(size=n)
            ref = ttest_rel(a, b, alternative="greater").pvalue
            assert paired_t_pvalue(torch.from_numpy(a - b)) == pytest.approx(ref, rel=1e-9, abs=1e-12)
            got = gain_test(torch.from_numpy(a), torch.from_numpy(b))
            assert got.p_value == pytest.approx(ref, rel=1e-9, abs=1e-12)
            assert got.gain == pytest.approx(float(np.mean(a - b)))
    # where scipy gives NaN or divides by zero: no change is never a gain
    assert paired_t_pvalue(torch.zeros(10)) == 1.0
    assert paired_t_pvalue(torch.full((5,), 0.2)) == 0.0
    assert paired_t_pvalue(torch.full((5,), -0.2)) == 1.0
    assert paired_t_pvalue(torch.tensor([0.3])) == 0.5 and paired_t_pvalue(torch.tensor([-0.3])) == 1.0
    with pytest.raises(InvalidParameterError, match="not the same scoring set"):
        gain_test(torch.zeros(4), torch.zeros(5))


def test_a_multi_sigma_round_gains_only_if_every_sigma_gains() -> None:
    rng = np.random.default_rng(1)
    best = torch.from_numpy(rng.uniform(0, 2, size=128))
    up = torch.from_numpy(rng.normal(0.5, 0.1, size=128))  # a clear gain
    flat = torch.from_numpy(rng.normal(0.0, 0.1, size=128))  # none
    mixed = torch.where(torch.arange(128) % 2 == 0, up, flat)  # image i at sigma i % 2: gains at the first only
    one = gain_test(best + mixed, best, levels=1)
    two = gain_test(best + mixed, best, levels=2)
    assert one.significant(0.1) and not two.significant(0.1)  # pooled, the first sigma would buy the second
    assert two.p_value == pytest.approx(max(paired_t_pvalue(mixed[0::2]), paired_t_pvalue(mixed[1::2])))
    assert two.gain == pytest.approx(float(mixed[1::2].mean()))
    assert gain_test(best + up, best, levels=2).significant(0.1)


@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_with_no_true_gain_a_gain_is_declared_at_most_alpha_of_the_time(alpha: float) -> None:
    """Two rounds of the same module (per-image agreement p_i, 8 draws each, independent noise): the
    declared-gain rate stays within alpha (plus three standard errors); a true gain is found."""
    rng = np.random.default_rng(2)
    reps, n, draws = 2000, 64, 8
    p = rng.uniform(0.3, 1.0, size=n)
    null = gain = 0
    for _ in range(reps):
        a = radius_scores(torch.from_numpy(rng.binomial(draws, p)), draws)
        b = radius_scores(torch.from_numpy(rng.binomial(draws, p)), draws)
        c = radius_scores(torch.from_numpy(rng.binomial(draws, np.minimum(1.0, p + 0.15))), draws)
        null += gain_test(a, b).significant(alpha)
        gain += gain_test(c, b).significant(alpha)
    assert null / reps <= alpha + 3 * (alpha * (1 - alpha) / reps) ** 0.5, null / reps
    assert gain / reps > 0.8, gain / reps  # the test can fail: it has power


# ---------------------------------------------------------------------------------- the driver
@pytest.mark.parametrize("case", sorted(OPTIMAL))
def test_a_fit_whose_steps_cannot_help_stops_after_patience_and_spends_a_tenth_of_its_cap(case: str) -> None:
    levels, sigma, pretrain = OPTIMAL[case]
    x = images(levels)
    sm, engine = smoother(brightness, sigma)
    cfg = FitConfig(strategy="surrogate", pretrain_steps=pretrain, **STOPPING)
    cap = estimate_fit_queries(cfg, N)
    report = sm.fit(x, config=cfg, progress=None)
    assert report.stopped == "no_gain"
    rounds = scored(report)
    assert cfg.patience == 2
    assert [h["step"] for h in rounds] == [pretrain, pretrain + 5, pretrain + 10]  # first round + patience
    assert [h["no_gain_rounds"] for h in rounds[1:]] == [1.0, 2.0]
    assert all(h["gain_p"] > cfg.gain_alpha for h in rounds[1:])
    assert report.steps_done == pretrain + 10 < report.steps_total
    assert report.queries == engine.stats.queries == expected_fit_queries(cfg, N)  # the dry run's expectation
    assert report.queries < cap / 10
    assert report.queries_saved == cap - report.queries > 0.9 * cap
    assert report.best_step == max(rounds, key=lambda h: h["score"])["step"]  # the best state is kept


def test_a_fit_whose_steps_help_does_not_stop_early() -> None:
    sm, engine = smoother(center_pixel, 0.5)
    base, _ = smoother(center_pixel, 0.5)
    x = images((0.25, 0.75))
    cfg = FitConfig(strategy="surrogate", pretrain_steps=0, steps=60, score_every=10, **TOY)
    report = sm.fit(x, config=cfg, progress=None)
    assert report.stopped == "completed" and report.steps_done == report.steps_total == 60
    assert report.queries == engine.stats.queries == estimate_fit_queries(cfg, N)
    assert report.queries_saved is None
    rounds = scored(report)
    assert [h["step"] for h in rounds] == [0, 10, 20, 30, 40, 50, 60]
    assert sum(h["gain_p"] <= cfg.gain_alpha for h in rounds[1:]) >= 4  # clear gains, not luck
    assert rounds[-1]["score"] > rounds[0]["score"] + 0.3
    assert report.best_step == 60


def test_a_multi_sigma_fit_stops_for_no_gain_too() -> None:
    levels, _, pretrain = OPTIMAL["saturated"]
    engine = QueryEngine(CallableConnector(brightness, input_shape=SHAPE, num_classes=2, fingerprint="toy:multi"))
    sm = BlackBoxSmoother(engine, module={"name": "dncnn", "depth": 2, "width": 8}, sigmas=[0.25, 0.5])
    cfg = FitConfig(strategy="zeroth_order", pretrain_steps=pretrain, zo_batch=4, zo_directions=1, **{
        k: v for k, v in STOPPING.items() if k not in ("distill_queries", "redistill_every", "surrogate_epochs")})
    report = sm.fit(images(levels), config=cfg, progress=None)
    assert report.stopped == "no_gain" and report.steps_done == pretrain + 10
    assert report.queries == expected_fit_queries(cfg, N) < estimate_fit_queries(cfg, N) / 10
    assert all("robust_score@0.5" in h for h in scored(report))


def test_patience_zero_never_stops_early() -> None:
    levels, sigma, pretrain = OPTIMAL["saturated"]
    sm, engine = smoother(brightness, sigma)
    cfg = FitConfig(strategy="surrogate", pretrain_steps=pretrain, **{**STOPPING, "steps": 40, "patience": 0})
    report = sm.fit(images(levels), config=cfg, progress=None)
    assert report.stopped == "completed" and report.steps_done == report.steps_total
    assert report.queries == estimate_fit_queries(cfg, N) == expected_fit_queries(cfg, N)
    rounds = scored(report)
    assert len(rounds) == 40 // 5 + 1 and rounds[-1]["no_gain_rounds"] == 8.0  # counted, never acted on


def test_a_resumed_fit_keeps_the_patience_counter(tmp_path: Path) -> None:
    """Interrupted by the budget after one round without gain (counter 1), the resumed fit stops after
    one more, where the uninterrupted fit stopped (a reset counter would run two more rounds); a fit
    interrupted inside a step whose round was run does not re-run the round; a rerun of a fit that
    stopped for no gain spends nothing."""
    levels, sigma, pretrain = OPTIMAL["near_threshold"]
    x = images(levels)
    cfg = FitConfig(strategy="surrogate", pretrain_steps=pretrain, **STOPPING)
    ref_sm, _ = smoother(brightness, sigma)
    ref = ref_sm.fit(x, config=cfg, progress=None)
    assert ref.stopped == "no_gain" and ref.steps_done == pretrain + 10
    round_cost = N * 8
    for cut, counter in ((N + round_cost + 10, 0),  # inside the distillation of step `pretrain`, after its round
                         (N + 32 + 2 * round_cost + 10, 1)):  # inside round 3, after one round without gain
        ck, cache = tmp_path / f"ck{cut}", tmp_path / f"cache{cut}"
        sm, _ = smoother(brightness, sigma, cache)
        first = sm.fit(x, config=cfg, budget=cut, checkpoint_dir=ck, progress=None)
        assert first.stopped == "budget"
        assert (scored(first)[-1].get("no_gain_rounds", 0.0)) == counter
        sm2, _ = smoother(brightness, sigma, cache)
        again = sm2.fit(x, config=cfg, budget=100_000, checkpoint_dir=ck, progress=None)
        assert again.stopped == "no_gain" and again.steps_done == ref.steps_done
        assert [h["step"] for h in scored(again)] == [h["step"] for h in scored(ref)]  # no round re-run
        for a, b in zip(scored(again), scored(ref), strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-9)
        assert first.queries + again.queries == ref.queries  # nothing paid twice
        assert again.queries_saved == ref.queries_saved  # over both calls
        assert again.best_step == ref.best_step
        for p, q in zip(sm2.module.state_dict().values(), ref_sm.module.state_dict().values(), strict=True):
            assert torch.allclose(p, q, atol=1e-5)
        sm3, _ = smoother(brightness, sigma, cache)
        rerun = sm3.fit(x, config=cfg, budget=100_000, checkpoint_dir=ck, progress=None)
        assert (rerun.stopped, rerun.steps_done, rerun.queries) == ("no_gain", ref.steps_done, 0)
        assert rerun.queries_saved == ref.queries_saved and rerun.best_step == ref.best_step
