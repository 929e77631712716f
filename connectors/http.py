"""HTTP core shared by every remote connector: credentials, a pooled session, retries, limits.

:class:`HTTPTransport` is the one place a remote connector sends requests through. It guarantees:

* **Retries** (tenacity): HTTP 429, 502, 503, 504 (configurable), connection errors and timeouts are
  retried with exponential backoff and full jitter (``uniform(0, min(backoff_max_s, backoff_base_s *
  2**attempt))``), at most ``max_attempts`` requests in all. A ``Retry-After`` header (seconds or an
  HTTP date) is honoured exactly instead of the backoff; if it asks for more than
  ``max_retry_after_s`` the transport gives up at once with :class:`RateLimitedError` /
  :class:`ServiceUnavailableError`. Any other status (400, 401, 403, 404, 422, 500, ...) and TLS
  failures are never retried. All requests here are idempotent model queries, so a retry cannot
  change the answer.
* **Every attempt that may be billed is charged.** Inside a :class:`~blackbox_rs.engine.QueryEngine`
  request, each attempt (the first and every retry) is charged to the engine's
  :class:`~blackbox_rs.engine.AttemptMeter` *before* it is sent, for the images it carries; a retry
  that does not fit the budget is not sent (:class:`BudgetExceeded`). An attempt is credited back
  only when it provably never reached the model: never sent (connection refused, unknown host,
  connect timeout, TLS handshake), refused before the model ran (401, 403, 429, a vendor's
  throttle/quota answer). Read timeouts, resets after sending and 5xx answers stay charged.
  ``stats()`` shows ``images`` (all attempts) and ``retried_images``.
* **Typed errors**: :class:`AuthenticationError` (401/403, not billed), :class:`HTTPStatusError`
  (other non-retried statuses, with ``status`` and a short redacted ``body_excerpt``),
  :class:`RateLimitedError` (throttled to the end: not an exhausted quota), :class:`QuotaExhausted`
  (a quota/billing limit, as the vendor's classifier tells), :class:`ServiceUnavailableError`
  (502/503/504 to the end), :class:`RequestTimeoutError` (no answer in time to the end),
  :class:`EndpointUnreachableError`, :class:`TLSError`. No error raised here carries another
  exception in ``__cause__`` or ``__context__`` (the raw ``requests`` exceptions hold the full URL,
  query-string credentials included).
* **Settings**: one :class:`TransportSettings` object (``transport=``) holds every setting below
  (timeouts, ``max_in_flight``, ``rate_limit``, retries, extra headers, TLS verification);
  credentials travel separately (``auth=``).
* **Timeouts**: ``(connect_timeout_s, timeout_s)`` on every request; ``timeout_s`` bounds each wait
  for the server's bytes (requests' read timeout), not the total transfer time.
* **Bounded concurrency**: at most ``max_in_flight`` requests on the wire at once, whatever the
  number of calling threads (a semaphore; the connection pool has the same size, so connections are
  reused). A thread waiting out a backoff holds no slot.
* **Client-side rate limit**: every request (retries included) first takes a slot from a shared
  :class:`RateLimiter`; see its guarantee. The slot is taken *after* the concurrency slot, right
  before sending, so a request never goes out later than the moment it was granted.
* **Secrets**: credentials come from a named environment variable or a pydantic ``SecretStr``
  (:class:`Credential`), are registered with :mod:`blackbox_rs.redact`, and never appear in a
  ``repr``, an exception message, a log line (any logger, in any encoding: see
  :mod:`blackbox_rs.redact`) or a fingerprint. Redirects are not followed (a 3xx is
  an :class:`HTTPStatusError`), so credentials are only ever sent to the configured host.

:class:`HTTPConnector` is the base class of remote connectors: it splits a batch into chunks of at
most ``info.max_batch`` images and asks the subclass for one prediction per chunk. It is thread-safe
if the subclass keeps no per-call state on ``self``; its ``info.max_concurrency`` is the transport's
``max_in_flight``.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator

import torch

from blackbox_rs.engine import current_meter

# the concepts live in one private module each; this module is the public face and re-exports them
from ._auth import Auth, Credential
from ._auth import AuthKind as AuthKind
from ._endpoint import _base_url as _base_url
from ._endpoint import endpoint_fingerprint
from ._ratelimit import RateLimiter
from ._response import parse_json as parse_json
from ._retry import _HANDSHAKE_MARKERS as _HANDSHAKE_MARKERS
from ._retry import DEFAULT_RETRY_STATUSES as DEFAULT_RETRY_STATUSES
from ._retry import Classifier as Classifier
from ._retry import ErrorClass, RetryPolicy
from ._retry import _is_read_timeout as _is_read_timeout
from ._retry import _never_sent as _never_sent
from ._retry import _tls_handshake_failed as _tls_handshake_failed
from ._retry import _Transient as _Transient
from ._retry import parse_retry_after as parse_retry_after
from ._transport import _CHUNK_IMAGES, HTTPTransport
from ._transport import _detached as _detached
from ._transport import _RequestState as _RequestState
from .base import BaseConnector, Prediction
from .transport_settings import TransportSettings

__all__ = [
    "Auth",
    "Credential",
    "ErrorClass",
    "HTTPConnector",
    "HTTPTransport",
    "RateLimiter",
    "RetryPolicy",
    "TransportSettings",
    "endpoint_fingerprint",
]


class HTTPConnector(BaseConnector):
    """Base class of connectors backed by an :class:`HTTPTransport`.

    Subclasses set ``self._info`` and ``self.transport`` and implement :meth:`_query_chunk` for a batch
    of at most ``info.max_batch`` images. :meth:`query` may be called from several threads at once;
    requests on the wire never exceed ``transport.max_in_flight`` (= ``info.max_concurrency``).
    Chunks of one call are sent one after the other, in order.
    """

    transport: HTTPTransport

    def _query(self, batch: torch.Tensor) -> Prediction:
        if int(batch.shape[0]) == 0:  # nothing to ask: no request is sent
            k = self._info.num_classes
            return Prediction(
                labels=torch.zeros(0, dtype=torch.int64),
                scores=torch.zeros(0, k) if self._info.returns_scores else None,
            )
        meter = current_meter()
        if meter is not None:
            meter.begin()  # an HTTP request: charged per attempt, refunded for what never left
        parts = []
        for chunk in _chunks(batch, self._info.max_batch):
            token = _CHUNK_IMAGES.set(int(chunk.shape[0]))
            try:
                parts.append(self._query_chunk(chunk))
            finally:
                _CHUNK_IMAGES.reset(token)
        return Prediction.concat(parts)

    @abc.abstractmethod
    def _query_chunk(self, batch: torch.Tensor) -> Prediction:
        """Query at most ``info.max_batch`` validated images in one request."""

    def transport_stats(self) -> dict[str, int]:
        """The transport's counters (see :meth:`HTTPTransport.stats`)."""
        return self.transport.stats()

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> HTTPConnector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _chunks(batch: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    n = int(batch.shape[0])
    for i in range(0, n, size):
        yield batch[i : i + size]
