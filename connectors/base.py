"""The connector contract: how blackbox-rs talks to an opaque base model.

A connector wraps one base model ``f``. It receives a float32 batch ``N x C x H x W`` with values in
``[0, 1]`` (already noisy, already passed through any input module, already clipped) and returns a
:class:`Prediction`: one int64 label per image and, if the model exposes them, an ``N x K`` score
matrix. Anything it does to the batch on the way (resizing, normalising, uint8 quantisation,
PNG/JPEG encoding) is deterministic post-processing of the noisy input, so it is part of the base
classifier and certificates stay valid.

Connectors are never called directly by the SDK: every query goes through
:class:`blackbox_rs.engine.QueryEngine`, which validates inputs and answers, batches, budgets,
caches and counts.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from blackbox_rs.errors import (
    BlackBoxRSError,
    ConnectorError,
    InvalidInputError,
    InvalidResponseError,
)

__all__ = [
    "BaseConnector",
    "BlackBoxRSError",
    "Connector",
    "ConnectorError",
    "ConnectorInfo",
    "InvalidInputError",
    "InvalidResponseError",
    "Prediction",
    "check_images",
    "validate_batch",
    "validate_prediction",
]


@dataclass(frozen=True)
class Prediction:
    """What a base model answered for a batch.

    labels: int64 tensor of shape ``[N]``, each in ``[0, K)``.
    scores: optional float tensor ``[N, K]`` (probabilities or logits, as the connector documents).
    """

    labels: torch.Tensor
    scores: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def concat(cls, parts: Sequence[Prediction]) -> Prediction:
        """The answers of consecutive chunks as one; scores only if every chunk has them."""
        if len(parts) == 1:
            return parts[0]
        scores = None
        if all(p.scores is not None for p in parts):
            scores = torch.cat([p.scores for p in parts])  # type: ignore[misc]
        return cls(labels=torch.cat([p.labels for p in parts]), scores=scores)


class ConnectorInfo(BaseModel):
    """What a connector declares about its base model.

    The ``fingerprint`` identifies the model *and its version* (a file hash, an endpoint URL plus a
    model version): cached answers are keyed by it, so two models must never share one. It must never
    contain a secret.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_shape: tuple[int, int, int] = Field(description="(C, H, W) of one input image")
    class_names: tuple[str, ...] = Field(description="names of the K classes, index = label")
    returns_scores: bool = False
    max_batch: int = Field(default=256, ge=1, description="most images per request")
    max_concurrency: int = Field(default=1, ge=1, description="requests the backend accepts in parallel")
    cost_per_query: float = Field(default=0.0, ge=0.0, description="price of one image query (any currency)")
    fingerprint: str = Field(min_length=1)
    differentiable: bool = False
    other_index: int | None = Field(
        default=None,
        description="index of the catch-all class ('none of your classes', e.g. a label map's `other`), if "
        "any: certification never counts it as correct or consistent and reports it in its own column",
    )

    @field_validator("input_shape")
    @classmethod
    def _positive_shape(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(d < 1 for d in v):
            raise ValueError(f"input_shape must be positive, got {v}")
        return v

    @model_validator(mode="after")
    def _classes(self) -> ConnectorInfo:
        if len(self.class_names) < 2:
            raise ValueError("a classifier needs at least 2 classes")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names must be unique")
        if self.other_index is not None and not (0 <= self.other_index < len(self.class_names)):
            raise ValueError(f"other_index {self.other_index} is outside the {len(self.class_names)} classes")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@runtime_checkable
class Connector(Protocol):
    """Structural type of a connector: an ``info`` and a ``query`` method."""

    @property
    def info(self) -> ConnectorInfo: ...

    def query(self, batch: torch.Tensor) -> Prediction: ...


class BaseConnector(abc.ABC):
    """Convenience base class: subclasses set ``self._info`` and implement :meth:`_query`.

    :meth:`query` validates the batch it is given and the prediction it returns, so a subclass only
    does the model-specific work.
    """

    _info: ConnectorInfo

    @property
    def info(self) -> ConnectorInfo:
        return self._info

    def query(self, batch: torch.Tensor) -> Prediction:
        validate_batch(batch, self._info)
        pred = self._query(batch)
        return validate_prediction(pred, int(batch.shape[0]), self._info)

    @abc.abstractmethod
    def _query(self, batch: torch.Tensor) -> Prediction:
        """Model-specific query; ``batch`` is already validated."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (sessions, servers). Default: nothing to release."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fingerprint={self._info.fingerprint!r})"


_FLOAT32 = (torch.float32,)


def _dims(shape: Sequence[int | None]) -> str:
    """``(3, None, None)`` -> ``"3 x H x W"``."""
    return " x ".join("CHW"[i] if d is None else str(d) for i, d in enumerate(shape))


def check_images(
    x: object,
    *,
    shape: Sequence[int | None] | None = None,
    batched: bool = True,
    value_range: tuple[float, float] | None = (0.0, 1.0),
    dtypes: Sequence[torch.dtype] | None = None,
    as_float32_cpu: bool = False,
    what: str = "input",
    owner: str = "the model",
) -> torch.Tensor:
    """The one image check of blackbox-rs: every place that accepts images calls it, so the rules
    and the wording are the same everywhere.

    ``x`` must be a torch tensor of a floating-point dtype (one of ``dtypes`` if given), a batch
    ``N x C x H x W`` (``batched=True``) or one image ``C x H x W``, with ``C x H x W`` equal to
    ``shape`` if given (``None`` entries match any size, e.g. ``(c, None, None)``) and, unless
    ``value_range`` is ``None``, finite values in ``value_range`` (checked in one
    :func:`torch.aminmax` pass; NaN and inf are looked for only when that pass fails). With
    ``as_float32_cpu`` the result is a detached, contiguous float32 CPU copy and the range is checked
    on it (on the values the model will see); otherwise ``x`` itself is returned. An empty batch has
    no values to check.

    Raises :class:`InvalidInputError` whose message starts with ``what`` and names the problem:
    "``what`` must be a torch.Tensor", "must be a float tensor", "must be N×C×H×W (4-D)",
    "has shape ..., ``owner`` expects ...", "contains NaN or inf values", "values must lie in
    [lo, hi], got [min, max]".
    """
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point or (dtypes is not None and x.dtype not in dtypes):
        names = [str(d).removeprefix("torch.") for d in dtypes or ()]
        kinds = "" if not names else " " + " or ".join(filter(None, (", ".join(names[:-1]), names[-1])))
        values = "" if value_range is None else f" with values in [{value_range[0]:g}, {value_range[1]:g}]"
        raise InvalidInputError(
            f"{what} must be a float tensor (floating-point dtype{kinds}){values}, got dtype {x.dtype}"
        )
    rank = 4 if batched else 3
    if x.ndim != rank:
        layout = "N×C×H×W (4-D)" if batched else "C×H×W (3-D)"
        raise InvalidInputError(f"{what} must be {layout}, got shape {tuple(x.shape)}")
    if shape is not None:
        image = tuple(x.shape[1:] if batched else x.shape)
        if image != tuple(shape) and (  # the fast path is one tuple comparison
            len(shape) != len(image) or any(w is not None and w != g for w, g in zip(shape, image, strict=True))
        ):
            want = ("N x " if batched else "") + _dims(shape)
            raise InvalidInputError(f"{what} has shape {tuple(x.shape)}, {owner} expects {want}")
    if as_float32_cpu:
        x = x.detach().to("cpu", torch.float32).contiguous()
    if value_range is not None and x.numel():
        low, high = value_range
        # one pass: min/max propagate NaN, and +-inf fall outside any finite range
        lo, hi = (float(v) for v in torch.aminmax(x.detach() if x.requires_grad else x))
        if not (lo >= low and hi <= high):
            if not bool(torch.isfinite(x).all()):
                raise InvalidInputError(f"{what} contains NaN or inf values")
            raise InvalidInputError(
                f"{what} values must lie in [{low:g}, {high:g}], got [{lo:.4g}, {hi:.4g}]"
            )
    return x


def validate_batch(batch: object, info: ConnectorInfo) -> torch.Tensor:
    """Check that ``batch`` honours the connector input contract: a float32 ``N x C x H x W``
    tensor of the model's input shape, finite, values in ``[0, 1]`` (:func:`check_images`, one
    :func:`torch.aminmax` pass). Returns ``batch`` itself.

    Raises :class:`InvalidInputError` naming the problem: not a tensor, wrong dtype, wrong rank or
    shape, NaN/inf, values outside ``[0, 1]``.
    """
    return check_images(batch, shape=info.input_shape, dtypes=_FLOAT32, what="batch")


def validate_prediction(pred: object, n: int, info: ConnectorInfo) -> Prediction:
    """Check a connector's answer for a batch of ``n`` images; normalise dtypes.

    Raises :class:`InvalidResponseError` for a wrong type, a wrong number of labels, labels outside
    ``[0, K)``, or scores of the wrong shape or with non-finite values.
    """
    if not isinstance(pred, Prediction):
        raise InvalidResponseError(f"connector must return a Prediction, got {type(pred).__name__}")
    labels = pred.labels
    if not isinstance(labels, torch.Tensor):
        raise InvalidResponseError(f"Prediction.labels must be a tensor, got {type(labels).__name__}")
    if labels.ndim != 1 or int(labels.shape[0]) != n:
        raise InvalidResponseError(
            f"connector returned {tuple(labels.shape)} labels for a batch of {n} images (expected ({n},))"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise InvalidResponseError(f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.to(torch.int64)
    k = info.num_classes
    if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
        bad = labels[(labels < 0) | (labels >= k)][0].item()
        raise InvalidResponseError(f"connector returned label {bad}, outside its {k} classes [0, {k})")
    scores = pred.scores
    if scores is not None:
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (n, k):
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise InvalidResponseError(f"scores must have shape ({n}, {k}), got {shape}")
        scores = scores.to(torch.float32)
        if scores.numel() and not bool(torch.isfinite(scores).all()):
            raise InvalidResponseError("connector returned NaN or inf scores")
    return Prediction(labels=labels, scores=scores)

