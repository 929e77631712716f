"""ConnectorSpec: a connector as a registry name plus settings, safe to ship to another process.

Guarantee: a spec never holds a secret. Settings whose key looks like a credential (``token``,
``secret``, ``password``, ``api_key``, ``credential``, ``auth`` ... as a word of the key in any
spelling: ``client_secret``, ``clientSecret``, ``X-Api-Key``, ``accessToken``; or a header name that
carries one, ``Ocp-Apim-Subscription-Key``), nested tables included, are refused with
:class:`ConfigError`, except the *names* of environment variables (keys ending in ``_env``) and
``api_key_header``; so are URL values with credentials in them (``user:pass@host``, a ``?key=`` /
``?token=`` / ``?sig=`` query parameter) and any value holding a registered secret; values must be
plain JSON (no objects that could carry a credential). The worker calls :func:`blackbox_rs.connectors.registry.build_connector`, which
reads the credential from *its own* environment, so the secret never enters task arguments, Ray's
object store, logs or the journal.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from pydantic import BaseModel, ConfigDict

from blackbox_rs.errors import ConfigError
from blackbox_rs.redact import SENSITIVE_HEADERS, SENSITIVE_QUERY_KEYS, redact

__all__ = ["ConnectorSpec"]

_WORDS = {"token", "secret", "password", "passwd", "credential", "credentials", "auth", "authorization",
          "apikey", "bearer", "cookie"}
_PAIRS = {("api", "key"), ("private", "key"), ("access", "key"), ("secret", "key"), ("session", "token"),
          ("client", "secret"), ("access", "token"), ("refresh", "token"), ("subscription", "key"),
          ("account", "key"), ("sas", "token")}
_ALLOWED = {"api_key_header"}
_WORD_RE = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")


def _words(key: str) -> list[str]:
    """The words of a key in any spelling: ``client_secret``, ``clientSecret``, ``X-Api-Key``, ``APIKey``."""
    return [w.lower() for w in _WORD_RE.findall(key)]


def _secretish(key: str) -> bool:
    """True for a key that names a credential (``token``, ``api_key``, ``client_secret``, ``apiKey``,
    ``X-Api-Key``), not for ``max_tokens`` or the name of an environment variable (``bearer_token_env``)."""
    if key.endswith("_env") or key in _ALLOWED:
        return False
    words = _words(key)
    return (bool(_WORDS & set(words)) or any(pair in _PAIRS for pair in zip(words, words[1:], strict=False))
            or key.lower() in SENSITIVE_HEADERS)


def _url_secret(value: str) -> str | None:
    """Why a string value carries a credential (userinfo or a secret query parameter in a URL, or a
    registered secret), or None."""
    if redact(value) != value:
        return "holds a registered secret"
    if "://" not in value:
        return None
    try:
        parts = urlsplit(value)
    except ValueError:
        return None
    if "@" in parts.netloc:
        return "is a URL with credentials in it (user:password@host)"
    for k, _ in parse_qsl(parts.query, keep_blank_values=True):
        if k.lower() in SENSITIVE_QUERY_KEYS or _secretish(k):
            return f"is a URL with a credential in its query ({k}=...)"
    return None


def _check(settings: Any, where: str) -> None:
    if isinstance(settings, dict):
        for k, v in settings.items():
            if not isinstance(k, str):
                raise ConfigError(f"connector setting keys must be strings, got {k!r} in {where}")
            if _secretish(k):
                raise ConfigError(
                    f"connector setting {where}{k} looks like a credential: a ConnectorSpec is shipped to "
                    f"workers, so give the *name* of an environment variable instead (e.g. bearer_token_env, "
                    f"api_key_env) and set that variable in the workers' environment"
                )
            _check(v, f"{where}{k}.")
    elif isinstance(settings, list):
        for v in settings:
            _check(v, where)
    elif isinstance(settings, str):
        why = _url_secret(settings)
        if why is not None:
            raise ConfigError(
                f"connector setting {where.rstrip('.') or 'value'} {why}: a ConnectorSpec is shipped to workers, so "
                f"give credentials by environment variable name (bearer_token_env, api_key_env) instead"
            )


class ConnectorSpec(BaseModel):
    """``name``: a registered connector (``blackbox_rs.connectors.registry``); ``settings``: its
    keyword arguments as plain JSON (paths, URLs, shapes, env var *names*)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    settings: dict[str, Any] = {}

    def __init__(self, **data: Any) -> None:
        settings = data.get("settings") or {}
        _check(settings, "")  # a ConfigError of its own, before pydantic (which would wrap it)
        try:
            json.dumps(settings)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"connector settings must be plain JSON to be shipped to workers: {exc}") from None
        super().__init__(**data)

    def build(self, *, credentials: bool = True) -> Any:
        """The connector, built in this process: credentials from this process's environment, or,
        with ``credentials=False``, none (for a driver that only reads the model's contract and
        fingerprint and sends no query: the secret need not exist on the driver at all)."""
        from blackbox_rs.connectors.registry import build_connector

        settings = dict(self.settings)
        if not credentials:
            for k in ("bearer_token_env", "api_key_env", "api_key_header"):
                settings.pop(k, None)
        return build_connector(self.name, settings)
