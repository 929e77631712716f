"""Clarifai predict (``general-image-recognition`` or any concept model).

``POST {base_url}/v2/users/{user_id}/apps/{app_id}/models/{model_id}[/versions/{version_id}]/outputs``
with ``Authorization: Key <PAT>`` (``auth=Auth.scheme("Key", "CLARIFAI_PAT")``) and
``{"user_app_id": {...}, "inputs": [{"data": {"image": {"base64": "<b64>"}}}, ...],
"model": {"output_info": {"output_config": {"max_concepts": k, "min_value": v, "select_concepts": [...]}}}}``:
up to **128 inputs per call**, one billed operation per input.

Two status levels: the call's ``status.code`` (10000 Ok, 10010 mixed) and each output's; an output
that failed with a retryable code (10030 TRY_AGAIN, 11005 CONN_THROTTLED) is sent again alone,
others raise. Concepts ``{id, name, value}`` match by name or id. Throttling (11005 / 11003, HTTP
429) backs off; a monthly or account limit (11004, 11006, 11000) is quota exhaustion, not retried.
Codes may come as numbers or names. Defaults: 15 requests/s (the documented limit on every plan);
about $1.20 per 1,000 images (verify your plan). Pin ``version_id`` for reproducible results.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from blackbox_rs.errors import InvalidResponseError

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
from .http import ErrorClass

__all__ = ["ClarifaiConnector"]

_NAMES = {"SUCCESS": 10000, "MIXED_STATUS": 10010, "FAILURE": 10020, "TRY_AGAIN": 10030, "CONN_ACCOUNT_ISSUES": 11000,
          "CONN_EXCEED_HOURLY_LIMIT": 11003, "CONN_EXCEED_MONTHLY_LIMIT": 11004, "CONN_THROTTLED": 11005,
          "CONN_EXCEEDS_LIMITS": 11006}
_OK = {10000, 10010}
_THROTTLE = {11003, 11005}
_QUOTA = {11000, 11004, 11006}


def _code(status: Any) -> int:
    raw = status.get("code") if isinstance(status, dict) else None
    if isinstance(raw, str) and not raw.isdigit():
        return _NAMES.get(raw, 10020)
    try:
        return int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 10020


class ClarifaiConnector(VendorConnector):
    """A Clarifai concept model (see the module docstring).

    Args:
        user_id, app_id, model_id, version_id: the model (default: Clarifai's public general model).
        max_concepts, min_value, select_concepts: ``output_config`` (``select_concepts`` restricts
            scoring to the named concepts; an unknown name is an error on Clarifai's side); all are in
            the fingerprint, and ``max_concepts`` must be >= ``label_depth``.
        Other keyword arguments: see :class:`~blackbox_rs.connectors._vendor.VendorConnector`.
    """

    spec = VendorSpec(name="clarifai", vendor="Clarifai", max_batch=128, max_in_flight=4, rate_limit=15.0,
                      price_per_1k=1.2, max_image_bytes=20_000_000, env=("CLARIFAI_PAT",))

    def __init__(
        self,
        *,
        base_url: str = "https://api.clarifai.com",
        user_id: str = "clarifai",
        app_id: str = "main",
        model_id: str = "general-image-recognition",
        version_id: str | None = None,
        max_concepts: int = 20,
        min_value: float | None = None,
        select_concepts: Sequence[str] | None = None,
        **common: Any,
    ) -> None:
        check_label_depth(common.get("label_depth", 1), int(max_concepts), "max_concepts")
        path = f"/v2/users/{quote(user_id, safe='')}/apps/{quote(app_id, safe='')}/models/{quote(model_id, safe='')}"
        if version_id:
            path += f"/versions/{quote(version_id, safe='')}"
        self._path = path + "/outputs"
        config: dict[str, Any] = {"max_concepts": int(max_concepts)}
        if min_value is not None:
            config["min_value"] = float(min_value)
        if select_concepts:
            config["select_concepts"] = [{"name": c} for c in select_concepts]
        self._static = {"user_app_id": {"user_id": user_id, "app_id": app_id},
                        "model": {"output_info": {"output_config": config}}}
        super().__init__(base_url, identity={"path": self._path, "config": str(sorted(config.items()))}, **common)

    def _request(self, images: list[bytes]) -> WireRequest:
        inputs = [{"data": {"image": {"base64": b64encode(b)}}} for b in images]
        return WireRequest(self._path, json_body={**self._static, "inputs": inputs})

    def _parse(self, body: Any, n: int) -> list[Item]:
        if not isinstance(body, dict):
            raise InvalidResponseError("Clarifai answered something that is not a JSON object")
        top = _code(body.get("status"))
        if top in _THROTTLE:  # throttled inside a 2xx: every image again
            return [ItemError("CONN_THROTTLED", "throttle")] * n
        if top not in _OK:
            raise InvalidResponseError(f"Clarifai call failed with status {body.get('status')!r}")
        items: list[Item] = []
        for out in body.get("outputs") or []:
            code = _code(out.get("status"))
            if code not in _OK:
                kind = "throttle" if code in _THROTTLE else "transient" if code == 10030 else "fatal"
                items.append(ItemError(f"output status {out.get('status')!r}", kind))  # type: ignore[arg-type]
                continue
            concepts = (out.get("data") or {}).get("concepts") or []
            items.append([((str(c.get("name", "")), str(c.get("id", ""))), float(c.get("value", 0.0)))
                          for c in concepts if c.get("name") or c.get("id")])
        return items

    def _model_version(self, body: Any) -> str | None:
        outs = body.get("outputs") if isinstance(body, dict) else None
        if outs and isinstance(outs[0], dict):
            version = ((outs[0].get("model") or {}).get("model_version") or {}).get("id")
            return str(version) if version else None
        return None

    def _classify(self, status: int, headers: Mapping[str, str], body: bytes) -> ErrorClass | None:
        obj, _ = json_error_text(body)
        code = _code(obj.get("status"))
        if code in _QUOTA:
            return ErrorClass("quota", reason=f"Clarifai status {code}")
        if code in _THROTTLE:
            return ErrorClass("throttle", reason=f"Clarifai status {code}")
        return None
