"""Reports: certificates -> JSON, CSV, a certified-accuracy table, a PNG plot and a markdown summary.

A report compares one or more *runs* (e.g. "no module" and "fitted module"), each a
:class:`~blackbox_rs.dataset.DatasetResult`. The summary states sigma, n0, n, alpha, the number
of inputs, queries and cost, what exactly was certified (model fingerprint, transform identity, noise
mode), and what "accuracy" means: agreement with ground-truth labels, or certified *consistency* with the
bare model's own clean predictions (no module). Certificates for the catch-all class ``other`` are never
counted as correct: they have their own column.

Every report states each run's largest certifiable radius (:func:`max_certifiable_radius`): no input
can be certified beyond it with that run's settings, whatever the model does. Columns above it are
shown as ``—`` ("not certifiable with these settings") in the markdown table and left empty in
``certified_accuracy.csv`` (whose last column, ``max_certifiable_radius``, gives the bound), never as a
silent 0.

Class names: the per-image CSV has ``prediction_name`` and ``label_name`` columns next to the
indices, the JSON carries them in each certificate, and the markdown summary lists the certificates
(the first :data:`MAX_LISTED` of each run) as ``index (name)``; a certificate without names (a
connector without class names, an older journal) shows the index alone. Names never decide
correctness. Query counts: each run states the queries charged (``queries``) and the queries in
total over every run that worked on its certificates, interrupted runs on the same journal included
(``queries_total``; records that predate it count their ``queries``, and the summary says so).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from blackbox_rs import stats
from blackbox_rs.certificate import Certificate, SequentialCertificate
from blackbox_rs.dataset import (
    REFERENCE_TEXT,
    DatasetResult,
    certified_accuracy,
    certified_other,
    total_queries,
)
from blackbox_rs.errors import CacheError, ConfigError, InvalidParameterError
from blackbox_rs.journal import read_journal
from blackbox_rs.paths import ensure_writable_dir

__all__ = ["MAX_LISTED", "NOT_CERTIFIABLE", "ReportFiles", "accuracy_table", "load_certificates", "load_run", "max_certifiable_radius",
           "plot_curves", "write_report"]

_CSV_FIELDS = ["index", "label", "label_name", "reference", "prediction", "prediction_name", "correct", "is_other",
               "radius", "p_lower", "n0", "n", "alpha", "sigma", "seed", "queries", "cache_hits", "queries_total",
               "method", "key", "fingerprint", "transform", "noise"]

#: Certificates listed per run in ``summary.md`` (all of them are in the CSV and JSON files).
MAX_LISTED = 50


def _named(index: int | None, name: str | None) -> str:
    """``3 (cat)``; the index alone without a name; ``—`` without an index."""
    if index is None:
        return "—"
    return f"{index} ({name})" if name else str(index)


def _listing(res: DatasetResult) -> list[str]:
    certs = res.certificates
    if not certs:
        return []
    rows = ["| input | label | prediction | radius | correct | queries | queries in total |", "|---|---|---|---|---|---|---|"]
    for c in certs[:MAX_LISTED]:
        total = "not recorded" if getattr(c, "queries_total", None) is None else f"{c.queries_total:,}"
        rows.append(f"| {'—' if c.index is None else c.index} | {_named(c.label, c.label_name)} | "
                    f"{_named(c.prediction, c.prediction_name)} | {c.radius:.3f} | "
                    f"{'—' if c.correct is None else ('yes' if c.correct else 'no')} | {c.queries:,} | {total} |")
    if len(certs) > MAX_LISTED:
        rows.append(f"\n(first {MAX_LISTED} of {len(certs)} certificates; all are in certificates.csv)")
    return rows


def _total_text(res: DatasetResult) -> str:
    total = res.queries_total if res.queries_total is not None else total_queries(res.certificates)
    old = sum(1 for c in res.certificates if getattr(c, "queries_total", None) is None)
    note = (f" (at least: {old} record(s) predate this count and give only the queries of the run that "
            f"finished them)" if old else "")
    return f"queries in total, every run on these certificates (interrupted ones included): {total:,}{note}"


#: Table cell of a radius above a run's largest certifiable radius.
NOT_CERTIFIABLE = "—"
_NOT_CERTIFIABLE_NOTE = (f"{NOT_CERTIFIABLE} = not certifiable with these settings: the radius is above the run's "
                         f"largest certifiable radius")


def _reach(c: Any) -> float | None:
    """Largest radius certificate ``c``'s settings can ever certify (None: not a certificate)."""
    if isinstance(c, SequentialCertificate):
        # every target radius is reachable: LookSchedule.for_radii refuses, before any query, a radius
        # the cap cannot certify even if every sample agrees
        return max((float(r) for r in c.radii), default=0.0)
    if isinstance(c, Certificate):
        try:
            return float(stats.max_radius(c.n, c.sigma, c.alpha))
        except InvalidParameterError:
            return 0.0
    return None


