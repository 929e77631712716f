"""Credentials and how they are attached to requests (:class:`Credential`, :class:`Auth`).

Part of :mod:`blackbox_rs.connectors.http` (import from there). A secret comes from a named
environment variable or a pydantic ``SecretStr``, is registered with :mod:`blackbox_rs.redact` when
the :class:`Credential` is created, is readable only through :meth:`Credential.get_secret_value`, and
never appears in a ``repr``/``str`` or a pickle (a :class:`Credential` cannot be pickled).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import SecretStr

from blackbox_rs.errors import ConfigError
from blackbox_rs.redact import register_secret

__all__ = ["Auth", "AuthKind", "Credential"]


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
