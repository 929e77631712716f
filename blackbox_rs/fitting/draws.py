"""Row layout of noise draws: the one convention for expanding images into draws and folding back.

A batch of ``n`` images with ``draws`` noise draws each is laid out **image-major**: row
``i * draws + j`` is draw ``j`` of image ``i``, i.e. rows ``x0, x0, …, x0, x1, x1, …`` (each image
``draws`` times in a row). :func:`repeat_draws` expands per-image tensors (images, labels, targets,
per-image sigmas) into that layout (``repeat_interleave``); :func:`per_image` folds per-row results
back into ``n × draws`` (a ``view``), so row ``i`` of the fold holds exactly the draws of image ``i``.

Guarantee: ``per_image(f(repeat_draws(x, draws)), n, draws)[i, j]`` is ``f``'s result on draw ``j`` of
image ``i``, for every row-wise ``f``. The other layout, draw-major (``Tensor.repeat``: rows
``x0, x1, …, x0, x1, …``), has the same shape, so mixing the two raises nothing and silently pairs
results with the wrong images: expand and fold with these two functions only.
"""

from __future__ import annotations

from typing import Any

import torch

from blackbox_rs.errors import InvalidInputError, InvalidParameterError

__all__ = ["per_image", "repeat_draws"]


def _count(name: str, v: Any, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise InvalidParameterError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return v


def _rows(name: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 0:
        raise InvalidInputError(f"{name} must have a row dimension, got a 0-d tensor")
    return t


def repeat_draws(x: torch.Tensor, draws: int) -> torch.Tensor:
    """Per-image rows → per-draw rows, image-major: row ``i * draws + j`` of the result is ``x[i]``.

    ``x`` is any tensor with images (or their labels) along dim 0; the result has
    ``x.shape[0] * draws`` rows and the same trailing shape, dtype and device (a new tensor).
    """
    x = _rows("x", x)
    return x.repeat_interleave(_count("draws", draws, 1), dim=0)


def per_image(values: torch.Tensor, n: int, draws: int) -> torch.Tensor:
    """Per-draw rows laid out by :func:`repeat_draws` → ``n × draws × …``: ``[i, j]`` is draw ``j`` of
    image ``i`` (row ``i * draws + j`` of ``values``).

    A view of ``values`` when its memory allows (a copy otherwise; the values are the same). Raises
    :class:`~blackbox_rs.errors.InvalidInputError` unless ``values`` has exactly ``n * draws`` rows.
    """
    values = _rows("values", values)
    n, draws = _count("n", n, 0), _count("draws", draws, 1)
    if values.shape[0] != n * draws:
        raise InvalidInputError(
            f"values has {values.shape[0]} rows, expected n * draws = {n} * {draws} = {n * draws}"
        )
    return values.reshape(n, draws, *values.shape[1:])
