"""Exact discrete Gaussian lattice noise: distribution (chi-square vs the exact pmf), reproducibility."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import stats as st

from blackbox_rs.errors import InvalidInputError, InvalidParameterError
from blackbox_rs.noise_lattice import (
    LatticeNoiseStream,
    _bern_exp,
    discrete_gaussian_pmf,
    lattice_scale,
    sample_discrete_gaussian,
    to_lattice,
)


def _chi_square_pvalue(z: np.ndarray, scale: Fraction) -> float:
    s = float(scale)
    lo, hi = -math.ceil(5 * s), math.ceil(5 * s)
    ks = np.arange(lo, hi + 1)
    pmf = discrete_gaussian_pmf(ks, scale)
    tail = (1.0 - pmf.sum()) / 2
    expected = np.concatenate([[tail], pmf, [tail]]) * z.size
    inner = np.bincount(np.clip(z, lo, hi) - lo, minlength=hi - lo + 1)
    inner[0] -= int((z < lo).sum())
    inner[-1] -= int((z > hi).sum())
    observed = np.concatenate([[(z < lo).sum()], inner, [(z > hi).sum()]])
    keep = expected >= 5  # pool sparse cells
    obs = np.concatenate([observed[keep], [observed[~keep].sum()]])
    exp = np.concatenate([expected[keep], [expected[~keep].sum()]])
    if exp[-1] < 5:
        obs, exp = obs[:-1], exp[:-1]
        exp = exp * obs.sum() / exp.sum()
    return float(st.chisquare(obs, exp).pvalue)


@pytest.mark.parametrize("scale", [Fraction(1, 2), Fraction(5, 2), Fraction(255, 4)])
def test_distribution_matches_exact_pmf(scale: Fraction) -> None:
    rng = np.random.Generator(np.random.Philox(key=12345))
    z = sample_discrete_gaussian(rng, 200_000, scale)
    assert z.dtype == np.int64
    assert _chi_square_pvalue(z, scale) > 1e-3
    assert abs(z.mean()) < 5 * float(scale) / math.sqrt(z.size)


def test_bernoulli_exp_is_exact_in_law() -> None:
    rng = np.random.Generator(np.random.Philox(key=7))
    n = 200_000
    for num, den in [(0, 1), (1, 1), (3, 2), (7, 3)]:
        out = _bern_exp(rng, np.full(n, num, np.int64), np.full(n, den, np.int64))
        k = int(out.sum())
        if num == 0:
            assert k == n
        else:
            assert st.binomtest(k, n, math.exp(-num / den)).pvalue > 1e-3


def test_reproducible_whatever_the_batching() -> None:
    kw = {"seed": 3, "key": "img", "stream": "seq-estimation", "shape": (1, 4, 4), "sigma": 0.25}
    a = LatticeNoiseStream(**kw).integers(0, 600)
    s = LatticeNoiseStream(**kw)
    b = torch.cat([s.integers(0, 7), s.integers(7, 300), s.integers(307, 293)])
    assert a.dtype == torch.int32 and torch.equal(a, b)
    assert torch.equal(LatticeNoiseStream(**kw).integers(450, 20), a[450:470])  # chunk boundary crossed
    other = LatticeNoiseStream(**{**kw, "stream": "seq-selection"}).integers(0, 600)
    assert not torch.equal(a, other)
    assert not torch.equal(a, LatticeNoiseStream(**{**kw, "seed": 4}).integers(0, 600))
    assert abs(float(a.float().std()) - 63.75) < 3.0


def test_noisy_inputs_are_exact_lattice_points() -> None:
    s = LatticeNoiseStream(seed=0, key="k", stream="s", shape=(1, 2, 2), sigma=0.5)
    u = to_lattice(torch.tensor([[[0.0, 1.0], [128 / 255, 3 / 255]]]))
    assert u.tolist() == [[[0, 255], [128, 3]]]
    noisy = s.noisy(u, 5, 10)
    ints = (noisy.double() * 255).round()
    assert torch.equal(ints.to(torch.int32), s.integers(5, 10) + u)
    with pytest.raises(InvalidInputError):
        to_lattice(torch.full((1, 2, 2), 0.3333))


def test_scale_is_rational() -> None:
    assert lattice_scale(0.25) == Fraction(255, 4)
    assert lattice_scale(0.12) == Fraction(153, 5)
    assert lattice_scale(1.0) == 255
    with pytest.raises(InvalidParameterError):
        lattice_scale(0.1234567891)
    with pytest.raises(InvalidParameterError):
        lattice_scale(0.0)
