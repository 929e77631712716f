"""blackbox_rs.stats against scipy, the figures of randomized-smoothing.md, and a coverage simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from blackbox_rs import stats
from blackbox_rs.errors import InvalidParameterError, UncertifiableError

ALPHAS = [1e-6, 0.001, 0.01, 0.05, 0.2]
NS = [1, 2, 5, 10, 37, 100, 1000, 100_000]


def _grid():
    for n in NS:
        ks = sorted({0, 1, n // 3, n // 2, n - 1, n} & set(range(n + 1)))
        for k in ks:
            for a in ALPHAS:
                yield k, n, a


# ---------------------------------------------------------------------------------------------
# Clopper-Pearson: exact against scipy
def test_cp_lower_upper_equal_beta_quantiles_over_grid():
    for k, n, a in _grid():
        lo, hi = stats.cp_lower(k, n, a), stats.cp_upper(k, n, a)
        want_lo = 0.0 if k == 0 else sps.beta.ppf(a, k, n - k + 1)
        want_hi = 1.0 if k == n else sps.beta.ppf(1 - a, k + 1, n - k)
        assert lo == pytest.approx(want_lo, rel=1e-12, abs=1e-300), (k, n, a)
        assert hi == pytest.approx(want_hi, rel=1e-9, abs=1e-12), (k, n, a)


def test_cp_matches_binomtest_exact_ci_at_matching_two_sided_level():
    # one-sided level alpha == each tail of the two-sided (1 - 2 alpha) exact interval
    for k, n, a in _grid():
        if a >= 0.5:
            continue
        ci = sps.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * a, method="exact")
        assert stats.cp_lower(k, n, a) == pytest.approx(ci.low, rel=1e-9, abs=1e-12), (k, n, a)
        assert stats.cp_upper(k, n, a) == pytest.approx(ci.high, rel=1e-9, abs=1e-12), (k, n, a)


def test_cp_vectorised_equals_scalar():
    n = 50
    k = np.arange(n + 1)
    lo, hi = stats.cp_lower(k, n, 0.01), stats.cp_upper(k, n, 0.01)
    assert isinstance(lo, np.ndarray) and lo.shape == (n + 1,)
    for i in range(n + 1):
        assert lo[i] == stats.cp_lower(i, n, 0.01)
        assert hi[i] == stats.cp_upper(i, n, 0.01)
    assert isinstance(stats.cp_lower(3, 10, 0.1), float)


def test_all_agree_bound_is_alpha_to_one_over_n():
    for n in [1, 10, 100, 10_000, 100_000]:
        for a in [0.001, 0.05]:
            assert stats.cp_lower(n, n, a) == pytest.approx(a ** (1 / n), rel=1e-12)
            assert stats.cp_upper(0, n, a) == pytest.approx(1 - a ** (1 / n), rel=1e-9)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan"), float("inf")])
def test_bad_alpha_raises(bad):
    with pytest.raises(InvalidParameterError, match="alpha"):
        stats.cp_lower(3, 10, bad)
    with pytest.raises(InvalidParameterError, match="alpha"):
        stats.cp_upper(3, 10, bad)
    with pytest.raises(InvalidParameterError, match="alpha"):
        stats.check_alpha(bad)


@pytest.mark.parametrize("k,n", [(-1, 5), (6, 5), (0, -1)])
def test_bad_counts_raise(k, n):
    with pytest.raises(InvalidParameterError, match="counts"):
        stats.cp_lower(k, n, 0.05)
    with pytest.raises(InvalidParameterError, match="counts"):
        stats.cp_upper(k, n, 0.05)


# ---------------------------------------------------------------------------------------------
# properties (hypothesis)
counts = st.integers(1, 5000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n)))
alphas = st.floats(1e-8, 0.5, allow_nan=False, exclude_max=True)
EPS = 1e-12


@settings(max_examples=300, deadline=None)
@given(kn=counts, a=alphas)
def test_bounds_bracket_the_estimate_and_edges(kn, a):
    k, n = kn
    lo, hi = stats.cp_lower(k, n, a), stats.cp_upper(k, n, a)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    if k == 0:
        assert lo == 0.0 and hi < 1.0
    if k == n:
        assert hi == 1.0 and lo > 0.0
    if 0 < k < n:
        assert 0.0 < lo < k / n < hi < 1.0


@settings(max_examples=200, deadline=None)
@given(kn=counts, a=alphas)
def test_monotone_in_k(kn, a):
    k, n = kn
    if k < n:
        assert stats.cp_lower(k + 1, n, a) >= stats.cp_lower(k, n, a) - EPS
        assert stats.cp_upper(k + 1, n, a) >= stats.cp_upper(k, n, a) - EPS


@settings(max_examples=200, deadline=None)
@given(kn=counts, a=alphas)
def test_monotone_in_n(kn, a):
    # one more trial that failed: the bounds can only go down
    k, n = kn
    assert stats.cp_lower(k, n + 1, a) <= stats.cp_lower(k, n, a) + EPS
    assert stats.cp_upper(k, n + 1, a) <= stats.cp_upper(k, n, a) + EPS


@settings(max_examples=200, deadline=None)
@given(kn=counts, a=alphas, b=alphas)
def test_monotone_in_alpha(kn, a, b):
    # a larger alpha is a less confident statement: a tighter interval
    k, n = kn
    a, b = min(a, b), max(a, b)
    assert stats.cp_lower(k, n, b) >= stats.cp_lower(k, n, a) - EPS
    assert stats.cp_upper(k, n, b) <= stats.cp_upper(k, n, a) + EPS


# ---------------------------------------------------------------------------------------------
# coverage simulation; the harness is shown to catch a wrong bound
def coverage_violations(bound, *, alpha, ps, ns, reps=200_000, seed=12345, n_se=4.0, upper=False):
    """Simulate ``reps`` Binomial(n, p) counts per (p, n); return the (p, n, rate) where the rate at
    which the bound misses p (lower bound > p, or upper bound < p) exceeds alpha + n_se standard
    errors. ``bound(k_array, n, alpha)`` is evaluated once per possible count (a table)."""
    rng = np.random.default_rng(seed)
    bad = []
    se = math.sqrt(alpha * (1 - alpha) / reps)
    for n in ns:
        table = np.asarray(bound(np.arange(n + 1), n, alpha))
        for p in ps:
            k = rng.binomial(n, p, size=reps)
            miss = table[k] < p if upper else table[k] > p
            rate = float(miss.mean())
            if rate > alpha + n_se * se:
                bad.append((p, n, rate))
    return bad


PS = np.round(np.linspace(0.02, 0.98, 25), 4)
COV_NS = [20, 100, 1000]


def test_cp_lower_coverage_holds():
    assert coverage_violations(stats.cp_lower, alpha=0.05, ps=PS, ns=COV_NS) == []


def test_cp_upper_coverage_holds():
    assert coverage_violations(stats.cp_upper, alpha=0.05, ps=PS, ns=COV_NS, upper=True) == []


@pytest.mark.parametrize("factor", [2, 10])
def test_coverage_harness_detects_a_wrong_bound(factor):
    def wrong(k, n, alpha):  # claims level alpha but is computed at factor * alpha
        return stats.cp_lower(k, n, factor * alpha)

    bad = coverage_violations(wrong, alpha=0.05, ps=PS, ns=COV_NS)
    assert bad, f"a bound at {factor}*alpha went unnoticed"
    if factor == 10:  # grossly wrong: caught nearly everywhere
        assert len(bad) >= len(PS) * len(COV_NS) // 2


def test_coverage_harness_detects_a_wrong_upper_bound():
    def wrong(k, n, alpha):
        return stats.cp_upper(k, n, 2 * alpha)

    assert coverage_violations(wrong, alpha=0.05, ps=PS, ns=COV_NS, upper=True)


# ---------------------------------------------------------------------------------------------
# PREDICT's abstain test
def test_abstain_pvalue_equals_binomtest():
    for n_a in [0, 1, 5, 17, 50, 100, 999]:
        for n_b in [0, 1, 3, 17, 40, 100]:
            if n_a + n_b == 0:
                assert stats.abstain_test_pvalue(0, 0) == 1.0
                continue
            want = sps.binomtest(n_a, n_a + n_b, 0.5, alternative="two-sided").pvalue
            assert stats.abstain_test_pvalue(n_a, n_b) == pytest.approx(want, rel=1e-12)
    assert stats.abstain_test_pvalue(5, 7) == stats.abstain_test_pvalue(7, 5)
    with pytest.raises(InvalidParameterError):
        stats.abstain_test_pvalue(-1, 3)


# ---------------------------------------------------------------------------------------------
# radius, n_min, max_radius: the figures of randomized-smoothing.md
def test_radius_is_sigma_times_probit():
    for p in [0.5000001, 0.6, 0.9, 0.99, 0.999999]:
        for s in [0.12, 0.25, 1.0, 3.0]:
            assert stats.radius(p, s) == pytest.approx(s * sps.norm.ppf(p), rel=1e-12)
    for p in [0.0, 0.3, 0.5]:
        assert stats.radius(p, 0.5) == 0.0
    for bad_p in [-0.1, 1.1, float("nan")]:
        with pytest.raises(InvalidParameterError):
            stats.radius(bad_p, 0.5)
    for bad_s in [0.0, -1.0, float("inf"), float("nan")]:
        with pytest.raises(InvalidParameterError, match="sigma"):
            stats.radius(0.9, bad_s)


N_MIN_TABLE = {
    (0.12, 0.25): 368, (0.12, 0.5): 446_977,
    (0.25, 0.25): 40, (0.25, 0.5): 301, (0.25, 1.0): 218_105,
    (0.5, 0.25): 19, (0.5, 0.5): 40, (0.5, 1.0): 301,
    (1.0, 0.25): 14, (1.0, 0.5): 19, (1.0, 1.0): 40,
}


@pytest.mark.parametrize("sigma_r,expected", sorted(N_MIN_TABLE.items()))
def test_n_min_table_and_defining_inequality(sigma_r, expected):
    sigma, r = sigma_r
    alpha = 0.001
    n = stats.n_min(r, sigma, alpha)
    assert n == expected
    phi = sps.norm.cdf(r / sigma)
    assert alpha ** (1 / n) >= phi
    assert alpha ** (1 / (n - 1)) < phi
    # and the bound CERTIFY computes agrees: n agreeing samples reach radius r, n - 1 do not
    assert stats.radius(stats.cp_lower(n, n, alpha), sigma) >= r * (1 - 1e-9)
    assert stats.radius(stats.cp_lower(n - 1, n - 1, alpha), sigma) < r


def test_n_min_astronomical_entry():
    n = stats.n_min(1.0, 0.12, 0.001)
    assert 1e17 <= n < 1e18  # "~10^17"
    want = math.log(0.001) / sps.norm.logcdf(1.0 / 0.12)
    assert n == pytest.approx(want, rel=1e-9)


def test_n_min_rejects_bad_arguments():
    for r in [0.0, -0.5, float("inf"), float("nan")]:
        with pytest.raises(InvalidParameterError, match="radius"):
            stats.n_min(r, 0.25, 0.001)
    with pytest.raises(InvalidParameterError):
        stats.n_min(0.5, 0.0, 0.001)
    with pytest.raises(InvalidParameterError):
        stats.n_min(0.5, 0.25, 1.0)
    with pytest.raises(UncertifiableError):
        stats.n_min(100.0, 0.1, 0.001)  # Phi(1000) == 1.0 in floating point


@pytest.mark.parametrize("n,factor", [(100, 1.50), (1_000, 2.46), (10_000, 3.20), (100_000, 3.81)])
def test_max_radius_figures(n, factor):
    for sigma in [0.25, 0.5, 1.0]:
        assert round(stats.max_radius(n, sigma, 0.001) / sigma, 2) == factor


def test_max_radius_zero_and_bad_n():
    assert stats.max_radius(5, 0.25, 0.001) == 0.0
    for bad in [0, -3, 2.5, True]:
        with pytest.raises(InvalidParameterError):
            stats.max_radius(bad, 0.25, 0.001)


def _smallest_n_with_disagreements(d, r, sigma, alpha):
    target = sps.norm.cdf(r / sigma)
    n = d + 1
    while stats.cp_lower(n - d, n, alpha) < target:
        n += 1
    return n


@pytest.mark.parametrize("d,expected", [(0, 301), (1, 402), (5, 718)])
def test_disagreements_raise_the_sample_count(d, expected):
    n = _smallest_n_with_disagreements(d, 0.5, 0.25, 0.001)
    assert n == expected
    assert stats.radius(stats.cp_lower(n - d, n, 0.001), 0.25) >= 0.5 * (1 - 1e-9)
    assert stats.radius(stats.cp_lower(n - 1 - d, n - 1, 0.001), 0.25) < 0.5


def test_min_samples_to_certify():
    for alpha in [0.5, 0.1, 0.05, 0.01, 0.001, 1e-6, 1e-12]:
        n = stats.min_samples_to_certify(alpha)
        assert alpha ** (1 / n) > 0.5
        assert n == 1 or alpha ** (1 / (n - 1)) <= 0.5
        assert stats.cp_lower(n, n, alpha) > 0.5
    assert stats.min_samples_to_certify(0.001) == 10
    assert stats.min_samples_to_certify(0.9) == 1


def test_selection_radius_scores_match_scipy():
    """The fit's selection score: max(0, Phi^-1((c + 1/2) / (m + 1))) per image, as scipy computes it."""
    import torch
    from scipy.stats import norm

    from blackbox_rs.fitting.selection import radius_scores

    m = 8
    got = radius_scores(torch.arange(m + 1), m)
    want = np.maximum(0.0, norm.ppf((np.arange(m + 1) + 0.5) / (m + 1)))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    assert got[: m // 2 + 1].eq(0).all() and bool((got[m // 2 + 1 :].diff() > 0).all())  # majority-wrong: 0
    assert float(got[-1]) < 1.6  # all agree: finite (Jeffreys posterior mean)
    with pytest.raises(InvalidParameterError, match="counts"):
        radius_scores(torch.tensor([9]), m)
    with pytest.raises(InvalidParameterError, match="draws"):
        radius_scores(torch.tensor([0]), 0)


def test_selection_worst_gain():
    """Multi-sigma selection: the smallest per-sigma gain over the baseline round; mismatched sigmas refused."""
    from blackbox_rs.fitting.selection import worst_gain

    base = {0.25: 1.40, 0.5: 1.20}
    assert worst_gain(base, base) == 0.0
    assert worst_gain({0.25: 1.50, 0.5: 1.18}, base) == pytest.approx(-0.02)  # mean up, sigma 0.5 down: refused
    assert worst_gain({0.25: 1.43, 0.5: 1.25}, base) == pytest.approx(0.03)
    with pytest.raises(InvalidParameterError, match="sigmas"):
        worst_gain({0.25: 1.0}, base)


def test_selection_rounds_rank_close_modules_with_common_noise():
    """Simulation of the selection design (384 images x 8 draws, the benchmark's): a module state whose
    expected score is higher by only ~0.015 sigma is ranked above the other in >= 85 % of rounds when
    both are scored on the same noise (common random numbers, as score_round does), clearly more often
    than with independent noise; and a round's score is an unbiased estimate of its expectation."""
    import torch
    from scipy.stats import binom

    from blackbox_rs.fitting.selection import radius_scores

    rng = np.random.default_rng(0)
    m, images, reps = 8, 384, 1000
    easy = rng.random(images) < 0.7
    p_a = np.where(easy, rng.uniform(0.9, 1.0, images), rng.uniform(0.2, 0.9, images))
    shift = rng.choice([0.10, -0.05, 0.0], size=images, p=[0.3, 0.3, 0.4])  # helps some images, hurts others
    p_b = np.clip(p_a + shift, 0.0, 1.0)
    table = radius_scores(torch.arange(m + 1), m).numpy()

    def expected(p):
        return float((binom.pmf(np.arange(m + 1)[None], m, p[:, None]) * table[None]).sum(1).mean())

    def rounds(u, p):  # u: (reps, images, m) uniforms; a draw agrees when u < p
        return table[(u < p[None, :, None]).sum(2)].mean(1)

    gap = expected(p_b) - expected(p_a)
    assert 0.01 < gap < 0.02
    u, u2 = rng.random((reps, images, m)), rng.random((reps, images, m))
    a, b_common, b_indep = rounds(u, p_a), rounds(u, p_b), rounds(u2, p_b)
    common, indep = float((b_common > a).mean()), float((b_indep > a).mean())
    assert common >= 0.85, common
    assert common - indep >= 0.1, (common, indep)
    se = a.std() / np.sqrt(reps)
    assert abs(a.mean() - expected(p_a)) < 4 * se
