"""Anytime-valid sequential certification at target radii (pure statistics: numpy/scipy, no torch).

Problem. A candidate class ``c`` has been fixed by samples independent of what follows. The
estimation samples ``1{f(x + delta_i) = c}`` are i.i.d. Bernoulli(p). Radius ``r`` is certified for
``c`` when ``p >= Phi(r / sigma)`` (Cohen et al. 2019), so certifying "robust at r" is a one-sided test
of ``H0: p < Phi(r / sigma)``. We want to stop as soon as the evidence allows. Re-testing a fixed-n
Clopper-Pearson bound after every batch is NOT valid: optional stopping inflates the error far above
alpha (``tests/test_sequential.py`` shows it).

Procedure: alpha spent over a pre-declared schedule of looks (:class:`LookSchedule`). Before any
sample is drawn, the radii, sigma, alpha and the per-input cap ``M`` fix look sizes
``n_1 < ... < n_K = M`` and levels ``alpha_k`` with ``sum_k alpha_k <= alpha``:

* one *target look* per radius ``r_j``, at ``n_min(r_j, sigma, alpha * target_share / m)``: the
  smallest n at which n agreeing samples certify ``r_j`` at that look's level. When the model agrees
  on every sample, the procedure stops there, at ``n_min * (1 + ln(m / target_share) / ln(1 / alpha))``
  samples (x1.10 of ``n_min`` for one radius at alpha = 0.001);
* *geometric looks* ``n_first * growth^i`` and ``M`` itself, sharing the rest of alpha equally: they
  serve inputs whose samples do not all agree.

At look k with ``K_k`` successes out of ``n_k``: ``L_k = CP_lower(K_k, n_k, alpha_k)`` and
``U_k = CP_upper(K_k, n_k, alpha_k)`` (exact one-sided Clopper-Pearson, scipy beta quantiles).
Radius ``r_j`` is declared *certified* when ``L_k >= Phi(r_j / sigma)`` and *not certifiable* when
``U_k < Phi(r_j / sigma)``; decisions are final. Between looks the procedure may stop *without a
claim* whenever no remaining look can certify any open radius even if every remaining sample agreed
(curtailment), and it stops at the cap ``M``; open radii are then *undecided*.

Guarantee (union bound over the declared looks + the Clopper-Pearson guarantee per look):

    P_p( exists k : L_k > p ) <= sum_k alpha_k <= alpha,      P_p( exists k : U_k < p ) <= alpha,

whatever the stopping rule, so the guarantee holds for the data-dependent stop used here. Hence,
with probability >= 1 - alpha, every radius declared certified satisfies ``Phi(r / sigma) <= p``
(the smoothed classifier returns ``c`` in the whole l2 ball of radius r), and so does the largest
radius of a list: certifying several radii at once costs nothing extra. Likewise, with probability
>= 1 - alpha every "not certifiable at r" verdict is right for the candidate class
(``p < Phi(r / sigma)``). ``sigma * Phi^-1(max_k L_k)`` is itself a valid certified radius.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import special as _sp
from scipy import stats as _st

from blackbox_rs import stats
from blackbox_rs.errors import InvalidParameterError, UncertifiableError

__all__ = [
    "LookSchedule",
    "RadiusStatus",
    "SequentialDecision",
    "SequentialTest",
    "check_radii",
    "decide",
    "naive_retest_thresholds",
    "simulate_bernoulli",
    "simulate_naive",
    "wald_oracle_samples",
]

RadiusStatus = Literal["certified", "not_certified", "undecided"]


def check_radii(radius: float | Sequence[float]) -> tuple[float, ...]:
    """Sorted, de-duplicated target radii; each must be a positive finite number."""
    items = [radius] if isinstance(radius, (int, float, np.floating, np.integer)) else list(radius)
    if not items:
        raise InvalidParameterError("give at least one target radius")
    out = []
    for r in items:
        if isinstance(r, bool):
            raise InvalidParameterError(f"radius must be a number, got {r!r}")
        try:
            v = float(r)
        except (TypeError, ValueError):
            raise InvalidParameterError(f"radius must be a number, got {r!r}") from None
        if not (v > 0.0) or not math.isfinite(v):
            raise InvalidParameterError(
                f"target radius must be a positive finite number, got {r!r} (radius 0 needs no "
                "certificate: use predict)"
            )
        out.append(v)
    return tuple(sorted(set(out)))


def _cp_lower(k: np.ndarray, n: np.ndarray, a: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.where(k > 0, _st.beta.ppf(a, np.maximum(k, 1), n - k + 1), 0.0)


def _cp_upper(k: np.ndarray, n: np.ndarray, a: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.where(k < n, _st.beta.isf(a, k + 1, np.maximum(n - k, 1)), 1.0)


def _certify_counts(n: np.ndarray, a: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Smallest count c in [0, n] with ``CP_lower(c, n, a) >= p`` (elementwise); ``n + 1`` if none.

    ``CP_lower`` is nondecreasing in c, so this is a bisection on the exact bound."""
    n, a, p = np.broadcast_arrays(np.asarray(n, np.int64), np.asarray(a, float), np.asarray(p, float))
    lo = np.zeros(n.shape, np.int64)
    hi = n + 1
    while np.any(lo < hi):
        mid = (lo + hi) // 2
        ok = (lo < hi) & (_cp_lower(np.minimum(mid, n), n, a) >= p)
        hi = np.where((lo < hi) & ok, mid, hi)
        lo = np.where((lo < hi) & ~ok, mid + 1, lo)
    return lo


