"""Fitting objectives for input modules, as plain functions and as a weighted, typed :class:`Objective`.

Terms (name: what it needs; whether autograd flows through it):

=====================  ========================================  ==========================  =======
name                   loss                                      inputs                      grads
=====================  ========================================  ==========================  =======
``mse``                mean((A(x+δ) − x)²)  (no queries)         outputs, clean              yes
``stability``          CE(logits(A(x+δ)), f(x))  (no labels)     logits, clean_predictions   yes
``classification``     CE(logits(A(x+δ)), y)                     logits, labels              yes
``label_disagreement`` mean[f(A(x+δ)) ≠ target]  (labels only)   query_labels, target        no
``score_ce``           mean −log s_target(A(x+δ))  (scores)      query_scores, target        no
=====================  ========================================  ==========================  =======

``logits`` come from a differentiable classifier (a white-box model or a surrogate) applied to the
module outputs; ``clean_predictions`` are the black box's own labels on the clean images;
``query_labels`` / ``query_scores`` are the black box's answers on the module outputs. The last two
terms are the zeroth-order losses: a function of black-box answers only, so they carry no gradient
and are meant for the estimators of :mod:`blackbox_rs.fitting.zo`. Their ``target`` is
``clean_predictions`` (default, label-free) or ``labels`` (``ObjectiveConfig.zo_target``).

Row convention: every tensor has one row per *noisy sample*. With ``m`` noise draws per clean image,
repeat the per-image tensors (``clean``, ``labels``, ``clean_predictions``) with
:func:`repeat_per_draw`; the losses are then averages over images and noise draws.

All losses are returned in at least float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from blackbox_rs.errors import ConfigError, InvalidInputError

__all__ = [
    "TERM_NAMES",
    "Objective",
    "ObjectiveConfig",
    "ObjectiveInputs",
    "ObjectiveResult",
    "TermSpec",
    "classification_loss",
    "label_disagreement_loss",
    "mse_loss",
    "repeat_per_draw",
    "score_cross_entropy_loss",
    "stability_loss",
]

TermName = Literal["mse", "stability", "classification", "label_disagreement", "score_ce"]


# ---------------------------------------------------------------------------- checks
def _as_loss_dtype(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _check_float(name: str, t: Any, dims: int | tuple[int, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    allowed = (dims,) if isinstance(dims, int) else dims
    if t.dim() not in allowed:
        raise InvalidInputError(
            f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}"
        )
    if not t.is_floating_point():
        raise InvalidInputError(f"{name} must be floating point, got {t.dtype}")
    if not torch.isfinite(t.detach()).all():
        raise InvalidInputError(f"{name} contains non-finite values")
    return t


def _check_labels(name: str, t: Any, n: int, num_classes: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != n:
        raise InvalidInputError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InvalidInputError(f"{name} must be an integer tensor of class indices, got {t.dtype}")
    if n and int(t.min()) < 0:
        raise InvalidInputError(f"{name} contains a negative class index {int(t.min())}")
    if num_classes is not None and n and int(t.max()) >= num_classes:
        raise InvalidInputError(
            f"{name} contains class {int(t.max())} but there are only {num_classes} classes"
        )
    return t.long()


def _check_nonempty(name: str, t: torch.Tensor) -> None:
    if t.shape[0] == 0:
        raise InvalidInputError(f"{name} is empty: a loss needs at least one sample")


# ---------------------------------------------------------------------------- term functions
def repeat_per_draw(t: torch.Tensor, draws: int) -> torch.Tensor:
    """Repeat each row of ``t`` ``draws`` times (``repeat_interleave``): per-image tensors → per-sample rows,
    for samples ordered image-major (all draws of image 0, then image 1, ...)."""
    if draws < 1:
        raise InvalidInputError(f"draws must be >= 1, got {draws}")
    return t.repeat_interleave(draws, dim=0)


def mse_loss(outputs: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Denoising loss ``mean((outputs − clean)²)`` over every element. Needs no classifier and no queries.

    ``outputs`` is the (unclamped) module output on noisy inputs; ``clean`` the matching clean images.
    """
    _check_float("outputs", outputs, 4)
    _check_float("clean", clean, 4)
    if outputs.shape != clean.shape:
        raise InvalidInputError(
            f"outputs {tuple(outputs.shape)} and clean {tuple(clean.shape)} must have the same shape"
        )
    _check_nonempty("outputs", outputs)
    return F.mse_loss(_as_loss_dtype(outputs), _as_loss_dtype(clean))


