"""PREDICT / CERTIFY / certify_dataset on synthetic models whose smoothed probabilities are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from blackbox_rs.certificate import ABSTAIN
from blackbox_rs.connectors import CallableConnector
from blackbox_rs.core import certify, predict, sample_counts
from blackbox_rs.dataset import certified_accuracy, certify_dataset
from blackbox_rs.engine import QueryEngine
from blackbox_rs.errors import (
    InvalidInputError,
    InvalidParameterError,
    UncertifiableError,
)

SHAPE = (1, 4, 4)
SIGMA = 0.25


def threshold_model(b: torch.Tensor, cut: float = 0.8) -> torch.Tensor:
    """Class 0 iff pixel 0 < cut, else class 1 iff pixel 1 < 0.5, else class 2.

    At an input with pixel 0 = x0 and pixel 1 = 0.5 under N(0, sigma^2) noise (then clipping to [0, 1],
    which does not move either threshold), P(class 0) = Phi((cut - x0) / sigma) exactly, and the
    smoothed classifier's true radius for class 0 is cut - x0 when pixel 0 is the only one that matters.
    """
    v0, v1 = b[:, 0, 0, 0], b[:, 0, 0, 1]
    return torch.where(v0 < cut, 0, torch.where(v1 < 0.5, 1, 2)).long()


class Recording:
    """Wraps a labelling function; remembers every batch's pixel 0 and every label answered."""

    def __init__(self, fn=threshold_model) -> None:
        self.fn = fn
        self.calls = 0
        self.sizes: list[int] = []
        self.pixels: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def __call__(self, b: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.sizes.append(len(b))
        self.pixels.append(b[:, 0, 0, 0].clone())
        out = self.fn(b)
        self.labels.append(out.clone())
        return out


def make(fn=None, num_classes: int = 3, **kw) -> tuple[CallableConnector, Recording]:
    rec = Recording(fn or threshold_model)
    return CallableConnector(rec, input_shape=SHAPE, num_classes=num_classes, **kw), rec


def image(x0: float = 0.5) -> torch.Tensor:
    x = torch.full(SHAPE, 0.5)
    x[0, 0, 0] = x0
    return x


def true_p(x0: float, sigma: float = SIGMA, cut: float = 0.8) -> float:
    return float(sps.norm.cdf((cut - x0) / sigma))


def recompute_certify(cert) -> tuple[int, float, float]:
    """Independent recomputation of Cohen's CERTIFY from the counts a certificate carries."""
    c_hat = int(np.argmax(cert.selection_counts))
    n_a = cert.counts[c_hat]
    p_lower = 0.0 if n_a == 0 else float(sps.beta.ppf(cert.alpha, n_a, cert.n - n_a + 1))
    if p_lower > 0.5:
        return c_hat, p_lower, cert.sigma * float(sps.norm.ppf(p_lower))
    return ABSTAIN, p_lower, 0.0


# ---------------------------------------------------------------------------------------------
# closed-form truth
def test_large_n_recovers_the_closed_form_radius():
    conn, rec = make()
    x0, n = 0.5, 100_000
    p = true_p(x0)  # Phi(1.2) = 0.8849
    cert = certify(conn, image(x0), sigma=SIGMA, n0=100, n=n, alpha=0.001, seed=3)
    assert cert.prediction == 0 and cert.n == n and sum(cert.counts) == n and sum(cert.selection_counts) == 100
    assert cert.queries == 100 + n == sum(rec.sizes)
    # empirical frequency within 4.5 standard errors of the truth
    assert abs(cert.counts[0] / n - p) < 4.5 * math.sqrt(p * (1 - p) / n)
    # the bound sits just below the truth: below it, and within ~2x the CP margin at n = 1e5
    assert cert.p_lower < p
    assert p - cert.p_lower < 0.008
    assert cert.p_lower == pytest.approx(sps.beta.ppf(0.001, cert.counts[0], n - cert.counts[0] + 1), rel=1e-12)
    assert cert.radius == pytest.approx(SIGMA * sps.norm.ppf(cert.p_lower), rel=1e-12)
    # the true radius of this smoothed classifier is cut - x0 = 0.3
    assert 0.27 < cert.radius < 0.3


def test_coverage_over_seeds():
    """Over many seeds the certified bound exceeds the true p_A at rate <= alpha (+ slack): the noise
    really is N(0, sigma^2) and the bound really is one-sided (1 - alpha)."""
    conn, _ = make()
    x0, alpha, runs = 0.6, 0.05, 300
    p = true_p(x0)  # Phi(0.8) = 0.788
    over = [certify(conn, image(x0), sigma=SIGMA, n0=10, n=200, alpha=alpha, seed=s).p_lower > p
            for s in range(runs)]
    slack = 4 * math.sqrt(alpha * (1 - alpha) / runs)
    assert np.mean(over) <= alpha + slack


@pytest.mark.parametrize("x0,alpha,n", [(0.5, 0.001, 1000), (0.7, 0.01, 500), (0.78, 0.001, 300),
                                        (0.8, 0.05, 400), (0.95, 0.001, 1000), (0.3, 0.1, 50)])
def test_certify_decision_matches_independent_recomputation(x0, alpha, n):
    conn, _ = make()
    for seed in range(3):
        cert = certify(conn, image(x0), sigma=SIGMA, n0=50, n=n, alpha=alpha, seed=seed)
        pred, p_lower, rad = recompute_certify(cert)
        assert cert.prediction == pred
        assert cert.p_lower == pytest.approx(p_lower, rel=1e-12, abs=1e-300)
        assert cert.radius == pytest.approx(rad, rel=1e-12, abs=0)
        assert cert.abstained == (pred == ABSTAIN)
        assert cert.alpha == alpha and cert.sigma == SIGMA and cert.n0 == 50 and cert.n == n


def test_abstains_at_coin_flip():
    conn, _ = make()
    cert = certify(conn, image(0.8), sigma=SIGMA, n0=100, n=2000, alpha=0.001, seed=0)  # p_A = 1/2
    assert cert.prediction == ABSTAIN and cert.radius == 0.0 and cert.p_lower < 0.5
    assert not cert.certified_at(0.0)


@pytest.mark.parametrize("x0,alpha", [(0.5, 0.001), (0.78, 0.01), (0.8, 0.05), (0.95, 0.001)])
def test_predict_decision_matches_binomtest(x0, alpha):
    conn, rec = make()
    for seed in range(3):
        sp = predict(conn, image(x0), sigma=SIGMA, n=400, alpha=alpha, seed=seed)
        c = np.asarray(sp.counts)
        assert c.sum() == 400 and sp.queries == 400
        top = sorted(range(3), key=lambda i: (-c[i], i))
        n_a, n_b = int(c[top[0]]), int(c[top[1]])
        pv = sps.binomtest(n_a, n_a + n_b, 0.5).pvalue
        assert sp.p_value == pytest.approx(pv, rel=1e-12)
        assert sp.prediction == (top[0] if pv <= alpha else ABSTAIN)


def test_predict_is_confident_away_from_the_boundary():
    conn, _ = make()
    assert predict(conn, image(0.2), sigma=SIGMA, n=500, alpha=0.001, seed=0).prediction == 0
    # at x0 = cut, class 0 still has p = 1/2 against 1/4 and 1/4: PREDICT names it
    assert predict(conn, image(0.8), sigma=SIGMA, n=400, alpha=0.001, seed=0).prediction == 0
    # a true coin flip between two classes: PREDICT abstains
    coin, _ = make(lambda b: (b[:, 0, 0, 0] >= 0.8).long(), num_classes=2)
    assert predict(coin, image(0.8), sigma=SIGMA, n=400, alpha=0.001, seed=0).prediction == ABSTAIN


# ---------------------------------------------------------------------------------------------
# independence of selection and estimation samples
def test_selection_and_estimation_use_independent_noise():
    conn, rec = make()
    cert = certify(conn, image(0.7), sigma=SIGMA, n0=256, n=256, alpha=0.01, batch_size=256, seed=0)
    assert rec.sizes == [256, 256]
    sel, est = rec.pixels
    assert not torch.equal(sel, est)
    def interior(v):  # clipped values (exactly 0 or 1) repeat by construction
        return {f for f in v.tolist() if 0.0 < f < 1.0}

    assert len(interior(sel) & interior(est)) == 0  # no sample reused
    assert abs(np.corrcoef(sel.numpy(), est.numpy())[0, 1]) < 0.2
    assert cert.selection_counts != cert.counts
    # PREDICT's stream is yet another one
    predict(conn, image(0.7), sigma=SIGMA, n=256, batch_size=256, seed=0)
    assert len(interior(rec.pixels[2]) & (interior(sel) | interior(est))) == 0


def test_noise_is_added_to_the_input_then_clipped():
    conn, rec = make()
    x = image(0.5)
    certify(conn, x, sigma=SIGMA, n0=10, n=1000, alpha=0.01, batch_size=1000, seed=1)
    v = torch.cat(rec.pixels)
    assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0
    d = v.double().numpy() - 0.5
    assert abs(d.std() - SIGMA) < 0.02 and abs(d.mean()) < 0.03


# ---------------------------------------------------------------------------------------------
# argument validation: typed errors, and no query is ever sent
BAD_PARAMS = [
    ({"n0": 0}, "n0"), ({"n0": -3}, "n0"), ({"n0": 2.5}, "n0"), ({"n0": True}, "n0"),
    ({"n": 0}, "n must"), ({"n": -1}, "n must"), ({"n": 100.0}, "n must"),
    ({"alpha": 0.0}, "alpha"), ({"alpha": 1.0}, "alpha"), ({"alpha": -0.5}, "alpha"), ({"alpha": 2.0}, "alpha"),
    ({"alpha": float("nan")}, "alpha"),
    ({"sigma": 0.0}, "sigma"), ({"sigma": -0.25}, "sigma"), ({"sigma": float("inf")}, "sigma"),
    ({"sigma": float("nan")}, "sigma"),
    ({"batch_size": 0}, "batch_size"), ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"),
]


@pytest.mark.parametrize("kw,msg", BAD_PARAMS, ids=[f"{k}" for k, _ in BAD_PARAMS])
def test_bad_parameters_raise_before_any_query(kw, msg):
    conn, rec = make()
    args = {"sigma": SIGMA, "n0": 10, "n": 100, "alpha": 0.01, **kw}
    with pytest.raises(InvalidParameterError, match=msg):
        certify(conn, image(), **args)
    if "n0" not in kw:
        args.pop("n0")
        with pytest.raises(InvalidParameterError, match=msg):
            predict(conn, image(), **args)
    assert rec.calls == 0


def _bad_images():
    x = image()
    nan, inf, big, neg = x.clone(), x.clone(), x.clone(), x.clone()
    nan[0, 1, 1] = float("nan")
    inf[0, 2, 2] = float("-inf")
    big[0, 0, 0] = 1.01
    neg[0, 3, 3] = -1e-3
    return [
        (nan, "NaN or inf"), (inf, "NaN or inf"), (big, r"\[0, 1\]"), (neg, r"\[0, 1\]"),
        (torch.rand(1, 4, 5), "shape"), (torch.rand(3, 4, 4), "shape"), (x.unsqueeze(0), "shape"),
        ((x * 255).to(torch.uint8), "float"), (torch.zeros(SHAPE, dtype=torch.int64), "float"),
        (x.numpy(), "torch.Tensor"), (None, "torch.Tensor"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_images())))
