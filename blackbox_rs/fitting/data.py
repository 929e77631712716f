"""Fitting data: a torch Dataset, tensors ``(x, y)`` or unlabeled ``x`` -> validated in-memory tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from blackbox_rs.connectors.base import ConnectorInfo
from blackbox_rs.errors import InvalidInputError

__all__ = ["FitData", "as_fit_data"]


@dataclass(frozen=True)
class FitData:
    """Images ``N x C x H x W`` (float32 in [0, 1]) and optional int64 labels ``[N]``."""

    x: torch.Tensor
    y: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _stack_dataset(dataset: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    try:
        n = len(dataset)
    except TypeError:
        raise InvalidInputError(f"dataset must be sized (a torch Dataset or tensors), got {type(dataset).__name__}") from None
    xs, ys = [], []
    for i in range(n):
        item = dataset[i]
        if isinstance(item, (tuple, list)):
            if len(item) < 1:
                raise InvalidInputError(f"dataset item {i} is empty")
            xs.append(torch.as_tensor(item[0]))
            if len(item) > 1:
                ys.append(int(item[1]))
        else:
            xs.append(torch.as_tensor(item))
    if ys and len(ys) != len(xs):
        raise InvalidInputError("either every dataset item has a label or none does")
    x = torch.stack(xs) if xs else torch.empty(0)
    return x, (torch.tensor(ys, dtype=torch.int64) if ys else None)


def as_fit_data(dataset: Any, info: ConnectorInfo) -> FitData:
    """Validate and stack ``dataset``: a ``(x, y)`` tuple of tensors, an ``x`` tensor, or a Dataset.

    Raises :class:`InvalidInputError` naming the problem: wrong shape for the model, values outside
    [0, 1] or non-finite, labels of the wrong length or outside ``[0, K)``, an empty dataset.
    """
    if isinstance(dataset, torch.Tensor):
        x, y = dataset, None
    elif isinstance(dataset, (tuple, list)) and len(dataset) == 2 and isinstance(dataset[0], torch.Tensor):
        x, y = dataset[0], torch.as_tensor(dataset[1])
    else:
        x, y = _stack_dataset(dataset)
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise InvalidInputError(f"images must be a float tensor in [0, 1], got {getattr(x, 'dtype', type(x))}")
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(info.input_shape):
        raise InvalidInputError(
            f"images must be N x {' x '.join(map(str, info.input_shape))} for this model, got {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise InvalidInputError("the dataset is empty")
    x = x.detach().to("cpu", torch.float32).contiguous()
    lo, hi = (float(v) for v in torch.aminmax(x))
    if not (lo >= 0.0 and hi <= 1.0):
        if not bool(torch.isfinite(x).all()):
            raise InvalidInputError("images contain NaN or inf values")
        raise InvalidInputError(f"image values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")
    if y is not None:
        if y.dtype.is_floating_point or y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise InvalidInputError(f"labels must be {x.shape[0]} integers, got shape {tuple(y.shape)} {y.dtype}")
        y = y.to(torch.int64)
        k = info.num_classes
        if int(y.min()) < 0 or int(y.max()) >= k:
            raise InvalidInputError(f"labels must lie in [0, {k}) (the model's classes), got [{int(y.min())}, {int(y.max())}]")
    return FitData(x=x, y=y)
