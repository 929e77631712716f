"""Append-only JSONL journal of final certificates: the resume point of dataset certification.

Layout: the first line is a header ``{"blackbox_rs_journal": 2, "kind": ..., "params": {...}, "seed": ...}``
written when the journal is created (before any query), then one certificate per line, each written
as soon as it is final, flushed and fsynced.

Guarantees:

* **Bound to what it describes.** Reopening compares the header and every record with this run's
  settings (model fingerprint, transform digest, noise mode, every certification setting, seed):
  a difference raises :class:`~blackbox_rs.errors.ResumeMismatchError` naming each field, before any
  query. The dataset loop also checks each finished record's input key, label and reference
  (:meth:`CertificateJournal.check_record`). A journal written by an older version (no header) is
  refused, never mixed.
* **The seed survives.** A run that asked for a fresh seed (``seed=None``) adopts the seed of the
  journal it resumes, so a crash at any point costs no repeated query (with a query cache).
* **Torn writes heal.** A torn last line (a crash in the middle of a write) is cut off before the next
  append, so every later resume and ``blackbox-rs report`` reads the file; its input is recomputed
  (from the query cache).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from blackbox_rs.binding import differences, fresh_seed
from blackbox_rs.errors import CacheError, ResumeMismatchError

__all__ = ["JOURNAL_FORMAT", "CertificateJournal", "read_journal"]

C = TypeVar("C", bound=BaseModel)
JOURNAL_FORMAT = 2
_HEADER_KEY = "blackbox_rs_journal"


def _lines(path: Path) -> tuple[list[tuple[int, bytes]], int | None]:
    """``[(offset, line)]`` of the complete lines and the offset of an unterminated tail (or None)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CacheError(f"cannot read output {path}: {exc}") from exc
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            return out, pos
        out.append((pos, data[pos:end]))
        pos = end + 1
    return out, None


def read_journal(path: str | os.PathLike[str], model: type[C]) -> tuple[dict[str, Any] | None, list[C]]:
    """The header (None for an old journal without one) and the certificates of a journal file, read
    only (a torn last line is skipped, not cut). Raises :class:`CacheError` on corruption."""
    p = Path(path)
    lines, tail = _lines(p)
    header, records, _, _ = _parse(p, lines, tail, model)
    return header, records


def _parse(path: Path, lines: list[tuple[int, bytes]], tail: int | None, model: type[C]
           ) -> tuple[dict[str, Any] | None, list[C], int | None, bool]:
    """(header, records, offset to truncate at or None, whether a newline must precede the next write)."""
    data = [(off, ln) for off, ln in lines if ln.strip()]
    tail_line: bytes | None = None
    if tail is not None:
        tail_line = path.read_bytes()[tail:]
    header: dict[str, Any] | None = None
    records: list[C] = []
    cut: int | None = None
    needs_newline = False
    entries = [(off, ln, True) for off, ln in data]
    if tail_line is not None and tail_line.strip():
        entries.append((tail, tail_line, False))
    for i, (off, ln, terminated) in enumerate(entries):
        try:
            obj = json.loads(ln)
        except ValueError as exc:
            if not terminated:  # torn final write: cut it off, its input is recomputed
                cut = off
                break
            raise CacheError(f"output {path} line {i + 1} is not JSON: {exc}") from None
        if i == 0 and isinstance(obj, dict) and _HEADER_KEY in obj:
            header = obj
            if not terminated:
                needs_newline = True
            if header.get("kind") != model.__name__ and model.__name__ != "_AnyCertificate":
                return header, [], None, needs_newline  # another kind of journal: refused by the caller
            continue
        try:
            records.append(model.model_validate(obj))
        except ValueError as exc:
            raise CacheError(f"output {path} line {i + 1} is not a {model.__name__}: {exc}") from None
        if not terminated:
            needs_newline = True
    return header, records, cut, needs_newline


