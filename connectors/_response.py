"""Parsing of HTTP answers (:func:`parse_json`).

Part of :mod:`blackbox_rs.connectors.http` (import from there). A body that is not JSON raises
:class:`~blackbox_rs.errors.InvalidResponseError` with a redacted excerpt and no exception chain.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import requests

from blackbox_rs.errors import InvalidResponseError
from blackbox_rs.redact import excerpt, redact, redact_url

__all__ = ["parse_json"]


def parse_json(resp: requests.Response, redact_fn: Callable[[object], str] = redact) -> Any:
    """The JSON body of ``resp``; :class:`InvalidResponseError` naming the content type and showing a
    redacted excerpt if the body is not JSON (an HTML error page, truncated output)."""
    try:
        return json.loads(resp.content)
    except (ValueError, UnicodeDecodeError):
        pass  # raised below, outside the except block: the decode error (it holds the body) stays out of the chain
    ctype = resp.headers.get("Content-Type", "?")
    raise InvalidResponseError(
        f"{resp.request.method if resp.request else ''} {redact_url(resp.url)} answered HTTP "
        f"{resp.status_code} with a body that is not JSON (Content-Type {ctype!r}): "
        f"{excerpt(redact_fn(resp.content.decode('utf-8', 'replace')))!r}"
    )