def max_certifiable_radius(res: DatasetResult) -> float | None:
    """The largest radius any input of run ``res`` could be certified at with its settings, even if
    every sample agreed: ``stats.max_radius(n, sigma, alpha)`` for Cohen certificates; for sequential
    ones the largest target radius that the per-input cap (``max_queries``, less 1 clean query and
    ``n0`` selection samples) can reach at the schedule's level for that radius. The maximum over
    the run's certificates; None for a run without certificates. Certified accuracy above it is 0
    by construction, not by measurement."""
    values = [v for v in (_reach(c) for c in res.certificates) if v is not None]
    return max(values) if values else None


def _not_certifiable(r: float, reach: float | None, value: float) -> bool:
    return reach is not None and float(r) > reach and value == 0.0


def _reach_text(res: DatasetResult, reach: float | None) -> str:
    if reach is None:
        return "- largest certifiable radius: no certificates"
    c = res.certificates[0]
    if isinstance(c, SequentialCertificate):
        how = (f"the largest target radius that the cap of max_queries = {c.max_queries} queries per input "
               f"can reach at sigma = {c.sigma}, alpha = {c.alpha}")
    else:
        how = f"all n = {getattr(c, 'n', '?')} samples agreeing at sigma = {c.sigma}, alpha = {c.alpha}"
    return (f"- largest certifiable radius with these settings: {reach:.4g} ({how}); radii above it are "
            f"not certifiable with these settings (shown as {NOT_CERTIFIABLE}, not 0)")


class ReportFiles(BaseModel):
    """Paths of the files a report wrote (``plot`` is None without matplotlib)."""

    directory: str
    summary: str
    certificates_json: str
    certificates_csv: str
    accuracy_csv: str
    plot: str | None


class _AnyCertificate:
    """Validates a journal line as the certificate class its ``method`` names."""

    @staticmethod
    def model_validate(obj: Any) -> Certificate | SequentialCertificate:
        if isinstance(obj, dict) and obj.get("method") == "sequential_certify":
            return SequentialCertificate.model_validate(obj)
        return Certificate.model_validate(obj)


def load_certificates(path: str | os.PathLike[str]) -> list[Any]:
    """Certificates (Cohen or sequential) from a JSONL journal of ``certify_dataset`` /
    ``certify_radius_dataset``: the header is skipped, a torn last line is skipped."""
    p = Path(path)
    try:
        _, certs = read_journal(p, _AnyCertificate)  # type: ignore[type-var]
    except CacheError as exc:
        raise ConfigError(f"cannot read certificates from {p}: {exc}") from exc
    return certs



