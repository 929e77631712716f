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
import email.utils
import json
import math
import os
import random
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import requests
import torch
import urllib3.exceptions
from pydantic import SecretStr
from requests.adapters import HTTPAdapter
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

from blackbox_rs.engine import AttemptMeter, current_meter
from blackbox_rs.errors import (
    AuthenticationError,
    ConfigError,
    ConnectorError,
    EndpointUnreachableError,
    HTTPStatusError,
    InvalidParameterError,
    InvalidResponseError,
    QuotaExhausted,
    RateLimitedError,
    RequestTimeoutError,
    ServiceUnavailableError,
    TLSError,
)
from blackbox_rs.redact import excerpt, redact, redact_url, register_secret

from ._ratelimit import RateLimiter
from .base import BaseConnector, Prediction

__all__ = [
    "Auth",
    "Credential",
    "ErrorClass",
    "HTTPConnector",
    "HTTPTransport",
    "RateLimiter",
    "RetryPolicy",
    "endpoint_fingerprint",
]

DEFAULT_RETRY_STATUSES = frozenset({429, 502, 503, 504})

#: images in the chunk :class:`HTTPConnector` is sending in this thread (None: not inside a chunk)
_CHUNK_IMAGES: ContextVar[int | None] = ContextVar("bbrs_http_chunk_images", default=None)


# --------------------------------------------------------------------------------------------------
# credentials


class Credential:
    """A secret taken from a named environment variable or a pydantic ``SecretStr``.

    ``Credential(env="MY_TOKEN")`` reads the variable when created and raises :class:`ConfigError`
    naming the *variable* (never a value) if it is unset or empty. ``Credential(secret=SecretStr(...))``
    takes a value directly. The value is registered with :func:`blackbox_rs.redact.register_secret`
    and is only readable through :meth:`get_secret_value`; ``repr``/``str`` show the source only.
    """

    __slots__ = ("_source", "_value")

    def __init__(self, *, env: str | None = None, secret: SecretStr | str | None = None) -> None:
        if (env is None) == (secret is None):
            raise ConfigError("a Credential needs exactly one of env= (a variable name) or secret=")
        if env is not None:
            value = os.environ.get(env, "")
            if not value:
                raise ConfigError(f"environment variable {env!r} (credential) is not set or empty")
            self._source = f"env:{env}"
        else:
            value = secret.get_secret_value() if isinstance(secret, SecretStr) else str(secret)
            if not value:
                raise ConfigError("the credential secret is empty")
            self._source = "SecretStr"
        register_secret(value)
        self._value = SecretStr(value)

    def get_secret_value(self) -> str:
        return self._value.get_secret_value()

    @property
    def source(self) -> str:
        """Where the value came from (``env:NAME`` or ``SecretStr``); safe to print."""
        return self._source

    def __repr__(self) -> str:
        return f"Credential({self._source})"

    __str__ = __repr__

    def __reduce__(self) -> Any:  # never pickle a secret
        raise TypeError("Credential objects cannot be pickled")


AuthKind = Literal["none", "bearer", "header", "query", "scheme"]


@dataclass(frozen=True)
class Auth:
    """How a credential is attached to each request.

    * ``Auth.bearer(cred)``: ``Authorization: Bearer <secret>``
    * ``Auth.header(name, cred)``: ``<name>: <secret>`` (``x-api-key``, ``Ocp-Apim-Subscription-Key``)
    * ``Auth.scheme(prefix, cred)``: ``Authorization: <prefix> <secret>`` (Clarifai ``Key``)
    * ``Auth.query(name, cred)``: ``?<name>=<secret>`` (Google ``key``)

    ``cred`` is a :class:`Credential`, or a string naming an environment variable.
    """

    kind: AuthKind = "none"
    credential: Credential | None = field(default=None, repr=True)
    name: str = ""

    @staticmethod
    def _cred(cred: Credential | str) -> Credential:
        return cred if isinstance(cred, Credential) else Credential(env=cred)

    @classmethod
    def bearer(cls, cred: Credential | str) -> Auth:
        return cls("bearer", cls._cred(cred), "Bearer")

    @classmethod
    def header(cls, name: str, cred: Credential | str) -> Auth:
        return cls("header", cls._cred(cred), name)

    @classmethod
    def scheme(cls, prefix: str, cred: Credential | str) -> Auth:
        return cls("scheme", cls._cred(cred), prefix)

    @classmethod
    def query(cls, name: str, cred: Credential | str) -> Auth:
        return cls("query", cls._cred(cred), name)

    def apply(self, headers: dict[str, str], params: dict[str, str]) -> None:
        """Add the credential to ``headers`` or ``params`` in place."""
        if self.kind == "none" or self.credential is None:
            return
        value = self.credential.get_secret_value()
        if self.kind in ("bearer", "scheme"):
            headers["Authorization"] = f"{self.name} {value}"
        elif self.kind == "header":
            headers[self.name] = value
        elif self.kind == "query":
            params[self.name] = value


