"""Certification of a dataset: one loop for every method, one result type, one accuracy function.

:func:`certify_each` is the loop shared by Cohen's CERTIFY (:func:`certify_dataset`) and sequential
certification (:func:`blackbox_rs.certify_sequential.certify_radius_dataset`): it validates the whole
dataset before the first query, skips inputs a journal has finished (after checking each finished
record is for this input: key, label, reference), journals each new certificate as soon as it is final,
and totals what was charged.

Query counts after a resume (the three figures agree): each certificate's ``queries`` is what the run
that finished it was charged for it, ``queries_total`` adds what interrupted runs recorded in the
journal for that input (:mod:`blackbox_rs.journal`: a run that stops in the middle of an input writes
a progress record with that input's charged queries, taken from the engine's counters, so the
dataset loop must be the engine's only user while it runs). :class:`DatasetResult` states
``queries`` (charged by this call) and ``queries_total`` (the sum of the certificates' totals: every
run on this journal). A progress bar shows budget left from the budget's own (persisted) ledger
(:class:`blackbox_rs.progress.ProgressBar`) and its ETA counts only the inputs left to do
(:class:`blackbox_rs.progress.DatasetProgress`).

Class names: every certificate gets ``prediction_name`` and ``label_name`` from the connector's
``class_names`` (:func:`blackbox_rs.certificate.with_names`; None without names), records read from
an older journal included. They are descriptive: not part of the resume check. Accuracy counts a certificate as correct only when it is not the catch-all
class ``other`` (:func:`certified_accuracy`, via each record's ``certified_at``); ``other`` has its own
column (:func:`certified_other`). Without labels the reference is the bare model's clean label f(x).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from pydantic import BaseModel

from blackbox_rs import defaults, stats
from blackbox_rs.binding import identified, transform_identity
from blackbox_rs.certificate import Certificate, with_names
from blackbox_rs.connectors.base import Connector
from blackbox_rs.core import (
    Transform,
    certify,
    check_budget_limit,
    check_certifiable,
    noise_mode,
    positive_int,
    resolve_seed,
    validate_input,
)
from blackbox_rs.dataset_result import (
    REFERENCE_TEXT,
    DatasetCertification,
    DatasetResult,
    certified_accuracy,
    certified_other,
    total_queries,
)
from blackbox_rs.engine import QueryEngine, Tally, as_engine
from blackbox_rs.errors import CacheError, InvalidInputError, InvalidParameterError, ResumeMismatchError
from blackbox_rs.journal import CertificateJournal
from blackbox_rs.noise import input_key

__all__ = [
    "DEFAULT_RADII",
    "REFERENCE_TEXT",
    "DatasetCertification",
    "DatasetResult",
    "bare_clean_label",
    "certified_accuracy",
    "certified_other",
    "certify_dataset",
    "certify_each",
    "observed_version",
    "open_journal",
    "run_dataset",
    "total_queries",
    "validate_dataset",
]

C = TypeVar("C", bound=BaseModel)
DEFAULT_RADII: tuple[float, ...] = defaults.RADII

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
    executor: Any = None,
    job: dict[str, Any] | None = None,
) -> tuple[list[C], str, Tally]:
    """The dataset loop shared by every certification method: validates labels, skips inputs the
    journal has finished (after checking that each finished record is for this input: its key,
    label and reference), calls ``certify_one(index, x, label, key)`` on the rest, journals each
    result and totals its queries. Returns the certificates, the reference ("labels" or
    "clean_prediction") and the queries charged in this call.

    Every certificate gets its class names (:func:`~blackbox_rs.certificate.with_names`). A new one
    gets ``queries_total`` = its ``queries`` + what the journal's progress records say earlier runs
    were charged for that input. When ``certify_one`` raises (budget spent, service error, Ctrl-C),
    the journal first records what this input was charged so far (the engine's counters over the
    call), then the exception propagates unchanged. ``progress(index, cert)`` is called for every
    certificate in order; a callback with a ``resumed(index, cert)`` method gets the certificates
    read from the journal there instead (no work this run: :class:`blackbox_rs.progress.DatasetProgress`).

    With an ``executor`` (:mod:`blackbox_rs.distributed`) other processes certify the unfinished
    inputs from ``job`` (the method, its settings and seed); every finished record is checked first
    (a mismatch is raised before any query), and results are journaled here, in input order."""
    inputs, reference = validate_dataset(engine, inputs, labels)
    certs: list[C] = []
    total = Tally()
    finished = journal.finished if journal is not None else {}
    remote = None
    if executor is not None:  # workers certify the unfinished inputs; this loop journals them in order
        remote = executor.certifier(engine, job, _unfinished(engine, inputs, labels, journal, reference), journal)
        certify_one = remote if remote is not None else certify_one
    names = engine.info.class_names
    resumed = getattr(progress, "resumed", None)
    for idx, (x, y) in enumerate(_iter_items(inputs, labels)):
        xt = validate_input(x, engine.info)
        key = input_key(xt)
        if idx in finished:
            cert = finished[idx]
            expected: dict[str, Any] = {"key": key, "reference": reference}
            if y is not None:
                expected["label"] = y
            journal.check_record(cert, expected)  # type: ignore[union-attr]
            if hasattr(cert, "prediction_name"):
                cert = with_names(cert, names)  # descriptive: an older record gets them too (not rewritten)
        else:
            prior = journal.charged_before(idx, key) if journal is not None else (0, 0)
            before = (engine.stats.queries, engine.stats.cache_hits)
            try:
                cert = certify_one(idx, xt, y, key)
            except BaseException:
                if journal is not None:
                    _note_unfinished(journal, idx, key, engine, before)
                raise
            update: dict[str, Any] = {}
            # recorded for the resume check (open_journal pins it); a worker's certificate carries the
            # version that worker observed (pinned to the journal's, see blackbox_rs.distributed.worker)
            version = observed_version(engine) if remote is None else None
            if version is not None:
                update["model_version"] = version
            q, hits = int(getattr(cert, "queries", 0)), int(getattr(cert, "cache_hits", 0))
            if hasattr(cert, "queries_total"):
                update["queries_total"] = q + prior[0]
            if update:
                cert = cert.model_copy(update=update)
            if hasattr(cert, "prediction_name"):
                cert = with_names(cert, names)
            total.add(Tally(queries=q, cache_hits=hits, cost=q * engine.info.cost_per_query))
            if journal is not None:
                journal.append(cert)
        certs.append(cert)
        if progress is not None:
            (resumed if idx in finished and callable(resumed) else progress)(idx, cert)
    if not certs:
        warnings.warn("no inputs to certify", stacklevel=3)
    return certs, reference, total


def _unfinished(engine: QueryEngine, inputs: Any, labels: Any, journal: CertificateJournal[Any] | None,
                reference: str) -> Iterator[tuple[int, torch.Tensor, int | None, str]]:
    """``(index, x, label, key)`` of every input the journal has not finished, after checking every
    finished record as :func:`certify_each` does (so a mismatch is raised before anything is sent)."""
    finished = journal.finished if journal is not None else {}
    for idx, (x, y) in enumerate(_iter_items(inputs, labels)):
        if idx in finished:
            expected: dict[str, Any] = {"key": input_key(validate_input(x, engine.info)), "reference": reference}
            if y is not None:
                expected["label"] = y
            journal.check_record(finished[idx], expected)  # type: ignore[union-attr]

    def todo() -> Iterator[tuple[int, torch.Tensor, int | None, str]]:
        for idx, (x, y) in enumerate(_iter_items(inputs, labels)):
            if idx not in finished:
                xt = validate_input(x, engine.info)
                yield idx, xt, y, input_key(xt)

    return todo()


def _note_unfinished(journal: CertificateJournal[Any], idx: int, key: str, engine: QueryEngine,
                     before: tuple[int, int]) -> None:
    """Record what input ``idx`` was charged before the run stopped; a failure to write warns and
    never replaces the exception that stopped the run."""
    try:
        journal.note_unfinished(idx, key, engine.stats.queries - before[0], engine.stats.cache_hits - before[1])
    except CacheError as exc:
        warnings.warn(f"the queries charged for unfinished input {idx} could not be recorded: {exc}", stacklevel=3)


def validate_dataset(engine: QueryEngine, inputs: Any, labels: Any) -> tuple[Any, str]:
    """Check every input and label before the first query and before any file is written (a NaN in
    image 900 must not be found after 899 images were paid for). Returns the inputs (a one-shot
    iterator is materialised, so it can be read again) and the reference ("labels" or
    "clean_prediction"). Validated inputs are marked, so a second call is free."""
    if isinstance(inputs, _Validated):
        return inputs, inputs.reference
    if isinstance(inputs, Iterator):
        inputs = list(inputs)
    reference = _check_all(engine, inputs, labels)
    return _Validated(inputs, reference), reference


class _Validated:
    """Inputs that :func:`validate_dataset` checked (iterates like the original)."""

    def __init__(self, inputs: Any, reference: str) -> None:
        self.inputs, self.reference = inputs, reference

    def __iter__(self) -> Iterator[Any]:
        return iter(self.inputs)


def _check_all(engine: QueryEngine, inputs: Any, labels: Any) -> str:
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
        return None, resolve_seed(seed)
    journal = CertificateJournal(output, model, params, seed=None if seed is None else resolve_seed(seed))
    expect = getattr(engine.connector, "expect_model_version", None)
    versions = {getattr(c, "model_version", None) for c in journal.finished.values()} - {None}
    if len(versions) > 1:
        journal.close()
        raise ResumeMismatchError(f"output {output} already mixes certificates of model versions "
                                  f"{sorted(versions)}; certify each version into its own output")
    if callable(expect) and versions:
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
    executor: Any = None,
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

    ``executor`` (e.g. :class:`blackbox_rs.distributed.RayExecutor`): the unfinished inputs are
    certified by its workers with the same per-input function and seeds (so the same certificates),
    against one budget; the journal stays here (see ``docs/distributed.md``).
    """
    engine = as_engine(connector)
    n0 = positive_int("n0", n0)
    n = positive_int("n", n)
    sigma = stats.check_sigma(sigma)
    alpha = stats.check_alpha(alpha)
    check_certifiable(n, alpha, sigma)
    radii = [float(r) for r in radii]
    if any(r < 0 or not math.isfinite(r) for r in radii):
        raise InvalidParameterError(f"radii must be finite and >= 0, got {radii}")
    if batch_size is not None:
        positive_int("batch_size", batch_size)
    check_budget_limit(engine, n0 + n, "n0 + n")
    transform = identified(transform, require=output is not None)  # hashed once, not per input
    params = {"n0": n0, "n": n, "alpha": alpha, "sigma": sigma, "fingerprint": engine.info.fingerprint,
              "transform": transform_identity(transform),
              "noise": noise_mode(engine), "other_index": engine.info.other_index,
              "method": "cohen_certify"}
    settings = {"sigma": sigma, "n0": n0, "n": n, "alpha": alpha, "batch_size": batch_size}
    make_one = cohen_maker(engine, transform, **settings)
    certs, summary = run_dataset(engine, inputs, labels, Certificate, params, output=output, seed=seed,
                                 radii=radii, make_one=make_one, progress=progress, executor=executor,
                                 job={"method": "cohen_certify", "settings": settings})
    return DatasetCertification(certificates=certs, **summary)


