"""Retry policy and error classification for :class:`~blackbox_rs.connectors.http.HTTPTransport`.

Part of :mod:`blackbox_rs.connectors.http` (import from there; its docstring states the retry rules):
:class:`RetryPolicy` (when and how long to retry), :class:`ErrorClass` (what a vendor's ``classify``
hook says a non-2xx answer means), :func:`parse_retry_after`, the internal :class:`_Transient` (one
retryable failed attempt) and the classifiers of ``requests`` failures that decide whether an attempt
provably never reached the model (:func:`_never_sent`, :func:`_tls_handshake_failed`) or is a read
timeout (:func:`_is_read_timeout`).
"""

from __future__ import annotations

import email.utils
import math
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import requests
import urllib3.exceptions

from blackbox_rs.errors import InvalidParameterError

__all__ = ["DEFAULT_RETRY_STATUSES", "Classifier", "ErrorClass", "RetryPolicy", "parse_retry_after"]

DEFAULT_RETRY_STATUSES = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to retry. See :mod:`blackbox_rs.connectors.http` for the exact rules."""

    max_attempts: int = 6
    backoff_base_s: float = 0.25
    backoff_max_s: float = 20.0
    max_retry_after_s: float = 120.0
    retry_statuses: frozenset[int] = DEFAULT_RETRY_STATUSES
    retry_timeouts: bool = True
    retry_connection_errors: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise InvalidParameterError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0 or self.max_retry_after_s < 0:
            raise InvalidParameterError("backoff and Retry-After limits must be >= 0")
        bad = {401, 403} & set(self.retry_statuses)
        if bad:
            raise InvalidParameterError(f"authentication failures {sorted(bad)} must not be retried")


@dataclass(frozen=True)
class ErrorClass:
    """What a vendor's non-2xx answer means, as told by a transport's ``classify`` hook.

    * ``throttle``: rate-limited, refused before the model ran (not billed): retried with backoff;
      still throttled after every attempt -> :class:`RateLimitedError`.
    * ``quota``: a hard quota or billing limit (monthly credits, ``insufficient_quota``): never
      retried, :class:`QuotaExhausted` at once (not billed).
    * ``transient``: a retryable server-side failure (model loading, internal error).
    * ``fatal``: never retried, even if the status is in ``retry_statuses``.

    ``retry_after`` (seconds) overrides the ``Retry-After`` header for this answer.
    """

    kind: Literal["throttle", "quota", "transient", "fatal"]
    retry_after: float | None = None
    reason: str = ""


Classifier = Callable[[int, Mapping[str, str], bytes], "ErrorClass | None"]


class _Transient(Exception):
    """Internal: one attempt failed in a retryable way. Converted to a typed error at the end."""

    def __init__(
        self,
        kind: Literal["status", "timeout", "connection"],
        message: str,
        *,
        status: int = 0,
        retry_after: float | None = None,
        body: str = "",
        throttled: bool = False,
    ) -> None:
        super().__init__(message)
        self.throttled = throttled
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.body = body


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date); None if absent/bad."""
    if value is None:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            dt = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if dt is None:
            return None
        secs = dt.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(secs):
        return None
    return max(0.0, secs)


_HANDSHAKE_MARKERS = ("CERTIFICATE_VERIFY_FAILED", "WRONG_VERSION_NUMBER", "certificate verify failed",
                      "unknown protocol", "TLSV1_ALERT", "SSLV3_ALERT_HANDSHAKE_FAILURE", "hostname mismatch")


def _tls_handshake_failed(e: BaseException) -> bool:
    """True only when a TLS error provably happened during the handshake (certificate refused,
    protocol mismatch), before any byte of the request was written. Any other TLS error (an
    ``SSLEOFError`` while reading the answer of a reused connection, say) may follow a billed
    request, so it is charged."""
    seen: set[int] = set()
    stack: list[BaseException] = [e]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, ssl.SSLCertVerificationError):
            return True
        if isinstance(x, ssl.SSLError) and any(m in str(x) for m in _HANDSHAKE_MARKERS):
            return True
        stack.extend(a for a in getattr(x, "args", ()) if isinstance(a, BaseException))
        for attr in ("reason", "__cause__", "__context__"):
            nxt = getattr(x, attr, None)
            if isinstance(nxt, BaseException):
                stack.append(nxt)
    return False


def _never_sent(e: requests.exceptions.ConnectionError) -> bool:
    """True if the connection was never established (refused, unknown host, connect timeout, a TLS
    handshake refused), so the request cannot have reached the model."""
    if isinstance(e, requests.exceptions.ConnectTimeout):
        return True
    if isinstance(e, requests.exceptions.SSLError):
        return _tls_handshake_failed(e)
    cause: BaseException | None = e.args[0] if e.args and isinstance(e.args[0], BaseException) else None
    reason = getattr(cause, "reason", None)
    return isinstance(reason, urllib3.exceptions.NewConnectionError | urllib3.exceptions.NameResolutionError)


def _is_read_timeout(e: requests.exceptions.ConnectionError) -> bool:
    arg = e.args[0] if e.args else None
    return isinstance(arg, urllib3.exceptions.ReadTimeoutError)
