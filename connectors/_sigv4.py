"""AWS Signature Version 4 (header form) with the standard library only: hashlib + hmac.

:func:`sign` returns the headers to add to one request (``X-Amz-Date``, ``Authorization`` and, with
temporary credentials, ``X-Amz-Security-Token``). The signature covers the method, path, query,
the given headers (always ``host`` and ``x-amz-date``) and the SHA-256 of the exact body bytes, so
the caller must send those bytes unchanged. It stays valid for 5 minutes of clock skew, which
covers the transport's retries of the same prepared request.

Steps (AWS General Reference, "Signature Version 4 signing process"): canonical request ->
string to sign (``AWS4-HMAC-SHA256``, timestamp, scope, hash of the canonical request) -> signing
key by chained HMAC (secret -> date -> region -> service -> ``aws4_request``) -> hex HMAC.
botocore is not needed; tests check this module against AWS's published example signatures.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
from collections.abc import Mapping
from urllib.parse import quote

__all__ = ["sign"]

_ALGORITHM = "AWS4-HMAC-SHA256"


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def _canonical_query(query: str) -> str:
    if not query:
        return ""
    pairs = []
    for part in query.split("&"):
        k, _, v = part.partition("=")
        pairs.append((quote(k, safe="-_.~"), quote(v, safe="-_.~")))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def sign(
    *,
    method: str,
    host: str,
    path: str,
    body: bytes,
    headers: Mapping[str, str],
    access_key: str,
    secret_key: str,
    region: str,
    service: str,
    session_token: str | None = None,
    query: str = "",
    now: _dt.datetime | None = None,
) -> dict[str, str]:
    """Headers that authenticate this request with SigV4 (see the module docstring).

    ``headers`` are the other headers to sign (e.g. ``Content-Type``, ``X-Amz-Target``); ``host`` is
    the ``Host`` header exactly as sent (``name[:port]``).
    """
    t = (now or _dt.datetime.now(_dt.UTC)).astimezone(_dt.UTC)
    amz_date = t.strftime("%Y%m%dT%H%M%SZ")
    datestamp = amz_date[:8]
    out = {"X-Amz-Date": amz_date}
    if session_token:
        out["X-Amz-Security-Token"] = session_token
    signed = {k.lower(): " ".join(str(v).split()) for k, v in {**headers, **out, "host": host}.items()}
    names = sorted(signed)
    canonical = "\n".join([
        method.upper(),
        quote(path or "/", safe="/-_.~"),
        _canonical_query(query),
        "".join(f"{k}:{signed[k]}\n" for k in names),
        ";".join(names),
        hashlib.sha256(body).hexdigest(),
    ])
    scope = f"{datestamp}/{region}/{service}/aws4_request"
    to_sign = "\n".join([_ALGORITHM, amz_date, scope, hashlib.sha256(canonical.encode("utf-8")).hexdigest()])
    key = ("AWS4" + secret_key).encode("utf-8")
    for part in (datestamp, region, service, "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    out["Authorization"] = (
        f"{_ALGORITHM} Credential={access_key}/{scope}, SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return out
