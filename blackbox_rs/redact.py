"""Keep credentials out of messages, reprs, logs and files.

Two mechanisms, applied together by :func:`redact`:

* **Known values.** A connector registers every secret it resolves (:func:`register_secret`); any
  later occurrence of that exact value in a string is replaced by ``***``. This catches a token
  wherever it appears (echoed in a response body, inside a URL, in a library's exception text).
* **Patterns.** ``Authorization``-like header lines, ``Bearer``/``Basic`` credentials, URL userinfo
  (``https://user:pass@host``) and query parameters with secret-looking names (``key``, ``token``,
  ``api_key``, ``sig``, ...) are masked even when the value was never registered.

Guarantee: ``redact(s)`` contains no registered secret value as a substring, in any of the encodings
a secret travels in: raw, percent-encoded (``quote`` and ``quote_plus`` forms, upper- or lower-case
hex), base64 and urlsafe base64 (alone, or inside a longer base64 string at any byte alignment, as
in ``Authorization: Basic base64(user:secret)``). The pattern rules are best effort for secrets the
SDK never saw. Registered values shorter than 4 characters are refused (they would mask ordinary
text and are not credentials anyway).

**Logs.** From the first :func:`register_secret` on, every log record the process creates is
redacted the same way (message *and* arguments, exception and stack text), whatever its logger
(urllib3, requests, ours, the user's) and whatever handler later sees it: :func:`register_secret`
installs a wrapper around the process's log-record factory (``logging.setLogRecordFactory``). A
record factory is used for every record a ``Logger`` creates, before any filter or handler runs, so
it also covers handlers added later (pytest's ``caplog``, error reporters, a recipe's file handler);
a filter would only cover the handlers or loggers it was attached to (a logger's filters do not even
see records propagated from child loggers such as ``urllib3.connectionpool``).
"""

from __future__ import annotations

import base64
import functools
import logging
import re
import threading
import traceback
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, urlencode, urlsplit, urlunsplit

__all__ = [
    "MASK",
    "SENSITIVE_HEADERS",
    "SENSITIVE_QUERY_KEYS",
    "encodings",
    "excerpt",
    "install_log_redaction",
    "redact",
    "redact_headers",
    "redact_url",
    "register_secret",
]

MASK = "***"

#: Header names whose values are always masked (compared case-insensitively).
SENSITIVE_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "apikey",
        "ocp-apim-subscription-key",
        "prediction-key",
        "x-goog-api-key",
        "x-amz-security-token",
        "cookie",
        "set-cookie",
    }
)

#: URL query parameter names whose values are always masked (compared case-insensitively).
SENSITIVE_QUERY_KEYS = frozenset(
    {
        "key",
        "api_key",
        "apikey",
        "api-key",
        "token",
        "access_token",
        "auth",
        "sig",
        "signature",
        "x-amz-signature",
        "x-amz-security-token",
        "x-amz-credential",
        "password",
        "secret",
        "client_secret",
        "code",
    }
)

_MIN_SECRET_LEN = 4
_lock = threading.Lock()
_secrets: set[str] = set()
_masks: tuple[str, ...] = ()  # every encoding of every registered secret, longest first

_HEADER_NAMES_RE = "|".join(sorted((re.escape(h) for h in SENSITIVE_HEADERS), key=len, reverse=True))
_QUERY_NAMES_RE = "|".join(sorted((re.escape(k) for k in SENSITIVE_QUERY_KEYS), key=len, reverse=True))
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # "Authorization: Bearer abc", "'x-api-key': 'abc'", "api-key=abc" in header dumps
    (
        re.compile(rf"(?i)(['\"]?(?:{_HEADER_NAMES_RE})['\"]?\s*[:=]\s*['\"]?)([^'\"\r\n,}}]+)"),
        rf"\g<1>{MASK}",
    ),
    # bare scheme credentials anywhere
    (re.compile(r"(?i)\b(Bearer|Basic|Token|Key)\s+[A-Za-z0-9._~+/=\-]{8,}"), rf"\g<1> {MASK}"),
    # URL userinfo
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s:@]+(?::[^/\s@]*)?@"), rf"\g<1>{MASK}@"),
    # secret-looking query parameters
    (re.compile(rf"(?i)([?&;](?:{_QUERY_NAMES_RE})=)[^&#\s'\"]+"), rf"\g<1>{MASK}"),
)


def register_secret(value: str | None) -> None:
    """Remember ``value`` so that :func:`redact` masks it from now on (process-wide, thread-safe).

    ``None`` and empty strings are ignored. Raises ``ValueError`` for values shorter than 4
    characters, which cannot be masked without mangling ordinary text.
    """
    if not value:
        return
    if len(value) < _MIN_SECRET_LEN:
        raise ValueError(f"a secret must be at least {_MIN_SECRET_LEN} characters long to be redactable")
    global _masks
    with _lock:
        if value not in _secrets:
            _secrets.add(value)
            _masks = tuple(sorted({m for v in _secrets for m in encodings(v)}, key=len, reverse=True))
    install_log_redaction()


