"""Cohen et al.'s PREDICT and CERTIFY over any connector, and dataset-level certification.

The base classifier that is smoothed is ``x -> f(clip(T(x), 0, 1))`` where ``T`` is an optional
deterministic input transform (a fitted input module) and ``f`` the opaque model behind the engine;
clipping and whatever the connector does on the wire are deterministic post-processing, so the
guarantees below hold for that composed classifier.

Guarantees (Cohen, Rosenfeld, Kolter 2019), for one call, over the randomness of the noise:

* :func:`certify`: with probability >= 1 - alpha, if it returns a class c with radius R, the smoothed
  classifier returns c everywhere in the l2 ball of radius R around x. Selection (n0) and estimation
  (n) samples come from independent noise streams.
* :func:`predict`: with probability >= 1 - alpha it returns either ABSTAIN or the smoothed class.

Noise is counter-based (:mod:`blackbox_rs.noise`): the samples are a function of (seed, key, stream,
index), so reruns send identical requests and hit the query cache. The seed defaults to a fresh one
from the OS's entropy source (:func:`blackbox_rs.binding.fresh_seed`), recorded in every certificate
and journal: nobody can compute an input's noise draws in advance. Pass a seed for reproducible runs.

Every certificate records what it is bound to (:mod:`blackbox_rs.binding`): model fingerprint,
transform identity, noise mode, settings, seed, input key, label and what the label is. Dataset runs
with ``output`` refuse to resume from a journal written for anything else.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from blackbox_rs import defaults, stats
from blackbox_rs.binding import fresh_seed, noise_identity, transform_identity
from blackbox_rs.budget import chain
from blackbox_rs.certificate import ABSTAIN, Certificate, SmoothedPrediction
from blackbox_rs.connectors.base import Connector, ConnectorInfo
from blackbox_rs.engine import QueryEngine, Tally, as_engine
from blackbox_rs.errors import (
    BudgetExceeded,
    InvalidInputError,
    InvalidParameterError,
    UncertifiableError,
)
from blackbox_rs.journal import CertificateJournal
from blackbox_rs.noise import NoiseStream, input_key

__all__ = [
    "DatasetCertification",
    "certified_accuracy",
    "certify",
    "certify_dataset",
    "predict",
    "sample_counts",
    "validate_input",
]

Transform = Callable[[torch.Tensor], torch.Tensor]
C = TypeVar("C", bound=BaseModel)
DEFAULT_RADII: tuple[float, ...] = defaults.RADII


# ---------------------------------------------------------------------------------------------
# validation
def validate_input(x: object, info: ConnectorInfo) -> torch.Tensor:
    """Check one input image ``C x H x W`` (float, finite, in [0, 1], the model's shape)."""
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise InvalidInputError(f"input must be a float tensor with values in [0, 1], got dtype {x.dtype}")
    if tuple(x.shape) != tuple(info.input_shape):
        raise InvalidInputError(f"input has shape {tuple(x.shape)}, the model expects {tuple(info.input_shape)}")
    x = x.detach().to("cpu", torch.float32)
    lo, hi = (float(v) for v in torch.aminmax(x))
    if not (lo >= 0.0 and hi <= 1.0):
        if not bool(torch.isfinite(x).all()):
            raise InvalidInputError("input contains NaN or inf values")
        raise InvalidInputError(f"input values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")
    return x.contiguous()


def _positive_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < 1:
        raise InvalidParameterError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def _seed(seed: object) -> int:
    """A validated seed; ``None`` draws a fresh one from the OS's entropy source."""
    if seed is None:
        return fresh_seed()
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise InvalidParameterError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_certifiable(n: int, alpha: float, sigma: float) -> None:
    """Raise :class:`UncertifiableError` when ``n`` estimation samples at ``alpha`` can never give
    ``p_lower > 1/2`` (so every CERTIFY would abstain: locuslab/smoothing#8)."""
    need = stats.min_samples_to_certify(alpha)
    if n < need:
        raise UncertifiableError(
            f"n={n} estimation samples at alpha={alpha} can never certify: even if all agree, the "
            f"Clopper-Pearson bound is alpha**(1/n) = {alpha ** (1 / n):.4f} <= 0.5. Use n >= {need} "
            f"(n=100 reaches radius {stats.max_radius(100, sigma, alpha):.3f} at sigma={sigma})."
        )


# ---------------------------------------------------------------------------------------------
# sampling
def sample_counts(
    engine: QueryEngine,
    x: torch.Tensor,
    *,
    sigma: float,
    num: int,
    seed: int,
    key: str,
    stream: str,
    batch_size: int,
    transform: Transform | None = None,
    tally: Tally | None = None,
    start: int = 0,
    noisy_batch: Callable[[int, int], torch.Tensor] | None = None,
) -> np.ndarray:
    """Per-class counts of ``f(clip(T(x + delta_i)))`` for noise samples ``start .. start+num-1``.

    ``noisy_batch(start, count)`` replaces the default Gaussian ``x + NoiseStream(...)`` source (e.g.
    exact lattice noise); it must be counter-based too. Memory is one batch; counting uses
    ``torch.bincount`` (no per-sample Python loop).
    """
    info = engine.info
    k = info.num_classes
    if noisy_batch is None:
        noise = NoiseStream(seed=seed, key=key, stream=stream, shape=info.input_shape, sigma=sigma)

        def noisy_batch(s: int, m: int) -> torch.Tensor:
            return noise.samples(s, m).add_(x)

    counts = torch.zeros(k, dtype=torch.int64)
    done = 0
    while done < num:
        m = min(batch_size, num - done)
        batch = noisy_batch(start + done, m)
        if transform is not None:
            with torch.no_grad():
                batch = transform(batch)
        batch = batch.clamp_(0.0, 1.0) if not batch.requires_grad else batch.detach().clamp(0.0, 1.0)
        pred = engine.query(batch, tally=tally)
        counts += torch.bincount(pred.labels, minlength=k)
        done += m
    return counts.numpy()


def _prepare(
    connector: Connector | QueryEngine, x: object, sigma: float, alpha: float, batch_size: int | None,
    seed: int | None, key: str | None,
) -> tuple[QueryEngine, torch.Tensor, float, float, int, int, str]:
    engine = as_engine(connector)
    sigma = stats.check_sigma(sigma)
    alpha = stats.check_alpha(alpha)
    seed = _seed(seed)
    bs = engine.info.max_batch if batch_size is None else _positive_int("batch_size", batch_size)
    xt = validate_input(x, engine.info)
    return engine, xt, sigma, alpha, bs, seed, (key if key is not None else input_key(xt))


# ---------------------------------------------------------------------------------------------
# PREDICT / CERTIFY
def predict(
    connector: Connector | QueryEngine,
    x: torch.Tensor,
    *,
    sigma: float,
    n: int,
    alpha: float = defaults.ALPHA,
    batch_size: int | None = None,
    seed: int | None = None,
    key: str | None = None,
    label: int | None = None,
    transform: Transform | None = None,
) -> SmoothedPrediction:
    """Cohen's PREDICT: the top class of n noisy samples if a two-sided binomial test of the top two
    counts rejects p = 1/2 at level alpha, else ABSTAIN. With probability >= 1 - alpha the answer is
    ABSTAIN or the smoothed classifier's class."""
    n = _positive_int("n", n)
    engine, xt, sigma, alpha, bs, seed, key = _prepare(connector, x, sigma, alpha, batch_size, seed, key)
    tally = Tally()
    counts = sample_counts(engine, xt, sigma=sigma, num=n, seed=seed, key=key, stream="predict",
                           batch_size=bs, transform=transform, tally=tally)
    order = np.argsort(-counts, kind="stable")
    n_a, n_b = int(counts[order[0]]), int(counts[order[1]])
    p_value = stats.abstain_test_pvalue(n_a, n_b)
    return SmoothedPrediction(
        prediction=int(order[0]) if p_value <= alpha else ABSTAIN, counts=counts.tolist(), n=n,
        alpha=alpha, sigma=sigma, seed=seed, key=key, fingerprint=engine.info.fingerprint,
        queries=tally.queries, cache_hits=tally.cache_hits, label=label, p_value=p_value,
        **record_binding(engine, transform, label=label),
    )


def certify(
    connector: Connector | QueryEngine,
    x: torch.Tensor,
    *,
    sigma: float,
    n0: int = defaults.N0,
    n: int = defaults.N,
    alpha: float = defaults.ALPHA,
    batch_size: int | None = None,
    seed: int | None = None,
    key: str | None = None,
    label: int | None = None,
    index: int | None = None,
    transform: Transform | None = None,
    reference: str | None = None,
) -> Certificate:
    """Cohen's CERTIFY: select the top class from n0 noisy samples, bound its probability from n
    fresh samples with a one-sided (1 - alpha) Clopper-Pearson bound, and certify radius
    ``sigma * Phi^-1(p_lower)`` if ``p_lower > 1/2`` (else ABSTAIN).

    ``seed=None`` draws a fresh seed (recorded in the certificate). ``reference`` says what
    ``label`` is (default: ``"labels"`` when a label is given).

    Raises :class:`UncertifiableError` before any query when (n, alpha) can never certify, and
    :class:`BudgetExceeded` before any query when the budget's limit is below n0 + n.
    """
    n0 = _positive_int("n0", n0)
    n = _positive_int("n", n)
    engine, xt, sigma, alpha, bs, seed, key = _prepare(connector, x, sigma, alpha, batch_size, seed, key)
    check_certifiable(n, alpha, sigma)
    check_budget_limit(engine, n0 + n, "n0 + n")
    tally = Tally()
    sel = sample_counts(engine, xt, sigma=sigma, num=n0, seed=seed, key=key, stream="selection",
                        batch_size=bs, transform=transform, tally=tally)
    c_hat = int(np.argmax(sel))  # ties: lowest index (deterministic)
    est = sample_counts(engine, xt, sigma=sigma, num=n, seed=seed, key=key, stream="estimation",
                        batch_size=bs, transform=transform, tally=tally)
    n_a = int(est[c_hat])
    p_lower = float(stats.cp_lower(n_a, n, alpha))
    certified = p_lower > 0.5
    return Certificate(
        prediction=c_hat if certified else ABSTAIN,
        radius=stats.radius(p_lower, sigma) if certified else 0.0,
        p_lower=p_lower, counts=est.tolist(), selection_counts=sel.tolist(), n0=n0, n=n, alpha=alpha,
        sigma=sigma, seed=seed, key=key, fingerprint=engine.info.fingerprint, queries=tally.queries,
        cache_hits=tally.cache_hits, label=label, index=index,
        **record_binding(engine, transform, label=label, reference=reference),
    )


def record_binding(engine: QueryEngine, transform: Transform | None, *, label: int | None = None,
                   reference: str | None = None, lattice: bool = False) -> dict[str, Any]:
    """The binding fields every record carries (see :mod:`blackbox_rs.binding`)."""
    return {
        "transform": transform_identity(transform),
        "noise": noise_identity(lattice),
        "other_index": engine.info.other_index,
        "reference": reference if reference is not None else ("labels" if label is not None else None),
    }


def check_budget_limit(engine: QueryEngine, needed: int, what: str = "") -> None:
    """Raise :class:`BudgetExceeded` before any query when the limits of the engine's budget (and of
    every budget above it) allow fewer than ``needed`` queries in total: one certificate could never
    finish. ``what`` spells out how ``needed`` is made up (e.g. "1 clean + n0 + n")."""
    cap: int | None = None
    for b in (chain(engine.budget) if engine.budget is not None else []):
        for c in (b.max_queries,
                  math.floor(b.max_cost / engine.info.cost_per_query + 1e-9)
                  if b.max_cost is not None and engine.info.cost_per_query > 0 else None):
            if c is not None:
                cap = c if cap is None else min(cap, c)
    if cap is not None and cap < needed:
        how = f"{what} = " if what else ""
        raise BudgetExceeded(
            f"the budget allows at most {cap} queries in total, but one certificate needs {how}{needed}; "
            "nothing was sent: raise the budget"
        )


# ---------------------------------------------------------------------------------------------
# datasets
REFERENCE_TEXT = {
    "labels": "certified accuracy: agreement with the ground-truth labels",
    "clean_prediction": "certified consistency: agreement with the bare model's own label on the clean input "
                        "(no module)",
}
"""What each ``reference`` means, as every report states it."""


class DatasetCertification(BaseModel):
    """Certificates for a dataset and certified accuracy at the requested radii.

    ``reference`` says what "accuracy" means (:data:`REFERENCE_TEXT`): ``"labels"`` (agreement with
    ground truth) or ``"clean_prediction"`` (certified consistency with the bare model's own clean
    prediction, without any module). A certificate for the catch-all class ``other`` never counts as
    correct; ``certified_other`` is its own column: the fraction of inputs certified as ``other``.
    """

    model_config = ConfigDict(extra="forbid")

    certificates: list[Certificate]
    radii: list[float]
    certified_accuracy: dict[str, float]
    reference: str
    queries: int
    cache_hits: int
    cost: float
    certified_other: dict[str, float] | None = None


class _Certified(Protocol):
    @property
    def correct(self) -> bool | None: ...
    @property
    def is_other(self) -> bool: ...
    def certified_at(self, r: float) -> bool: ...


def certified_accuracy(certificates: Sequence[_Certified], radii: Sequence[float]) -> dict[str, float]:
    """Fraction of certificates that are correct and certified at radius >= r, for each r (keys:
    ``f"{r:g}"``), for any certificate type (via its ``certified_at``). ``other`` is never correct."""
    total = len(certificates)
    return {f"{float(r):g}": (sum(1 for c in certificates if c.correct and c.certified_at(float(r))) / total
                              if total else 0.0) for r in radii}


def certified_other(certificates: Sequence[_Certified], radii: Sequence[float]) -> dict[str, float] | None:
    """Fraction of certificates certified as the catch-all class at radius >= r (None when the
    model has no catch-all class)."""
    if not any(getattr(c, "other_index", None) is not None for c in certificates):
        return None
    total = len(certificates)
    return {f"{float(r):g}": sum(1 for c in certificates if c.is_other and c.certified_at(float(r))) / total
            for r in radii}


def _label(y: Any) -> int | None:
    """A label as int; a non-integral value (0.7, "cat") is an error, never truncated."""
    if y is None:
        return None
    if isinstance(y, torch.Tensor):
        y = y.item() if y.numel() == 1 else y.tolist()
    if isinstance(y, bool) or not isinstance(y, (int, float, np.integer, np.floating)) or float(y) != int(y):
        raise InvalidInputError(f"labels must be integers, got {y!r}")
    return int(y)


def _iter_items(inputs: Any, labels: Any) -> Iterable[tuple[torch.Tensor, int | None]]:
    if isinstance(inputs, torch.Tensor):
        if inputs.ndim != 4:
            raise InvalidInputError(f"a tensor of inputs must be N x C x H x W, got shape {tuple(inputs.shape)}")
        items: Iterable[Any] = iter(inputs)
    else:
        items = iter(inputs)
    label_iter = None if labels is None else iter(labels)
    for item in items:
        if isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise InvalidInputError(f"dataset items must be x or (x, y), got a sequence of length {len(item)}")
            x, y = item
        else:
            x, y = item, None
        if label_iter is not None:
            try:
                y = next(label_iter)
            except StopIteration:
                raise InvalidInputError("fewer labels than inputs") from None
        yield x, _label(y)


def bare_clean_label(engine: QueryEngine, xt: torch.Tensor, tally: Tally) -> int:
    """The bare model's label on the clean input (no module): the reference of certified consistency.
    One query through the engine (cached, budgeted, counted in ``tally``)."""
    return int(engine.query(xt.unsqueeze(0), tally=tally).labels[0])


def certify_each(
    engine: QueryEngine,
    inputs: Any,
    labels: Sequence[int] | None,
    certify_one: Callable[[int, torch.Tensor, int | None, str], C],
    *,
    journal: CertificateJournal[C] | None = None,
    progress: Callable[[int, C], None] | None = None,
) -> tuple[list[C], str, Tally]:
    """The dataset loop shared by every certification method: validates labels, skips inputs the
    journal has finished (after checking that each finished record is for this input: its key,
    label and reference), calls ``certify_one(index, x, label, key)`` on the rest, journals each
    result and totals its queries. Returns the certificates, the reference ("labels" or
    "clean_prediction") and the queries charged in this call."""
    if isinstance(inputs, Iterator):  # a one-shot iterable: keep it for the two passes
        inputs = list(inputs)
    reference = _validate_all(engine, inputs, labels)
    certs: list[C] = []
    total = Tally()
    finished = journal.finished if journal is not None else {}
    for idx, (x, y) in enumerate(_iter_items(inputs, labels)):
        xt = validate_input(x, engine.info)
        key = input_key(xt)
        if idx in finished:
            cert = finished[idx]
            expected: dict[str, Any] = {"key": key, "reference": reference}
            if y is not None:
                expected["label"] = y
            journal.check_record(cert, expected)  # type: ignore[union-attr]
        else:
            cert = certify_one(idx, xt, y, key)
            q, hits = int(getattr(cert, "queries", 0)), int(getattr(cert, "cache_hits", 0))
            total.add(Tally(queries=q, cache_hits=hits, cost=q * engine.info.cost_per_query))
            if journal is not None:
                journal.append(cert)
        certs.append(cert)
        if progress is not None:
            progress(idx, cert)
    if not certs:
        warnings.warn("no inputs to certify", stacklevel=3)
    return certs, reference, total


def _validate_all(engine: QueryEngine, inputs: Any, labels: Any) -> str:
    """Check every input and label before the first query (a NaN in image 900 must not be found after
    899 images were paid for); returns the reference ("labels" or "clean_prediction")."""
    reference: str | None = "labels" if labels is not None else None
    k = engine.info.num_classes
    n = 0
    for idx, (x, y) in enumerate(_iter_items(inputs, labels)):
        n += 1
        if reference is None:
            reference = "labels" if y is not None else "clean_prediction"
        elif (reference == "labels") != (y is not None):
            raise InvalidInputError(f"input {idx}: either every input has a label or none does")
        if y is not None and not (0 <= y < k):
            raise InvalidInputError(f"input {idx}: label {y} outside the model's classes [0, {k})")
        try:
            validate_input(x, engine.info)
        except InvalidInputError as exc:
            raise InvalidInputError(f"input {idx}: {exc} (nothing was sent)") from None
    if labels is not None:
        try:
            extra = len(labels) - n  # type: ignore[arg-type]
        except TypeError:
            extra = 0
        if extra > 0:
            raise InvalidInputError(f"{n + extra} labels for {n} inputs")
    return reference or "labels"


def open_journal(output: str | os.PathLike[str] | None, model: type[C], engine: QueryEngine,
                 params: dict[str, Any], seed: int | None) -> tuple[CertificateJournal[C] | None, int]:
    """The journal for ``output`` (None without one) and the seed to use: the given one, the
    journal's when resuming with ``seed=None``, or a fresh one. A journal whose records carry an
    observed model version makes the connector expect it (a model swapped behind the endpoint is
    then a typed error, not a silent mix)."""
    if output is None:
        return None, _seed(seed)
    journal = CertificateJournal(output, model, params, seed=None if seed is None else _seed(seed))
    expect = getattr(engine.connector, "expect_model_version", None)
    versions = {getattr(c, "model_version", None) for c in journal.finished.values()} - {None}
    if callable(expect) and len(versions) == 1:
        expect(versions.pop())
    return journal, journal.seed


def certify_dataset(
    connector: Connector | QueryEngine,
    inputs: Any,
    labels: Sequence[int] | None = None,
    *,
    sigma: float,
    n0: int = defaults.N0,
    n: int = defaults.N,
    alpha: float = defaults.ALPHA,
    batch_size: int | None = None,
    seed: int | None = None,
    radii: Sequence[float] = DEFAULT_RADII,
    output: str | os.PathLike[str] | None = None,
    transform: Transform | None = None,
    progress: Callable[[int, Certificate], None] | None = None,
) -> DatasetCertification:
    """CERTIFY every input of ``inputs`` (an ``N x C x H x W`` tensor, an iterable of images, or of
    ``(image, label)`` pairs such as a torch Dataset).

    Without labels, each input's reference is the bare model's clean prediction f(x), without the
    transform (one extra query per input, through the engine), and the accuracy reported is certified
    *consistency*. A certificate for the catch-all class ``other`` is never counted as correct.

    ``seed=None`` (default) draws a fresh seed from the OS's entropy source, or reads back the seed of
    the journal it resumes; every certificate records it.

    With ``output``, the journal's header is written first, then each certificate as one JSONL line
    as soon as it is final (flushed and fsynced). A rerun with the same arguments skips finished inputs
    and regenerates identical noise for the rest, so with a query cache it repeats no answered query;
    a rerun with another model, transform, dataset, labels, noise mode or setting raises
    :class:`ResumeMismatchError` before any query. :class:`BudgetExceeded` is raised before any query
    when the budget's limit cannot pay one certificate, and otherwise propagates after the finished
    certificates are written.
    """
    engine = as_engine(connector)
    n0 = _positive_int("n0", n0)
    n = _positive_int("n", n)
    sigma = stats.check_sigma(sigma)
    alpha = stats.check_alpha(alpha)
    check_certifiable(n, alpha, sigma)
    radii = [float(r) for r in radii]
    if any(r < 0 or not math.isfinite(r) for r in radii):
        raise InvalidParameterError(f"radii must be finite and >= 0, got {radii}")
    if batch_size is not None:
        _positive_int("batch_size", batch_size)
    check_budget_limit(engine, n0 + n, "n0 + n")
    params = {"n0": n0, "n": n, "alpha": alpha, "sigma": sigma, "fingerprint": engine.info.fingerprint,
              "transform": transform_identity(transform, require=output is not None),
              "noise": noise_identity(), "other_index": engine.info.other_index, "method": "cohen_certify"}
    journal, seed = open_journal(output, Certificate, engine, params, seed)

    def one(idx: int, xt: torch.Tensor, y: int | None, key: str) -> Certificate:
        t = Tally()
        reference = "labels" if y is not None else "clean_prediction"
        if y is None:  # certified consistency: the reference is the bare model's own clean prediction
            check_budget_limit(engine, 1 + n0 + n, "1 clean query + n0 + n")  # still before any query
            y = bare_clean_label(engine, xt, t)
        cert = certify(engine, xt, sigma=sigma, n0=n0, n=n, alpha=alpha, batch_size=batch_size, seed=seed,
                       key=key, label=y, index=idx, transform=transform, reference=reference)
        update: dict[str, Any] = {"model_version": _observed_version(engine)}
        if t.requests or t.cache_hits:  # the clean query belongs to this certificate's cost
            update.update(queries=cert.queries + t.queries, cache_hits=cert.cache_hits + t.cache_hits)
        return cert.model_copy(update=update)

    try:
        certs, reference, total = certify_each(engine, inputs, labels, one, journal=journal, progress=progress)
    finally:
        if journal is not None:
            journal.close()
    return DatasetCertification(
        certificates=certs, radii=radii, certified_accuracy=certified_accuracy(certs, radii),
        reference=reference, queries=total.queries, cache_hits=total.cache_hits, cost=total.cost,
        certified_other=certified_other(certs, radii),
    )


def _observed_version(engine: QueryEngine) -> str | None:
    v = getattr(engine.connector, "observed_model_version", None)
    return v if isinstance(v, str) and v else None
