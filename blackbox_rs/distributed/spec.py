"""ConnectorSpec: a connector as a registry name plus settings, safe to ship to another process.

Guarantee: a spec never holds a secret. Settings whose key looks like a credential (``token``,
``secret``, ``password``, ``api_key``, ``credential``, ``auth`` ... anywhere in the key, nested
tables included) are refused with :class:`ConfigError`, except the *names* of environment variables
(keys ending in ``_env``) and ``api_key_header``; values must be plain JSON (no objects that could
carry a credential). The worker calls :func:`blackbox_rs.connectors.registry.build_connector`, which
reads the credential from *its own* environment, so the secret never enters task arguments, Ray's
object store, logs or the journal.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict

from blackbox_rs.errors import ConfigError

__all__ = ["ConnectorSpec"]

_WORDS = {"token", "secret", "password", "passwd", "credential", "credentials", "auth", "authorization",
          "apikey", "bearer", "cookie"}
_PAIRS = re.compile(r"(api_key|private_key|access_key|secret_key|session_token)", re.IGNORECASE)
_ALLOWED = {"api_key_header"}


def _secretish(key: str) -> bool:
    """True for a key that names a credential (``token``, ``api_key``, ``client_secret``), not for
    ``max_tokens`` or the name of an environment variable (``bearer_token_env``)."""
    if key.endswith("_env") or key in _ALLOWED:
        return False
    return bool(_WORDS & set(key.lower().replace("-", "_").split("_")) or _PAIRS.search(key))


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