def load_run(path: str | os.PathLike[str], radii: Sequence[float]) -> DatasetResult:
    """A dataset result rebuilt from one journal (no queries): Cohen or sequential by its records'
    method, its reference label kind, certified accuracy at ``radii``, queries charged by the runs
    that finished each certificate (``queries``) and in total (``queries_total``); the cost is not in
    the records (NaN). :class:`ConfigError` for a journal that mixes references or methods."""
    from blackbox_rs.certify_sequential import SequentialDatasetCertification
    from blackbox_rs.dataset import DatasetCertification, certified_accuracy, certified_other, total_queries

    certs = load_certificates(path)
    refs = {ce.reference for ce in certs} - {None}
    if len(refs) > 1:
        raise ConfigError(f"{path} mixes certificates with references {sorted(refs)}")
    ref = refs.pop() if refs else ("labels" if all(ce.label is not None for ce in certs) else "clean_prediction")
    rs = [float(r) for r in radii]
    common = {"certificates": certs, "radii": rs, "certified_accuracy": certified_accuracy(certs, rs),
              "reference": ref, "queries": sum(ce.queries for ce in certs), "queries_total": total_queries(certs),
              "cache_hits": sum(ce.cache_hits for ce in certs), "cost": math.nan,
              "certified_other": certified_other(certs, rs)}
    methods = {ce.method for ce in certs}
    if len(methods) > 1:
        raise ConfigError(f"{path} mixes certification methods {sorted(methods)}")
    if methods == {"sequential_certify"}:
        return SequentialDatasetCertification(
            **common, mean_queries=sum(ce.queries + ce.cache_hits for ce in certs) / len(certs))
    return DatasetCertification(**common)


def accuracy_table(runs: Mapping[str, DatasetResult], radii: Sequence[float] | None = None) -> str:
    """Markdown table: one row per run, one column per radius. A radius above the run's largest
    certifiable radius (:func:`max_certifiable_radius`) shows :data:`NOT_CERTIFIABLE`, and a note
    line under the table then says so and gives each run's largest certifiable radius."""
    if not runs:
        return ""
    radii = list(radii if radii is not None else next(iter(runs.values())).radii)
    head = "| run | " + " | ".join(f"r = {r:g}" for r in radii) + " |"
    sep = "|---|" + "---|" * len(radii)
    rows = []
    marked = False

    def cells(values: Mapping[str, float], reach: float | None) -> str:
        nonlocal marked
        out = []
        for r in radii:
            v = values[f"{r:g}"]
            if _not_certifiable(r, reach, v):
                marked = True
                out.append(NOT_CERTIFIABLE)
            else:
                out.append(f"{v:.3f}")
        return " | ".join(out)

    reaches = {name: max_certifiable_radius(res) for name, res in runs.items()}
    for name, res in runs.items():
        acc = certified_accuracy(res.certificates, radii)
        rows.append(f"| {name} | " + cells(acc, reaches[name]) + " |")
        other = certified_other(res.certificates, radii)
        if other is not None:
            rows.append(f"| {name}: certified `other` (not counted) | " + cells(other, reaches[name]) + " |")
    table = "\n".join([head, sep, *rows])
    if marked:
        table += "\n\n" + _NOT_CERTIFIABLE_NOTE + " (" + "; ".join(
            f"{name}: {reach:.4g}" for name, reach in reaches.items() if reach is not None) + ")"
    return table