class CertificateJournal(Generic[C]):
    """A JSONL file of certificates of type ``model`` bound to ``params`` and a seed.

    Args:
        path: the JSONL file (created with its header if missing).
        model: the certificate class (its name is the journal's ``kind``).
        params: every setting that determines a certificate, keyed by certificate field name (each
            record's field must equal it).
        seed: the noise seed of this run; ``None`` adopts the journal's seed, or draws a fresh one
            for a new journal. The seed in use is :attr:`seed`.
    """

    def __init__(self, path: str | os.PathLike[str], model: type[C], params: dict[str, Any], *,
                 seed: int | None) -> None:
        self.path = Path(path)
        self.model = model
        self.finished: dict[int, C] = {}
        header: dict[str, Any] | None = None
        records: list[C] = []
        cut: int | None = None
        needs_newline = False
        if self.path.exists():
            lines, tail = _lines(self.path)
            header, records, cut, needs_newline = _parse(self.path, lines, tail, model)
            if header is None and (records or cut):
                raise ResumeMismatchError(
                    f"output {self.path} was written by an older blackbox-rs whose records are not bound to the "
                    "module, inputs and seed; it cannot be resumed safely: use another output path "
                    "(`blackbox-rs report` still reads it)"
                )
        if header is not None:
            if header.get(_HEADER_KEY) != JOURNAL_FORMAT:
                raise ResumeMismatchError(
                    f"output {self.path} has journal format {header.get(_HEADER_KEY)!r}; this blackbox-rs reads "
                    f"format {JOURNAL_FORMAT}: use another output path or the blackbox-rs that wrote it")
            saved_seed = header.get("seed")
            if isinstance(saved_seed, bool) or not isinstance(saved_seed, int) or saved_seed < 0:
                raise CacheError(f"output {self.path} has a corrupted header: seed {saved_seed!r} is not a "
                                 "non-negative integer")
            if seed is None:
                seed = saved_seed
            saved = {"kind": header.get("kind"), **dict(header.get("params") or {}), "seed": saved_seed}
            now = {"kind": model.__name__, **params, "seed": seed}
            diff = differences(saved, now)
            diff.update({k: (v, None) for k, v in saved.items() if k not in now})  # settings this run lacks
            if diff:
                raise ResumeMismatchError(self._mismatch(diff), diff)
        elif seed is None:
            seed = fresh_seed()
        self.seed: int = int(seed)  # type: ignore[arg-type]
        self.params = {**params, "seed": self.seed}
        for cert in records:
            got = {k: getattr(cert, k, None) for k in self.params}
            diff = differences(got, self.params)
            if diff:
                where = f"record {getattr(cert, 'index', '?')}"
                raise ResumeMismatchError(self._mismatch(diff, where), diff)
            index = getattr(cert, "index", None)
            if index is not None:
                self.finished[int(index)] = cert
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "r+b" if self.path.exists() else "w+b")  # noqa: SIM115 - closed by close()
            if cut is not None:
                self._fh.truncate(cut)
                os.fsync(self._fh.fileno())
            self._fh.seek(0, os.SEEK_END)
            if needs_newline:
                self._fh.write(b"\n")
            if header is None:
                self._write({_HEADER_KEY: JOURNAL_FORMAT, "kind": model.__name__, "params": params,
                             "seed": self.seed})
        except OSError as exc:
            raise CacheError(f"cannot write output {self.path}: {exc}") from exc

    def _mismatch(self, diff: dict[str, tuple[Any, Any]], where: str = "") -> str:
        parts = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in diff.items())
        at = f" ({where})" if where else ""
        return (f"output {self.path} was written for something else{at}: {parts}. Its certificates would "
                "be reported for the wrong classifier or settings; use another output path, or the original "
                "settings")

    def check_record(self, cert: C, expected: dict[str, Any]) -> None:
        """Raise :class:`ResumeMismatchError` unless the finished ``cert`` has every ``expected``
        field value (the dataset loop passes the input's key, label and reference)."""
        got = {k: getattr(cert, k, None) for k in expected}
        diff = differences(got, expected)
        if diff:
            raise ResumeMismatchError(self._mismatch(diff, f"input {getattr(cert, 'index', '?')}"), diff)

    def _write(self, obj: dict[str, Any]) -> None:
        self._fh.write(json.dumps(obj).encode() + b"\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

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
