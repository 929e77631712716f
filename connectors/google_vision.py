"""Google Cloud Vision ``images:annotate`` with ``LABEL_DETECTION``.

``POST {base_url}/v1/images:annotate`` with ``{"requests": [{"image": {"content": "<b64>"},
"features": [{"type": "LABEL_DETECTION", "maxResults": k}]}, ...]}``: up to **16 images per call**;
``responses[i]`` comes back in order with ``labelAnnotations[] = {mid, description, score}`` (top-k
of Google's Knowledge-Graph vocabulary) or its own ``error`` (``{code, message}``, gRPC codes).

Auth: an API key as ``?key=`` (``auth=Auth.query("key", "GOOGLE_API_KEY")``) or an OAuth2 bearer
token; ``quota_project`` sets ``x-goog-user-project``.

Per-image errors are retried for that image only (codes 4, 8, 10, 13, 14); others (3: bad image)
raise. A 429 ``RESOURCE_EXHAUSTED`` is throttling (backoff; no Retry-After is sent), except a
per-day quota or disabled billing, which are quota exhaustion (not retried).

Defaults: 1,800 label-detection images/min per project -> 1.8 requests/s of 16 images; $1.50 per
1,000 images after the first 1,000 each month. Labels match by ``description`` or ``mid``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from blackbox_rs.errors import InvalidParameterError, InvalidResponseError

from ._encoding import b64encode
from ._vendor import (
    Item,
    ItemError,
    VendorConnector,
    VendorSpec,
    WireRequest,
    check_label_depth,
    json_error_text,
)
from .http import DEFAULT_RETRY_STATUSES, ErrorClass
from .transport_settings import as_transport_settings

__all__ = ["GoogleVisionConnector"]

_RETRY_CODES = {4: "transient", 8: "throttle", 10: "transient", 13: "transient", 14: "transient"}


class GoogleVisionConnector(VendorConnector):
    """Google Cloud Vision label detection (see the module docstring).

    Args:
        max_results: labels requested per image (``maxResults``; the server's default is 10). Only the
            first ``label_depth`` (default 1: Google's top label) are searched for a task class, so
            it must be >= ``label_depth``. It stays in the fingerprint even with ``label_depth=1``:
            it is part of the request, and Google does not promise a top label independent of it.
        quota_project: billing/quota project for user credentials (``x-goog-user-project``).
        Other keyword arguments: see :class:`~blackbox_rs.connectors._vendor.VendorConnector`.
    """

    spec = VendorSpec(name="google_vision", vendor="Google Cloud Vision", max_batch=16, max_in_flight=4,
                      rate_limit=1.8, price_per_1k=1.5, max_image_bytes=4_000_000,
                      retry_statuses=DEFAULT_RETRY_STATUSES | {500}, env=("GOOGLE_API_KEY",))

    def __init__(
        self,
        *,
        base_url: str = "https://vision.googleapis.com",
        max_results: int = 10,
        quota_project: str | None = None,
        **common: Any,
    ) -> None:
        if int(max_results) < 1:
            raise InvalidParameterError(f"max_results must be >= 1, got {max_results!r}")
        check_label_depth(common.get("label_depth", 1), int(max_results), "max_results")
        self._feature = [{"type": "LABEL_DETECTION", "maxResults": int(max_results)}]
        if quota_project:  # a routing header, not a credential: it joins the transport's static headers
            settings = as_transport_settings(common.pop("transport", None))
            headers = {**settings.headers, "x-goog-user-project": quota_project}
            common["transport"] = settings.model_copy(update={"headers": headers})
        super().__init__(base_url, identity={"max_results": int(max_results)}, **common)

    def _request(self, images: list[bytes]) -> WireRequest:
        reqs = [{"image": {"content": b64encode(b)}, "features": self._feature} for b in images]
        return WireRequest("/v1/images:annotate", json_body={"requests": reqs})

    def _parse(self, body: Any, n: int) -> list[Item]:
        responses = body.get("responses") if isinstance(body, dict) else None
        if not isinstance(responses, list):
            raise InvalidResponseError("Google Vision answered without a 'responses' list")
        items: list[Item] = []
        for r in responses:
            err = r.get("error") if isinstance(r, dict) else None
            if err:
                code = int(err.get("code", 2)) if isinstance(err, dict) else 2
                msg = f"code {code}: {err.get('message', '') if isinstance(err, dict) else err}"
                items.append(ItemError(msg, _RETRY_CODES.get(code, "fatal")))  # type: ignore[arg-type]
                continue
            anns = r.get("labelAnnotations") or [] if isinstance(r, dict) else []
            items.append([((str(a.get("description", "")), str(a.get("mid", ""))), float(a.get("score", 0.0)))
                          for a in anns if a.get("description") or a.get("mid")])
        return items

    def _classify(self, status: int, headers: Mapping[str, str], body: bytes) -> ErrorClass | None:
        _, text = json_error_text(body)
        if status == 429 and "per day" in text:
            return ErrorClass("quota", reason="the project's daily quota is spent")
        if status == 403 and "billing" in text:
            return ErrorClass("quota", reason="billing is disabled for the project")
        return None
