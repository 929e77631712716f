"""TensorFlow Serving REST ``:predict`` (also KServe v1 and Vertex AI custom containers).

``POST {base_url}/v1/models/{name}[/versions/{v}]:predict`` with the row format
``{"signature_name": s, "instances": [{"<input_key>": {"b64": "<b64>"}}, ...]}`` (``input_key=None``
sends ``{"b64": ...}`` as the instance itself, for a single string input). Batches of up to 32 images
by default. No auth (put it behind a proxy; ``auth=`` works if there is one).

Each row of ``predictions`` is read as
* a list of numbers: the model's scores over ``vocabulary`` (its class names in output order;
  default ``"0".."K-1"``);
* an object with ``classes`` and ``scores`` (any order), or with ``output_key`` naming a score vector.

Non-standard ``NaN`` / ``Infinity`` tokens are accepted and rank last. Errors are an HTTP status
with ``{"error": ...}``; 503 is retried. Self-hosted: no per-image price.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from blackbox_rs.errors import InvalidResponseError

from ._encoding import b64encode
from ._vendor import Item, Label, VendorConnector, VendorSpec, WireRequest

__all__ = ["TFServingConnector"]


class TFServingConnector(VendorConnector):
    """A model served by TensorFlow Serving (see the module docstring)."""

    spec = VendorSpec(name="tf_serving", vendor="TF Serving", max_batch=32, max_in_flight=4, encoding="png")

    def __init__(self, model_name: str, *, base_url: str = "http://127.0.0.1:8501", model_version: str | None = None,
                 signature_name: str | None = None, input_key: str | None = "image_bytes",
                 vocabulary: Sequence[str] | None = None, output_key: str | None = None, **common: Any) -> None:
        path = f"/v1/models/{quote(model_name, safe='')}"
        if model_version:
            path += f"/versions/{quote(model_version, safe='')}"
        self._path = path + ":predict"
        self._signature = signature_name
        self._input_key = input_key
        self._vocab = [str(v) for v in vocabulary] if vocabulary is not None else None
        self._output_key = output_key
        # the vocabulary names the score columns: another order is another classifier
        vocab = None if self._vocab is None else hashlib.sha256(json.dumps(self._vocab).encode()).hexdigest()[:16]
        super().__init__(base_url, identity={"path": self._path, "signature": signature_name, "input": input_key,
                                             "output": output_key, "vocabulary": vocab}, **common)

    def _request(self, images: list[bytes]) -> WireRequest:
        rows = [{"b64": b64encode(b)} for b in images]
        body: dict[str, Any] = {"instances": rows if self._input_key is None else [{self._input_key: r} for r in rows]}
        if self._signature:
            body["signature_name"] = self._signature
        return WireRequest(self._path, json_body=body)

    def _parse(self, body: Any, n: int) -> list[Item]:
        rows = body.get("predictions") if isinstance(body, dict) else None
        if not isinstance(rows, list):
            raise InvalidResponseError("TF Serving answered without a 'predictions' list")
        return [self._row(r) for r in rows]

    def _row(self, row: Any) -> list[Label]:
        if isinstance(row, dict) and self._output_key is not None:
            row = row.get(self._output_key)
        if isinstance(row, dict) and "classes" in row and "scores" in row:
            names, scores = row["classes"], row["scores"]
        elif isinstance(row, list) and all(isinstance(v, int | float) for v in row):
            names = self._vocab if self._vocab is not None else [str(i) for i in range(len(row))]
            if len(names) != len(row):
                raise InvalidResponseError(f"TF Serving row has {len(row)} scores, the vocabulary {len(names)} names")
            scores = row
        else:
            raise InvalidResponseError(f"cannot read a TF Serving prediction row {str(row)[:200]!r}")
        return [((str(c),), float(s) if math.isfinite(float(s)) else -math.inf) for c, s in zip(names, scores, strict=True)]
