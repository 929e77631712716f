"""TorchServe inference API: ``POST {base_url}/predictions/{model}[/{version}]``.

The image is the raw request body (``Content-Type: image/png`` or ``image/jpeg``), one per call;
TorchServe batches concurrent requests on the server, so throughput comes from ``max_in_flight``.
Token authorization is on by default in recent releases: ``auth=Auth.bearer("TORCHSERVE_TOKEN")``
with the *inference* key from ``key_file.json``.

Answer of the stock ``image_classifier`` handler: the top-5 as ``{label: probability}``; older
handlers answer ``[{"class" | "className" | "label": ..., "probability" | "score": p}]``. Both are
read. 503 (job queue full) is retried; 404/400/500 are not. Self-hosted: no per-image price.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from blackbox_rs.errors import InvalidResponseError

from ._vendor import Item, VendorConnector, VendorSpec, WireRequest

__all__ = ["TorchServeConnector"]


def _entry(d: dict[str, Any]) -> tuple[tuple[str, ...], float] | None:
    name = next((d[k] for k in ("class", "className", "label") if k in d), None)
    score = next((d[k] for k in ("probability", "score") if k in d), 0.0)
    return None if name is None else ((str(name),), float(score))


class TorchServeConnector(VendorConnector):
    """A model served by TorchServe (see the module docstring)."""

    spec = VendorSpec(name="torchserve", vendor="TorchServe", max_batch=1, max_in_flight=8, encoding="png",
                      max_image_bytes=6_553_500, env=("TORCHSERVE_TOKEN",))

    def __init__(self, model_name: str, *, base_url: str = "http://127.0.0.1:8080", model_version: str | None = None,
                 **common: Any) -> None:
        self._path = f"/predictions/{quote(model_name, safe='')}"
        if model_version:
            self._path += f"/{quote(model_version, safe='')}"
        super().__init__(base_url, identity={"path": self._path}, **common)

    def _request(self, images: list[bytes]) -> WireRequest:
        return WireRequest(self._path, data=images[0], content_type=self.encoding.mime)

    def _parse(self, body: Any, n: int) -> list[Item]:
        if isinstance(body, list) and len(body) == 1 and isinstance(body[0], dict) and _entry(body[0]) is None:
            body = body[0]
        if isinstance(body, dict) and all(isinstance(v, int | float) for v in body.values()):
            return [[((str(k),), float(v)) for k, v in body.items()]]
        if isinstance(body, list) and all(isinstance(d, dict) for d in body):
            return [[e for e in map(_entry, body) if e is not None]]
        raise InvalidResponseError(f"TorchServe answered {str(body)[:200]!r}, not {{label: probability}}")
