"""Fitting data: a torch Dataset, tensors or numpy arrays ``(x, y)`` or unlabeled ``x`` -> validated
in-memory tensors.

numpy images are float in [0, 1] or ``uint8`` 0..255 (divided by 255), ``N x C x H x W`` or
``N x H x W x C`` (``N x H x W`` for a 1-channel model); numpy labels are integers. Any other dtype,
a shape that fits neither layout, values outside [0, 1], NaN/inf or labels of the wrong kind raise
:class:`~blackbox_rs.errors.InvalidInputError` naming the problem, before anything is queried.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from blackbox_rs.connectors.base import ConnectorInfo, check_images
from blackbox_rs.data_files import as_image_tensor
from blackbox_rs.errors import InvalidInputError

__all__ = ["FitData", "as_fit_data"]


@dataclass(frozen=True)
class FitData:
    """Images ``N x C x H x W`` (float32 in [0, 1]) and optional int64 labels ``[N]``: on the CPU as
    :func:`as_fit_data` validates them; a :class:`~blackbox_rs.fitting.context.FitContext` holds a
    copy on the fit device."""

    x: torch.Tensor
    y: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _np_labels(y: Any) -> torch.Tensor:
    """Labels (numpy array, list or tensor) as a tensor; non-integer numpy labels are an error."""
    if isinstance(y, np.ndarray):
        if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
            raise InvalidInputError(f"labels must be integers, got numpy dtype {y.dtype}")
        return torch.from_numpy(np.ascontiguousarray(y).astype(np.int64))
    try:
        return torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidInputError(f"labels must be a sequence of integers, got {type(y).__name__} ({exc})") from None


def _item_image(x: Any, shape: tuple[int, ...]) -> torch.Tensor:
    return as_image_tensor(x, shape, batched=False) if isinstance(x, np.ndarray) else torch.as_tensor(x)


def _stack_dataset(dataset: Any, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
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
            xs.append(_item_image(item[0], shape))
            if len(item) > 1:
                ys.append(int(item[1]))
        else:
            xs.append(_item_image(item, shape))
    if ys and len(ys) != len(xs):
        raise InvalidInputError("either every dataset item has a label or none does")
    try:
        x = torch.stack(xs) if xs else torch.empty(0)
    except RuntimeError:
        shapes = sorted({tuple(t.shape) for t in xs})
        raise InvalidInputError(f"dataset images differ in shape ({', '.join(map(str, shapes[:4]))}); "
                                f"each must be {' x '.join(map(str, shape))}") from None
    return x, (torch.tensor(ys, dtype=torch.int64) if ys else None)


def as_fit_data(dataset: Any, info: ConnectorInfo) -> FitData:
    """Validate and stack ``dataset``: a ``(x, y)`` tuple of tensors or numpy arrays, an ``x``
    tensor or array, or a Dataset (whose items may be numpy arrays). numpy images may be ``uint8``
    (divided by 255) and channels-last (see the module docstring).

    Raises :class:`InvalidInputError` naming the problem: a dtype that is not float (or numpy
    uint8), wrong shape for the model, values outside [0, 1] or non-finite, labels that are not
    integers, of the wrong length or outside ``[0, K)``, an empty dataset.
    """
    shape = tuple(info.input_shape)
    if isinstance(dataset, torch.Tensor):
        x, y = dataset, None
    elif isinstance(dataset, np.ndarray):
        x, y = as_image_tensor(dataset, shape, batched=True), None
    elif (isinstance(dataset, (tuple, list)) and len(dataset) == 2
          and isinstance(dataset[0], (torch.Tensor, np.ndarray))):
        x = dataset[0] if isinstance(dataset[0], torch.Tensor) else as_image_tensor(dataset[0], shape, batched=True)
        y = _np_labels(dataset[1])
    else:
        x, y = _stack_dataset(dataset, shape)
    # the one image check (connectors.base.check_images); an empty batch passes it, so say so after
    x = check_images(x, shape=info.input_shape, as_float32_cpu=True, what="fit data")
    if x.shape[0] == 0:
        raise InvalidInputError("the dataset is empty")
    if y is not None:
        if y.dtype.is_floating_point or y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise InvalidInputError(f"labels must be {x.shape[0]} integers, got shape {tuple(y.shape)} {y.dtype}")
        y = y.to(torch.int64)
        k = info.num_classes
        if int(y.min()) < 0 or int(y.max()) >= k:
            raise InvalidInputError(f"labels must lie in [0, {k}) (the model's classes), got [{int(y.min())}, {int(y.max())}]")
    return FitData(x=x, y=y)
