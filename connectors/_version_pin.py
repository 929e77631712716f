"""The model version a connector is bound to: the first one observed, a pinned one, or the one a
resumed run's cache recorded. Thread-safe; a different version is a :class:`ModelVersionChangedError`
(answers of two models are never mixed in one cache)."""

from __future__ import annotations

import threading
from typing import Any

from blackbox_rs.errors import InvalidParameterError, ModelVersionChangedError

__all__ = ["VersionPin"]


class VersionPin:
    """Holds one model version (None until known)."""

    def __init__(self, version: str | None = None) -> None:
        self._lock = threading.Lock()
        self.value: str | None = version

    def observe(self, version: Any, message: str) -> None:
        """An answer reported ``version``: bind to it if unbound, else raise unless it matches.
        ``message`` is formatted with ``{seen}`` (the answer's) and ``{bound}``."""
        if version in (None, ""):
            return
        seen = str(version)
        with self._lock:
            if self.value is None:
                self.value = seen
                return
            bound = self.value
        if seen != bound:
            raise ModelVersionChangedError(message.format(seen=repr(seen), bound=repr(bound)))

    def expect(self, version: str, message: str) -> None:
        """Bind to ``version`` (e.g. from a resumed run's cache); raise at once if already bound to
        another. ``message`` is formatted with ``{bound}`` (the current) and ``{seen}`` (``version``)."""
        if not isinstance(version, str) or not version:
            raise InvalidParameterError(f"expect_model_version needs a non-empty version string, got {version!r}")
        with self._lock:
            if self.value is None:
                self.value = version
                return
            bound = self.value
        if bound != version:
            raise ModelVersionChangedError(message.format(seen=repr(version), bound=repr(bound)))
