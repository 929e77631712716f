"""Filesystem helpers shared by every file the SDK writes: a writability check and the one atomic
write (:func:`atomic_write`), so every saved artefact is either the old or the new file, never a torn
one."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from blackbox_rs.errors import BlackBoxRSError, CacheError

__all__ = ["atomic_path", "atomic_write", "ensure_writable_dir", "file_sha256"]

_UMASK = os.umask(0)  # read once at import (os.umask can only be read by setting it)
os.umask(_UMASK)


def ensure_writable_dir(path: str | os.PathLike[str], what: str = "directory",
                        error: type[BlackBoxRSError] = CacheError) -> Path:
    """Create ``path`` if needed and prove it is writable (create and remove a probe file).

    Raises ``error`` ("<what> <path> is not writable: <reason>") before any work that would be lost.
    """
    d = Path(path)
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise error(f"{what} {d} is not writable: {exc.strerror or exc}") from None
    return d


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. a platform without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: str | os.PathLike[str], error: type[BlackBoxRSError] = CacheError) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; when the block succeeds the file written there is
    fsynced and moved onto ``target`` with ``os.replace`` (then the folder is fsynced), so a reader or a
    crash sees either the old or the new file. On failure the temporary file is removed and ``target``
    is untouched; an ``OSError`` becomes ``error`` naming the file."""
    t = Path(target)
    try:
        t.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=t.parent, prefix=f".{t.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        raise error(f"cannot write {t}: {exc.strerror or exc}") from None
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # the mode a plain write would give (mkstemp creates 0600)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, t)
        _fsync_dir(t.parent)
    except OSError as exc:
        raise error(f"cannot write {t}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(target: str | os.PathLike[str], data: bytes | str | Callable[[Path], None],
                 error: type[BlackBoxRSError] = CacheError) -> Path:
    """Write ``data`` (bytes, text, or a function that writes a given path) to ``target`` atomically
    and durably (see :func:`atomic_path`). Returns ``target``."""
    with atomic_path(target, error) as tmp:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(target)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file's content, read in 1 MiB blocks (the one file hash of the SDK:
    model files, image files, diffusion weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