# --------------------------------------------------------------------------------------------------
# retry policy


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to retry. See the module docstring for the exact rules."""

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


# --------------------------------------------------------------------------------------------------
# transport


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


class HTTPTransport:
    """A thread-safe, pooled, rate-limited, retrying HTTP client for one endpoint.

    Args:
        base_url: ``http(s)://host[:port][/prefix]``; request paths are appended to it. No
            credentials in it (use ``auth``).
        auth: how to attach a credential (:class:`Auth`); default none.
        headers: static headers for every request (e.g. ``{"Host": "model.ns.example.com"}`` for
            KServe behind Knative). Sensitive ones are redacted wherever they are shown.
        timeout_s: read timeout of each request; connect_timeout_s: connect timeout.
        max_in_flight: requests on the wire at once (across all threads).
        rate_limit: requests per second (float) or a shared :class:`RateLimiter`; None = unlimited.
        retry: the :class:`RetryPolicy`.
        verify: TLS verification (True, False, or a CA bundle path).
        sleep: injectable sleep for backoff (tests).
        classify: optional hook ``(status, headers, body) -> ErrorClass | None`` for vendors whose
            throttling or quota errors are told by the body, not the status (``None``: the default
            status rules).
    """

    def __init__(
        self,
        base_url: str,
        *,
        auth: Auth | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 30.0,
        connect_timeout_s: float | None = None,
        max_in_flight: int = 4,
        rate_limit: float | RateLimiter | None = None,
        retry: RetryPolicy | None = None,
        verify: bool | str = True,
        sleep: Callable[[float], None] = time.sleep,
        classify: Classifier | None = None,
    ) -> None:
        if not (timeout_s > 0):
            raise InvalidParameterError(f"timeout_s must be > 0, got {timeout_s!r}")
        if int(max_in_flight) < 1:
            raise InvalidParameterError(f"max_in_flight must be >= 1, got {max_in_flight!r}")
        self.base_url = _base_url(base_url)
        self.auth = auth or Auth()
        self._headers = dict(headers or {})
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = float(connect_timeout_s if connect_timeout_s is not None else min(timeout_s, 10.0))
        self.max_in_flight = int(max_in_flight)
        if rate_limit is None or isinstance(rate_limit, RateLimiter):
            self.limiter = rate_limit
        else:
            self.limiter = RateLimiter(float(rate_limit))
        self.retry = retry or RetryPolicy()
        self.verify = verify
        self._sleep = sleep
        self.classify = classify
        self._slots = threading.BoundedSemaphore(self.max_in_flight)
        self._session = requests.Session()
        self._session.trust_env = False  # no proxy/netrc surprises: only what is configured is sent
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=self.max_in_flight, max_retries=0, pool_block=False)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._stats_lock = threading.Lock()
        self._stats = {"calls": 0, "requests": 0, "retries": 0, "throttled": 0, "failures": 0, "images": 0,
                       "retried_images": 0}
        self._closed = False
        self._shown_urls: dict[str, str] = {}

    # ---- public ----------------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | None = None,
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
        request_id: str | None = None,
        retry: bool = True,
        images: int | None = None,
    ) -> requests.Response:
        """Send one logical request (retried as the policy says) and return a 2xx response.

        ``json_body`` is serialised once (compact, ``allow_nan=False``) so every attempt sends the same
        bytes. ``request_id`` (default: a fresh UUID) is sent as ``X-Request-ID`` on every attempt.
        ``images`` is the number of images in the request (default: the chunk that
        :class:`HTTPConnector` is sending, else the whole engine request): inside a
        :class:`~blackbox_rs.engine.QueryEngine` request, every attempt is charged to the engine's
        :class:`~blackbox_rs.engine.AttemptMeter` (hence the budget) *before* it is sent, and every
        attempt that provably never reached the model (connection refused, 401/403, throttled) is
        credited back. A re-send that does not fit the budget is not sent: :class:`BudgetExceeded`.
        Raises the typed errors listed in the module docstring; none of them carries another
        exception in ``__cause__`` or ``__context__``.
        """
        if self._closed:
            raise ConnectorError("this HTTP transport is closed", billed=False)
        if json_body is not None:
            if data is not None:
                raise InvalidParameterError("give json_body or data, not both")
            data = json.dumps(json_body, separators=(",", ":"), allow_nan=False).encode("utf-8")
            content_type = content_type or "application/json"
        rid = request_id or uuid.uuid4().hex
        hdrs = {**self._headers, **(headers or {}), "X-Request-ID": rid}
        if content_type:
            hdrs["Content-Type"] = content_type
        params: dict[str, str] = {}
        self.auth.apply(hdrs, params)
        url = self.url(path)
        shown_url = self._shown_urls.get(url)
        if shown_url is None:  # redacting costs regex passes: once per URL, not per request
            shown_url = self._shown_urls.setdefault(url, redact_url(url))
        self._count("calls")
        meter = current_meter()
        if images is None:
            images = _CHUNK_IMAGES.get()
        if images is None:  # a request of unknown size inside an engine request: charge all of it
            images = meter.prepaid if meter is not None else 0
        if meter is not None:
            meter.begin()
        state = _RequestState(images=int(images), meter=meter)

        # prepared once, outside the in-flight slot: every attempt sends these exact bytes
        prepared = self._session.prepare_request(
            requests.Request(method, url, data=data, headers=hdrs, params=params or None)
        )

        def attempt() -> requests.Response:
            state.attempts += 1
            retried = state.attempts > 1
            if state.meter is not None:
                # charged before it leaves: a re-send that does not fit the budget is never sent
                state.meter.attempt(state.images, retry=retried)
            if retried:
                self._count("retries")
                self._count("retried_images", state.images)
            self._count("images", state.images)
            return self._send_once(prepared, method, shown_url, rid, state)

        policy = self.retry
        retrying = Retrying(
            stop=stop_after_attempt(policy.max_attempts if retry else 1),
            wait=self._wait,
            retry=retry_if_exception_type(_Transient),
            sleep=self._sleep,
            reraise=True,
        )
        error: BaseException | None = None
        try:
            return retrying(attempt)
        except _Transient as t:
            error = self._final_error(t, method, shown_url, state, rid, billed=state.delivered)
        except ConnectorError as e:
            if not state.delivered and e.billed is None:
                e.billed = False
            error = e
        except BaseException as e:  # BudgetExceeded from the meter, KeyboardInterrupt, ...
            error = e
        # raised here, outside every except block, with the chain cut: the raw requests/urllib3
        # exceptions (their text holds the full URL, query-string credentials included) must not ride
        # along in __context__, where error reporters that walk the chain would print them
        if isinstance(error, ConnectorError):
            self._count("failures")
        raise _detached(error)

    def get_json(self, path: str, *, request_id: str | None = None, retry: bool = True) -> Any:
        """GET ``path`` and parse a JSON body (:class:`InvalidResponseError` if it is not JSON)."""
        resp = self.request("GET", path, request_id=request_id, retry=retry)
        return parse_json(resp, self.redact)

    def stats(self) -> dict[str, int]:
        """Counters since creation: ``calls`` (logical requests), ``requests`` (HTTP requests sent,
        retries included), ``retries``, ``throttled`` (429/503 answers), ``failures``, ``images``
        (images in the HTTP requests sent, retries included: what a vendor may bill) and
        ``retried_images`` (the part of ``images`` that re-sent a request)."""
        with self._stats_lock:
            return dict(self._stats)

    def redact(self, text: object) -> str:
        """``text`` with this transport's credential (and every registered secret) masked."""
        cred = self.auth.credential
        return redact(text, [cred.get_secret_value()] if cred else [])

    def close(self) -> None:
        self._closed = True
        self._session.close()

    def __enter__(self) -> HTTPTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"HTTPTransport({redact_url(self.base_url)!r}, auth={self.auth.kind}, "
            f"max_in_flight={self.max_in_flight}, rate_limit={self.limiter!r})"
        )

    # ---- internals -------------------------------------------------------------------------------

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[key] += n

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Transient) and exc.retry_after is not None:
            return exc.retry_after
        p = self.retry
        cap = min(p.backoff_max_s, p.backoff_base_s * (2 ** (state.attempt_number - 1)))
        return random.uniform(0.0, cap)  # full jitter; not security-relevant

    def _send_once(
        self,
        prepared: requests.PreparedRequest,
        method: str,
        shown_url: str,
        rid: str,
        state: _RequestState,
    ) -> requests.Response:
        policy = self.retry
        attempts = state.attempts
        error: BaseException | None = None
        with self._slots:
            if self.limiter is not None:
                self.limiter.acquire()
            self._count("requests")
            try:
                resp = self._session.send(
                    prepared,
                    timeout=(self.connect_timeout_s, self.timeout_s),
                    verify=self.verify,
                    allow_redirects=False,
                    proxies={},
                )
            except requests.exceptions.SSLError as e:
                if _tls_handshake_failed(e):
                    state.not_billed()  # refused during the handshake: nothing reached the model
                else:  # e.g. an SSLEOFError while reading the answer: the request may have been billed
                    state.delivered = True
                error = TLSError(
                    f"TLS handshake with {shown_url} failed (is it really https, and is the certificate "
                    f"trusted?): {self.redact(e)}"
                )
            except requests.exceptions.Timeout as e:
                if isinstance(e, requests.exceptions.ConnectTimeout):
                    state.not_billed()
                else:
                    state.delivered = True
                if not policy.retry_timeouts:
                    error = RequestTimeoutError(
                        f"{method} {shown_url} timed out after {self.timeout_s:g} s: {self.redact(e)}"
                    )
                else:
                    error = _Transient("timeout", self.redact(e))
            except requests.exceptions.ConnectionError as e:
                if _never_sent(e):
                    state.not_billed()
                else:
                    state.delivered = True
                if _is_read_timeout(e):
                    error = _Transient("timeout", self.redact(e))
                elif not policy.retry_connection_errors:
                    error = EndpointUnreachableError(f"cannot connect to {shown_url}: {self.redact(e)}")
                else:
                    error = _Transient("connection", self.redact(e))
            except requests.exceptions.RequestException as e:
                state.delivered = True
                error = ConnectorError(f"{method} {shown_url} failed: {self.redact(e)}")
        if error is not None:  # raised outside the except blocks: no raw exception in the chain
            raise error
        status = resp.status_code
        verdict = self.classify(status, resp.headers, resp.content) if self.classify and status >= 300 else None
        # refused before the model ran: throttled, out of quota, or the credentials were rejected
        refused = status in (401, 403, 429) or (verdict is not None and verdict.kind in ("throttle", "quota"))
        if refused:
            state.not_billed()
        else:  # anything else may have been billed
            state.delivered = True
        if 200 <= status < 300:
            return resp
        body = excerpt(resp.content, secrets=self._secret_list())
        if verdict is not None and verdict.kind == "quota":
            why = f": {verdict.reason}" if verdict.reason else ""
            raise QuotaExhausted(
                f"{method} {shown_url} -> HTTP {status}: quota exhausted{why} (not retried); body: {body!r}",
                status=status, url=shown_url, body_excerpt=body, attempts=attempts, request_id=rid,
                billed=None if state.delivered else False,
            )
        retryable = status in policy.retry_statuses if verdict is None else verdict.kind in ("throttle", "transient")
        if retryable:
            throttled = status == 429 or (verdict is not None and verdict.kind == "throttle")
            if throttled or status == 503:
                self._count("throttled")
            if throttled:
                state.throttled += 1
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            if verdict is not None and verdict.retry_after is not None:
                retry_after = verdict.retry_after
            t = _Transient("status", f"HTTP {status}", status=status, retry_after=retry_after, body=body,
                           throttled=throttled)
            if retry_after is not None and retry_after > policy.max_retry_after_s:
                raise self._final_error(t, method, shown_url, state, rid, too_long=True, billed=state.delivered)
            raise t
        kwargs: dict[str, Any] = dict(status=status, url=shown_url, body_excerpt=body, attempts=attempts,
                                      request_id=rid)
        if status in (401, 403):
            raise AuthenticationError(
                f"{method} {shown_url} -> HTTP {status}: the endpoint refused the credentials "
                f"({self.auth.kind} auth{', ' + self.auth.credential.source if self.auth.credential else ''}); "
                f"body: {body!r}",
                billed=None if state.delivered else False,
                **kwargs,
            )
        if 300 <= status < 400:
            loc = redact_url(resp.headers.get("Location", "?"))
            raise HTTPStatusError(
                f"{method} {shown_url} -> HTTP {status} redirect to {loc}; redirects are not followed, "
                f"configure the final URL",
                **kwargs,
            )
        raise HTTPStatusError(f"{method} {shown_url} -> HTTP {status} (not retried); body: {body!r}", **kwargs)

    def _secret_list(self) -> list[str]:
        cred = self.auth.credential
        return [cred.get_secret_value()] if cred else []

    def _final_error(
        self,
        t: _Transient,
        method: str,
        shown_url: str,
        state: _RequestState,
        rid: str,
        too_long: bool = False,
        billed: bool = True,
    ) -> ConnectorError:
        """The typed error for a retryable failure that is final. ``billed=False`` (no attempt can
        have reached the model: refused connections, 429s) lets the engine refund the budget."""
        err = self._final_error_inner(t, method, shown_url, state, rid, too_long)
        err.billed = None if billed else False
        return err

    def _final_error_inner(
        self, t: _Transient, method: str, shown_url: str, state: _RequestState, rid: str, too_long: bool
    ) -> ConnectorError:
        attempts = state.attempts
        what = f"{method} {shown_url}"
        tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
        if t.kind == "timeout":
            return RequestTimeoutError(
                f"{what}: no answer within the {self.timeout_s:g} s timeout on {tries} ({t.message})"
            )
        if t.kind == "connection":
            return EndpointUnreachableError(f"{what}: cannot connect after {tries}: {t.message}")
        kwargs: dict[str, Any] = dict(status=t.status, url=shown_url, body_excerpt=t.body, attempts=attempts,
                                      request_id=rid)
        if too_long:
            reason = (f"the server asked to retry after {t.retry_after:g} s, more than max_retry_after_s="
                      f"{self.retry.max_retry_after_s:g}")
        else:
            reason = f"still HTTP {t.status} after {tries}"
        if t.status == 429 or t.throttled:
            n = state.throttled
            return RateLimitedError(
                f"{what}: rate-limited (HTTP {t.status}): {reason}, {n} of {tries} throttled; this is "
                f"throttling, not an exhausted quota: retry later, or lower max_in_flight or rate_limit "
                f"(not billed); body: {t.body!r}",
                retry_after=t.retry_after, throttled=n, **kwargs,
            )
        return ServiceUnavailableError(f"{what}: HTTP {t.status}: {reason}; body: {t.body!r}", **kwargs)


def _detached(error: BaseException) -> BaseException:
    """``error`` with its exception chain cut (``__cause__`` and ``__context__`` cleared)."""
    error.__cause__ = None
    error.__context__ = None
    error.__suppress_context__ = False
    return error


@dataclass
class _RequestState:
    """One logical request's attempts: how many were sent, whether one may have reached the model,
    how many were throttled, and the engine meter (if any) charged for each."""

    images: int
    meter: AttemptMeter | None = None
    attempts: int = 0
    delivered: bool = False
    throttled: int = 0

    def not_billed(self) -> None:
        """The current attempt provably never reached the model: credit it back."""
        if self.meter is not None:
            self.meter.not_billed(self.images)


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


# --------------------------------------------------------------------------------------------------
# connector base


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
