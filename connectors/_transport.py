"""The HTTP transport (:class:`HTTPTransport`) and its per-request attempt bookkeeping.

Part of :mod:`blackbox_rs.connectors.http` (import from there): its module docstring states the
transport's guarantees (retries, per-attempt billing, typed errors with no exception chain, timeouts,
bounded concurrency, client-side rate limit, secrets).
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

from blackbox_rs.engine import AttemptMeter, current_meter
from blackbox_rs.errors import (
    AuthenticationError,
    ConnectorError,
    EndpointUnreachableError,
    HTTPStatusError,
    InvalidParameterError,
    QuotaExhausted,
    RateLimitedError,
    RequestTimeoutError,
    ServiceUnavailableError,
    TLSError,
)
from blackbox_rs.redact import excerpt, redact, redact_url

from ._auth import Auth
from ._endpoint import _base_url
from ._response import parse_json
from ._retry import (
    Classifier,
    _is_read_timeout,
    _never_sent,
    _tls_handshake_failed,
    _Transient,
    parse_retry_after,
)
from .transport_settings import TransportSettings, as_transport_settings, refuse_flat_transport_keywords

__all__ = ["HTTPTransport"]

#: images in the chunk :class:`HTTPConnector` is sending in this thread (None: not inside a chunk)
_CHUNK_IMAGES: ContextVar[int | None] = ContextVar("bbrs_http_chunk_images", default=None)


class HTTPTransport:
    """A thread-safe, pooled, rate-limited, retrying HTTP client for one endpoint.

    Args:
        base_url: ``http(s)://host[:port][/prefix]``; request paths are appended to it. No
            credentials in it (use ``auth``).
        auth: how to attach a credential (:class:`Auth`); default none.
        transport: the :class:`TransportSettings` (or a dict of its fields): timeouts, requests in
            flight (unset: 4), rate limit (unset or ``"default"``: none), retries (unset:
            ``RetryPolicy()``), static headers (e.g. ``{"Host": "model.ns.example.com"}`` for KServe
            behind Knative), TLS verification. A flat keyword (``timeout_s=``) raises
            :class:`~blackbox_rs.errors.ConfigError` naming it.
        sleep: injectable sleep for backoff (tests).
        classify: optional hook ``(status, headers, body) -> ErrorClass | None`` for vendors whose
            throttling or quota errors are told by the body, not the status (``None``: the default
            status rules).
    """

    @refuse_flat_transport_keywords
    def __init__(
        self,
        base_url: str,
        *,
        auth: Auth | None = None,
        transport: TransportSettings | Mapping[str, Any] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        classify: Classifier | None = None,
    ) -> None:
        settings = as_transport_settings(transport).with_defaults(max_in_flight=4)
        self.settings = settings
        self.base_url = _base_url(base_url)
        self.auth = auth or Auth()
        self._headers = dict(settings.headers)
        self.timeout_s = settings.timeout_s
        connect = settings.connect_timeout_s
        self.connect_timeout_s = float(connect if connect is not None else min(self.timeout_s, 10.0))
        self.max_in_flight = int(settings.max_in_flight or 4)
        self.limiter = settings.resolved_limiter()
        self.retry = settings.resolved_retry()
        self.verify = settings.verify
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
        Raises the typed errors listed in :mod:`blackbox_rs.connectors.http`; none of them carries
        another exception in ``__cause__`` or ``__context__``.
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
        # and without the frames that hold the credential in their locals (reporters that capture
        # local variables, e.g. Sentry, would show them): only this frame remains, its secrets deleted
        hdrs = params = prepared = None  # noqa: F841 - the closure's cell too
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
    """``error`` with its exception chain and earlier traceback frames cut (``__cause__``,
    ``__context__`` and ``__traceback__`` cleared): its frames' locals may hold a credential."""
    if not isinstance(error, KeyboardInterrupt):  # keep where Ctrl-C struck
        error.__traceback__ = None
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
