"""Azure AI Vision: Image Analysis 4.0 ``tags`` and Azure Custom Vision classification.

Both take the raw image as the body (``Content-Type: application/octet-stream``), one per call.

* :class:`AzureImageAnalysisConnector`: ``POST {endpoint}/computervision/imageanalysis:analyze?
  api-version=2024-02-01&features=tags&language=en&model-version=latest`` with
  ``Ocp-Apim-Subscription-Key``. Answer: ``tagsResult.values[] = {name, confidence}`` (a confident
  subset of an open vocabulary) and ``modelVersion`` (pinned). Limits: 20 MB, 50 to 16,000 px (smaller
  images are upscaled first). Rate: S1 about 10 calls/s (default), F0 20/min; about $1 per 1,000.
* :class:`AzureCustomVisionConnector`: ``POST {endpoint}/customvision/v3.0/Prediction/{project}/
  classify/iterations/{published_name}/image[/nostore]`` with ``Prediction-Key``. Answer: every tag
  of the project scored (``predictions[] = {probability, tagName}``). ``nostore`` (default) keeps
  the noisy images out of the project and allows 20 TPS on S0 (10 with storage; F0: 2). Limit 4 MB;
  about $2 per 1,000.

429 (with ``Retry-After``) is throttling; a 403 "out of call volume quota" (F0's monthly cap) is
quota exhaustion (:class:`QuotaExhausted`, not retried).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

from blackbox_rs.errors import InvalidResponseError

from ._vendor import Item, VendorConnector, VendorSpec, WireRequest, json_error_text
from .http import ErrorClass

__all__ = ["AzureCustomVisionConnector", "AzureImageAnalysisConnector"]

_OCTET = "application/octet-stream"


class _AzureConnector(VendorConnector):
    """Raw-bytes body and the Azure quota rule, shared by both Azure services."""

    _path: str

    def _request(self, images: list[bytes]) -> WireRequest:
        return WireRequest(self._path, data=images[0], content_type=_OCTET)

    def _classify(self, status: int, headers: Mapping[str, str], body: bytes) -> ErrorClass | None:
        _, text = json_error_text(body)
        if status == 403 and "quota" in text:
            return ErrorClass("quota", reason="the resource's call volume quota is spent")
        return None

    def _items(self, body: Any, path: tuple[str, ...], name: str, score: str) -> list[Item]:
        values: Any = body
        for key in path:
            values = values.get(key) if isinstance(values, dict) else None
        if not isinstance(values, list):
            raise InvalidResponseError(f"{self.spec.vendor} answered without {'.'.join(path)}")
        return [[((str(v[name]),), float(v.get(score, 0.0))) for v in values if isinstance(v, dict) and v.get(name)]]


class AzureImageAnalysisConnector(_AzureConnector):
    """Azure AI Vision Image Analysis 4.0 tags (see the module docstring)."""

    spec = VendorSpec(name="azure_image_analysis", vendor="Azure AI Vision", max_batch=1, max_in_flight=4,
                      rate_limit=10.0, price_per_1k=1.0, min_side=50, max_image_bytes=20_971_520,
                      env=("AZURE_VISION_KEY", "AZURE_VISION_ENDPOINT"))

    def __init__(self, endpoint: str, *, api_version: str = "2024-02-01", model_version: str = "latest",
                 language: str = "en", **common: Any) -> None:
        query = {"api-version": api_version, "features": "tags", "language": language,
                 "model-version": model_version}
        self._path = "/computervision/imageanalysis:analyze?" + urlencode(query)
        super().__init__(endpoint, identity=query, **common)

    def _parse(self, body: Any, n: int) -> list[Item]:
        return self._items(body, ("tagsResult", "values"), "name", "confidence")

    def _model_version(self, body: Any) -> str | None:
        return body.get("modelVersion") if isinstance(body, dict) else None


class AzureCustomVisionConnector(_AzureConnector):
    """Azure Custom Vision prediction of a published classification iteration (module docstring)."""

    spec = VendorSpec(name="azure_custom_vision", vendor="Azure Custom Vision", max_batch=1, max_in_flight=4,
                      rate_limit=10.0, price_per_1k=2.0, max_image_bytes=4_000_000,
                      env=("AZURE_CUSTOM_VISION_KEY", "AZURE_CUSTOM_VISION_ENDPOINT"))

    def __init__(self, endpoint: str, project_id: str, published_name: str, *, store: bool = False,
                 **common: Any) -> None:
        self._path = (f"/customvision/v3.0/Prediction/{quote(project_id, safe='')}/classify/iterations/"
                      f"{quote(published_name, safe='')}/image" + ("" if store else "/nostore"))
        super().__init__(endpoint, identity={"project": project_id, "iteration": published_name}, **common)

    def _parse(self, body: Any, n: int) -> list[Item]:
        return self._items(body, ("predictions",), "tagName", "probability")

    def _model_version(self, body: Any) -> str | None:
        return body.get("iteration") if isinstance(body, dict) else None