def cohen_maker(engine: QueryEngine, transform: Transform | None, *, sigma: float, n0: int, n: int, alpha: float,
                batch_size: int | None) -> Callable[[int], Callable[[int, torch.Tensor, int | None, str], Certificate]]:
    """The per-input function of :func:`certify_dataset` (``make_one(seed)(index, x, label, key)``),
    the same in-process and on a worker (:mod:`blackbox_rs.distributed`)."""
    def make_one(seed: int) -> Callable[[int, torch.Tensor, int | None, str], Certificate]:
        return lambda idx, xt, y, key: one(idx, xt, y, key, seed)

    def one(idx: int, xt: torch.Tensor, y: int | None, key: str, seed: int) -> Certificate:
        t = Tally()
        reference = "labels" if y is not None else "clean_prediction"
        if y is None:  # certified consistency: the reference is the bare model's own clean prediction
            check_budget_limit(engine, 1 + n0 + n, "1 clean query + n0 + n")  # still before any query
            y = bare_clean_label(engine, xt, t)
        cert = certify(engine, xt, sigma=sigma, n0=n0, n=n, alpha=alpha, batch_size=batch_size, seed=seed,
                       key=key, label=y, index=idx, transform=transform, reference=reference)
        if t.requests or t.cache_hits:  # the clean query belongs to this certificate's cost
            cert = cert.model_copy(update={"queries": cert.queries + t.queries,
                                           "cache_hits": cert.cache_hits + t.cache_hits})
        return cert

    return make_one