def _futile_counts(n: np.ndarray, a: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Largest count c in [0, n] with ``CP_upper(c, n, a) < p`` (elementwise); -1 if none."""
    n, a, p = np.broadcast_arrays(np.asarray(n, np.int64), np.asarray(a, float), np.asarray(p, float))
    lo = np.zeros(n.shape, np.int64)
    hi = n.copy()  # CP_upper(n, n, a) = 1 >= p: the smallest c with CP_upper >= p lies in [0, n]
    while np.any(lo < hi):
        mid = (lo + hi) // 2
        ok = (lo < hi) & (_cp_upper(mid, n, a) >= p)
        hi = np.where((lo < hi) & ok, mid, hi)
        lo = np.where((lo < hi) & ~ok, mid + 1, lo)
    return lo - 1


@dataclass(frozen=True)
class LookSchedule:
    """A pre-declared schedule of looks for certifying ``radii`` at noise ``sigma``.

    ``sizes[k]`` is the cumulative number of estimation samples at look k and ``alphas[k]`` the level
    spent there (``sum(alphas) <= alpha``). ``cert_counts[k, j]`` is the smallest candidate count that
    certifies ``radii[j]`` at look k (``sizes[k] + 1``: impossible) and ``futile_counts[k, j]`` the
    largest count that proves it not certifiable (-1: impossible). Build one with :meth:`for_radii`.
    """

    radii: tuple[float, ...]
    sigma: float
    alpha: float
    max_samples: int
    sizes: tuple[int, ...]
    alphas: tuple[float, ...]
    thresholds: tuple[float, ...]
    cert_counts: np.ndarray = field(repr=False, compare=False)
    futile_counts: np.ndarray = field(repr=False, compare=False)

    @classmethod
    def for_radii(
        cls,
        radii: float | Sequence[float],
        sigma: float,
        alpha: float,
        max_samples: int,
        *,
        target_share: float = 0.5,
        growth: float = 1.5,
    ) -> LookSchedule:
        """Schedule with one target look per radius (``target_share`` of alpha, split equally) and
        geometric looks (ratio ``growth``, up to ``max_samples``) sharing the rest equally.

        Raises :class:`UncertifiableError` when some radius cannot be certified within
        ``max_samples`` estimation samples even if every sample agrees (the message gives n_min).
        """
        rad = check_radii(radii)
        sigma = stats.check_sigma(sigma)
        alpha = stats.check_alpha(alpha)
        if isinstance(max_samples, bool) or int(max_samples) != max_samples or int(max_samples) < 1:
            raise InvalidParameterError(f"max_samples must be a positive integer, got {max_samples!r}")
        m_cap = int(max_samples)
        if not (0.0 < float(target_share) <= 1.0):
            raise InvalidParameterError(f"target_share must lie in (0, 1], got {target_share!r}")
        if not (float(growth) > 1.0) or not math.isfinite(float(growth)):
            raise InvalidParameterError(f"growth must be a finite number > 1, got {growth!r}")
        m = len(rad)
        a_target = alpha * float(target_share) / m
        targets: list[int] = []
        for r in rad:
            try:
                need_full = stats.n_min(r, sigma, alpha)
                need = stats.n_min(r, sigma, a_target)
            except UncertifiableError as exc:
                raise UncertifiableError(
                    f"radius {r} at sigma={sigma} cannot be certified with any query budget: {exc}"
                ) from None
            if need > m_cap:
                raise UncertifiableError(
                    f"radius {r} at sigma={sigma}, alpha={alpha} cannot be certified within the cap: "
                    f"even if every sample agrees it needs n_min = {need_full} estimation samples "
                    f"({need} at this schedule's first look, level {a_target:.3g}), but the cap leaves "
                    f"{m_cap}. Raise max_queries, lower the radius or raise sigma."
                )
            targets.append(need)
        alloc: dict[int, float] = {}
        for n in targets:
            alloc[n] = alloc.get(n, 0.0) + a_target
        geo: list[int] = []
        if target_share < 1.0:
            g = float(min(targets))
            while True:
                g *= float(growth)
                n = math.ceil(g)
                if n >= m_cap:
                    break
                if not geo or n > geo[-1]:
                    geo.append(n)
            geo.append(m_cap)
            a_geo = (alpha - a_target * m) / len(geo)
            for n in geo:
                alloc[n] = alloc.get(n, 0.0) + a_geo
        sizes = tuple(sorted(alloc))
        alphas = tuple(alloc[n] for n in sizes)
        thresholds = tuple(float(_st.norm.cdf(r / sigma)) for r in rad)
        n_arr = np.asarray(sizes, np.int64)[:, None]
        a_arr = np.asarray(alphas, float)[:, None]
        p_arr = np.asarray(thresholds, float)[None, :]
        cert = _certify_counts(n_arr, a_arr, p_arr)
        fut = _futile_counts(n_arr, a_arr, p_arr)
        return cls(rad, sigma, alpha, m_cap, sizes, alphas, thresholds, cert, fut)

    @property
    def num_looks(self) -> int:
        return len(self.sizes)

    def lower_bound(self, count: int, look: int) -> float:
        """Exact Clopper-Pearson lower bound at look ``look`` (level ``alphas[look]``)."""
        return float(stats.cp_lower(int(count), self.sizes[look], self.alphas[look]))

    def upper_bound(self, count: int, look: int) -> float:
        return float(stats.cp_upper(int(count), self.sizes[look], self.alphas[look]))

    def reachable(self, count: int, n: int, j: int) -> bool:
        """Whether radius ``j`` can still be certified at some look ``>= n`` if every remaining sample
        agrees, given ``count`` successes in the first ``n`` samples."""
        sizes = np.asarray(self.sizes)
        later = sizes >= n
        best = count + (sizes[later] - n)
        return bool(np.any(best >= self.cert_counts[later, j]))


@dataclass
class SequentialDecision:
    """Outcome of a sequential test: per-radius verdicts and the looks used."""

    status: list[RadiusStatus]
    looks: list[int]
    look_counts: list[int]
    n: int
    stop_reason: str
    p_lower: float

    @property
    def certified_index(self) -> int:
        """Index of the largest certified radius, -1 if none."""
        idx = [j for j, s in enumerate(self.status) if s == "certified"]
        return max(idx) if idx else -1

    @property
    def decision(self) -> RadiusStatus:
        if "certified" in self.status:
            return "certified"
        if self.status and all(s == "not_certified" for s in self.status):
            return "not_certified"
        return "undecided"


class SequentialTest:
    """The stateful decision rule: feed it cumulative counts; it says when to stop.

    Use :meth:`observe_look` with the candidate count after each look's samples and
    :meth:`hopeless` after any batch in between (a free, claim-less stop).
    """

    def __init__(self, schedule: LookSchedule, futility: float | None = None) -> None:
        if futility is not None and not (0.0 < futility < 1.0):
            raise InvalidParameterError(f"futility must lie in (0, 1) or be None, got {futility!r}")
        self.schedule = schedule
        self.futility = futility
        m = len(schedule.radii)
        self.status: list[RadiusStatus] = ["undecided"] * m
        self.look = 0  # index of the next look
        self.looks: list[int] = []
        self.look_counts: list[int] = []
        self.p_lower = 0.0
        self.stop_reason = ""

    def _open(self) -> list[int]:
        return [j for j, s in enumerate(self.status) if s == "undecided"]

    @property
    def next_size(self) -> int | None:
        """Cumulative sample count of the next look (None when the schedule is exhausted)."""
        return self.schedule.sizes[self.look] if self.look < self.schedule.num_looks else None

    @property
    def done(self) -> bool:
        return bool(self.stop_reason)

    def observe_look(self, count: int) -> bool:
        """Apply look ``self.look`` to ``count`` successes out of its size; returns True to stop."""
        s = self.schedule
        k = self.look
        n = s.sizes[k]
        count = int(count)
        if not (0 <= count <= n):
            raise InvalidParameterError(f"count {count} outside [0, {n}] at look {k}")
        self.looks.append(n)
        self.look_counts.append(count)
        self.p_lower = max(self.p_lower, s.lower_bound(count, k))
        for j in self._open():
            if count >= s.cert_counts[k, j]:
                for i in range(j + 1):  # certified at r_j implies certified at every smaller radius
                    if self.status[i] == "undecided":
                        self.status[i] = "certified"
            elif count <= s.futile_counts[k, j]:
                for i in range(j, len(self.status)):  # and not certifiable at every larger radius
                    if self.status[i] == "undecided":
                        self.status[i] = "not_certified"
        self.look += 1
        if not self._open():
            self.stop_reason = "resolved"
        elif self.look >= s.num_looks:
            self.stop_reason = "cap"
        elif self.hopeless(count, n):
            self.stop_reason = "unreachable"
        elif self.improbable(count, n):
            self.stop_reason = "improbable"
        return self.done

    def improbable(self, count: int, n: int) -> bool:
        """Futility stop (only with ``futility`` set): True when even the (1 - futility) upper
        confidence bound on p is below the success rate that certifies the smallest open radius at
        the cap. Like every claim-less stop it cannot create a false certificate; it gives up on
        inputs that would almost surely end undecided, at a chance <= ``futility`` per look of
        giving up on one that would have been certified."""
        opened = self._open()
        if self.futility is None or not opened:
            return False
        s = self.schedule
        p_need = float(s.cert_counts[-1, opened[0]]) / s.sizes[-1]
        return float(stats.cp_upper(int(count), int(n), self.futility)) < p_need

    def hopeless(self, count: int, n: int) -> bool:
        """True when no open radius can be certified at any remaining look even if all remaining
        samples agree (stopping then changes no certification: it only saves queries)."""
        opened = self._open()
        if not opened:
            return True
        s = self.schedule
        later = np.arange(self.look, s.num_looks)
        if later.size == 0:
            return True
        best = count + (np.asarray(s.sizes)[later] - n)
        return not bool(np.any(best >= s.cert_counts[later, opened[0]]))

    def stop_unreachable(self) -> None:
        self.stop_reason = "unreachable"

    def result(self, n: int) -> SequentialDecision:
        return SequentialDecision(list(self.status), list(self.looks), list(self.look_counts), int(n),
                                  self.stop_reason or "cap", float(self.p_lower))


def decide(schedule: LookSchedule, look_counts: Sequence[int]) -> SequentialDecision:
    """Replay the decision rule on the candidate counts observed at the first looks (audit a record:
    the same counts always give the same verdicts)."""
    t = SequentialTest(schedule)
    n = 0
    for c in look_counts:
        if t.done or t.next_size is None:
            raise InvalidParameterError("more look counts than the procedure would have used")
        n = t.next_size
        t.observe_look(int(c))
    return t.result(n)


def wald_oracle_samples(p: float, radius: float, sigma: float, alpha: float) -> float:
    """Wald's lower bound ``ln(1/alpha) / KL(p || Phi(radius / sigma))`` on the expected number of
    estimation samples that *any* level-alpha test needs to certify ``radius`` (with power near 1)
    when the candidate's true probability is ``p``; ``inf`` when ``p <= Phi(radius / sigma)``.

    It is the cost of the oracle that knows p (a sequential probability ratio test against that
    exact alternative), so it measures how far a procedure is from the best possible, and how much a
    model's probabilities near the threshold cost whoever certifies them."""
    sigma = stats.check_sigma(sigma)
    alpha = stats.check_alpha(alpha)
    threshold = float(_st.norm.cdf(check_radii(radius)[0] / sigma))
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise InvalidParameterError(f"p must lie in [0, 1], got {p!r}")
    if p <= threshold:
        return math.inf
    kl = float(_sp.rel_entr(p, threshold) + _sp.rel_entr(1.0 - p, 1.0 - threshold))
    return math.log(1.0 / alpha) / kl


# ---------------------------------------------------------------------------------------------
# simulation (vectorised over runs): validity and cost studies on Bernoulli oracles
def simulate_bernoulli(schedule: LookSchedule, p: float, runs: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Run the sequential procedure on ``runs`` Bernoulli(p) oracles at once.

    Returns ``certified_index`` (largest certified radius per run, -1 if none), ``n`` (estimation
    samples used) and ``not_certified`` (bool matrix runs x radii). Curtailment stops between looks
    are not modelled: they never change a certification, only the count of samples (so ``n`` is an
    upper bound on the real procedure's use).
    """
    rng = np.random.default_rng(seed)
    s = schedule
    m = len(s.radii)
    cert_idx = np.full(runs, -1, np.int64)
    futile_from = np.full(runs, m, np.int64)  # radii >= this index are not certifiable
    alive = np.ones(runs, bool)
    n_used = np.zeros(runs, np.int64)
    counts = np.zeros(runs, np.int64)
    prev = 0
    for k, n in enumerate(s.sizes):
        counts = counts + rng.binomial(n - prev, p, size=runs)
        prev = n
        idx = np.nonzero(alive)[0]
        c = counts[idx]
        n_used[idx] = n
        cert_here = (c[:, None] >= s.cert_counts[k][None, :]).sum(axis=1) - 1  # thresholds increase in j
        fut_here = m - (c[:, None] <= s.futile_counts[k][None, :]).sum(axis=1)
        open_lo = cert_idx[idx] + 1
        open_hi = futile_from[idx]  # open radii: open_lo .. open_hi - 1
        new_cert = np.where(cert_here >= open_lo, np.minimum(cert_here, open_hi - 1), cert_idx[idx])
        cert_idx[idx] = new_cert
        new_fut = np.where(fut_here < open_hi, np.maximum(fut_here, new_cert + 1), open_hi)
        futile_from[idx] = new_fut
        resolved = (cert_idx[idx] + 1) >= futile_from[idx]
        alive[idx[resolved]] = False
    not_cert = np.arange(m)[None, :] >= futile_from[:, None]
    return {"certified_index": cert_idx, "n": n_used, "not_certified": not_cert}


def naive_retest_thresholds(threshold: float, alpha: float, batch: int, max_samples: int) -> np.ndarray:
    """Certification counts of the INVALID naive procedure: re-test the fixed-n bound
    ``CP_lower(K_t, t, alpha) >= threshold`` after every ``batch`` samples. For demonstrations only."""
    sizes = np.arange(batch, max_samples + 1, batch, dtype=np.int64)
    return _certify_counts(sizes, np.full(sizes.shape, float(alpha)), np.full(sizes.shape, float(threshold)))


def simulate_naive(threshold: float, alpha: float, p: float, runs: int, *, batch: int, max_samples: int,
                   seed: int = 0) -> np.ndarray:
    """Whether the naive re-tested procedure certifies, for ``runs`` Bernoulli(p) oracles (bool array)."""
    rng = np.random.default_rng(seed)
    need = naive_retest_thresholds(threshold, alpha, batch, max_samples)
    steps = rng.binomial(batch, p, size=(runs, need.size))
    counts = np.cumsum(steps, axis=1)
    return np.any(counts >= need[None, :], axis=1)
