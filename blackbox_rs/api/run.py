"""``blackbox-rs api <vendor> certify``: certify a hosted API on a folder of images.

Flow: images (:mod:`blackbox_rs.api.images`: label map, folder, fit/certify split) -> estimate (worst
case and, for the sequential test, the cost if every sample agrees; time at the rate limit; a fit's
query cap and its measured time) -> ``--dry-run`` stops here and writes nothing -> optional
``--check-encoding`` -> optional ``--fit`` on the fit images only -> certify every certification image
(sequential test at ``--radius`` by default, Cohen's CERTIFY with ``--method cohen``), each
certificate appended to ``OUT/certificates.jsonl`` as soon as it is final -> report into ``OUT``.

Guarantees: every query goes through one :class:`~blackbox_rs.engine.QueryEngine` (budgeted by
``--max-queries`` / ``--max-cost`` with a ledger in ``OUT``, cached, counted); a rerun into the same
``OUT`` resumes without paying again for a finished certificate and refuses (typed error, exit 2) a
journal or split written for another classifier, encoding or split. Credentials are read from the
environment only and never printed, logged or written.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

from blackbox_rs import defaults
from blackbox_rs.api.args import echo
from blackbox_rs.api.images import RunImages
from blackbox_rs.errors import ConfigError, InvalidParameterError

__all__ = ["certify_action", "connector_kwargs", "estimate", "open_budget"]

log = logging.getLogger("blackbox_rs.api")


def connector_kwargs(args: argparse.Namespace, lm: Any, *, encoding: str | None = None) -> dict[str, Any]:
    """The keyword arguments every vendor connector takes, from the shared flags (``encoding``
    overrides ``--encoding``, for the encoding check's lossless twin)."""
    from blackbox_rs.connectors.http import TransportSettings

    t: dict[str, Any] = {}
    if args.rate_limit is not None:
        t["rate_limit"] = args.rate_limit or None
    if args.max_in_flight is not None:
        t["max_in_flight"] = args.max_in_flight
    if args.timeout is not None:
        t["timeout_s"] = args.timeout
    if args.max_attempts is not None:
        t["max_attempts"] = args.max_attempts
    if args.label_depth < 1:
        raise InvalidParameterError(f"--label-depth must be >= 1, got {args.label_depth}")
    enc = encoding or args.encoding
    if args.jpeg_quality is not None and args.encoding != "jpeg":
        raise InvalidParameterError("--jpeg-quality needs --encoding jpeg (png is lossless)")
    kw: dict[str, Any] = {"label_map": lm, "input_shape": (3, args.size, args.size), "label_depth": args.label_depth,
                          "encoding": enc}
    try:
        kw["transport"] = TransportSettings(**t)
    except ValueError as exc:
        raise InvalidParameterError(f"invalid transport settings: {' '.join(str(exc).split())}") from None
    if enc == "jpeg" and args.jpeg_quality is not None:
        kw["jpeg_quality"] = args.jpeg_quality
    if args.price_per_1k is not None:
        kw["price_per_1k"] = args.price_per_1k
    return kw


def open_budget(args: argparse.Namespace, out: Path) -> Any:
    """The run's budget (``--max-queries`` / ``--max-cost``, ledger ``OUT/budget_ledger.json``) or None."""
    from blackbox_rs.budget import QueryBudget

    if args.max_queries is None and args.max_cost is None:
        return None
    return QueryBudget(args.max_queries, args.max_cost, ledger=out / "budget_ledger.json")


# ---- estimates -------------------------------------------------------------------------------------
def _fit_config(args: argparse.Namespace) -> Any:
    """The fit's settings: ``--fit-steps`` MSE pretraining steps, then as many of the strategy's own
    steps, ``--fit-batch-size`` images per step, cosine learning-rate decay per phase (the documented
    large-input fit, docs/large-inputs.md); everything else is the strategy's default."""
    from blackbox_rs.fitting.config import FitConfig

    fields: dict[str, Any] = {"steps": args.fit_steps, "pretrain_steps": args.fit_steps,
                              "batch_size": args.fit_batch_size, "lr_schedule": "cosine"}
    try:
        return FitConfig(strategy=args.fit, **fields)
    except ValueError as exc:
        raise ConfigError(f"invalid fit settings: {' '.join(str(exc).split())}") from None


def module_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``--module-config`` as a dict (a JSON object)."""
    if not args.module_config:
        return {}
    try:
        cfg = json.loads(args.module_config)
    except ValueError as exc:
        raise ConfigError(f"--module-config is not JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ConfigError("--module-config must be a JSON object of the module's settings")
    return cfg


def _sequential_costs(args: argparse.Namespace, labelled: bool) -> tuple[int, int, int]:
    """(worst case, cost if every sample agrees, looks) per image of the sequential test: the test's
    own clean query, n0 selection samples and the estimation samples up to the look that certifies
    every radius when all samples agree (or the cap); without labels and with a module, one more
    clean query of the bare model gives the reference label."""
    from blackbox_rs.sequential import LookSchedule

    n0 = defaults.SEQ_N0 if args.n0 is None else args.n0
    cap = int(args.max_queries_per_image)
    if cap < n0 + 2:
        raise InvalidParameterError(f"--max-queries-per-image {cap} leaves no estimation sample after the clean "
                                    f"query and n0={n0} selection samples")
    schedule = LookSchedule.for_radii(radii(args), args.sigma, args.alpha, cap - 1 - n0)
    agree = next(n for k, n in enumerate(schedule.sizes) if all(int(c) <= n for c in schedule.cert_counts[k]))
    reference = 0 if labelled or args.fit == "none" else 1
    return cap + reference, reference + 1 + n0 + agree, len(schedule.sizes)


def radii(args: argparse.Namespace) -> tuple[float, ...]:
    return tuple(sorted(set(args.radius))) if args.radius else defaults.RADII_HOSTED


def estimate(vendor: Any, args: argparse.Namespace, data: RunImages) -> dict[str, Any]:
    """Queries, requests, time at the rate limit and cost of the run, before anything is sent."""
    spec = vendor.connector_class.spec
    batch = spec.max_batch
    n_images, labelled = int(data.x.shape[0]), data.y is not None
    price = spec.price_per_1k if args.price_per_1k is None else args.price_per_1k
    rate = spec.rate_limit if args.rate_limit is None else (args.rate_limit or None)
    n_fit = 0 if data.fit_names is None else len(data.fit_names)
    fit = fit_expected = 0
    if args.fit not in ("none", "denoise"):
        from blackbox_rs.fitting.strategies import estimate_fit_queries, expected_fit_queries

        fit = int(estimate_fit_queries(_fit_config(args), n_fit, args.fit_budget))
        fit_expected = int(expected_fit_queries(_fit_config(args), n_fit, args.fit_budget))
    est: dict[str, Any] = {"vendor": spec.vendor, "method": args.method, "encoding": _encoding_label(args, spec),
                           "images": n_images, "fit_images": n_fit, "split": (data.split or {}).get("mode", "none"),
                           "fit_queries": fit, "fit_queries_if_no_gain": fit_expected}
    clean = 0 if labelled else 1
    if args.method == "cohen":
        n0 = defaults.N0 if args.n0 is None else args.n0
        per_image = clean + n0 + args.n
        requests = n_images * (clean + math.ceil(n0 / batch) + math.ceil(args.n / batch))
        est.update(queries_per_image=per_image, queries=n_images * per_image + fit)
    else:
        worst, agree, looks = _sequential_costs(args, labelled)
        n0 = defaults.SEQ_N0 if args.n0 is None else args.n0
        requests = n_images * (2 + math.ceil(n0 / batch) + looks + math.ceil((worst - 1 - n0) / batch))
        est.update(radii=list(radii(args)), queries_per_image_worst=worst, queries_per_image_if_all_agree=agree,
                   queries=n_images * worst + fit, queries_if_all_agree=n_images * agree + fit)
        est["estimated_cost_if_all_agree_usd"] = round(est["queries_if_all_agree"] * price / 1000.0, 4)
    requests += math.ceil(fit / batch)
    check = 2 * n_images if args.check_encoding and args.encoding != "png" else 0  # PNG + chosen, per image
    if check:
        est["encoding_check_queries"] = check
        est["queries"] += check
        if "queries_if_all_agree" in est:
            est["queries_if_all_agree"] += check
            est["estimated_cost_if_all_agree_usd"] = round(est["queries_if_all_agree"] * price / 1000.0, 4)
        requests += 2 * math.ceil(n_images / batch)
    est.update(requests=requests, rate_limit_per_s=rate, min_duration_s=round(requests / rate, 1) if rate else None,
               price_per_1k=price, estimated_cost_usd=round(est["queries"] * price / 1000.0, 4))
    return est


def _encoding_label(args: argparse.Namespace, spec: Any) -> str:
    if args.encoding == "png":
        return "png (lossless)"
    return f"jpeg quality {args.jpeg_quality if args.jpeg_quality is not None else spec.jpeg_quality}"


def fit_time(vendor: Any, args: argparse.Namespace, data: RunImages, num_classes: int) -> Any:
    """The fit's time on this machine, measured with a few timed steps of each phase on a local
    stand-in (no query is sent; :func:`blackbox_rs.fitting.timing.estimate_fit_time`), plus the
    vendor's time at its rate limit; None without a fit."""
    if args.fit == "none" or data.fit_x is None:
        return None
    from blackbox_rs.fitting.timing import estimate_fit_time
    from blackbox_rs.modules.registry import create_module

    spec = vendor.connector_class.spec
    rate = spec.rate_limit if args.rate_limit is None else (args.rate_limit or None)
    shape = (3, args.size, args.size)
    module = create_module(args.module, input_shape=shape, **module_settings(args))
    return estimate_fit_time(module, _fit_config(args), shape, num_classes, n_images=len(data.fit_names or []),
                             sigmas=(args.sigma,), seconds_per_query=1.0 / (rate * spec.max_batch) if rate else None)


# ---- the run ---------------------------------------------------------------------------------------
def certify_action(vendor: Any, args: argparse.Namespace, data: RunImages, out: Path) -> None:
    """Fit (optional) and certify; writes the journal and the report into ``out``."""
    from blackbox_rs.api.encoding_check import check_encoding
    from blackbox_rs.engine import QueryEngine
    from blackbox_rs.reports import write_report
    from blackbox_rs.smoother import BlackBoxSmoother

    budget = open_budget(args, out)
    if args.check_encoding:
        check_encoding(vendor, args, data, out, budget)
    connector = vendor.build(args, connector_kwargs(args, data.lm))
    try:
        info = connector.info
        engine = QueryEngine(connector, cache=args.cache_dir or out / "cache", budget=budget)
        module = None
        if args.fit != "none":
            from blackbox_rs.modules.registry import create_module

            module = create_module(args.module, input_shape=info.input_shape, **module_settings(args))
        smoother = BlackBoxSmoother(engine, module=module, sigma=args.sigma)
        if data.fit_x is not None:
            import torch

            fit_data = data.fit_x if data.fit_y is None else (data.fit_x, torch.tensor(data.fit_y))
            rep = smoother.fit(fit_data, config=_fit_config(args), budget=args.fit_budget,
                               checkpoint_dir=out / "fit")
            log.info("fit %s on %d image(s): %d queries, %s", rep.stopped, len(data.fit_names or []), rep.queries,
                     rep.model_dump(exclude={"history"}))
        def progress(i: int, cert: Any) -> None:
            stop = f", {cert.decision} ({cert.stop_reason})" if hasattr(cert, "stop_reason") else ""
            label = "" if cert.label is None else f", reference {cert.label} ({cert.label_name})"
            log.info("image %d (%s): prediction %s (%s)%s, certified radius %.3f%s, queries %d (all runs: %s), "
                     "cache hits %d", i, data.names[i], cert.prediction, cert.prediction_name, label, cert.radius,
                     stop, cert.queries, cert.queries_total, cert.cache_hits)

        seed = {} if args.seed is None else {"seed": args.seed}  # None: the core chooses (or reads it back)
        batch = args.batch_size or info.max_batch * info.max_concurrency
        journal = out / "certificates.jsonl"
        if args.method == "cohen":
            res = smoother.certify_dataset(data.x, data.y, n0=defaults.N0 if args.n0 is None else args.n0, n=args.n,
                                           alpha=args.alpha, output=journal, batch_size=batch, progress=progress,
                                           **seed)
            how = f"Cohen's CERTIFY, n0={defaults.N0 if args.n0 is None else args.n0}, n={args.n}"
        else:
            res = smoother.certify_radius_dataset(
                data.x, data.y, radius=radii(args), alpha=args.alpha,
                n0=defaults.SEQ_N0 if args.n0 is None else args.n0, max_queries=args.max_queries_per_image,
                futility=args.futility or None, batch_size=batch, output=journal, progress=progress, **seed)
            how = (f"sequential test at r = {', '.join(f'{r:g}' for r in radii(args))}, cap "
                   f"{args.max_queries_per_image:,} queries per image, futility {args.futility:g}")
        unmapped = list(data.lm.unmapped_counts().items())[:10]
        notes = [f"model: {info.fingerprint}", f"method: {how}, sigma={args.sigma}, alpha={args.alpha}",
                 f"encoding: {_encoding_label(args, vendor.connector_class.spec)}",
                 f"vendor labels mapped to 'other' (top 10): {unmapped}", split_note(data)]
        files = write_report({vendor.name: res}, out, title=f"{vendor.connector_class.spec.vendor}: certified accuracy",
                             notes=notes)
        log.info("transport: %s", connector.transport_stats() if hasattr(connector, "transport_stats") else {})
        acc = ", ".join(f"r={r}: {a:.2f}" for r, a in res.certified_accuracy.items())
        echo(f"{len(res.certificates)} images certified ({res.queries} queries charged by this run, "
             f"{res.queries_total} in all runs, {res.cache_hits} from the cache); certified accuracy {acc}; "
             f"report: {files.summary}")
    finally:
        connector.close()


def split_note(data: RunImages) -> str:
    if data.fit_names is None:
        return f"images: all {len(data.names)} certified, none used for fitting (split.json)"
    return (f"images: fitted on {len(data.fit_names)}, certified {len(data.names)} other image(s); the two sets "
            f"are disjoint (files listed in split.json)")
