"""Sequential (anytime-valid) certification: validity by simulation, cost, bad input, end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as st

from blackbox_rs import stats
from blackbox_rs.budget import QueryBudget
from blackbox_rs.cache import QueryCache
from blackbox_rs.certify_sequential import certify_radius, certify_radius_dataset
from blackbox_rs.connectors import CallableConnector
from blackbox_rs.engine import QueryEngine
from blackbox_rs.errors import BudgetExceeded, InvalidInputError, InvalidParameterError, UncertifiableError
from blackbox_rs.sequential import (
    LookSchedule,
    check_radii,
    decide,
    simulate_bernoulli,
    simulate_naive,
    wald_oracle_samples,
)

RUNS = 6000
ALPHA = 0.05


def _limit(alpha: float, runs: int) -> float:
    """alpha plus 3 Monte-Carlo standard errors."""
    return alpha + 3.0 * math.sqrt(alpha * (1 - alpha) / runs)


def _just_below(th: float) -> float:
    return th - 1e-9


# ---------------------------------------------------------------------------------------------
# validity (the point of the procedure)
@pytest.mark.parametrize(("sigma", "r"), [(0.25, 0.25), (0.25, 0.5), (0.5, 1.0)])
def test_false_certification_rate_at_most_alpha_and_naive_fails(sigma: float, r: float) -> None:
    cap = 4000
    sch = LookSchedule.for_radii(r, sigma, ALPHA, cap)
    p = _just_below(sch.thresholds[0])
    out = simulate_bernoulli(sch, p, RUNS, seed=1)
    rate = float(np.mean(out["certified_index"] >= 0))
    assert rate <= _limit(ALPHA, RUNS), rate
    # the same harness on the naive procedure (fixed-n CP bound re-tested after every batch of 10)
    naive = float(np.mean(simulate_naive(sch.thresholds[0], ALPHA, p, RUNS, batch=10, max_samples=cap, seed=1)))
    assert naive > _limit(ALPHA, RUNS), naive
    assert naive > 2 * rate


def test_multiple_radii_validity() -> None:
    radii = [0.25, 0.5, 0.75]
    sch = LookSchedule.for_radii(radii, 0.5, ALPHA, 4000)
    for j, th in enumerate(sch.thresholds):
        out = simulate_bernoulli(sch, _just_below(th), RUNS, seed=10 + j)
        over = float(np.mean(out["certified_index"] >= j))  # certified at a radius it does not have
        assert over <= _limit(ALPHA, RUNS), (j, over)


def test_not_certified_verdict_validity() -> None:
    sch = LookSchedule.for_radii([0.25, 0.5], 0.25, ALPHA, 3000)
    for j, th in enumerate(sch.thresholds):
        out = simulate_bernoulli(sch, th, RUNS, seed=20 + j)  # p = Phi(r/sigma): r is certifiable
        wrong = float(np.mean(out["not_certified"][:, j]))
        assert wrong <= _limit(ALPHA, RUNS), (j, wrong)


def test_power_well_above_threshold() -> None:
    sch = LookSchedule.for_radii(0.5, 0.25, 0.001, 100_000)
    out = simulate_bernoulli(sch, 0.995, 2000, seed=3)
    assert np.mean(out["certified_index"] == 0) > 0.99
    assert np.median(out["n"]) < 2000


def test_thresholds_match_exact_bounds() -> None:
    sch = LookSchedule.for_radii([0.25, 0.5], 0.25, 0.001, 5000)
    rng = np.random.default_rng(0)
    for k, n in enumerate(sch.sizes):
        for c in {0, n, int(sch.cert_counts[k, 0]), int(sch.cert_counts[k, 0]) - 1, *rng.integers(0, n + 1, 5)}:
            if not 0 <= c <= n:
                continue
            lo = stats.cp_lower(c, n, sch.alphas[k])
            up = stats.cp_upper(c, n, sch.alphas[k])
            for j, th in enumerate(sch.thresholds):
                assert (c >= sch.cert_counts[k, j]) == (lo >= th)
                assert (c <= sch.futile_counts[k, j]) == (up < th)
    assert sum(sch.alphas) <= 0.001 * (1 + 1e-12)


# ---------------------------------------------------------------------------------------------
# cost when every sample agrees
@pytest.mark.parametrize(("sigma", "r"), [(0.25, 0.25), (0.25, 0.5), (0.5, 0.5), (0.5, 1.0), (0.12, 0.25)])
def test_all_agree_cost_near_n_min(sigma: float, r: float) -> None:
    n0, cap = 10, 100_000
    sch = LookSchedule.for_radii(r, sigma, 0.001, cap - 1 - n0)
    out = simulate_bernoulli(sch, 1.0, 4, seed=0)
    assert np.all(out["certified_index"] == 0)
    total = int(out["n"][0]) + 1 + n0
    nmin = stats.n_min(r, sigma, 0.001)
    assert total <= 1.5 * nmin + 10, (total, nmin)
    assert cap / total >= 100 or nmin > 600


def test_all_agree_cost_several_radii() -> None:
    radii = [0.25, 0.5]
    sch = LookSchedule.for_radii(radii, 0.25, 0.001, 100_000 - 11)
    out = simulate_bernoulli(sch, 1.0, 2, seed=0)
    assert out["certified_index"][0] == 1
    assert int(out["n"][0]) + 11 <= 1.5 * stats.n_min(0.5, 0.25, 0.001) + 10


# ---------------------------------------------------------------------------------------------
# through a connector and a counting engine
SHAPE = (1, 1, 1)


def _threshold_model(t: float):  # noqa: ANN202
    """Class 1 iff the single pixel exceeds t: P(class 1 at x = 0.5) = Phi((0.5 - t) / sigma)."""

    def fn(batch: torch.Tensor) -> torch.Tensor:
        return (batch[:, 0, 0, 0] > t).long()

    return fn


def _engine(t: float, **kw) -> QueryEngine:  # noqa: ANN003
    return QueryEngine(CallableConnector(_threshold_model(t), input_shape=SHAPE, num_classes=3,
                                         fingerprint=f"thr:{t}"), **kw)


def test_end_to_end_all_agree_counts_queries() -> None:
    eng = _engine(-1.0)  # always class 1
    x = torch.full(SHAPE, 0.5)
    cert = certify_radius(eng, x, radius=0.5, sigma=0.25, alpha=0.001, n0=10, batch_size=64, seed=0)
    assert cert.decision == "certified" and cert.certified_radius == 0.5 and cert.prediction == 1
    assert cert.queries == eng.stats.queries == 1 + 10 + cert.n
    assert cert.queries <= 1.5 * stats.n_min(0.5, 0.25, 0.001) + 10
    assert cert.certified_at(0.5) and not cert.certified_at(0.6)
    sch = LookSchedule.for_radii(cert.radii, 0.25, 0.001, cert.max_queries - 1 - cert.n0)
    assert decide(sch, cert.look_counts).status == cert.radius_status
    again = certify_radius(eng, x, radius=0.5, sigma=0.25, alpha=0.001, n0=10, batch_size=64, seed=0)
    assert again == cert  # reproducible


def test_end_to_end_mixed_model_and_cache(tmp_path) -> None:  # noqa: ANN001
    sigma = 0.1
    t = 0.5 - sigma * st.norm.ppf(0.995)  # P(class 1) = 0.995 > Phi(2) = 0.977 (t in (0, 1): no clipping)
    cache = QueryCache(tmp_path / "cache")
    eng = _engine(t, cache=cache)
    x = torch.full(SHAPE, 0.5)
    cert = certify_radius(eng, x, radius=[0.1, 0.2, 0.24], sigma=sigma, alpha=0.01, n0=10, batch_size=50,
                          max_queries=3000, seed=0)
    assert cert.candidate == 1
    assert cert.radius_status[:2] == ["certified", "certified"]
    assert cert.queries == eng.stats.queries <= 3000
    before = eng.stats.queries
    again = certify_radius(eng, x, radius=[0.1, 0.2, 0.24], sigma=sigma, alpha=0.01, n0=10, batch_size=50,
                           max_queries=3000, seed=0)
    assert eng.stats.queries == before and again.queries == 0  # every request answered by the cache
    assert again.cache_hits == cert.queries and again.radius_status == cert.radius_status
    eng.close()


def test_undecided_at_cap() -> None:
    sigma, r = 0.25, 0.25
    p = st.norm.cdf(r / sigma) + 0.002  # certifiable, but far too close to call with 2,000 queries
    eng = _engine(0.5 - sigma * st.norm.ppf(p))
    cert = certify_radius(eng, torch.full(SHAPE, 0.5), radius=r, sigma=sigma, alpha=0.001, n0=10,
                          max_queries=2000, batch_size=100, futility=None, seed=0)
    assert cert.decision == "undecided" and cert.certified_radius == 0.0
    assert cert.stop_reason in ("cap", "unreachable")
    assert cert.queries == eng.stats.queries <= 2000


def test_futility_stop_gives_up_early_without_a_claim() -> None:
    """p = Phi(r/sigma) - 0.01 can never be certified: without the futility rule the run needs ~20k
    samples to *prove* it (U_k < Phi at a tiny alpha_k); with it, the run gives up (no claim) as soon
    as a 99% upper bound says the cap cannot certify."""
    sigma, r = 0.25, 0.25
    p = st.norm.cdf(r / sigma) - 0.01
    kw = dict(radius=r, sigma=sigma, alpha=0.001, n0=10, max_queries=100_000, batch_size=500, seed=0)
    eng = _engine(0.5 - sigma * st.norm.ppf(p))
    quick = certify_radius(eng, torch.full(SHAPE, 0.5), futility=0.01, **kw)
    assert quick.decision == "undecided" and quick.stop_reason == "improbable"
    eng2 = _engine(0.5 - sigma * st.norm.ppf(p))
    slow = certify_radius(eng2, torch.full(SHAPE, 0.5), futility=None, **kw)
    assert slow.decision == "not_certified"
    assert quick.queries * 3 < slow.queries, (quick.queries, slow.queries)
    # a clearly certifiable input is not affected
    eng3 = _engine(0.5 - sigma * st.norm.ppf(0.97))
    assert certify_radius(eng3, torch.full(SHAPE, 0.5), futility=0.01, **kw).decision == "certified"


def test_clearly_not_certifiable_stops_at_first_look() -> None:
    eng = _engine(0.5)  # P(class 1) = 1/2
    cert = certify_radius(eng, torch.full(SHAPE, 0.5), radius=0.5, sigma=0.25, n0=10, seed=0)
    assert cert.decision in ("not_certified", "undecided")
    assert cert.queries <= 1 + 10 + LookSchedule.for_radii(0.5, 0.25, 0.001, 100_000 - 11).sizes[0]


def test_dataset_accuracy_and_resume(tmp_path) -> None:  # noqa: ANN001
    eng = _engine(0.5)
    xs = torch.tensor([0.05, 0.95, 0.45, 0.9]).reshape(4, 1, 1, 1)
    out = tmp_path / "seq.jsonl"
    res = certify_radius_dataset(eng, xs, [0, 1, 1, 1], radius=[0.1, 0.2], sigma=0.1, alpha=0.01, n0=10,
                                 max_queries=5000, output=out, seed=0)
    assert len(res.certificates) == 4 and res.reference == "labels"
    acc = res.certified_accuracy
    assert set(acc) == {"0.1", "0.2"} and acc["0.1"] >= acc["0.2"]
    assert res.certificates[0].certified_at(0.2) and not res.certificates[2].certified_at(0.1)
    assert res.queries == eng.stats.queries
    spent = eng.stats.queries
    again = certify_radius_dataset(eng, xs, [0, 1, 1, 1], radius=[0.1, 0.2], sigma=0.1, alpha=0.01, n0=10,
                                   max_queries=5000, output=out, seed=0)
    assert eng.stats.queries == spent and again.certificates == res.certificates
    unlabeled = certify_radius_dataset(eng, xs, radius=0.1, sigma=0.1, alpha=0.01, n0=10, max_queries=5000, seed=0)
    assert unlabeled.reference == "clean_prediction"


# ---------------------------------------------------------------------------------------------
# bad input: typed errors before any query
@pytest.mark.parametrize("radius", [0.0, -0.5, float("nan"), float("inf"), [], [0.25, 0.0]])
def test_bad_radius(radius) -> None:  # noqa: ANN001
    eng = _engine(0.5)
    with pytest.raises(InvalidParameterError):
        certify_radius(eng, torch.full(SHAPE, 0.5), radius=radius, sigma=0.25, seed=0)
    assert eng.stats.queries == 0


def test_unreachable_radius_says_n_min_before_spending() -> None:
    eng = _engine(-1.0)
    with pytest.raises(UncertifiableError, match="218105"):
        certify_radius(eng, torch.full(SHAPE, 0.5), radius=1.0, sigma=0.25, alpha=0.001, max_queries=100_000, seed=0)
    with pytest.raises(UncertifiableError):
        certify_radius(eng, torch.full(SHAPE, 0.5), radius=10.0, sigma=0.12, seed=0)
    with pytest.raises(UncertifiableError):  # 301 needed, 200 allowed
        certify_radius(eng, torch.full(SHAPE, 0.5), radius=0.5, sigma=0.25, max_queries=200, seed=0)
    with pytest.raises(InvalidParameterError):
        certify_radius(eng, torch.full(SHAPE, 0.5), radius=0.5, sigma=0.25, max_queries=5, n0=10, seed=0)
    assert eng.stats.queries == 0
    poor = _engine(-1.0, budget=QueryBudget(max_queries=100))
    with pytest.raises(BudgetExceeded):
        certify_radius(poor, torch.full(SHAPE, 0.5), radius=0.5, sigma=0.25, seed=0)
    assert poor.stats.queries == 0


def test_check_radii() -> None:
    assert check_radii([0.5, 0.25, 0.5]) == (0.25, 0.5)
    assert check_radii(1) == (1.0,)
    with pytest.raises(InvalidParameterError):
        check_radii([True])


# ---------------------------------------------------------------------------------------------
# sound lattice mode
def test_lattice_mode_end_to_end() -> None:
    eng = _engine(-1.0)
    x = torch.full(SHAPE, 128 / 255)
    cert = certify_radius(eng, x, radius=0.5, sigma=0.25, lattice=True, seed=0)
    assert cert.decision == "certified" and cert.lattice
    with pytest.raises(InvalidInputError):
        certify_radius(eng, torch.full(SHAPE, 0.5001), radius=0.5, sigma=0.25, lattice=True, seed=0)


def test_wald_oracle_matches_scipy_and_an_sprt_and_bounds_our_procedure() -> None:
    sigma, r, alpha = 0.25, 0.5, 0.001
    p0 = st.norm.cdf(r / sigma)
    for p in (0.981, 0.99, 0.999):
        kl = st.entropy([p, 1 - p], [p0, 1 - p0])  # KL(p || p0) in nats
        assert wald_oracle_samples(p, r, sigma, alpha) == pytest.approx(math.log(1 / alpha) / kl, rel=1e-9)
    assert wald_oracle_samples(p0 - 1e-3, r, sigma, alpha) == math.inf
    # attainable: the SPRT that knows p stops (certifies) after about the bound, a little more (overshoot)
    rng = np.random.default_rng(0)
    for p in (0.99, 0.995):
        bound = wald_oracle_samples(p, r, sigma, alpha)
        step_yes, step_no = math.log(p / p0), math.log((1 - p) / (1 - p0))
        x = rng.random((2000, int(6 * bound))) < p
        llr = np.cumsum(np.where(x, step_yes, step_no), axis=1)
        crossed = llr >= math.log(1 / alpha)
        assert crossed.any(axis=1).mean() > 0.99
        mean_n = (crossed.argmax(axis=1)[crossed.any(axis=1)] + 1).mean()
        assert 0.97 * bound <= mean_n <= 1.1 * bound, (p, bound, mean_n)  # 3 %: Monte-Carlo error
        # a lower bound: our valid procedure never beats it on average
        sched = LookSchedule.for_radii(r, sigma, alpha, 100_000)
        ours = simulate_bernoulli(sched, p, 2000, seed=1)["n"].mean()
        assert ours >= bound, (p, ours, bound)
    with pytest.raises(InvalidParameterError):
        wald_oracle_samples(1.5, r, sigma, alpha)
