"""Open Inference Protocol v2 tensors on the wire: an image batch as the request's input tensor, and
the answer's output tensor read back as a :class:`~blackbox_rs.connectors.base.Prediction`.

Part of :mod:`blackbox_rs.connectors.kserve_v2` (its module docstring states the encodings and the
checks). Pure functions of their arguments: the same batch always gives the same request body, and
every answer that is not exactly N well-formed predictions raises :class:`InvalidResponseError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from blackbox_rs.errors import InvalidResponseError

from ._encoding import ImageEncoding, Layout, b64encode, encode_images, to_float32_array, to_uint8_array
from .base import Prediction
from .labelmap import LabelMap

__all__ = ["FLOAT_TYPES", "INT_TYPES", "check_envelope", "decode_output", "encode_input"]

FLOAT_TYPES = {"FP16", "FP32", "FP64", "BF16"}
INT_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}


def encode_input(
    batch: torch.Tensor,
    *,
    name: str,
    datatype: str,
    encoding: ImageEncoding,
    layout: Layout,
    jpeg_quality: int,
    bytes_2d: bool,
    content_type: str | None,
) -> dict[str, Any]:
    """The input tensor of ``POST .../infer`` for ``batch`` (``N x C x H x W`` in ``[0, 1]``)."""
    n = int(batch.shape[0])
    if encoding is ImageEncoding.FP32:
        arr = to_float32_array(batch, layout)
        return {"name": name, "shape": [n, *arr.shape[1:]], "datatype": datatype, "data": arr.ravel().tolist()}
    if encoding is ImageEncoding.UINT8:
        arr = to_uint8_array(batch, layout)
        return {"name": name, "shape": [n, *arr.shape[1:]], "datatype": "UINT8", "data": arr.ravel().tolist()}
    blobs = encode_images(batch, encoding, jpeg_quality=jpeg_quality)
    t: dict[str, Any] = {"name": name, "shape": [n, 1] if bytes_2d else [n], "datatype": "BYTES",
                         "data": [b64encode(b) for b in blobs]}
    if content_type:
        t["parameters"] = {"content_type": content_type}
    return t


def check_envelope(doc: Any, rid: str, where: str) -> list[dict[str, Any]]:
    """The answer's output tensors, after checking it is a JSON object with an ``outputs`` list and
    (if it echoes one) the request's ``id``."""
    if not isinstance(doc, dict) or not isinstance(doc.get("outputs"), list):
        raise InvalidResponseError(f"{where}: the answer has no 'outputs' list: {str(doc)[:200]!r}")
    if doc.get("id") not in (None, "", rid):
        raise InvalidResponseError(f"{where}: the answer carries id {doc.get('id')!r}, not the request's id")
    return [o for o in doc["outputs"] if isinstance(o, dict)]


def decode_output(
    outs: Sequence[dict[str, Any]],
    n: int,
    where: str,
    *,
    output_name: str | None,
    kind: Literal["scores", "index", "label"],
    num_classes: int,
    label_map: LabelMap | None,
    label_depth: int | None,
) -> Prediction:
    """The prediction for ``n`` images from the answer's output tensors (see the module docstring of
    :mod:`blackbox_rs.connectors.kserve_v2` for how each ``kind`` is read)."""
    if output_name is not None:
        match = [o for o in outs if o.get("name") == output_name]
        if not match:
            raise InvalidResponseError(
                f"{where}: no output named {output_name!r} in the answer (got {[o.get('name') for o in outs]})"
            )
        out = match[0]
    elif len(outs) == 1:
        out = outs[0]
    else:
        raise InvalidResponseError(
            f"{where}: the answer has {len(outs)} outputs {[o.get('name') for o in outs]}; pass output_name="
        )
    shape, data = out.get("shape"), out.get("data")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape) or not shape:
        raise InvalidResponseError(f"{where}: output shape {shape!r} is not a list of sizes")
    if not isinstance(data, list):
        raise InvalidResponseError(f"{where}: output data is {type(data).__name__}, not a list")
    if shape[0] != n:
        raise InvalidResponseError(f"{where}: the server returned predictions for {shape[0]} images, {n} were sent")
    if len(data) != math.prod(shape):
        raise InvalidResponseError(
            f"{where}: output shape {shape} needs {math.prod(shape)} values, the answer has {len(data)}"
        )
    k = num_classes
    if kind == "scores":
        width = math.prod(shape[1:]) if len(shape) > 1 else 1
        if width != k:
            raise InvalidResponseError(
                f"{where}: the model returned scores of width {width} (shape {shape}), the connector has "
                f"{k} classes"
            )
        try:
            arr = np.asarray(data, dtype=np.float64).reshape(n, k)
        except (TypeError, ValueError):
            raise InvalidResponseError(f"{where}: score output contains non-numeric values") from None
        if not np.isfinite(arr).all():
            raise InvalidResponseError(f"{where}: the model returned NaN or inf scores")
        labels = torch.from_numpy(np.argmax(arr, axis=1).astype(np.int64))
        return Prediction(labels=labels, scores=torch.from_numpy(arr.astype(np.float32)))
    if kind == "index":
        if math.prod(shape[1:]) != 1:
            raise InvalidResponseError(f"{where}: an index output must be [N] or [N, 1], got shape {shape}")
        if not all(isinstance(v, int | float) and float(v).is_integer() for v in data):
            raise InvalidResponseError(f"{where}: the index output contains non-integer values")
        return Prediction(labels=torch.tensor([int(v) for v in data], dtype=torch.int64))
    # labels: [N] or [N, k] ranked lists
    assert label_map is not None
    if not all(isinstance(v, str) for v in data):
        raise InvalidResponseError(f"{where}: a label output must contain strings")
    per = math.prod(shape[1:]) if len(shape) > 1 else 1
    rows = [data[i * per : (i + 1) * per] for i in range(n)]
    return Prediction(labels=torch.tensor([label_map.map_ranked(r, depth=label_depth) for r in rows],
                                          dtype=torch.int64))
