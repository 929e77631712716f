"""A Python function as an opaque base model (tests, notebooks, quick wrappers)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence

import torch

from blackbox_rs.errors import InvalidParameterError, InvalidResponseError

from .base import BaseConnector, ConnectorInfo, Prediction

__all__ = ["CallableConnector"]

QueryFn = Callable[[torch.Tensor], "torch.Tensor | Prediction"]


class CallableConnector(BaseConnector):
    """Wrap ``fn(batch) -> labels | logits | Prediction``.

    ``fn`` receives a validated float32 batch ``N x C x H x W`` in ``[0, 1]``. It may return int
    labels ``[N]``, float logits/scores ``[N, K]`` (labels are their argmax; scores are passed on only
    if ``returns_scores``), or a :class:`Prediction`.

    ``fingerprint`` names the model for the query cache. Give a stable one (e.g. ``"mymodel:v3"``) to
    reuse cached answers across runs; the default is unique to this object, so nothing is ever
    shared with another model by accident.
    """

    def __init__(
        self,
        fn: QueryFn,
        *,
        input_shape: Sequence[int],
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        returns_scores: bool = False,
        max_batch: int = 1024,
        max_concurrency: int = 1,
        cost_per_query: float = 0.0,
        fingerprint: str | None = None,
        differentiable: bool = False,
    ) -> None:
        if not callable(fn):
            raise InvalidParameterError(f"fn must be callable, got {type(fn).__name__}")
        if class_names is None:
            if num_classes is None:
                raise InvalidParameterError("give class_names or num_classes")
            class_names = [str(i) for i in range(int(num_classes))]
        self._fn = fn
        self._info = ConnectorInfo(
            input_shape=tuple(int(d) for d in input_shape),  # type: ignore[arg-type]
            class_names=tuple(class_names),
            returns_scores=returns_scores,
            max_batch=max_batch,
            max_concurrency=max_concurrency,
            cost_per_query=cost_per_query,
            fingerprint=fingerprint or f"callable:{getattr(fn, '__qualname__', 'fn')}:{uuid.uuid4().hex}",
            differentiable=differentiable,
        )

    def forward_logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Differentiable forward (only when ``differentiable=True`` and ``fn`` returns logits)."""
        if not self._info.differentiable:
            raise InvalidParameterError("this CallableConnector was not declared differentiable")
        out = self._fn(batch)
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            raise InvalidResponseError("a differentiable callable must return logits of shape (N, K)")
        return out

    def _query(self, batch: torch.Tensor) -> Prediction:
        with torch.no_grad():
            out = self._fn(batch)
        if isinstance(out, Prediction):
            if not self._info.returns_scores:
                return Prediction(labels=out.labels, scores=None)
            return out
        if not isinstance(out, torch.Tensor):
            raise InvalidResponseError(f"fn returned {type(out).__name__}, expected a tensor or Prediction")
        if out.ndim == 2 and out.dtype.is_floating_point:
            labels = out.argmax(dim=1)
            return Prediction(labels=labels, scores=out if self._info.returns_scores else None)
        return Prediction(labels=out, scores=None)
