"""Keep credentials out of messages, reprs, logs and files.

Two mechanisms, applied together by :func:`redact`:

* **Known values.** A connector registers every secret it resolves (:func:`register_secret`); any
  later occurrence of that exact value in a string is replaced by ``***``. This catches a token
  wherever it appears (echoed in a response body, inside a URL, in a library's exception text).
* **Patterns.** ``Authorization``-like header lines, ``Bearer``/``Basic`` credentials, URL userinfo
  (``https://user:pass@host``) and query parameters with secret-looking names (``key``, ``token``,
  ``api_key``, ``sig``, ...) are masked even when the value was never registered.

Guarantee: ``redact(s)`` contains no registered secret value as a substring. The pattern rules are
best effort for secrets the SDK never saw. Registered values shorter than 4 characters are refused
(they would mask ordinary text and are not credentials anyway).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = [
    "MASK",
    "SENSITIVE_HEADERS",
    "SENSITIVE_QUERY_KEYS",
    "excerpt",
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
    with _lock:
        _secrets.add(value)


def redact(text: object, secrets: Iterable[str | None] = ()) -> str:
    """``str(text)`` with every registered secret, every value in ``secrets`` and every
    credential-looking pattern replaced by ``***``."""
    s = str(text)
    with _lock:
        known = set(_secrets)
    known.update(v for v in secrets if v and len(v) >= _MIN_SECRET_LEN)
    # longest first, so a secret that contains another is masked whole
    for value in sorted(known, key=len, reverse=True):
        if value in s:
            s = s.replace(value, MASK)
    for pattern, repl in _PATTERNS:
        s = pattern.sub(repl, s)
    return s


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
