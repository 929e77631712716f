"""Endpoint URLs: validation of a transport's ``base_url`` and the cache fingerprint of an endpoint.

Part of :mod:`blackbox_rs.connectors.http` (import from there). :func:`endpoint_fingerprint` never holds
userinfo, a query string or a registered secret; :func:`_base_url` refuses non-http(s) URLs and URLs
with credentials in them.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from blackbox_rs.errors import ConfigError, InvalidParameterError
from blackbox_rs.redact import redact, redact_url

__all__ = ["endpoint_fingerprint"]


def _base_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidParameterError(f"base_url must be an http(s) URL, got {redact_url(url)!r}")
    if parts.username or parts.password:
        raise ConfigError("put credentials in auth=Auth..., not in the URL")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), parts.query, ""))


def endpoint_fingerprint(kind: str, base_url: str, **parts: object) -> str:
    """A cache identity ``kind:scheme://host[:port]/path|k=v|...`` with no userinfo, query string or
    registered secret in it (query strings are where API keys hide, so they are dropped)."""
    u = urlsplit(base_url)
    host = u.hostname or ""
    netloc = f"{host}:{u.port}" if u.port else host
    core = urlunsplit((u.scheme, netloc, u.path.rstrip("/"), "", ""))
    extra = "".join(f"|{k}={v}" for k, v in parts.items() if v is not None)
    return redact(f"{kind}:{core}{extra}")
