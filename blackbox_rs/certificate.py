"""Certificates and smoothed predictions: self-contained, auditable records.

A :class:`Certificate` carries everything needed to recompute it from its counts (class, radius,
lower bound, selection and estimation counts, n0, n, alpha, sigma, seed, noise key, method, queries
spent, model fingerprint), so it can be re-derived at another alpha or re-audited without new queries.

Query counts: ``queries`` are the queries charged by the run that finished the record, ``cache_hits``
the samples that run got from the query cache, and ``queries_total`` the queries charged for the
record's samples by every run that worked on it, an interrupted one included, as far as the
dataset journal recorded them (see :mod:`blackbox_rs.journal`). ``queries_total`` is None only for a
record read from a journal written before it was recorded.

``prediction_name`` and ``label_name`` (the connector's class names, :func:`class_name`) are
descriptive only: never part of what a record is bound to, never used to decide correctness.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ABSTAIN", "ABSTAIN_NAME", "Certificate", "SmoothedPrediction", "class_name", "with_names"]

ABSTAIN = -1
"""Class index meaning "the smoothed classifier abstains"."""

ABSTAIN_NAME = "abstain"
"""``prediction_name`` of an abstention."""


def _has_names(names: Sequence[str]) -> bool:
    """False for the placeholder names ``"0" .. "K-1"`` that a connector without class names uses."""
    return bool(names) and tuple(names) != tuple(str(i) for i in range(len(names)))


def class_name(names: Sequence[str], index: int | None) -> str | None:
    """The name of class ``index`` in ``names`` (a connector's ``info.class_names``): ``"abstain"``
    for :data:`ABSTAIN`; None when ``index`` is None or outside the classes, or when the connector
    has no names (its names are the placeholders ``"0" .. "K-1"``)."""
    if index is None or not _has_names(names):
        return None
    if index == ABSTAIN:
        return ABSTAIN_NAME
    return names[index] if 0 <= index < len(names) else None


def with_names(record: Any, names: Sequence[str]) -> Any:
    """``record`` with ``prediction_name`` and ``label_name`` filled from ``names`` (a copy; the
    record itself when nothing changes). Names are descriptive: no other field changes."""
    update = {"prediction_name": class_name(names, record.prediction), "label_name": class_name(names, record.label)}
    update = {k: v for k, v in update.items() if getattr(record, k, None) != v}
    return record.model_copy(update=update) if update else record


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    prediction: int = Field(description="predicted class index, or ABSTAIN (-1)")
    counts: list[int] = Field(description="per-class counts of the samples the decision used")
    alpha: float
    sigma: float
    seed: int
    key: str = Field(description="noise key of the input (content hash unless given)")
    fingerprint: str = Field(description="fingerprint of the base model the counts came from")
    queries: int = Field(ge=0, description="queries charged for this record by the run that finished it "
                                           "(cache hits excluded)")
    cache_hits: int = Field(default=0, ge=0, description="samples the finishing run got from the query cache")
    queries_total: int | None = Field(
        default=None, ge=0,
        description="queries charged for this record's samples by every run that worked on it (interrupted runs "
        "recorded in the dataset journal included); defaults to `queries` when a record is created; None: not "
        "recorded (a journal line written before this field existed)",
    )
    prediction_name: str | None = Field(
        default=None, description="class name of `prediction` ('abstain' for ABSTAIN); None without names. "
        "Descriptive only")
    label_name: str | None = Field(default=None, description="class name of `label`; None without names")
    label: int | None = Field(default=None, description="reference label, if known")
    index: int | None = Field(default=None, description="position in the dataset, if certified as part of one")
    reference: Literal["labels", "clean_prediction"] | None = Field(
        default=None,
        description="what `label` is: ground truth ('labels') or the bare model's own label on the clean "
        "input, without any module ('clean_prediction': accuracy is then certified consistency)",
    )
    transform: str = Field(
        default="unrecorded",
        description="identity of the deterministic transform before the model: 'none' or the module's digest",
    )
    noise: str = Field(default="unrecorded", description="noise mode and generator device type")
    other_index: int | None = Field(
        default=None, description="the model's catch-all class ('other'), never counted as correct"
    )
    model_version: str | None = Field(
        default=None, description="model version the endpoint reported while certifying, if it reports one"
    )

    @model_validator(mode="before")
    @classmethod
    def _default_total(cls, data: Any) -> Any:
        """A record created without ``queries_total`` was made by one run: its total is ``queries``.
        (The journal reader passes an explicit None for old lines: not recorded.)"""
        if isinstance(data, dict) and "queries_total" not in data and "queries" in data:
            data = {**data, "queries_total": data["queries"]}
        return data

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN

    @property
    def is_other(self) -> bool:
        """The smoothed classifier answered the catch-all class ("none of your classes")."""
        return self.other_index is not None and self.prediction == self.other_index

    @property
    def correct(self) -> bool | None:
        """Whether the prediction equals the reference label (None without a label). A prediction of
        the catch-all class ``other``, or a reference that is ``other``, is never correct: "none of
        your classes" is no evidence of robustness on your classes."""
        if self.label is None:
            return None
        if self.other_index is not None and self.other_index in (self.prediction, self.label):
            return False
        return self.prediction == self.label


class Certificate(_Record):
    """Outcome of CERTIFY: with probability >= 1 - alpha over the noise, if ``prediction`` is not
    ABSTAIN, the smoothed classifier returns ``prediction`` for every input within l2 distance
    ``radius`` of the certified input."""

    method: Literal["cohen_certify"] = "cohen_certify"
    radius: float = Field(ge=0.0, description="certified l2 radius (0 when abstaining)")
    p_lower: float = Field(ge=0.0, le=1.0, description="one-sided Clopper-Pearson lower bound on p_A")
    n0: int = Field(ge=1)
    n: int = Field(ge=1)
    selection_counts: list[int]

    def certified_at(self, r: float) -> bool:
        """True when the input is certified (not abstained) with radius >= r."""
        return (not self.abstained) and self.radius >= r


class SmoothedPrediction(_Record):
    """Outcome of PREDICT: with probability >= 1 - alpha, ``prediction`` is either ABSTAIN or the
    smoothed classifier's class at this input."""

    method: Literal["cohen_predict"] = "cohen_predict"
    n: int = Field(ge=1)
    p_value: float = Field(ge=0.0, le=1.0)


class SequentialCertificate(_Record):
    """Outcome of anytime-valid sequential certification at target radii
    (:func:`blackbox_rs.certify_sequential.certify_radius`).

    With probability >= 1 - alpha over the noise, if ``decision == "certified"`` the smoothed
    classifier returns ``prediction`` for every input within l2 distance ``certified_radius`` of the
    certified input (the guarantee holds for every radius marked certified at once). With probability
    >= 1 - alpha, every radius marked ``"not_certified"`` is truly not certifiable for ``candidate``
    (``P(f(x + delta) = candidate) < Phi(r / sigma)``). ``"undecided"`` radii carry no claim (the
    per-input cap stopped the test). ``prediction`` is ``candidate`` when certified, else ABSTAIN.
    The record can be re-audited with :func:`blackbox_rs.sequential.decide` from ``look_counts``.
    """

    method: Literal["sequential_certify"] = "sequential_certify"
    decision: Literal["certified", "not_certified", "undecided"]
    certified_radius: float = Field(ge=0.0, description="largest certified radius of `radii`, 0 if none")
    radii: list[float] = Field(description="target radii, sorted")
    radius_status: list[Literal["certified", "not_certified", "undecided"]]
    candidate: int = Field(description="class tested (from the clean prediction and the selection sample)")
    clean_prediction: int = Field(description="base classifier's label on the clean input")
    selection_counts: list[int]
    n0: int = Field(ge=1, description="selection samples (plus one clean query)")
    n: int = Field(ge=0, description="estimation samples used")
    max_queries: int = Field(ge=1, description="per-input query cap (selection + estimation)")
    looks: list[int] = Field(description="cumulative estimation sample counts at the looks reached")
    look_counts: list[int] = Field(description="candidate count at each look reached")
    look_alphas: list[float] = Field(description="level spent at each look reached")
    p_lower: float = Field(ge=0.0, le=1.0, description="best lower bound on P(candidate) over the looks")
    stop_reason: str = Field(description="resolved | unreachable (cap makes the rest impossible) | improbable (futility stop) | cap")
    lattice: bool = Field(default=False, description="exact discrete Gaussian noise on the 1/255 lattice")
    growth: float = 1.5
    target_share: float = 0.5
    futility: float | None = None

    @property
    def radius(self) -> float:
        return self.certified_radius

    def certified_at(self, r: float) -> bool:
        """True when certified with a target radius >= r."""
        return self.decision == "certified" and self.certified_radius >= r