def test_bad_inputs_raise_before_any_query(case):
    bad, msg = _bad_images()[case]
    conn, rec = make()
    with pytest.raises(InvalidInputError, match=msg):
        certify(conn, bad, sigma=SIGMA, n0=10, n=100, alpha=0.01, seed=0)
    with pytest.raises(InvalidInputError, match=msg):
        predict(conn, bad, sigma=SIGMA, n=100, alpha=0.01, seed=0)
    assert rec.calls == 0


def test_float64_input_is_accepted_as_float32():
    conn, _ = make()
    a = certify(conn, image().double(), sigma=SIGMA, n0=10, n=100, alpha=0.01, seed=0)
    b = certify(conn, image(), sigma=SIGMA, n0=10, n=100, alpha=0.01, seed=0)
    assert a == b


def test_uncertifiable_settings_raise_before_any_query():
    conn, rec = make()
    with pytest.raises(UncertifiableError, match="n >= 10"):
        certify(conn, image(), sigma=SIGMA, n0=10, n=5, alpha=0.001, seed=0)
    with pytest.raises(UncertifiableError):
        certify(conn, image(), sigma=SIGMA, n0=10, n=9, alpha=0.001, seed=0)  # 0.001 ** (1/9) = 0.464
    with pytest.raises(UncertifiableError):
        certify_dataset(conn, image().unsqueeze(0).repeat(3, 1, 1, 1), [0, 0, 0], sigma=SIGMA, n=5, alpha=0.001, seed=0)
    assert rec.calls == 0
    assert issubclass(UncertifiableError, InvalidParameterError)
    # n = 10 is the smallest that can certify at alpha = 0.001, and does when all samples agree
    cert = certify(conn, image(0.0), sigma=0.05, n0=10, n=10, alpha=0.001, seed=0)
    assert cert.prediction == 0 and cert.p_lower == pytest.approx(0.001 ** 0.1)