def run_dataset(engine: QueryEngine, inputs: Any, labels: Sequence[int] | None, model: type[C],
                params: dict[str, Any], *, output: str | os.PathLike[str] | None, seed: int | None,
                radii: Sequence[float], make_one: Callable[[int], Callable[[int, torch.Tensor, int | None, str], C]],
                progress: Callable[[int, C], None] | None, executor: Any = None,
                job: dict[str, Any] | None = None) -> tuple[list[C], dict[str, Any]]:
    """What every dataset method does around its per-input certificate: validate the whole dataset
    (before the journal is created), open the journal (resolving the seed), run :func:`certify_each`
    with ``make_one(seed)``, close the journal, and summarise. Returns the certificates and the
    :class:`DatasetResult` fields. With an ``executor`` its workers get ``job`` with the seed and
    ``params`` added (they check the model and transform against them)."""
    inputs, _ = validate_dataset(engine, inputs, labels)
    journal, run_seed = open_journal(output, model, engine, params, seed)
    if executor is not None:  # workers pin their connector to the model version the journal is bound to
        job = {**(job or {}), "seed": run_seed, "params": params, "model_version": observed_version(engine)}
    try:
        certs, reference, total = certify_each(engine, inputs, labels, make_one(run_seed), journal=journal,
                                               progress=progress, executor=executor, job=job)
    finally:
        if executor is not None:
            executor.finish()
        if journal is not None:
            journal.close()
    return certs, {"radii": [float(r) for r in radii], "certified_accuracy": certified_accuracy(certs, radii),
                   "reference": reference, "queries": total.queries, "cache_hits": total.cache_hits,
                   "cost": total.cost, "certified_other": certified_other(certs, radii),
                   "queries_total": total_queries(certs)}


def observed_version(engine: QueryEngine) -> str | None:
    v = getattr(engine.connector, "observed_model_version", None)
    return v if isinstance(v, str) and v else None
