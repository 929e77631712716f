"""Exact discrete Gaussian noise on the 8-bit lattice (sound randomized smoothing for 8-bit inputs).

Float Gaussian noise is not what the theory assumes: rounding makes ``x + delta`` depend on ``x`` in
ways an adversary can exploit (Voracek & Hein 2022, arXiv 2207.07209). For 8-bit inputs
(``x = u / 255`` with integer u) the sound alternative is integer noise: ``z ~ N_Z(0, s^2)``, the
discrete Gaussian on the integers with ``P(z) ∝ exp(-z^2 / (2 s^2))`` and ``s = 255 sigma``, so the
noisy input ``(u + z) / 255`` is an exact lattice point and every step is exact integer arithmetic.

Sampler: Canonne, Kamath & Steinke (2020, "The Discrete Gaussian for Differential Privacy",
Algorithms 1-3): rejection from a discrete Laplace of scale ``t = floor(s) + 1``, with every
Bernoulli(exp(-gamma)) drawn by von Neumann's series method from uniform *integers*. No floating
point enters a decision, so the output distribution is exactly the discrete Gaussian given ideal
uniform integers (``numpy.random.Generator.integers`` on a Philox bit stream: Lemire's unbiased
method). ``s^2`` must be rational: ``s = 255 sigma`` is taken as the fraction with denominator
<= 1000 nearest to it (exact for sigma = 0.12, 0.25, 0.5, 1.0, ...), see :func:`lattice_scale`.

Reproducibility contract (same as :class:`blackbox_rs.noise.NoiseStream`): sample ``i`` of
``(seed, key, stream)`` is a pure function of ``(seed, key, stream, i, shape, s)``, whatever the
batching. Samples are grouped in fixed chunks (:func:`blackbox_rs.noise.chunk_size_for`); chunk c is
drawn from a Philox generator keyed by a BLAKE2b hash of ``(seed, key, stream, c)``.

Cost: vectorised numpy rejection sampling, a few dozen uniform integers per noise element (~1 s
per million elements on one CPU core, vs ~0.01 s for float ``torch.randn``); queries are unchanged.
The inputs must lie on the 1/255 lattice.

Scope: this removes the floating-point gap (the noise law is exactly the one sampled, and the noisy
inputs are exact). Certificates computed from lattice-noise counts use the Gaussian radius formula
``sigma * Phi^-1(p)``; for ``s = 255 sigma >> 1`` the discrete and continuous Gaussians agree to
within O(1/s^2) relative error in the Neyman-Pearson bound, and an exact discrete-Gaussian
correction of the radius is not applied here.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch

from blackbox_rs.errors import InvalidInputError, InvalidParameterError
from blackbox_rs.noise import chunk_size_for

__all__ = [
    "LATTICE_LEVELS",
    "LatticeNoiseStream",
    "discrete_gaussian_pmf",
    "lattice_scale",
    "sample_discrete_gaussian",
    "to_lattice",
]

LATTICE_LEVELS = 255
_MAX_DEN = 1000
_I64_SAFE = 1 << 62


def lattice_scale(sigma: float, levels: int = LATTICE_LEVELS) -> Fraction:
    """The exact rational noise scale ``s = levels * sigma`` (in lattice steps) used by the sampler.

    Raises :class:`InvalidParameterError` when ``levels * sigma`` is not within 1e-9 (relative) of a
    fraction with denominator <= 1000 (round sigma, e.g. 0.123 -> 0.12)."""
    sig = float(sigma)
    if not (sig > 0.0) or not math.isfinite(sig):
        raise InvalidParameterError(f"sigma must be a positive finite number, got {sigma!r}")
    target = levels * sig
    s = Fraction(target).limit_denominator(_MAX_DEN)
    if abs(float(s) - target) > 1e-9 * target:
        raise InvalidParameterError(
            f"{levels} * sigma = {target!r} is not a simple fraction; round sigma (lattice noise needs a "
            "rational scale)"
        )
    a, b = s.numerator ** 2, s.denominator ** 2
    t = math.floor(s) + 1
    if 2 * a * b * t * t >= _I64_SAFE:
        raise InvalidParameterError(f"sigma={sigma!r} makes the exact sampler's integers too large; round it")
    return s


# --- exact Bernoulli and discrete Laplace / Gaussian samplers (vectorised) -------------------------
def _bern_exp_small(rng: np.random.Generator, num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Bernoulli(exp(-num/den)) for integer arrays with 0 <= num <= den (CKS Algorithm 1).

    K = 1; repeat: A ~ Bernoulli(gamma / K) (= Bernoulli(gamma) and Bernoulli(1/K), independent); if
    A: K += 1 else stop. Return K odd. P(K odd) = exp(-gamma)."""
    size = num.shape[0]
    k = np.ones(size, np.int64)
    active = np.arange(size)
    while active.size:
        u = rng.integers(0, den[active], dtype=np.int64)
        v = rng.integers(0, k[active], dtype=np.int64)
        a = (u < num[active]) & (v == 0)
        active = active[a]
        k[active] += 1
    return (k % 2) == 1


