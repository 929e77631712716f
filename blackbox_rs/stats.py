"""Pure statistics of randomized smoothing (numpy/scipy only, no torch).

Guarantees, for ``K ~ Binomial(n, p)``:

* ``cp_lower(K, n, alpha) <= p`` with probability at least ``1 - alpha`` (one-sided Clopper-Pearson);
* ``cp_upper(K, n, alpha) >= p`` with probability at least ``1 - alpha``.

Cohen et al. (2019): if the lower bound ``p_lower`` on the top class probability exceeds 1/2, the
smoothed classifier is constant within l2 radius ``sigma * Phi^-1(p_lower)``.
"""

from __future__ import annotations

import math
from typing import overload

import numpy as np
from scipy import stats as _st

from blackbox_rs.errors import InvalidParameterError, UncertifiableError

__all__ = [
    "abstain_test_pvalue",
    "check_alpha",
    "check_sigma",
    "cp_lower",
    "cp_upper",
    "max_radius",
    "min_samples_to_certify",
    "n_min",
    "radius",
]


def check_alpha(alpha: float) -> float:
    a = float(alpha)
    if not (0.0 < a < 1.0) or math.isnan(a):
        raise InvalidParameterError(f"alpha must lie in (0, 1), got {alpha!r}")
    return a


def check_sigma(sigma: float) -> float:
    s = float(sigma)
    if not (s > 0.0) or not math.isfinite(s):
        raise InvalidParameterError(f"sigma must be a positive finite number, got {sigma!r}")
    return s


def _check_counts(k: np.ndarray, n: np.ndarray) -> None:
    if np.any(n < 0) or np.any(k < 0) or np.any(k > n):
        raise InvalidParameterError("counts must satisfy 0 <= k <= n")


@overload
def cp_lower(k: int, n: int, alpha: float) -> float: ...
@overload
def cp_lower(k: np.ndarray, n: np.ndarray | int, alpha: float) -> np.ndarray: ...
def cp_lower(k, n, alpha):  # type: ignore[no-untyped-def]
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p from k successes in n trials.

    Equals the ``alpha`` quantile of ``Beta(k, n - k + 1)``; 0 when ``k == 0``.
    Vectorised over ``k`` and ``n``.
    """
    alpha = check_alpha(alpha)
    k_arr, n_arr = np.asarray(k), np.asarray(n)
    _check_counts(k_arr, n_arr)
    with np.errstate(all="ignore"):
        out = np.where(k_arr > 0, _st.beta.ppf(alpha, np.maximum(k_arr, 1), n_arr - k_arr + 1), 0.0)
    return float(out) if out.ndim == 0 else out


@overload
def cp_upper(k: int, n: int, alpha: float) -> float: ...
@overload
def cp_upper(k: np.ndarray, n: np.ndarray | int, alpha: float) -> np.ndarray: ...
def cp_upper(k, n, alpha):  # type: ignore[no-untyped-def]
    """One-sided (1 - alpha) Clopper-Pearson upper bound on p; 1 when ``k == n``.

    Equals the ``1 - alpha`` quantile of ``Beta(k + 1, n - k)``.
    """
    alpha = check_alpha(alpha)
    k_arr, n_arr = np.asarray(k), np.asarray(n)
    _check_counts(k_arr, n_arr)
    with np.errstate(all="ignore"):
        out = np.where(k_arr < n_arr, _st.beta.isf(alpha, k_arr + 1, np.maximum(n_arr - k_arr, 1)), 1.0)
    return float(out) if out.ndim == 0 else out


def abstain_test_pvalue(n_a: int, n_b: int) -> float:
    """Two-sided binomial test p-value of ``n_a`` vs ``n_b`` at p = 1/2 (Cohen's PREDICT).

    PREDICT returns the top class when this p-value is <= alpha; then the probability of returning
    a class other than the smoothed classifier's is at most alpha (Hung & Fithian 2016).
    """
    n_a, n_b = int(n_a), int(n_b)
    if n_a < 0 or n_b < 0:
        raise InvalidParameterError("counts must be non-negative")
    if n_a + n_b == 0:
        return 1.0
    return float(_st.binomtest(n_a, n_a + n_b, 0.5, alternative="two-sided").pvalue)


def radius(p_lower: float, sigma: float) -> float:
    """Certified l2 radius ``sigma * Phi^-1(p_lower)``; 0.0 when ``p_lower <= 1/2`` (no certificate)."""
    sigma = check_sigma(sigma)
    p = float(p_lower)
    if not (0.0 <= p <= 1.0):
        raise InvalidParameterError(f"p_lower must lie in [0, 1], got {p_lower!r}")
    if p <= 0.5:
        return 0.0
    return float(sigma * _st.norm.ppf(p))


def max_radius(n: int, sigma: float, alpha: float) -> float:
    """Largest radius a CERTIFY with ``n`` estimation samples can ever give (all n samples agree).

    Then ``p_lower = alpha ** (1/n)`` and the radius is ``sigma * Phi^-1(alpha ** (1/n))``; 0.0 when
    that bound is not above 1/2.
    """
    n = _check_n(n)
    alpha = check_alpha(alpha)
    return radius(cp_lower(n, n, alpha), sigma)


def min_samples_to_certify(alpha: float) -> int:
    """Smallest n for which ``n`` agreeing samples give ``p_lower > 1/2`` (``alpha ** (1/n) > 1/2``)."""
    alpha = check_alpha(alpha)
    n = max(1, math.floor(math.log(alpha) / math.log(0.5)))
    while alpha ** (1.0 / n) <= 0.5:
        n += 1
    while n > 1 and alpha ** (1.0 / (n - 1)) > 0.5:
        n -= 1
    return n


def n_min(r: float, sigma: float, alpha: float) -> int:
    """Fewest estimation samples that can certify radius ``r`` at noise ``sigma`` and level ``alpha``.

    ``ceil(ln alpha / ln Phi(r / sigma))``: the smallest n with ``alpha ** (1/n) >= Phi(r / sigma)``,
    reached only if all n samples agree. Computed with ``log Phi`` so huge values (1e17) stay exact to
    float precision. Selection samples are extra.
    """
    sigma = check_sigma(sigma)
    alpha = check_alpha(alpha)
    r = float(r)
    if not (r > 0.0) or not math.isfinite(r):
        raise InvalidParameterError(f"radius must be a positive finite number, got {r!r}")
    log_phi = float(_st.norm.logcdf(r / sigma))  # < 0
    if log_phi == 0.0:
        raise UncertifiableError(f"radius {r} at sigma {sigma} needs more samples than can be counted")
    est = math.log(alpha) / log_phi
    n = math.ceil(est)
    # ceil() of a float may be off by one at exact boundaries: settle with the defining inequality
    if n < 2**52:
        while n > 1 and math.log(alpha) / (n - 1) >= log_phi:
            n -= 1
        while math.log(alpha) / n < log_phi:
            n += 1
    return int(n)


def _check_n(n: int) -> int:
    if isinstance(n, bool) or int(n) != n or int(n) < 1:
        raise InvalidParameterError(f"n must be a positive integer, got {n!r}")
    return int(n)
