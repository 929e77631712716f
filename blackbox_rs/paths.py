"""Filesystem checks shared by the cache, reports and the command line."""

from __future__ import annotations

import os
from pathlib import Path

from blackbox_rs.errors import BlackBoxRSError, CacheError

__all__ = ["ensure_writable_dir"]


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
