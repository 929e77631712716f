"""Append-only JSONL journal of final certificates: the resume point of dataset certification.

Each certificate is written as one line as soon as it is final, flushed and fsynced. Reopening the
journal returns the finished certificates by dataset index, after checking that they were produced
with the same settings (so a rerun with other settings cannot silently mix results). A torn last
line (a crash in the middle of a write) is ignored and its input recomputed (from the query cache).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from blackbox_rs.errors import CacheError

__all__ = ["CertificateJournal"]

C = TypeVar("C", bound=BaseModel)


class CertificateJournal(Generic[C]):
    """A JSONL file of certificates of type ``model`` written with settings ``params``.

    ``params_of(cert)`` extracts a certificate's settings for the comparison with ``params``.
    """

    def __init__(self, path: str | os.PathLike[str], model: type[C], params: dict[str, Any],
                 params_of: Callable[[C], dict[str, Any]]) -> None:
        self.path = Path(path)
        self.finished: dict[int, C] = self._load(model, params, params_of)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a+b")  # noqa: SIM115 - closed by close()
            self._fh.seek(0, os.SEEK_END)
            if self._fh.tell() > 0:  # a torn last line must not glue onto the next record
                self._fh.seek(-1, os.SEEK_END)
                if self._fh.read(1) != b"\n":
                    self._fh.write(b"\n")
        except OSError as exc:
            raise CacheError(f"cannot write output {self.path}: {exc}") from exc

    def _load(self, model: type[C], params: dict[str, Any], params_of: Callable[[C], dict[str, Any]]) -> dict[int, C]:
        done: dict[int, C] = {}
        if not self.path.exists():
            return done
        try:
            lines = self.path.read_text().splitlines()
        except OSError as exc:
            raise CacheError(f"cannot read output {self.path}: {exc}") from exc
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                cert = model.model_validate_json(line)
            except ValueError as exc:
                if i == len(lines) - 1:
                    break  # torn final write; it will be recomputed
                raise CacheError(f"output {self.path} line {i + 1} is not a {model.__name__}: {exc}") from exc
            got = params_of(cert)
            if got != params:
                diff = {k: (got.get(k), params[k]) for k in params if got.get(k) != params[k]}
                raise CacheError(
                    f"output {self.path} was written with different settings {diff} (was, now); "
                    "use another output path or the original settings"
                )
            index = getattr(cert, "index", None)
            if index is not None:
                done[int(index)] = cert
        return done

    def append(self, cert: C) -> None:
        """Write one final certificate durably (flush + fsync) before returning."""
        try:
            self._fh.write(cert.model_dump_json().encode() + b"\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise CacheError(f"cannot write output {self.path}: {exc}") from exc

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> CertificateJournal[C]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
