"""What a dataset run reports, whatever the certification method: the generic result
(:class:`DatasetResult`), Cohen's (:class:`DatasetCertification`), and the one accuracy function
(:func:`certified_accuracy`, via each record's ``certified_at``). The catch-all class ``other`` is
never counted as correct; :func:`certified_other` says how often it was certified instead."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from blackbox_rs.certificate import Certificate

__all__ = ["REFERENCE_TEXT", "DatasetCertification", "DatasetResult", "certified_accuracy", "certified_other",
           "total_queries"]

REFERENCE_TEXT = {
    "labels": "certified accuracy: agreement with the ground-truth labels",
    "clean_prediction": "certified consistency: agreement with the bare model's own label on the clean input "
                        "(no module)",
}
"""What each ``reference`` means, as every report states it."""


class DatasetResult(BaseModel):
    """What every dataset run reports, whatever the certification method: the radii, certified
    accuracy at each (``reference`` says what accuracy means, :data:`REFERENCE_TEXT`), queries charged
    in this call (``queries``; ``cache_hits`` and ``cost`` of this call too), ``queries_total`` (charged
    for these certificates by every run that worked on them, interrupted ones on the same journal
    included: the sum of their ``queries_total``, using ``queries`` for records that predate it; None
    when not stated), and the ``certified_other`` column (None without a catch-all class).
    Subclasses add the certificates of their method."""

    model_config = ConfigDict(extra="forbid")

    radii: list[float]
    certified_accuracy: dict[str, float]
    reference: str
    queries: int
    cache_hits: int
    cost: float
    certified_other: dict[str, float] | None = None
    queries_total: int | None = None


def total_queries(certificates: Sequence[Any]) -> int:
    """Queries charged for ``certificates`` by every run that worked on them: the sum of their
    ``queries_total`` (``queries`` for a record that predates that field: a lower bound)."""
    return sum(int(c.queries if getattr(c, "queries_total", None) is None else c.queries_total)
               for c in certificates)


class DatasetCertification(DatasetResult):
    """Certificates for a dataset and certified accuracy at the requested radii.

    ``reference`` says what "accuracy" means (:data:`REFERENCE_TEXT`): ``"labels"`` (agreement with
    ground truth) or ``"clean_prediction"`` (certified consistency with the bare model's own clean
    prediction, without any module). A certificate for the catch-all class ``other`` never counts as
    correct; ``certified_other`` is its own column: the fraction of inputs certified as ``other``.
    """

    certificates: list[Certificate]


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