def stability_loss(logits: torch.Tensor, clean_predictions: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` (a differentiable classifier on the module outputs) against the black
    box's own labels on the clean images. Needs no ground-truth labels."""
    _check_float("logits", logits, 2)
    _check_nonempty("logits", logits)
    y = _check_labels("clean_predictions", clean_predictions, logits.shape[0], logits.shape[1])
    return F.cross_entropy(_as_loss_dtype(logits), y.to(logits.device))


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` against ground-truth ``labels``."""
    _check_float("logits", logits, 2)
    _check_nonempty("logits", logits)
    y = _check_labels("labels", labels, logits.shape[0], logits.shape[1])
    return F.cross_entropy(_as_loss_dtype(logits), y.to(logits.device))


def label_disagreement_loss(query_labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Label-only loss: the fraction of rows where the black box's label differs from the target.

    Averaged over images and noise draws this is ``1 − p̂(target)``: the quantity a smoothing
    certificate depends on. Piecewise constant in θ: use with zeroth-order estimators and enough
    noise draws. Returns a float32 scalar without gradient.
    """
    if not isinstance(query_labels, torch.Tensor) or query_labels.dim() != 1:
        shape = (
            tuple(query_labels.shape)
            if isinstance(query_labels, torch.Tensor)
            else type(query_labels).__name__
        )
        raise InvalidInputError(f"query_labels must be a 1-D tensor of labels, got {shape}")
    q = _check_labels("query_labels", query_labels, query_labels.shape[0])
    _check_nonempty("query_labels", q)
    t = _check_labels("targets", targets, q.shape[0])
    return (q != t.to(q.device)).float().mean()


def score_cross_entropy_loss(
    query_scores: torch.Tensor,
    targets: torch.Tensor,
    *,
    kind: Literal["probabilities", "logits"] = "probabilities",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Score-based loss: mean ``−log s_target`` of the black box's returned scores (``N×K``).

    ``kind="probabilities"``: scores must lie in ``[0, 1]`` (not necessarily summing to 1); they are
    clamped below at ``eps``. ``kind="logits"``: a softmax cross-entropy. Returns a float32 (or
    float64) scalar; no gradient flows to the module through black-box scores.
    """
    if not (0.0 < eps < 1.0):
        raise InvalidInputError(f"eps must be in (0, 1), got {eps}")
    _check_float("query_scores", query_scores, 2)
    _check_nonempty("query_scores", query_scores)
    y = _check_labels("targets", targets, query_scores.shape[0], query_scores.shape[1]).to(
        query_scores.device
    )
    s = _as_loss_dtype(query_scores)
    if kind == "logits":
        return F.cross_entropy(s, y)
    if kind != "probabilities":
        raise InvalidInputError(f"kind must be 'probabilities' or 'logits', got {kind!r}")
    if float(s.min()) < 0.0 or float(s.max()) > 1.0 + 1e-6:
        raise InvalidInputError(
            f"query_scores must be probabilities in [0, 1] (got range [{float(s.min()):.4g}, {float(s.max()):.4g}]); "
            "pass kind='logits' for unnormalised scores"
        )
    p = s.gather(1, y[:, None]).squeeze(1).clamp_min(eps)
    return -torch.log(p).mean()


# ---------------------------------------------------------------------------- the typed Objective
@dataclass(frozen=True)
class ObjectiveInputs:
    """What an :class:`Objective` may consume; one row per noisy sample. Leave unneeded fields ``None``.

    - ``outputs``: module outputs ``A(x + δ)``, ``N×C×H×W`` (unclamped);
    - ``clean``: the clean images ``x`` for those rows, ``N×C×H×W``;
    - ``logits``: ``N×K`` logits of a differentiable classifier on the (clamped) module outputs;
    - ``labels``: ``N`` ground-truth labels;
    - ``clean_predictions``: ``N`` black-box labels on the clean images;
    - ``query_labels``: ``N`` black-box labels on the module outputs;
    - ``query_scores``: ``N×K`` black-box scores on the module outputs.
    """

    outputs: torch.Tensor | None = None
    clean: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    clean_predictions: torch.Tensor | None = None
    query_labels: torch.Tensor | None = None
    query_scores: torch.Tensor | None = None


_INPUT_FIELDS = frozenset(f.name for f in fields(ObjectiveInputs))


@dataclass(frozen=True)
class TermSpec:
    """Static facts about one objective term."""

    name: str
    inputs: tuple[str, ...]  # fields of ObjectiveInputs it reads ("target" = zo_target's field)
    differentiable: bool  # autograd reaches the module through it
    needs_queries: bool  # needs black-box answers on module outputs (fit-time queries)


TERMS: dict[str, TermSpec] = {
    "mse": TermSpec("mse", ("outputs", "clean"), True, False),
    "stability": TermSpec("stability", ("logits", "clean_predictions"), True, False),
    "classification": TermSpec("classification", ("logits", "labels"), True, False),
    "label_disagreement": TermSpec("label_disagreement", ("query_labels", "target"), False, True),
    "score_ce": TermSpec("score_ce", ("query_scores", "target"), False, True),
}
TERM_NAMES: tuple[str, ...] = tuple(TERMS)


class ObjectiveConfig(BaseModel):
    """Weights of the objective terms, e.g. ``{"mse": 1.0, "stability": 0.5}``.

    Validated: names must be in :data:`TERM_NAMES`, weights finite and ``>= 0``, at least one ``> 0``.
    ``zo_target`` picks the target of the label/score terms: the black box's clean prediction
    (label-free, default) or the ground-truth label.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: dict[str, float] = Field(description="term name -> non-negative weight")
    zo_target: Literal["clean_prediction", "label"] = "clean_prediction"
    score_kind: Literal["probabilities", "logits"] = "probabilities"
    score_eps: float = Field(default=1e-6, gt=0.0, lt=1.0)

    @field_validator("weights")
    @classmethod
    def _valid_weights(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(TERMS))
        if unknown:
            raise ValueError(f"unknown objective term(s) {unknown}; known terms: {list(TERM_NAMES)}")
        for k, w in v.items():
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"weight of {k!r} must be finite and >= 0, got {w}")
        if not any(w > 0 for w in v.values()):
            raise ValueError(f"at least one weight must be > 0, got {v}")
        return v


@dataclass(frozen=True)
class ObjectiveResult:
    """``total`` = Σ weight·term (a scalar tensor, ≥ float32); ``terms`` holds each unweighted term."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]

    def as_floats(self) -> dict[str, float]:
        """``{"total": ..., term: ...}`` as Python floats (for logs and reports)."""
        out = {"total": float(self.total.detach())}
        out.update({k: float(v.detach()) for k, v in self.terms.items()})
        return out


class Objective:
    """A weighted sum of objective terms with validated names and declared needs.

    ``Objective({"mse": 1.0, "stability": 0.5})`` or ``Objective(ObjectiveConfig(...))``. Call it
    with an :class:`ObjectiveInputs` (or its fields as keywords); it checks that every field its
    active terms need is present, raising :class:`InvalidInputError` naming the missing field.
    Terms with weight 0 are neither required nor computed.
    """

    def __init__(self, config: ObjectiveConfig | Mapping[str, Any]) -> None:
        if not isinstance(config, ObjectiveConfig):
            data = dict(config)
            try:
                config = ObjectiveConfig.model_validate(data if "weights" in data else {"weights": data})
            except ValidationError as err:
                msg = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
                raise ConfigError(f"invalid objective: {msg}") from None
        self.config: ObjectiveConfig = config
        self.weights: dict[str, float] = {k: w for k, w in config.weights.items() if w > 0}

    def __repr__(self) -> str:
        return f"Objective({self.weights}, zo_target={self.config.zo_target!r})"

    @property
    def terms(self) -> tuple[str, ...]:
        """Names of the active terms (weight > 0), in the canonical order of :data:`TERM_NAMES`."""
        return tuple(t for t in TERM_NAMES if t in self.weights)

    @property
    def target_field(self) -> str:
        """The :class:`ObjectiveInputs` field used as target by the label/score terms."""
        return "clean_predictions" if self.config.zo_target == "clean_prediction" else "labels"

    @property
    def required_inputs(self) -> frozenset[str]:
        """Fields of :class:`ObjectiveInputs` that must be provided."""
        req: set[str] = set()
        for t in self.terms:
            for f in TERMS[t].inputs:
                req.add(self.target_field if f == "target" else f)
        return frozenset(req)

    @property
    def differentiable(self) -> bool:
        """True when every active term lets autograd reach the module (usable with torch.optim)."""
        return all(TERMS[t].differentiable for t in self.terms)

    @property
    def needs_queries(self) -> bool:
        """True when some term needs black-box answers on the module outputs."""
        return any(TERMS[t].needs_queries for t in self.terms)

    @property
    def needs_logits(self) -> bool:
        """True when a differentiable classifier (surrogate or white-box) must score the outputs."""
        return "logits" in self.required_inputs

    @property
    def needs_labels(self) -> bool:
        """True when ground-truth labels are required."""
        return "labels" in self.required_inputs

    def __call__(
        self, inputs: ObjectiveInputs | None = None, **kwargs: torch.Tensor | None
    ) -> ObjectiveResult:
        """Compute every active term and the weighted total."""
        if inputs is None:
            bad = sorted(set(kwargs) - _INPUT_FIELDS)
            if bad:
                raise InvalidInputError(f"unknown objective input(s) {bad}; known: {sorted(_INPUT_FIELDS)}")
            inputs = ObjectiveInputs(**kwargs)
        elif kwargs:
            raise InvalidInputError("pass either an ObjectiveInputs or keyword tensors, not both")
        missing = sorted(f for f in self.required_inputs if getattr(inputs, f) is None)
        if missing:
            raise InvalidInputError(
                f"objective {self.weights} needs input(s) {missing} (active terms: {list(self.terms)})"
            )
        target = getattr(inputs, self.target_field)
        compute: dict[str, Callable[[], torch.Tensor]] = {
            "mse": lambda: mse_loss(inputs.outputs, inputs.clean),  # type: ignore[arg-type]
            "stability": lambda: stability_loss(inputs.logits, inputs.clean_predictions),  # type: ignore[arg-type]
            "classification": lambda: classification_loss(inputs.logits, inputs.labels),  # type: ignore[arg-type]
            "label_disagreement": lambda: label_disagreement_loss(inputs.query_labels, target),  # type: ignore[arg-type]
            "score_ce": lambda: score_cross_entropy_loss(
                inputs.query_scores,  # type: ignore[arg-type]
                target,
                kind=self.config.score_kind,
                eps=self.config.score_eps,
            ),
        }
        values = {t: compute[t]() for t in self.terms}
        total: torch.Tensor | None = None
        for t, v in values.items():
            contrib = self.weights[t] * v
            total = contrib if total is None else total + contrib.to(total.device)
        if total is None:  # unreachable: ObjectiveConfig guarantees one active term
            raise ConfigError("objective has no active term")
        return ObjectiveResult(total=total, terms=values)
