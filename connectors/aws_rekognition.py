"""AWS Rekognition ``DetectLabels`` (AWS JSON 1.1 protocol, SigV4-signed with :mod:`._sigv4`).

``POST https://rekognition.{region}.amazonaws.com/`` with ``X-Amz-Target:
RekognitionService.DetectLabels``, ``Content-Type: application/x-amz-json-1.1`` and the body
``{"Image": {"Bytes": "<b64>"}, "MaxLabels": m, "MinConfidence": c, "Features": ["GENERAL_LABELS"],
"Settings": {"GeneralLabels": {"LabelInclusionFilters": [...]}}}``; one image per call. Answer:
``Labels[] = {Name, Confidence (0-100), Parents[]}`` + ``LabelModelVersion`` (pinned). A label's
parents are fallbacks for the label map ("Cat" -> "Animal" when only "Animal" is mapped).

Credentials from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (+ ``AWS_SESSION_TOKEN`` if set);
botocore is not used. Errors branch on the body's ``__type``: ``ThrottlingException``,
``ProvisionedThroughputExceededException``, ``LimitExceededException`` -> throttling (backoff, not
billed); ``InternalServerError`` / ``ServiceUnavailableException`` -> retried; anything else
(``ImageTooLargeException``, ``InvalidImageFormatException``, ``AccessDeniedException``) is not.

Limits: 5 MB raw bytes, 80 px minimum side (smaller images are upscaled first), JPEG/PNG. The
per-region TPS quota is adjustable; the default here is a conservative 5 requests/s (verify yours).
Price: about $1.00 per 1,000 images (first tier, us-east-1).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from blackbox_rs.errors import InvalidResponseError

from ._encoding import b64encode
from ._sigv4 import sign
from ._vendor import Item, VendorConnector, VendorSpec, WireRequest, check_label_depth, json_error_text
from .http import Credential, ErrorClass

__all__ = ["RekognitionConnector"]

_THROTTLE = {"ThrottlingException", "ProvisionedThroughputExceededException", "LimitExceededException"}
_TRANSIENT = {"InternalServerError", "ServiceUnavailableException"}
_TARGET = "RekognitionService.DetectLabels"
_CTYPE = "application/x-amz-json-1.1"


class RekognitionConnector(VendorConnector):
    """AWS Rekognition label detection (see the module docstring).

    Args:
        region: AWS region (default ``$AWS_REGION``, ``$AWS_DEFAULT_REGION``, else us-east-1).
        base_url: override the regional endpoint (tests, FIPS, VPC endpoints).
        max_labels, min_confidence (0-100; the server's default is 55), inclusion_filters
            (``LabelInclusionFilters``: restrict the answer to these label names). All three change
            answers and are in the fingerprint; ``max_labels`` must be >= ``label_depth`` (default 1:
            the label Rekognition is most confident of, which may be a parent such as "Animal").
        access_key_env, secret_key_env, session_token_env: where the credentials are read.
        Other keyword arguments: see :class:`~blackbox_rs.connectors._vendor.VendorConnector`.
    """

    spec = VendorSpec(name="aws_rekognition", vendor="AWS Rekognition", max_batch=1, max_in_flight=5,
                      rate_limit=5.0, price_per_1k=1.0, min_side=80, max_image_bytes=5_000_000,
                      env=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION"))

    def __init__(
        self,
        region: str | None = None,
        *,
        base_url: str | None = None,
        max_labels: int = 50,
        min_confidence: float = 20.0,
        inclusion_filters: Sequence[str] | None = None,
        access_key_env: str = "AWS_ACCESS_KEY_ID",
        secret_key_env: str = "AWS_SECRET_ACCESS_KEY",
        session_token_env: str = "AWS_SESSION_TOKEN",
        **common: Any,
    ) -> None:
        check_label_depth(common.get("label_depth", 1), int(max_labels), "max_labels")
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self._access_key = Credential(env=access_key_env)
        self._secret_key = Credential(env=secret_key_env)
        self._token = Credential(env=session_token_env) if os.environ.get(session_token_env) else None
        options: dict[str, Any] = {"MaxLabels": int(max_labels), "MinConfidence": float(min_confidence),
                                   "Features": ["GENERAL_LABELS"]}
        if inclusion_filters:
            options["Settings"] = {"GeneralLabels": {"LabelInclusionFilters": list(inclusion_filters)}}
        self._options = options
        base = base_url or f"https://rekognition.{self.region}.amazonaws.com"
        super().__init__(base, identity={"region": self.region, "options": json.dumps(options, sort_keys=True)},
                         **common)
        u = urlsplit(self.transport.base_url)
        self._host, self._path = u.netloc, u.path + "/"

    def _request(self, images: list[bytes]) -> WireRequest:
        data = json.dumps({"Image": {"Bytes": b64encode(images[0])}, **self._options},
                          separators=(",", ":")).encode()
        headers = {"Content-Type": _CTYPE, "X-Amz-Target": _TARGET}
        auth = sign(method="POST", host=self._host, path=self._path, body=data, headers=headers,
                    access_key=self._access_key.get_secret_value(), secret_key=self._secret_key.get_secret_value(),
                    session_token=self._token.get_secret_value() if self._token else None,
                    region=self.region, service="rekognition")
        return WireRequest("/", data=data, content_type=_CTYPE, headers={"X-Amz-Target": _TARGET, **auth})

    def _parse(self, body: Any, n: int) -> list[Item]:
        labels = body.get("Labels") if isinstance(body, dict) else None
        if not isinstance(labels, list):
            raise InvalidResponseError("Rekognition answered without a 'Labels' list")
        return [[((str(lab["Name"]), *(str(p.get("Name")) for p in lab.get("Parents") or [])),
                  float(lab.get("Confidence", 0.0)) / 100.0) for lab in labels if lab.get("Name")]]

    def _model_version(self, body: Any) -> str | None:
        return body.get("LabelModelVersion") if isinstance(body, dict) else None

    def _classify(self, status: int, headers: Mapping[str, str], body: bytes) -> ErrorClass | None:
        obj, _ = json_error_text(body)
        kind = str(obj.get("__type", "")).rsplit("#", 1)[-1]
        if not kind:
            return None
        if kind in _THROTTLE:
            return ErrorClass("throttle", reason=kind)
        return ErrorClass("transient" if kind in _TRANSIENT else "fatal", reason=kind)