# ---------------------------------------------------------------------------------------------
# datasets
def _dataset():
    xs = torch.stack([image(0.5), image(0.7), image(0.95), image(0.2), image(0.8)])
    ys = [0, 0, 1, 0, 2]  # input 4 sits on the boundary; its label is wrong anyway
    return xs, ys


RADII = (0.0, 0.1, 0.25, 0.5)


def _check_accuracy(res, radii=RADII):
    certs = res.certificates
    for r in radii:
        want = sum(1 for c in certs if c.prediction != ABSTAIN and c.prediction == c.label and c.radius >= r)
        assert res.certified_accuracy[f"{r:g}"] == pytest.approx(want / len(certs))
    assert res.certified_accuracy == certified_accuracy(certs, radii)


def test_certify_dataset_tensor_with_labels():
    xs, ys = _dataset()
    conn, rec = make()
    res = certify_dataset(conn, xs, ys, sigma=SIGMA, n0=20, n=500, alpha=0.001, radii=RADII, seed=1)
    assert res.reference == "labels"
    assert [c.index for c in res.certificates] == list(range(5))
    assert [c.label for c in res.certificates] == ys
    assert res.queries == 5 * 520 == sum(rec.sizes)
    _check_accuracy(res)
    # input 0 (p_A = 0.885) and 3 (p_A = 0.9918) certify class 0; input 3 with the larger radius
    c = res.certificates
    assert c[0].prediction == 0 and c[3].prediction == 0 and c[3].radius > c[0].radius > 0.2
    assert res.certified_accuracy["0"] >= 0.4
    # each certificate equals certifying that input alone
    for i, x in enumerate(xs):
        alone = certify(conn, x, sigma=SIGMA, n0=20, n=500, alpha=0.001, seed=1, label=ys[i], index=i)
        assert alone.model_dump(exclude={"queries"}) == res.certificates[i].model_dump(exclude={"queries"})