@functools.lru_cache(maxsize=256)
def encodings(value: str) -> tuple[str, ...]:
    """Every form in which ``value`` may appear in a URL, header, log line or exception text: itself,
    its percent-encodings (``quote`` with and without ``/`` kept, ``quote_plus``; upper- and lower-case
    hex), its base64 and urlsafe base64 (padded and not), and the base64 cores that appear whatever
    the byte alignment of ``value`` inside a longer base64 payload (``user:secret``). Forms shorter
    than 4 characters are left out (they would mask ordinary text)."""
    forms = {value}
    for q in (quote(value, safe=""), quote(value), quote_plus(value, safe=""), quote_plus(value)):
        forms.add(q)
        forms.add(re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), q))
    raw = value.encode("utf-8")
    for enc in (base64.b64encode, base64.urlsafe_b64encode):
        full = enc(raw).decode("ascii")
        forms.update((full, full.rstrip("=")))
        for k in range(3):  # value starting at byte offset = -k (mod 3) inside a longer payload
            whole = (len(raw) - k) // 3 * 3
            if whole > 0:
                forms.add(enc(raw[k : k + whole]).decode("ascii"))
    return tuple(f for f in forms if len(f) >= _MIN_SECRET_LEN)


def redact(text: object, secrets: Iterable[str | None] = ()) -> str:
    """``str(text)`` with every registered secret, every value in ``secrets`` (each in every form
    :func:`encodings` lists) and every credential-looking pattern replaced by ``***``."""
    s = str(text)
    with _lock:
        masks = _masks
    extra = [v for v in secrets if v and len(v) >= _MIN_SECRET_LEN and v not in _secrets]
    if extra:
        masks = tuple(sorted({*masks, *(m for v in extra for m in encodings(v))}, key=len, reverse=True))
    # longest first, so a secret that contains another is masked whole
    for value in masks:
        if value in s:
            s = s.replace(value, MASK)
    for pattern, repl in _PATTERNS:
        s = pattern.sub(repl, s)
    return s


# --------------------------------------------------------------------------------------------------
# log records


def _redact_record(record: logging.LogRecord) -> None:
    """Redact one record in place: the formatted message (then ``args`` are dropped, so no handler
    can re-format or ship the raw arguments), exception and stack text."""
    try:
        text = record.getMessage()
    except Exception:  # a malformed record: logging reports it when it is formatted; hide the args
        text = redact(f"{record.msg} {record.args!r}")
        record.msg, record.args = text, ()
        return
    # one pass: the formatted, redacted text replaces msg and args (no handler can re-format or ship
    # the raw arguments)
    record.msg, record.args = redact(text), ()
    if record.exc_info and record.exc_info[0] is not None:
        exc_text = record.exc_text or "".join(traceback.format_exception(*record.exc_info))
        clean_exc = redact(exc_text)
        record.exc_text = clean_exc.rstrip("\n")  # formatted once: the formatter reuses exc_text
        if clean_exc != exc_text:  # drop the exception objects that hold the secret
            record.exc_info = None
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


_factory_lock = threading.Lock()
_installed_factory: Any = None


def install_log_redaction() -> None:
    """Make every log record created from now on redacted (see the module docstring); idempotent.
    Called by :func:`register_secret`. If other code later replaces the record factory without
    chaining to the previous one, the next :func:`register_secret` installs the wrapper again."""
    global _installed_factory
    with _factory_lock:
        current = logging.getLogRecordFactory()
        if current is _installed_factory:
            return

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = current(*args, **kwargs)
            if _masks:
                _safely(_redact_record, record)
            return record

        _installed_factory = factory
        logging.setLogRecordFactory(factory)
        _patch_make_record()


_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def _safely(fn: Any, record: logging.LogRecord) -> None:
    """Run a redaction step; if it fails (an argument whose ``__str__`` raises, say) the record keeps
    only a fixed placeholder: logging must never raise into the caller, nor leak on the way."""
    try:
        fn(record)
    except Exception:
        record.msg, record.args = "[log record withheld: it could not be redacted]", ()
        record.exc_info, record.exc_text, record.stack_info = None, None, None


def _redact_extra(record: logging.LogRecord) -> None:
    """Redact the ``extra=`` fields of a record (set by ``Logger.makeRecord`` after the factory ran)."""
    for key, value in list(vars(record).items()):
        if key in _STANDARD_ATTRS:
            continue
        text = value if isinstance(value, str) else repr(value)
        clean = redact(text)
        if clean != text:
            setattr(record, key, clean)


def _patch_make_record() -> None:
    """Wrap ``logging.Logger.makeRecord`` once so ``extra`` fields are redacted too."""
    if getattr(logging.Logger.makeRecord, "_bbrs_redacting", False):
        return
    original = logging.Logger.makeRecord

    def makeRecord(self: logging.Logger, *args: Any, **kwargs: Any) -> logging.LogRecord:  # noqa: N802
        record = original(self, *args, **kwargs)
        if _masks:
            _safely(_redact_extra, record)
        return record

    makeRecord._bbrs_redacting = True  # type: ignore[attr-defined]
    logging.Logger.makeRecord = makeRecord  # type: ignore[method-assign]


def redact_url(url: str) -> str:
    """``url`` without userinfo and with secret-looking query values masked (and registered secrets)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, MASK if k.lower() in SENSITIVE_QUERY_KEYS else v) for k, v in pairs], safe="*"
        )
    return redact(urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment)))


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``headers`` with sensitive header values masked and registered secrets removed."""
    return {k: MASK if k.lower() in SENSITIVE_HEADERS else redact(v) for k, v in headers.items()}


def excerpt(text: str | bytes | None, limit: int = 300, secrets: Iterable[str | None] = ()) -> str:
    """A short, single-line, redacted excerpt of a response body for error messages."""
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    # redact before cutting, so a secret straddling the cut is not half-printed
    s = redact(text, secrets)
    s = " ".join(s.split())
    if len(s) > limit:
        s = s[: limit - 3] + "..."
    return s