def _bern_exp(rng: np.random.Generator, num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Bernoulli(exp(-num/den)) for any non-negative rational num/den (int64 arrays)."""
    whole = num // den
    frac = num - whole * den
    out = _bern_exp_small(rng, frac, den)
    idx = np.nonzero(out & (whole > 0))[0]
    left = whole[idx].copy()
    ones = np.ones(1, np.int64)
    while idx.size:  # `whole` independent Bernoulli(exp(-1)), stopping at the first failure
        ok = _bern_exp_small(rng, np.broadcast_to(ones, idx.shape), np.broadcast_to(ones, idx.shape))
        out[idx[~ok]] = False
        left = left[ok] - 1
        idx = idx[ok]
        keep = left > 0
        idx, left = idx[keep], left[keep]
    return out


def _discrete_laplace(rng: np.random.Generator, size: int, t: int) -> np.ndarray:
    """Discrete Laplace with P(y) ∝ exp(-|y| / t) on the integers (CKS Algorithm 2, s = 1)."""
    out = np.zeros(size, np.int64)
    todo = np.arange(size)
    tt = np.full(1, t, np.int64)
    ones = np.ones(1, np.int64)
    while todo.size:
        m = todo.size
        u = rng.integers(0, t, size=m, dtype=np.int64)
        d = _bern_exp_small(rng, u, np.broadcast_to(tt, (m,)))
        v = np.zeros(m, np.int64)
        go = np.arange(m)
        while go.size:  # V ~ Geometric: count Bernoulli(exp(-1)) successes before the first failure
            a = _bern_exp_small(rng, np.broadcast_to(ones, go.shape), np.broadcast_to(ones, go.shape))
            go = go[a]
            v[go] += 1
        x = u + t * v
        b = rng.integers(0, 2, size=m, dtype=np.int64)
        ok = d & ~((b == 1) & (x == 0))
        out[todo[ok]] = np.where(b[ok] == 1, -x[ok], x[ok])
        todo = todo[~ok]
    return out


def sample_discrete_gaussian(rng: np.random.Generator, size: int, scale: Fraction) -> np.ndarray:
    """``size`` exact draws from the discrete Gaussian ``N_Z(0, scale^2)`` (CKS Algorithm 3), int64."""
    p, q = scale.numerator, scale.denominator
    a, b = p * p, q * q  # scale^2 = a / b
    t = math.floor(scale) + 1
    den = 2 * a * b * t * t  # gamma(y) = (|y| t b - a)^2 / (2 a b t^2)
    out = np.zeros(size, np.int64)
    todo = np.arange(size)
    # largest |y| for which (|y| t b - a)^2 fits in int64
    y_safe = (math.isqrt(_I64_SAFE) + a) // (t * b)
    while todo.size:
        y = _discrete_laplace(rng, todo.size, t)
        ay = np.abs(y)
        small = ay <= y_safe
        num = np.zeros(todo.size, np.int64)
        diff = ay[small] * (t * b) - a
        num[small] = diff * diff
        acc = np.zeros(todo.size, bool)
        acc[small] = _bern_exp(rng, num[small], np.full(int(small.sum()), den, np.int64))
        for i in np.nonzero(~small)[0]:  # astronomically rare: exact Python integers
            g_num = (int(ay[i]) * t * b - a) ** 2
            whole, frac = divmod(g_num, den)
            ok = True
            for _ in range(whole):
                if not _bern_exp_small(rng, np.ones(1, np.int64), np.ones(1, np.int64))[0]:
                    ok = False
                    break
            if ok and frac:
                ok = bool(_bern_exp_small(rng, np.array([frac], np.int64), np.array([den], np.int64))[0])
            acc[i] = ok
        out[todo[acc]] = y[acc]
        todo = todo[~acc]
    return out


def discrete_gaussian_pmf(values: np.ndarray, scale: float | Fraction) -> np.ndarray:
    """Exact-to-float-precision pmf of ``N_Z(0, scale^2)`` at integer ``values`` (for tests)."""
    s = float(scale)
    span = int(math.ceil(40 * s)) + 10
    ks = np.arange(-span, span + 1, dtype=float)
    norm = np.exp(-(ks ** 2) / (2 * s * s)).sum()
    v = np.asarray(values, float)
    return np.exp(-(v ** 2) / (2 * s * s)) / norm


def to_lattice(x: torch.Tensor, levels: int = LATTICE_LEVELS) -> torch.Tensor:
    """Integer levels ``u`` of an input on the 1/levels lattice (int32); raises
    :class:`InvalidInputError` when ``x`` is not an 8-bit image (``x * levels`` not integral)."""
    scaled = x.detach().to("cpu", torch.float64) * levels
    u = torch.round(scaled)
    if float((scaled - u).abs().max()) > 1e-4:
        raise InvalidInputError(
            f"lattice noise needs an input on the 1/{levels} grid (an 8-bit image); this one is not "
            "(quantise it first: torch.round(x * 255) / 255)"
        )
    return u.to(torch.int32)


def _chunk_key(seed: int, key: str, stream: str, chunk: int, scale: Fraction) -> int:
    msg = f"blackbox-rs/noise-lattice/v1|{int(seed)}|{key}|{stream}|{scale}|{int(chunk)}".encode()
    return int.from_bytes(hashlib.blake2b(msg, digest_size=16).digest(), "little")


class LatticeNoiseStream:
    """Integer discrete Gaussian noise for one (seed, key, stream), addressable by sample index.

    ``integers(start, count)`` gives ``count x *shape`` int32 noise in lattice steps (standard
    deviation ~ ``255 sigma``); ``noisy(u, start, count)`` the exact noisy inputs ``(u + z) / 255`` as
    float32 (a deterministic function of the integers ``u + z``).
    """

    def __init__(self, *, seed: int, key: str, stream: str, shape: Sequence[int], sigma: float,
                 levels: int = LATTICE_LEVELS) -> None:
        if isinstance(seed, bool) or int(seed) != seed or seed < 0:
            raise InvalidParameterError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.key = str(key)
        self.stream = str(stream)
        self.shape = tuple(int(d) for d in shape)
        self.levels = int(levels)
        self.scale = lattice_scale(sigma, self.levels)
        self.sigma = float(self.scale) / self.levels
        self.chunk = chunk_size_for(self.shape)
        self._numel = int(np.prod(self.shape)) if self.shape else 1
        self._cached_index = -1
        self._cached: np.ndarray | None = None

    def _chunk(self, c: int) -> np.ndarray:
        if c != self._cached_index:
            rng = np.random.Generator(np.random.Philox(key=_chunk_key(self.seed, self.key, self.stream, c,
                                                                      self.scale)))
            z = sample_discrete_gaussian(rng, self.chunk * self._numel, self.scale)
            self._cached = z.astype(np.int32).reshape((self.chunk, *self.shape))
            self._cached_index = c
        assert self._cached is not None
        return self._cached

    def integers(self, start: int, count: int) -> torch.Tensor:
        """Integer noise for sample indices ``start .. start + count - 1``."""
        if start < 0 or count < 0:
            raise InvalidParameterError("start and count must be non-negative")
        out = np.empty((count, *self.shape), np.int32)
        pos, end = start, start + count
        while pos < end:
            c, off = divmod(pos, self.chunk)
            take = min(self.chunk - off, end - pos)
            out[pos - start : pos - start + take] = self._chunk(c)[off : off + take]
            pos += take
        return torch.from_numpy(out)

    def noisy(self, u: torch.Tensor, start: int, count: int) -> torch.Tensor:
        """Exact noisy inputs ``(u + z_i) / levels`` (float32, not clipped) for the given indices."""
        z = self.integers(start, count)
        return (z + u.to(torch.int32)).to(torch.float32).div_(self.levels)
