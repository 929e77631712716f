"""Hugging Face image classification: serverless Inference Providers (``hf-inference``) and
dedicated Inference Endpoints.

* serverless: ``POST {base_url}/hf-inference/models/{model_id}`` (``base_url`` defaults to
  ``https://router.huggingface.co``);
* dedicated: ``POST {endpoint_url}`` (any ``https://{id}.{region}.{cloud}.endpoints.huggingface.cloud``).

Auth: ``Authorization: Bearer hf_...`` (``auth=Auth.bearer("HF_TOKEN")``; public endpoints need none).
Body: ``{"inputs": "<b64>", "parameters": {"top_k": k, "function_to_apply": ...}}``, one image per
call. Answer: ``[{"label", "score"}, ...]`` (top-k of the model's ``id2label``), mapped through the
label map. ``top_k`` = the model's number of labels gives the full distribution.

Errors: 503 ``{"error": "... is currently loading", "estimated_time": s}`` is retried after
``estimated_time`` (or send ``wait_for_model=True``: header ``x-wait-for-model: true``); 429 is
throttling (backoff); 402, or a 429 saying the monthly included credits are spent, is quota
exhaustion (:class:`QuotaExhausted`, not retried). Price: billed by compute time, no per-image
list price (give ``price_per_1k`` for budgets).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from blackbox_rs.errors import InvalidParameterError, InvalidResponseError

from ._encoding import b64encode
from ._vendor import Item, VendorConnector, VendorSpec, WireRequest, check_label_depth, json_error_text
from .http import ErrorClass

__all__ = ["HuggingFaceConnector"]


class HuggingFaceConnector(VendorConnector):
    """A Hugging Face image-classification model (see the module docstring).

    Args:
        model_id: e.g. ``"google/vit-base-patch16-224"`` (serverless); or ``endpoint_url`` for a
            dedicated Inference Endpoint.
        top_k, function_to_apply: task parameters sent with every image (omitted when None; both in
            the fingerprint); ``top_k`` must be >= ``label_depth``.
        wait_for_model: ask the server to block until a cold model is loaded.
        Other keyword arguments: see :class:`~blackbox_rs.connectors._vendor.VendorConnector`.
    """

    spec = VendorSpec(name="huggingface", vendor="Hugging Face", max_batch=1, max_in_flight=2, rate_limit=2.0,
                      env=("HF_TOKEN",))

    def __init__(
        self,
        model_id: str | None = None,
        *,
        endpoint_url: str | None = None,
        base_url: str = "https://router.huggingface.co",
        top_k: int | None = None,
        function_to_apply: str | None = None,
        wait_for_model: bool = False,
        **common: Any,
    ) -> None:
        if (model_id is None) == (endpoint_url is None):
            raise InvalidParameterError("give model_id= (serverless) or endpoint_url= (dedicated endpoint)")
        if function_to_apply not in (None, "softmax", "sigmoid", "none"):
            raise InvalidParameterError(f"function_to_apply must be softmax, sigmoid or none, got {function_to_apply!r}")
        if endpoint_url is not None:
            u = urlsplit(endpoint_url)
            base_url, self._path = urlunsplit((u.scheme, u.netloc, "", "", "")), (u.path or "/")
        else:
            self._path = f"/hf-inference/models/{quote(str(model_id), safe='/')}"
        if top_k is not None:
            check_label_depth(common.get("label_depth", 1), int(top_k), "top_k")
        params = {"top_k": top_k, "function_to_apply": function_to_apply}
        self._params = {k: v for k, v in params.items() if v is not None}
        self._headers = {"x-wait-for-model": "true"} if wait_for_model else {}
        super().__init__(base_url, identity={"path": self._path, **self._params}, **common)

    def _request(self, images: list[bytes]) -> WireRequest:
        body: dict[str, Any] = {"inputs": b64encode(images[0])}
        if self._params:
            body["parameters"] = self._params
        return WireRequest(self._path, json_body=body, headers=self._headers)

    def _parse(self, body: Any, n: int) -> list[Item]:
        if isinstance(body, list) and len(body) == 1 and isinstance(body[0], list):
            body = body[0]  # some handlers answer a batch of one
        if not isinstance(body, list) or not all(isinstance(d, dict) and "label" in d for d in body):
            raise InvalidResponseError(f"Hugging Face answered {str(body)[:200]!r}, not a list of {{label, score}}")
        return [[((str(d["label"]),), float(d.get("score", 0.0))) for d in body]]

    def _classify(self, status: int, headers: Mapping[str, str], body: bytes) -> ErrorClass | None:
        obj, text = json_error_text(body)
        if status == 402 or (status == 429 and "credits" in text):
            return ErrorClass("quota", reason="the account's included credits are spent")
        if status == 503 and isinstance(obj.get("estimated_time"), int | float):
            return ErrorClass("transient", retry_after=float(obj["estimated_time"]), reason="model loading")
        return None
