"""Reports: certificates -> JSON, CSV, a certified-accuracy table, a PNG plot and a markdown summary.

A report compares one or more *runs* (e.g. "no module" and "fitted module"), each a
:class:`~blackbox_rs.certify.DatasetCertification`. The summary states sigma, n0, n, alpha, the number
of inputs, queries and cost, and what "accuracy" means: agreement with ground-truth labels, or
certified *consistency* with the base model's own clean predictions.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel

from blackbox_rs.certificate import Certificate
from blackbox_rs.certify import DatasetCertification, certified_accuracy
from blackbox_rs.errors import ConfigError
from blackbox_rs.paths import ensure_writable_dir

__all__ = ["ReportFiles", "accuracy_table", "load_certificates", "plot_curves", "write_report"]

_CSV_FIELDS = ["index", "label", "prediction", "correct", "radius", "p_lower", "n0", "n", "alpha", "sigma",
               "seed", "queries", "cache_hits", "key", "fingerprint"]


class ReportFiles(BaseModel):
    """Paths of the files a report wrote (``plot`` is None without matplotlib)."""

    directory: str
    summary: str
    certificates_json: str
    certificates_csv: str
    accuracy_csv: str
    plot: str | None


def load_certificates(path: str | os.PathLike[str]) -> list[Certificate]:
    """Certificates from a JSONL output of ``certify_dataset`` (a torn last line is skipped)."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read certificates from {p}: {exc}") from exc
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(Certificate.model_validate_json(line))
        except ValueError as exc:
            if i == len(lines) - 1:
                break
            raise ConfigError(f"{p} line {i + 1} is not a certificate: {exc}") from exc
    return out


def accuracy_table(runs: Mapping[str, DatasetCertification], radii: Sequence[float] | None = None) -> str:
    """Markdown table: one row per run, one column per radius."""
    if not runs:
        return ""
    radii = list(radii if radii is not None else next(iter(runs.values())).radii)
    head = "| run | " + " | ".join(f"r = {r:g}" for r in radii) + " |"
    sep = "|---|" + "---|" * len(radii)
    rows = []
    for name, res in runs.items():
        acc = certified_accuracy(res.certificates, radii)
        rows.append(f"| {name} | " + " | ".join(f"{acc[f'{r:g}']:.3f}" for r in radii) + " |")
    return "\n".join([head, sep, *rows])


def plot_curves(runs: Mapping[str, DatasetCertification], path: str | os.PathLike[str], *, title: str = "") -> str | None:
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


def _settings(res: DatasetCertification) -> dict[str, object]:
    c = res.certificates[0] if res.certificates else None
    return {} if c is None else {"sigma": c.sigma, "n0": c.n0, "n": c.n, "alpha": c.alpha, "seed": c.seed}


def write_report(runs: Mapping[str, DatasetCertification], directory: str | os.PathLike[str], *,
                 title: str = "blackbox-rs certification report", notes: Sequence[str] = (),
                 cost_per_query: float | None = None) -> ReportFiles:
    """Write the report files into ``directory`` (created if needed) and return their paths."""
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
                row["correct"] = c.correct
                w.writerow([name, *[row.get(k) for k in _CSV_FIELDS]])
    with open(d / "certified_accuracy.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", *[f"{r:g}" for r in radii]])
        for name, res in runs.items():
            acc = certified_accuracy(res.certificates, radii)
            w.writerow([name, *[f"{acc[f'{r:g}']:.4f}" for r in radii]])
    plot = plot_curves(runs, d / "certified_accuracy.png", title=title)
    lines = [f"# {title}", ""]
    for name, res in runs.items():
        s = _settings(res)
        meaning = ("agreement with ground-truth labels" if res.reference == "labels"
                   else "certified consistency with the base model's own clean predictions")
        cost = res.cost if cost_per_query is None else res.queries * cost_per_query
        lines += [f"## {name}", "",
                  f"- inputs: {len(res.certificates)}; sigma = {s.get('sigma')}, n0 = {s.get('n0')}, "
                  f"n = {s.get('n')}, alpha = {s.get('alpha')}, seed = {s.get('seed')}",
                  f"- accuracy means: {meaning}",
                  f"- queries charged: {res.queries:,} (cache hits: {res.cache_hits:,}); cost: {cost:.4g}",
                  f"- abstained: {sum(c.abstained for c in res.certificates)}", ""]
    lines += ["## Certified accuracy", "", accuracy_table(runs, radii), ""]
    lines += [f"- {n}" for n in notes]
    if plot:
        lines += ["", "![certified accuracy](certified_accuracy.png)"]
    (d / "summary.md").write_text("\n".join(lines) + "\n")
    return ReportFiles(directory=str(d), summary=str(d / "summary.md"),
                       certificates_json=str(d / "certificates.json"), certificates_csv=str(d / "certificates.csv"),
                       accuracy_csv=str(d / "certified_accuracy.csv"), plot=plot)