def test_certify_dataset_pairs_match_tensor_and_labels():
    xs, ys = _dataset()
    conn, _ = make()
    a = certify_dataset(conn, xs, ys, sigma=SIGMA, n0=20, n=300, alpha=0.01, radii=RADII, seed=0)
    b = certify_dataset(conn, list(zip(xs, ys, strict=True)), sigma=SIGMA, n0=20, n=300, alpha=0.01, radii=RADII,
                        seed=0)
    assert b.reference == "labels"
    assert a.certificates == b.certificates and a.certified_accuracy == b.certified_accuracy


def test_certify_dataset_unlabeled_uses_clean_prediction():
    xs, _ = _dataset()
    conn, rec = make()
    res = certify_dataset(conn, xs, sigma=SIGMA, n0=20, n=300, alpha=0.01, radii=RADII, seed=0)
    assert res.reference == "clean_prediction"
    clean = threshold_model(xs).tolist()
    assert [c.label for c in res.certificates] == clean
    assert res.queries == 5 * (20 + 300) + 5 == sum(rec.sizes)  # one extra query per input
    _check_accuracy(res)
    # an unlabeled list of images is the same
    res2 = certify_dataset(conn, list(xs), sigma=SIGMA, n0=20, n=300, alpha=0.01, radii=RADII, seed=0)
    assert res2.certificates == res.certificates


def test_certify_dataset_rejects_malformed_datasets():
    xs, ys = _dataset()
    conn, rec = make()
    kw = {"sigma": SIGMA, "n0": 10, "n": 100, "alpha": 0.01}
    with pytest.raises(InvalidInputError, match="N x C x H x W"):
        certify_dataset(conn, xs[0], **kw)
    with pytest.raises(InvalidInputError, match="fewer labels"):
        certify_dataset(conn, xs, ys[:2], **kw)
    with pytest.raises(InvalidInputError, match="outside"):
        certify_dataset(conn, xs[:1], [3], **kw)
    with pytest.raises(InvalidInputError, match="every input has a label"):
        certify_dataset(conn, [(xs[0], 0), xs[1]], **kw)
    with pytest.raises(InvalidParameterError, match="radii"):
        certify_dataset(conn, xs, ys, radii=(0.0, -1.0), **kw)
    bad = xs.clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN"):
        certify_dataset(conn, bad, ys, **kw)


