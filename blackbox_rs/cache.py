"""Persistent query cache: diskcache storage, JSON values, nothing ever unpickled.

Keys are BLAKE2b hashes of (connector fingerprint, request shape, exact float32 payload bytes), so
answers of one model are never served for another and a changed model file (new fingerprint) never
gets stale hits. For a model that runs in this process (a local torch model, possibly on an
accelerator) a request whose payload the certification core generated is keyed instead by the
payload's *generating identity* (:func:`origin_key`: input content hash, noise mode and device type,
seed, noise key, stream, sigma, sample range, transform digest, clipping): the payload is a pure
function of those, and hashing hundreds of KB per sample on the host would cost more than the model
on a GPU. An input module without an identity never gets origin keys (nothing would tell two apart). Values are JSON: labels as a list, scores as base64 of their little-endian float32 bytes
(bit for bit, and fast for 1,000-class batches; rows that earlier releases wrote as JSON float lists
are still read). The granularity is the request: a rerun with the same arguments sends the same
requests and hits; changing the batch size misses.

A few metadata values bound to the cache live beside the answers (:meth:`QueryCache.get_meta` /
:meth:`QueryCache.set_meta`), e.g. the model version observed for a connector fingerprint, so a
resumed run can refuse a model that changed behind the same endpoint.

diskcache's stock ``Disk`` unpickles rows stored in "pickle" mode; :class:`_SafeJSONDisk` refuses any
row that is not raw bytes, so a tampered cache raises :class:`CacheError` instead of running code.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from typing import Any

import diskcache
import torch

from blackbox_rs.errors import CacheError
from blackbox_rs.paths import ensure_writable_dir

__all__ = ["QueryCache", "origin_key", "request_key"]

_FORMAT = "blackbox-rs/cache/v1"
_META = "__meta__"  # one row: {name: JSON value}, metadata bound to this cache (model versions, ...)


def request_key(fingerprint: str, batch: torch.Tensor) -> str:
    """Cache key of one request: hash of fingerprint, shape and float32 payload bytes."""
    t = batch.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{_FORMAT}|{fingerprint}|{tuple(t.shape)}|".encode())
    h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


def origin_key(fingerprint: str, origin: str, shape: tuple[int, ...]) -> str:
    """Cache key of one generated request: hash of fingerprint, shape and the payload's generating
    identity ``origin`` (which must determine the payload bytes; see the module docstring). Keys of
    this form never equal a :func:`request_key` (a different domain prefix)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{_FORMAT}|origin|{fingerprint}|{tuple(int(d) for d in shape)}|{origin}".encode())
    return h.hexdigest()


class _SafeJSONDisk(diskcache.Disk):
    """A diskcache Disk that stores keys and values as UTF-8 JSON bytes and refuses pickled rows."""

    def put(self, key: Any) -> tuple[Any, bool]:
        return super().put(json.dumps(key).encode())

    def get(self, key: Any, raw: bool) -> Any:
        if not raw:
            raise CacheError("cache row holds a pickled key; refusing to unpickle (cache tampered?)")
        return json.loads(bytes(key).decode())

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if read:
            raise CacheError("file-like cache values are not supported")
        return super().store(json.dumps(value, separators=(",", ":")).encode(), False, key=key)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode not in (diskcache.core.MODE_RAW, diskcache.core.MODE_BINARY):
            raise CacheError(f"cache row has storage mode {mode}; only raw JSON bytes are accepted")
        data = super().fetch(mode, filename, value, read)
        return json.loads(bytes(data).decode())


class QueryCache:
    """A directory of cached answers, safe for concurrent threads and processes.

    Raises :class:`CacheError` when the directory cannot be created or written, or holds a database
    that is not a readable cache.
    """

    def __init__(self, directory: str | os.PathLike[str], *, size_limit: int = 2**36) -> None:
        self.directory = ensure_writable_dir(directory, "cache directory")
        try:
            self._cache = diskcache.Cache(
                str(self.directory), disk=_SafeJSONDisk, size_limit=size_limit, eviction_policy="none"
            )
            if self._cache.get("__format__") is None:  # touches the database: a corrupted file fails here
                self._cache.set("__format__", _FORMAT)
        except (sqlite3.DatabaseError, OSError, ValueError) as exc:
            raise CacheError(f"cache directory {self.directory} holds a corrupted or foreign cache: {exc}") from exc
        fmt = self._cache.get("__format__")
        if fmt != _FORMAT:
            raise CacheError(f"cache directory {self.directory} has format {fmt!r}, expected {_FORMAT!r}")

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached answer for ``key`` or ``None``."""
        try:
            return self._cache.get(key)
        except (sqlite3.DatabaseError, OSError, ValueError) as exc:
            raise CacheError(f"cannot read cache {self.directory}: {exc}") from exc

    def set(self, key: str, value: dict[str, Any]) -> None:
        """Store an answer (one SQLite transaction, durable before return)."""
        try:
            self._cache.set(key, value)
        except (sqlite3.DatabaseError, OSError, ValueError, TypeError) as exc:
            raise CacheError(f"cannot write cache {self.directory}: {exc}") from exc

    def get_meta(self, name: str) -> Any:
        """The metadata value stored under ``name`` (``None`` if absent)."""
        try:
            meta = self._cache.get(_META)
        except (sqlite3.DatabaseError, OSError, ValueError) as exc:
            raise CacheError(f"cannot read cache {self.directory}: {exc}") from exc
        if meta is not None and not isinstance(meta, dict):
            raise CacheError(f"cache {self.directory} holds malformed metadata (a {type(meta).__name__})")
        return None if meta is None else meta.get(name)

    def set_meta(self, name: str, value: Any, *, keep_existing: bool = False) -> Any:
        """Store a JSON value under ``name`` (one transaction, durable before return, safe against
        concurrent threads and processes) and return the value now stored: with ``keep_existing``,
        an existing value is kept and returned instead (first writer wins)."""
        try:
            with self._cache.transact():
                meta = self._cache.get(_META) or {}
                if not isinstance(meta, dict):
                    raise CacheError(f"cache {self.directory} holds malformed metadata (a {type(meta).__name__})")
                if keep_existing and meta.get(name) is not None:
                    return meta[name]
                self._cache.set(_META, {**meta, name: value})
                return value
        except (sqlite3.DatabaseError, OSError, ValueError, TypeError) as exc:
            raise CacheError(f"cannot write cache {self.directory}: {exc}") from exc

    def __len__(self) -> int:
        """Number of cached answers (the format and metadata rows are not answers)."""
        return len(self._cache) - 1 - (_META in self._cache)

    def close(self) -> None:
        self._cache.close()

    def __repr__(self) -> str:
        return f"QueryCache({str(self.directory)!r})"
