"""Append-only JSONL journal of final certificates: the resume point of dataset certification.

Layout: the first line is a header ``{"blackbox_rs_journal": 2, "kind": ..., "params": {...}, "seed": ...}``
written when the journal is created (before any query), then one certificate per line, each written
as soon as it is final, flushed and fsynced. A run that stops in the middle of an input (budget or
quota spent, a service error, Ctrl-C: any exception out of that input's certification) appends a
*progress record* ``{"blackbox_rs_progress": 1, "index": i, "key": ..., "queries": q, "cache_hits": h}``
with what that input had been charged so far (:meth:`CertificateJournal.note_unfinished`).

Guarantees:

* **Bound to what it describes.** Reopening compares the header and every record with this run's
  settings (model fingerprint, transform digest, noise mode, every certification setting, seed):
  a difference raises :class:`~blackbox_rs.errors.ResumeMismatchError` naming each field, before any
  query. The dataset loop also checks each finished record's input key, label and reference
  (:meth:`CertificateJournal.check_record`). A journal written by an older version (no header) is
  refused, never mixed.
* **The seed survives.** A run that asked for a fresh seed (``seed=None``) adopts the seed of the
  journal it resumes, so a crash at any point costs no repeated query (with a query cache).
* **Queries add up across runs.** The resumed run that finishes input ``i`` records
  ``queries_total = queries + (queries of every progress record for i)``: the queries charged for
  that certificate's samples by every run that worked on it, so an interrupted run's spending (which
  the resumed run sees as cache hits) is not lost. A progress record for ``i`` whose input key is not
  the input's now is refused (:meth:`CertificateJournal.charged_before`). A process killed without a
  chance to write (SIGKILL, power loss) leaves no progress record: what it paid for its unfinished
  input then shows only as the resumed run's cache hits. Journals without progress records (older
  ones included) resume as before; a record without ``queries_total`` reads as None (not recorded).
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
_PROGRESS_KEY = "blackbox_rs_progress"


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
    header, records, _, _, _ = _parse(p, lines, tail, model)
    return header, records


def _parse(path: Path, lines: list[tuple[int, bytes]], tail: int | None, model: type[C]
           ) -> tuple[dict[str, Any] | None, list[C], int | None, bool, list[dict[str, Any]]]:
    """(header, records, offset to truncate at or None, whether a newline must precede the next write,
    progress records)."""
    data = [(off, ln) for off, ln in lines if ln.strip()]
    tail_line: bytes | None = None
    if tail is not None:
        tail_line = path.read_bytes()[tail:]
    header: dict[str, Any] | None = None
    records: list[C] = []
    progress: list[dict[str, Any]] = []
    cut: int | None = None
    needs_newline = False
    fields = getattr(model, "model_fields", None)
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
                return header, [], None, needs_newline, []  # another kind of journal: refused by the caller
            continue
        if isinstance(obj, dict) and _PROGRESS_KEY in obj:
            progress.append(_check_progress(path, i + 1, obj))
            if not terminated:
                needs_newline = True
            continue
        if isinstance(obj, dict) and "queries_total" not in obj and (fields is None or "queries_total" in fields):
            obj["queries_total"] = None  # written before it was recorded: unknown, not `queries`
        try:
            records.append(model.model_validate(obj))
        except ValueError as exc:
            raise CacheError(f"output {path} line {i + 1} is not a {model.__name__}: {exc}") from None
        if not terminated:
            needs_newline = True
    return header, records, cut, needs_newline, progress


def _check_progress(path: Path, line: int, obj: dict[str, Any]) -> dict[str, Any]:
    ok = (obj.get(_PROGRESS_KEY) == 1 and isinstance(obj.get("key"), str)
          and all(isinstance(obj.get(k), int) and not isinstance(obj.get(k), bool) and obj[k] >= 0
                  for k in ("index", "queries", "cache_hits")))
    if not ok:
        raise CacheError(f"output {path} line {line} is not a valid progress record")
    return obj


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
        self._progress: dict[int, list[dict[str, Any]]] = {}
        header: dict[str, Any] | None = None
        records: list[C] = []
        progress: list[dict[str, Any]] = []
        cut: int | None = None
        needs_newline = False
        if self.path.exists():
            lines, tail = _lines(self.path)
            header, records, cut, needs_newline, progress = _parse(self.path, lines, tail, model)
            if header is None and (records or cut or progress):
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
        for rec in progress:  # those of finished inputs are in their certificate's queries_total already
            if int(rec["index"]) not in self.finished:
                self._progress.setdefault(int(rec["index"]), []).append(rec)
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

    def charged_before(self, index: int, key: str) -> tuple[int, int]:
        """``(queries, cache_hits)`` that earlier, interrupted runs recorded for unfinished input
        ``index`` (0, 0 without progress records). Raises :class:`ResumeMismatchError` when a record
        was written for another input at that position (its key differs)."""
        recs = self._progress.get(int(index), [])
        for rec in recs:
            if rec["key"] != key:
                diff = {"key": (rec["key"], key)}
                raise ResumeMismatchError(self._mismatch(diff, f"progress record of input {index}"), diff)
        return sum(int(r["queries"]) for r in recs), sum(int(r["cache_hits"]) for r in recs)

    def note_unfinished(self, index: int, key: str, queries: int, cache_hits: int) -> None:
        """Durably record (flush + fsync) that this run stopped in the middle of input ``index`` after
        being charged ``queries`` for it (and answered ``cache_hits`` of its samples from the cache);
        the run that finishes it adds them to its ``queries_total``. Nothing is written when both are 0.
        Raises :class:`CacheError` when the file cannot be written."""
        if queries <= 0 and cache_hits <= 0:
            return
        rec = {_PROGRESS_KEY: 1, "index": int(index), "key": key, "queries": int(queries),
               "cache_hits": int(cache_hits)}
        try:
            self._write(rec)
        except OSError as exc:
            raise CacheError(f"cannot write output {self.path}: {exc}") from exc
        self._progress.setdefault(int(index), []).append(rec)

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
