"""How a remote connector talks to its endpoint: :class:`TransportSettings`, one validated object.

Every HTTP connector (and :class:`~blackbox_rs.connectors.http.HTTPTransport`) takes
``transport=TransportSettings(...)`` (or its dict form, e.g. a config file's ``[connector.transport]``
sub-table) instead of one keyword per setting. Credentials are not transport settings: they travel
with ``auth=`` (:class:`~blackbox_rs.connectors.http.Auth`).

Guarantees:

* **Validated once, named when wrong.** Construction (directly, or through
  :func:`as_transport_settings`) raises :class:`~blackbox_rs.errors.ConfigError` naming every bad
  field (``transport.timeout_s: ...``); unknown fields are refused. The object is immutable.
* **No secrets.** A header whose name looks like a credential (``Authorization``, ``Cookie``, any
  name containing ``key``, ``token``, ``secret``, ``password`` or ``auth``) is refused with a
  :class:`~blackbox_rs.errors.ConfigError` naming the header (never its value): use ``auth=``. The
  ``repr`` masks such values anyway, and no error message here ever shows a header value.
* **One way to say it.** The old flat keywords (``timeout_s=5`` on a connector) are refused by
  :func:`refuse_flat_transport_keywords` with a :class:`~blackbox_rs.errors.ConfigError` naming the
  keyword and the replacement (``transport=TransportSettings(timeout_s=5)``).
* **Answer-neutral, except routing headers.** None of these settings enters a connector's fingerprint
  except the headers, which can route to another model behind one address: ``Host``, and any other
  header (``azureml-model-deployment``, ``X-Amzn-SageMaker-Target-Model``, a Seldon or Istio routing
  header ...) but the known-neutral ones (``User-Agent``, ``Accept*``, ``Connection``, cache headers,
  and tracing headers: a name with ``trace``, ``request-id``, ``correlation`` or ``span`` in it).

Unset values (``None``, ``rate_limit="default"``) take the connector's declared default
(:meth:`TransportSettings.with_defaults`), then the transport's own (4 in flight, no rate limit,
``RetryPolicy()``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    InstanceOf,
    ValidationError,
    field_validator,
    model_validator,
)

from blackbox_rs.errors import ConfigError, InvalidParameterError
from blackbox_rs.redact import MASK, SENSITIVE_HEADERS

from ._ratelimit import RateLimiter
from ._retry import RetryPolicy

__all__ = ["FLAT_TRANSPORT_KEYWORDS", "TransportSettings", "as_transport_settings", "is_credential_header",
           "refuse_flat_transport_keywords"]

#: substrings of a header name that mark it as a credential (compared lower-case)
_CREDENTIAL_MARKERS = ("auth", "key", "token", "cookie", "secret", "password")

_F = TypeVar("_F", bound=Callable[..., Any])


def is_credential_header(name: str) -> bool:
    """True if a header called ``name`` looks like it carries a credential."""
    low = name.strip().lower()
    return low in SENSITIVE_HEADERS or any(m in low for m in _CREDENTIAL_MARKERS)


_NEUTRAL_HEADERS = frozenset({"user-agent", "accept", "accept-encoding", "accept-language", "accept-charset",
                              "connection", "keep-alive", "cache-control", "pragma", "expect",
                              "x-goog-user-project"})  # Google: the billing/quota project, not a model


def _neutral_header(name: str) -> bool:
    """A header that never selects a model: content negotiation, connection handling, caching, tracing."""
    n = name.lower()
    return n in _NEUTRAL_HEADERS or any(w in n for w in ("trace", "request-id", "correlation", "span"))


class TransportSettings(BaseModel):
    """Timeouts, concurrency, rate limit, retries, extra headers and TLS of one connector's transport.

    See the module docstring for the guarantees. ``TransportSettings(timeout_s=60, max_in_flight=2)``;
    a dict with the same keys is accepted wherever a ``TransportSettings`` is.
    """

    # hide_input_in_errors: a rejected header value (a secret put where it does not belong) never shows
    # in a validation error, whichever way the model is built (model_validate, JSON, ...)
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True, hide_input_in_errors=True)

    timeout_s: float = Field(30.0, gt=0, strict=True, allow_inf_nan=False,
                             description="Seconds to wait for each answer (each wait for the server's bytes).")
    connect_timeout_s: float | None = Field(None, gt=0, strict=True, allow_inf_nan=False,
                                            description="Seconds to wait for a connection; None: min(timeout_s, 10).")
    max_in_flight: int | None = Field(None, ge=1, strict=True,
                                      description="Requests on the wire at once, across all threads; None: the "
                                                  "connector's declared default.")
    rate_limit: float | InstanceOf[RateLimiter] | None | Literal["default"] = Field(
        "default", description="Client-side limit in requests/s (or a RateLimiter shared by several connectors); "
                               "None: no limit; 'default': the vendor's documented limit.")
    max_attempts: int | None = Field(None, ge=1, strict=True,
                                     description="Requests per logical request, retries included; None: the "
                                                 "connector's retry default. Ignored if retry is given.")
    retry: InstanceOf[RetryPolicy] | None = Field(
        None, description="The full retry policy (a RetryPolicy or a dict of its fields); overrides max_attempts.")
    headers: dict[str, str] = Field(default_factory=dict,
                                    description="Extra headers for every request (never credentials: use auth=).")
    verify: bool | str = Field(True, description="TLS certificate verification, or the path of a CA bundle.")

    def __init__(self, **data: Any) -> None:
        message = None
        try:
            super().__init__(**data)
        except ValidationError as err:
            message = _message(err)
        if message is not None:  # raised outside the except block: the ValidationError shows inputs
            raise ConfigError(message)

    # ---- validation ------------------------------------------------------------------------------

    @field_validator("rate_limit", mode="before")
    @classmethod
    def _rate(cls, v: Any) -> Any:
        if v is None or v == "default" or isinstance(v, RateLimiter):
            return v
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"must be a number of requests/s, None (no limit), 'default' or a RateLimiter, got "
                             f"{type(v).__name__}")
        if not (v > 0 and v != float("inf")):
            raise ValueError(f"must be > 0 requests/s (None: no limit), got {v!r}")
        return float(v)

    @field_validator("retry", mode="before")
    @classmethod
    def _retry(cls, v: Any) -> Any:
        if not isinstance(v, Mapping):
            return v
        known = {f.name for f in dataclasses.fields(RetryPolicy)}
        unknown = sorted(set(v) - known)
        if unknown:
            raise ValueError(f"invalid retry settings: unknown field(s) {unknown}; known: {sorted(known)}")
        fields = {k: (frozenset(x) if k == "retry_statuses" else x) for k, x in v.items()}
        try:
            return RetryPolicy(**fields)
        except (InvalidParameterError, TypeError) as e:
            raise ValueError(f"invalid retry settings: {e}") from None

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not name.strip():
                raise ValueError("a header name must not be empty")
            if is_credential_header(name):
                raise ValueError(f"header {name!r} looks like a credential; transport headers are never secrets: "
                                 f"pass it with auth=Auth.header({name!r}, '<ENV_VAR>') instead")
        return _ReadOnlyHeaders(v)

    @field_validator("verify", mode="before")
    @classmethod
    def _verify(cls, v: Any) -> Any:
        if not isinstance(v, bool | str) or (isinstance(v, str) and not v.strip()):
            raise ValueError("must be True, False or the path of a CA bundle")
        return v

    @model_validator(mode="after")
    def _attempts_agree(self) -> TransportSettings:
        if self.retry is not None and self.max_attempts is not None and self.max_attempts != self.retry.max_attempts:
            raise ValueError(f"max_attempts={self.max_attempts} contradicts retry.max_attempts="
                             f"{self.retry.max_attempts}; give one of them")
        return self

    # ---- resolution ------------------------------------------------------------------------------

    def with_defaults(
        self, *, max_in_flight: int | None = None, rate_limit: float | None = None, retry: RetryPolicy | None = None
    ) -> TransportSettings:
        """These settings with a connector's declared defaults filled in where unset: ``max_in_flight``
        when None, ``rate_limit`` when ``"default"``, ``retry`` when None (with ``max_attempts``
        applied to it if given). Set values are never changed."""
        update: dict[str, Any] = {}
        if self.max_in_flight is None and max_in_flight is not None:
            update["max_in_flight"] = int(max_in_flight)
        if self.rate_limit == "default":
            update["rate_limit"] = rate_limit
        if self.retry is None and retry is not None:
            policy = retry if self.max_attempts is None else dataclasses.replace(retry, max_attempts=self.max_attempts)
            update.update(retry=policy, max_attempts=policy.max_attempts)
        return self.model_copy(update=update) if update else self

    def resolved_retry(self) -> RetryPolicy:
        """The retry policy these settings give: ``retry``, else ``RetryPolicy(max_attempts=...)``."""
        if self.retry is not None:
            return self.retry
        return RetryPolicy() if self.max_attempts is None else RetryPolicy(max_attempts=self.max_attempts)

    def resolved_limiter(self) -> RateLimiter | None:
        """The rate limiter: the shared one given, a new one for a rate, None for no limit (or an
        unresolved ``"default"``: the transport knows no vendor)."""
        r = self.rate_limit
        if r is None or r == "default":
            return None
        return r if isinstance(r, RateLimiter) else RateLimiter(float(r))

    @property
    def host(self) -> str | None:
        """The ``Host`` header, if any (it routes to a model, so connectors fingerprint it)."""
        return next((v for k, v in self.headers.items() if k.lower() == "host"), None)

    @property
    def routing_headers(self) -> str | None:
        """Every header but ``Host`` and the known-neutral ones (see the module docstring), as
        ``name=value`` pairs (names lower-cased, sorted, ``;``-joined) for the fingerprint: such a
        header may route to another model. ``None`` when there is none (fingerprints stay as before)."""
        pairs = sorted((k.lower(), v) for k, v in self.headers.items() if k.lower() != "host" and not _neutral_header(k))
        return ";".join(f"{k}={v}" for k, v in pairs) or None

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            if name == "headers":
                value = {k: MASK if is_credential_header(k) else v for k, v in value.items()}
            yield name, value


class _ReadOnlyHeaders(dict):  # type: ignore[type-arg]
    """The settings' headers: a dict that cannot be changed after validation (so the credential check
    cannot be bypassed by editing it)."""

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise ConfigError("TransportSettings are immutable: build new settings with the headers you need")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = __ior__ = _refuse  # type: ignore[assignment]


def as_transport_settings(value: TransportSettings | Mapping[str, Any] | None) -> TransportSettings:
    """``value`` as :class:`TransportSettings` (None: all defaults; a mapping: validated, bad fields
    raise :class:`ConfigError` naming them)."""
    if value is None:
        return TransportSettings()
    if isinstance(value, TransportSettings):
        return value
    if isinstance(value, Mapping):
        return TransportSettings(**{str(k): v for k, v in value.items()})
    raise ConfigError(f"transport must be a TransportSettings or a dict of its fields, got {type(value).__name__}")


#: the transport keywords connectors took one by one before :class:`TransportSettings`
FLAT_TRANSPORT_KEYWORDS = frozenset(TransportSettings.model_fields)


def flat_keyword_hint(key: str, value: Any = ...) -> str:
    """``transport=TransportSettings(<key>=<value>)``, the value shown only when it is a harmless scalar
    (never a header mapping or a policy object)."""
    harmless = isinstance(value, bool | int | float | type(None)) or (key == "rate_limit" and value == "default")
    shown = repr(value) if harmless else "..."
    return f"transport=TransportSettings({key}={shown})"


def refuse_flat_transport_keywords(init: _F) -> _F:
    """Decorate a connector's ``__init__``: a transport setting given as its own keyword
    (``timeout_s=5``) raises :class:`ConfigError` naming it and saying to pass
    ``transport=TransportSettings(timeout_s=5)``. The signature seen by :mod:`inspect` is unchanged."""

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        flat = sorted(FLAT_TRANSPORT_KEYWORDS & kwargs.keys())
        if flat:
            what = "is a transport setting" if len(flat) == 1 else "are transport settings"
            raise ConfigError(
                f"{type(self).__name__}: {', '.join(flat)} {what}; "
                f"pass {flat_keyword_hint(flat[0], kwargs[flat[0]])} instead"
                + (f" (with {', '.join(flat[1:])} in it too)" if len(flat) > 1 else "")
            )
        return init(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _message(err: ValidationError) -> str:
    """``transport.<field>: <problem>`` for every error; never the input values (headers may hold secrets)."""
    parts = []
    for e in err.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in e["loc"] if not isinstance(p, int))
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown transport setting; known: {', '.join(TransportSettings.model_fields)}"
        parts.append(f"transport.{loc}: {msg}" if loc else f"transport: {msg}")
    return "invalid transport settings: " + "; ".join(dict.fromkeys(parts))
