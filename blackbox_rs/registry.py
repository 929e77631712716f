"""The one registry helper: a table of named objects, used by connectors, input modules and fit
strategies alike (:mod:`blackbox_rs.connectors.registry`, :mod:`blackbox_rs.modules.registry`,
:mod:`blackbox_rs.fitting.strategies.base`).

Guarantees of :class:`Registry`:

- ``register(name, obj)`` adds an entry; a name already taken raises the family's ``duplicate`` error
  naming it and what holds it (nothing is replaced).
- ``register_lazy(name, module, attr)`` adds an entry that is imported on its first ``get`` (so no
  heavy import happens when the registry is imported or listed); naming the same import path again
  is a no-op, another one under a taken name is a duplicate.
- ``get(name)`` returns the object; an unknown name raises the family's ``unknown`` error listing the
  known names. ``names()`` is sorted; ``name in registry``, ``iter``, ``len`` and ``pop`` never import
  a lazy entry.

This module imports only :mod:`blackbox_rs.errors` (plus :mod:`importlib` when a lazy entry is used).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar, overload

from blackbox_rs.errors import BlackBoxRSError, ConfigError

__all__ = ["Registry"]

T = TypeVar("T")
_D = TypeVar("_D")


class _Lazy:
    """An entry not imported yet: ``module:attr``."""

    __slots__ = ("attr", "module")

    def __init__(self, module: str, attr: str) -> None:
        self.module, self.attr = module, attr

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Lazy) and (self.module, self.attr) == (other.module, other.attr)

    def __hash__(self) -> int:
        return hash((self.module, self.attr))

    def __repr__(self) -> str:
        return f"{self.module}:{self.attr}"


def _describe(obj: Any) -> str:
    return repr(obj) if isinstance(obj, _Lazy) else getattr(obj, "__qualname__", None) or repr(obj)


class Registry(Generic[T]):
    """Named entries of one family (``kind``, e.g. ``"connector"``), with the family's own errors:
    ``unknown`` for a name that is not registered, ``duplicate`` for a name registered twice
    (default: the same class as ``unknown``); ``lazy`` maps names to ``(module, attr)`` entries to
    :meth:`register_lazy`. See the module docstring for the guarantees."""

    def __init__(self, kind: str, *, unknown: type[BlackBoxRSError] = ConfigError,
                 duplicate: type[BlackBoxRSError] | None = None,
                 lazy: Mapping[str, tuple[str, str]] | None = None) -> None:
        self.kind = kind
        self._unknown = unknown
        self._duplicate = duplicate or unknown
        self._entries: dict[str, T | _Lazy] = {}
        self._loaded: dict[str, T] = {}  # lazy entries already imported
        for name, (module, attr) in (lazy or {}).items():
            self.register_lazy(name, module, attr)

    # ------------------------------------------------------------------ registration
    def register(self, name: str, obj: T) -> T:
        """Add ``obj`` as ``name`` and return it; a taken name raises the ``duplicate`` error, except
        that registering the very object a lazy entry names resolves that entry."""
        existing = self._entries.get(name)
        if (isinstance(existing, _Lazy) and getattr(obj, "__module__", None) == existing.module
                and getattr(obj, "__qualname__", None) == existing.attr):
            self._entries[name] = obj
            self._loaded.pop(name, None)
            return obj
        self.require_free(name)
        self._entries[name] = obj
        return obj

    def register_lazy(self, name: str, module: str, attr: str) -> None:
        """Add ``module:attr`` as ``name``, imported on first :meth:`get`. The same path again is a
        no-op; another path under a taken name raises the ``duplicate`` error."""
        entry = _Lazy(module, attr)
        if self._entries.get(name) == entry:
            return
        self.require_free(name)
        self._entries[name] = entry

    def require_free(self, name: str) -> None:
        """Raise the ``duplicate`` error if ``name`` is taken (to check before other validation)."""
        if name in self._entries:
            raise self._duplicate(
                f"{self.kind} name {name!r} is already registered ({_describe(self._entries[name])})"
            )

    @overload
    def pop(self, name: str) -> T | None: ...
    @overload
    def pop(self, name: str, default: _D) -> T | _D: ...

    def pop(self, name: str, default: Any = None) -> Any:
        """Remove ``name`` (e.g. a plugin registered by a test); returns what was stored (a lazy entry
        is returned unimported, as its ``module:attr`` description) or ``default``."""
        self._loaded.pop(name, None)
        return self._entries.pop(name, default)

    # ------------------------------------------------------------------ lookup
    def get(self, name: str) -> T:
        """The object registered as ``name`` (a lazy entry is imported now, once); an unknown name
        raises the ``unknown`` error listing the known names. Import errors of a lazy entry propagate
        as they are (e.g. a missing optional dependency)."""
        try:
            entry = self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable "name"
            raise self._unknown(
                f"unknown {self.kind} {name!r}; known: {', '.join(self.names()) or '(none)'}"
            ) from None
        if not isinstance(entry, _Lazy):
            return entry
        if name not in self._loaded:
            self._loaded[name] = getattr(importlib.import_module(entry.module), entry.attr)
        return self._loaded[name]

    __getitem__ = get

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._entries
        except TypeError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
