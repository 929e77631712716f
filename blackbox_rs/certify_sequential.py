"""Certify at target radii with near-minimal queries: anytime-valid sequential certification.

:func:`certify_radius` decides "certified at r" / "not certifiable at r" for one input as early as the
evidence allows, for one radius or the largest of a list, and stops at a per-input query cap with
"undecided". Statistics (schedule of looks, alpha spending, guarantee): :mod:`blackbox_rs.sequential`.

Queries, in order, all through the :class:`~blackbox_rs.engine.QueryEngine`:

1. one clean query ``f(clip(T(x)))`` (tie-breaker for the candidate, and the dataset reference);
2. ``n0`` selection samples, noise stream ``"seq-selection"``: candidate ``c`` = their majority class
   (ties: the clean prediction, then the lowest index);
3. estimation samples from stream ``"seq-estimation"``, drawn look by look with
   ``sample_counts(..., start=...)`` in batches of ``batch_size`` aligned to the look boundaries, so a
   rerun sends byte-identical requests and a resumed run is answered by the query cache.

Selection and estimation use independent noise streams, so ``c`` is independent of the estimation
samples and the guarantee of :mod:`blackbox_rs.sequential` applies: with probability >= 1 - alpha
every radius reported certified is correct. With all samples agreeing, radius r costs
``1 + n0 + n_min(r, sigma, alpha / 2)`` queries (about ``1.1 n_min + 11`` at alpha = 0.001).

``lattice=True`` (sound mode for 8-bit inputs): the noise is an exact discrete Gaussian on the 1/255
lattice (:mod:`blackbox_rs.noise_lattice`), so every noisy input is an exact lattice point. It costs
CPU time for sampling (about 1 s per million noise elements), not queries.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from blackbox_rs import defaults, stats
from blackbox_rs.binding import identified, noise_identity, transform_identity
from blackbox_rs.certificate import ABSTAIN, SequentialCertificate, class_name
from blackbox_rs.connectors.base import Connector
from blackbox_rs.core import (
    Transform,
    check_budget_limit,
    noise_device,
    noise_mode,
    positive_int,
    prepare,
    record_binding,
    run_transform,
    sample_counts,
)
from blackbox_rs.dataset import (
    DatasetResult,
    bare_clean_label,
    certified_accuracy,
    run_dataset,
)
from blackbox_rs.engine import QueryEngine, Tally, as_engine
from blackbox_rs.errors import InvalidParameterError
from blackbox_rs.noise_lattice import LatticeNoiseStream, to_lattice
from blackbox_rs.sequential import LookSchedule, SequentialTest, check_radii

__all__ = [
    "SequentialDatasetCertification",
    "certify_radius",
    "certify_radius_dataset",
    "sequential_certified_accuracy",
]

SELECTION_STREAM = "seq-selection"
ESTIMATION_STREAM = "seq-estimation"


def _check_cap(max_queries: object, n0: int) -> int:
    cap = positive_int("max_queries", max_queries)
    if cap <= n0 + 1:
        raise InvalidParameterError(
            f"max_queries={cap} leaves no estimation samples after 1 clean query and n0={n0} selection samples"
        )
    return cap


def certify_radius(
    connector: Connector | QueryEngine,
    x: torch.Tensor,
    *,
    radius: float | Sequence[float],
    sigma: float,
    alpha: float = defaults.ALPHA,
    n0: int = defaults.SEQ_N0,
    max_queries: int = defaults.SEQ_MAX_QUERIES,
    batch_size: int | None = None,
    seed: int | None = None,
    key: str | None = None,
    label: int | None = None,
    index: int | None = None,
    transform: Transform | None = None,
    reference: str | None = None,
    lattice: bool = False,
    growth: float = 1.5,
    target_share: float = 0.5,
    futility: float | None = defaults.FUTILITY,
) -> SequentialCertificate:
    """Decide, with as few queries as the evidence allows, whether ``x`` is certified at ``radius``
    (or which is the largest certified radius of a list).

    Args:
        radius: target radius or list of radii (each > 0).
        max_queries: per-input cap on queries (1 clean + n0 selection + estimation); at the cap the
            open radii are "undecided".
        n0: selection samples for the candidate class.
        lattice: exact discrete Gaussian noise on the 1/255 lattice (``x`` must be an 8-bit image).
        growth, target_share: schedule knobs (see :meth:`LookSchedule.for_radii`).
        futility: give up (undecided, no claim) when the (1 - futility) upper bound on p says the cap
            cannot certify the smallest open radius (:meth:`SequentialTest.improbable`); None: never.
        seed: noise seed; ``None`` draws a fresh one from the OS's entropy source (recorded).
        reference: what ``label`` is (default ``"labels"`` when a label is given).

    Guarantee: with probability >= 1 - alpha, every radius marked certified is a true certificate of
    the smoothed classifier of ``x -> f(clip(T(x)))`` (see :mod:`blackbox_rs.sequential`).

    Raises, before any query: :class:`InvalidParameterError` for a radius <= 0 or bad settings;
    :class:`UncertifiableError` when a radius cannot be certified within ``max_queries`` even if every
    sample agrees (the message gives n_min); :class:`BudgetExceeded` when the engine's budget cannot
    pay even the cheapest certificate.
    """
    radii = check_radii(radius)
    n0 = positive_int("n0", n0)
    cap = _check_cap(max_queries, n0)
    engine, xt, sigma, alpha, bs, seed, key = prepare(connector, x, sigma, alpha, batch_size, seed, key)
    schedule = LookSchedule.for_radii(radii, sigma, alpha, cap - 1 - n0, target_share=target_share,
                                      growth=growth)
    u = to_lattice(xt) if lattice else None
    lat_sel = lat_est = None
    if u is not None:
        shape = engine.info.input_shape
        lat_sel = LatticeNoiseStream(seed=seed, key=key, stream=SELECTION_STREAM, shape=shape, sigma=sigma)
        lat_est = LatticeNoiseStream(seed=seed, key=key, stream=ESTIMATION_STREAM, shape=shape, sigma=sigma)
    check_budget_limit(engine, 1 + n0 + schedule.sizes[0], "1 clean + n0 + the first look")
    tally = Tally()

    def counts(stream: str, start: int, num: int) -> np.ndarray:
        source = None
        if u is not None:
            noise = lat_sel if stream == SELECTION_STREAM else lat_est
            assert noise is not None
            source = lambda s, m: noise.noisy(u, s, m)  # noqa: E731 - exact lattice points
        return sample_counts(engine, xt, sigma=sigma, num=num, seed=seed, key=key, stream=stream,
                             batch_size=bs, transform=transform, tally=tally, start=start, noisy_batch=source,
                             _origin_mode=noise_identity(True, "cpu") if source is not None else None)

    clean_in = xt.unsqueeze(0).to(noise_device(engine))  # where the noisy batches run, the module too
    if transform is not None:
        with torch.no_grad():
            clean_in = run_transform(transform, clean_in)
    clean = int(engine.query(clean_in.detach().clamp(0.0, 1.0), tally=tally).labels[0])
    sel = counts(SELECTION_STREAM, 0, n0)
    best = sel.max()
    tied = np.flatnonzero(sel == best)
    cand = clean if clean in tied else int(tied[0])

    test = SequentialTest(schedule, futility=futility)
    est = np.zeros(engine.info.num_classes, dtype=np.int64)
    n = 0
    while not test.done:
        target = test.next_size
        assert target is not None
        while n < target:  # batches aligned to the look boundary: deterministic requests
            m = min(bs, target - n)
            est += counts(ESTIMATION_STREAM, n, m)
            n += m
            if n < target and test.hopeless(int(est[cand]), n):
                test.stop_unreachable()
                break
        if test.done:
            break
        test.observe_look(int(est[cand]))
    res = test.result(n)
    j = res.certified_index
    certified = j >= 0
    looks_used = len(res.looks)
    names = engine.info.class_names
    return SequentialCertificate(
        prediction=cand if certified else ABSTAIN,
        prediction_name=class_name(names, cand if certified else ABSTAIN), label_name=class_name(names, label),
        counts=est.tolist(), alpha=alpha, sigma=sigma, seed=seed, key=key,
        fingerprint=engine.info.fingerprint, queries=tally.queries, cache_hits=tally.cache_hits,
        label=label, index=index,
        decision=res.decision, certified_radius=radii[j] if certified else 0.0, radii=list(radii),
        radius_status=res.status, candidate=cand, clean_prediction=clean, selection_counts=sel.tolist(),
        n0=n0, n=n, max_queries=cap, looks=res.looks, look_counts=res.look_counts,
        look_alphas=list(schedule.alphas[:looks_used]), p_lower=min(1.0, max(0.0, res.p_lower)),
        stop_reason=res.stop_reason, lattice=bool(lattice), growth=float(growth),
        target_share=float(target_share), futility=futility,
        **record_binding(engine, transform, label=label, reference=reference, lattice=bool(lattice)),
    )


# ---------------------------------------------------------------------------------------------
# datasets
class SequentialDatasetCertification(DatasetResult):
    """Sequential certificates for a dataset and certified accuracy at each target radius.

    ``reference``: ``"labels"`` (ground truth) or ``"clean_prediction"`` (certified consistency with
    the bare model's own clean label f(x), without any module: taken from each certificate's clean query
    when there is no transform, else one extra query). ``other`` is never correct; ``certified_other``
    is its own column.
    ``mean_queries``: queries needed per input (charged + answered from the cache).
    """

    certificates: list[SequentialCertificate]
    mean_queries: float


def sequential_certified_accuracy(certificates: Sequence[SequentialCertificate],
                                  radii: Sequence[float]) -> dict[str, float]:
    """Fraction of certificates that are correct and certified at >= r, for each r (keys ``f"{r:g}"``)."""
    return certified_accuracy(certificates, radii)


def certify_radius_dataset(
    connector: Connector | QueryEngine,
    inputs: Any,
    labels: Sequence[int] | None = None,
    *,
    radius: float | Sequence[float],
    sigma: float,
    alpha: float = defaults.ALPHA,
    n0: int = defaults.SEQ_N0,
    max_queries: int = defaults.SEQ_MAX_QUERIES,
    batch_size: int | None = None,
    seed: int | None = None,
    output: str | os.PathLike[str] | None = None,
    transform: Transform | None = None,
    lattice: bool = False,
    growth: float = 1.5,
    target_share: float = 0.5,
    futility: float | None = defaults.FUTILITY,
    progress: Callable[[int, SequentialCertificate], None] | None = None,
    executor: Any = None,
) -> SequentialDatasetCertification:
    """:func:`certify_radius` on every input (same input forms as
    :func:`blackbox_rs.dataset.certify_dataset`), with certified accuracy at each target radius.

    Without labels the reference is each input's clean prediction (from the certificate's own clean
    query; one extra bare query when there is a transform). With ``output`` every certificate is
    appended as a JSONL line once final (flushed and fsynced); a rerun with the same settings (the
    journal's seed is read back when ``seed=None``) skips finished inputs and, with a query cache,
    repeats no answered query; a rerun for another model, transform, dataset, labels or setting raises
    :class:`ResumeMismatchError`. Parameter and budget-limit errors are raised before any query.
    ``executor``: the unfinished inputs are certified by its workers, journaled here (as
    :func:`blackbox_rs.dataset.certify_dataset` says).
    """
    engine = as_engine(connector)
    radii = check_radii(radius)
    n0 = positive_int("n0", n0)
    cap = _check_cap(max_queries, n0)
    sigma = stats.check_sigma(sigma)
    alpha = stats.check_alpha(alpha)
    schedule = LookSchedule.for_radii(radii, sigma, alpha, cap - 1 - n0, target_share=target_share,
                                      growth=growth)
    first_look = 1 + n0 + schedule.sizes[0]
    check_budget_limit(engine, first_look, "1 clean + n0 + the first look")
    transform = identified(transform, require=output is not None)  # hashed once, not per input
    params = {"radii": [float(r) for r in radii], "n0": n0, "max_queries": cap, "alpha": alpha, "sigma": sigma,
              "fingerprint": engine.info.fingerprint, "lattice": bool(lattice), "growth": float(growth),
              "target_share": float(target_share), "futility": futility,
              "transform": transform_identity(transform),
              "noise": noise_mode(engine, bool(lattice)),
              "other_index": engine.info.other_index,
              "method": "sequential_certify"}
    settings = {"radii": [float(r) for r in radii], "sigma": sigma, "alpha": alpha, "n0": n0, "max_queries": cap,
                "batch_size": batch_size, "lattice": bool(lattice), "growth": growth, "target_share": target_share,
                "futility": futility, "first_look": first_look}
    certs, summary = run_dataset(engine, inputs, labels, SequentialCertificate, params, output=output, seed=seed,
                                 radii=radii, make_one=sequential_maker(engine, transform, **settings),
                                 progress=progress, executor=executor,
                                 job={"method": "sequential_certify", "settings": settings})
    return SequentialDatasetCertification(
        certificates=certs, **summary,
        mean_queries=(sum(c.queries + c.cache_hits for c in certs) / len(certs)) if certs else math.nan,
    )


def sequential_maker(engine: QueryEngine, transform: Transform | None, *, radii: Sequence[float], sigma: float,
                     alpha: float, n0: int, max_queries: int, batch_size: int | None, lattice: bool, growth: float,
                     target_share: float, futility: float | None, first_look: int,
                     ) -> Callable[[int], Callable[[int, torch.Tensor, int | None, str], SequentialCertificate]]:
    """The per-input function of :func:`certify_radius_dataset` (``make_one(seed)(index, x, label,
    key)``), the same in-process and on a worker (:mod:`blackbox_rs.distributed`)."""
    cap = max_queries

    def make_one(run_seed: int) -> Callable[[int, torch.Tensor, int | None, str], SequentialCertificate]:
        return lambda idx, xt, y, key: one(idx, xt, y, key, run_seed)

    def one(idx: int, xt: torch.Tensor, y: int | None, key: str, run_seed: int) -> SequentialCertificate:
        reference = "labels" if y is not None else "clean_prediction"
        if y is None and transform is not None:  # one more (bare) clean query: still before any query
            check_budget_limit(engine, 1 + first_look, "1 bare clean + 1 clean + n0 + the first look")
        cert = certify_radius(engine, xt, radius=radii, sigma=sigma, alpha=alpha, n0=n0, max_queries=cap,
                              batch_size=batch_size, seed=run_seed, key=key, label=y, index=idx,
                              transform=transform, reference=reference, lattice=lattice, growth=growth,
                              target_share=target_share, futility=futility)
        update: dict[str, Any] = {}
        if y is None:
            # the reference is the bare model's clean label f(x): the certificate's own clean query when
            # there is no transform, else one more (bare) query, charged to this certificate
            if transform is None:
                update["label"] = cert.clean_prediction
            else:
                t = Tally()
                update["label"] = bare_clean_label(engine, xt, t)
                update.update(queries=cert.queries + t.queries, cache_hits=cert.cache_hits + t.cache_hits)
        return cert.model_copy(update=update) if update else cert

    return make_one