def test_certified_accuracy_by_hand():
    xs, ys = _dataset()
    conn, _ = make()
    certs = certify_dataset(conn, xs, ys, sigma=SIGMA, n0=20, n=300, alpha=0.01, seed=0).certificates
    acc = certified_accuracy(certs, [0.0, 10.0])
    assert acc["10"] == 0.0
    assert acc["0"] == sum(c.correct and not c.abstained for c in certs) / 5
    assert certified_accuracy([], [0.0]) == {"0": 0.0}


# ---------------------------------------------------------------------------------------------
# determinism
def test_same_seed_same_certificate_whatever_the_batch_size():
    conn, _ = make()
    x = image(0.7)
    ref = certify(conn, x, sigma=SIGMA, n0=30, n=600, alpha=0.01, seed=5, batch_size=1000)
    for bs in [1, 7, 64, 256, 599]:
        got = certify(conn, x, sigma=SIGMA, n0=30, n=600, alpha=0.01, seed=5, batch_size=bs)
        assert got.counts == ref.counts and got.selection_counts == ref.selection_counts
        assert got == ref
    # through an engine, too (the engine splits further at max_batch)
    small, _ = make(max_batch=13)
    via_engine = certify(QueryEngine(small), x, sigma=SIGMA, n0=30, n=600, alpha=0.01, seed=5, batch_size=100)
    assert via_engine.counts == ref.counts and via_engine.selection_counts == ref.selection_counts
    # another seed draws other noise
    other = certify(conn, x, sigma=SIGMA, n0=30, n=600, alpha=0.01, seed=6)
    assert other.counts != ref.counts
    # the default key is the content hash: a copy of the input gets the same certificate
    assert certify(conn, x.clone(), sigma=SIGMA, n0=30, n=600, alpha=0.01, seed=5) == ref
    # an explicit key replaces it
    keyed = certify(conn, x, sigma=SIGMA, n0=30, n=600, alpha=0.01, seed=5, key="img-17")
    assert keyed.key == "img-17" and keyed.counts != ref.counts


def test_predict_is_deterministic_across_batch_sizes():
    conn, _ = make()
    ref = predict(conn, image(0.75), sigma=SIGMA, n=500, alpha=0.01, seed=2, batch_size=500)
    for bs in [1, 9, 128]:
        assert predict(conn, image(0.75), sigma=SIGMA, n=500, alpha=0.01, seed=2, batch_size=bs) == ref


def test_batches_never_exceed_batch_size():
    conn, rec = make()
    certify(conn, image(), sigma=SIGMA, n0=100, n=5000, alpha=0.001, batch_size=300, seed=0)
    assert max(rec.sizes) == 300 and sum(rec.sizes) == 5100


# ---------------------------------------------------------------------------------------------
# counting
def many_classes(b: torch.Tensor) -> torch.Tensor:
    """1000 classes, spread over all of them: a hash of the noisy pixels."""
    v = (b.flatten(1) * 65536).long()
    return (v * torch.arange(1, v.shape[1] + 1)).sum(1).remainder(1000)


def test_counts_are_exact_with_many_classes():
    conn, rec = make(many_classes, num_classes=1000)
    engine = QueryEngine(conn)
    counts = sample_counts(engine, image(), sigma=SIGMA, num=20_000, seed=0, key="k", stream="s", batch_size=777)
    labels = torch.cat(rec.labels).numpy()
    assert counts.dtype == np.int64 and counts.shape == (1000,)
    assert np.array_equal(counts, np.bincount(labels, minlength=1000))
    assert counts.sum() == 20_000 and (counts > 0).sum() > 990  # really many classes in play
    # CERTIFY's estimation counts are the bincount of exactly the estimation stream's answers
    rec.labels.clear()
    cert = certify(conn, image(), sigma=SIGMA, n0=50, n=3000, alpha=0.5, batch_size=1000, seed=0)
    sel, est = torch.cat(rec.labels[:1]).numpy(), torch.cat(rec.labels[1:]).numpy()
    assert cert.selection_counts == np.bincount(sel, minlength=1000).tolist()
    assert cert.counts == np.bincount(est, minlength=1000).tolist()
    assert cert.prediction == ABSTAIN  # 1000 near-uniform classes: nothing above 1/2