def plot_curves(runs: Mapping[str, DatasetResult], path: str | os.PathLike[str], *, title: str = "") -> str | None:
    """Certified accuracy vs radius, one curve per run, as a PNG. Returns the path, or None when
    matplotlib is not installed (``pip install 'blackbox-rs[plot]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    rmax = 0.0
    for res in runs.values():
        rmax = max([rmax, *[c.radius for c in res.certificates]])
    rmax = max(rmax * 1.05, 0.1)
    grid = [rmax * i / 200 for i in range(201)]
    for name, res in runs.items():
        acc = certified_accuracy(res.certificates, grid)
        ax.plot(grid, [acc[f"{r:g}"] for r in grid], label=name, linewidth=2)
    ax.set_xlabel("l2 radius")
    ax.set_ylabel("certified accuracy" if all(r.reference == "labels" for r in runs.values())
                  else "certified consistency")
    ax.set_ylim(0, 1)
    ax.set_xlim(0, rmax)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def _settings(res: DatasetResult) -> dict[str, object]:
    c = res.certificates[0] if res.certificates else None
    if c is None:
        return {}
    return {"sigma": c.sigma, "n0": c.n0, "n": c.n, "alpha": c.alpha, "seed": c.seed, "method": c.method,
            "fingerprint": c.fingerprint, "transform": c.transform, "noise": c.noise,
            "max_queries": getattr(c, "max_queries", None), "radii": getattr(c, "radii", None)}


def write_report(runs: Mapping[str, DatasetResult], directory: str | os.PathLike[str], *,
                 title: str = "blackbox-rs certification report", notes: Sequence[str] = (),
                 cost_per_query: float | None = None) -> ReportFiles:
    """Write the report files into ``directory`` (created if needed) and return their paths.

    ``summary.md`` states each run's largest certifiable radius; the table marks radii above it
    :data:`NOT_CERTIFIABLE`; ``certified_accuracy.csv`` leaves those cells empty and ends each row
    with ``max_certifiable_radius``.
    """
    d = ensure_writable_dir(directory, "report directory")
    if not runs:
        raise ConfigError("a report needs at least one run of certificates")
    radii = next(iter(runs.values())).radii
    (d / "certificates.json").write_text(json.dumps(
        {name: [c.model_dump() for c in res.certificates] for name, res in runs.items()}, indent=1))
    with open(d / "certificates.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", *_CSV_FIELDS])
        for name, res in runs.items():
            for c in res.certificates:
                row = c.model_dump()
                row.update(correct=c.correct, is_other=c.is_other, radius=c.radius)
                w.writerow([name, *[row.get(k) for k in _CSV_FIELDS]])
    reaches = {name: max_certifiable_radius(res) for name, res in runs.items()}
    with open(d / "certified_accuracy.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", *[f"{r:g}" for r in radii], "max_certifiable_radius"])
        for name, res in runs.items():
            acc = certified_accuracy(res.certificates, radii)
            reach = reaches[name]
            w.writerow([name, *["" if _not_certifiable(r, reach, acc[f"{r:g}"]) else f"{acc[f'{r:g}']:.4f}"
                                for r in radii], "" if reach is None else f"{reach:.6g}"])
    plot = plot_curves(runs, d / "certified_accuracy.png", title=title)
    lines = [f"# {title}", ""]
    for name, res in runs.items():
        s = _settings(res)
        meaning = REFERENCE_TEXT.get(res.reference, res.reference)
        cost = res.cost if cost_per_query is None else res.queries * cost_per_query
        cost_text = "not recorded" if math.isnan(cost) else f"{cost:.4g}"
        samples = (f"max_queries = {s.get('max_queries')}, radii = {s.get('radii')}" if s.get("method") ==
                   "sequential_certify" else f"n = {s.get('n')}")
        other = certified_other(res.certificates, radii)
        lines += [f"## {name}", "",
                  f"- inputs: {len(res.certificates)}; method = {s.get('method')}, sigma = {s.get('sigma')}, "
                  f"n0 = {s.get('n0')}, {samples}, alpha = {s.get('alpha')}, seed = {s.get('seed')}",
                  f"- certified classifier: model `{s.get('fingerprint')}`, transform `{s.get('transform')}`, "
                  f"noise `{s.get('noise')}`",
                  f"- accuracy means: {meaning}",
                  f"- queries charged: {res.queries:,} (cache hits: {res.cache_hits:,}); cost: {cost_text}",
                  f"- {_total_text(res)}",
                  f"- abstained: {sum(c.abstained for c in res.certificates)}",
                  _reach_text(res, reaches[name])]
        if other is not None:
            lines.append("- certified as the catch-all class `other` (never counted as correct): "
                         + ", ".join(f"r = {r:g}: " + (NOT_CERTIFIABLE if _not_certifiable(r, reaches[name], other[f"{r:g}"])
                                                         else f"{other[f'{r:g}']:.3f}") for r in radii))
        lines.append("")
    lines += ["## Certified accuracy", "", accuracy_table(runs, radii), ""]
    for name, res in runs.items():
        listing = _listing(res)
        if listing:
            lines += [f"## Certificates: {name}", "", *listing, ""]
    lines += [f"- {n}" for n in notes]
    if plot:
        lines += ["", "![certified accuracy](certified_accuracy.png)"]
    (d / "summary.md").write_text("\n".join(lines) + "\n")
    return ReportFiles(directory=str(d), summary=str(d / "summary.md"),
                       certificates_json=str(d / "certificates.json"), certificates_csv=str(d / "certificates.csv"),
                       accuracy_csv=str(d / "certified_accuracy.csv"), plot=plot)
