"""QueryBudget: a hard limit on queries and money, safe under concurrency, across processes and
across crashes.

Guarantee: the sum of all reservations that were not refunded never exceeds ``max_queries`` or
``max_cost``. A request is reserved *before* it is sent; it is refunded only when it is provably not
billed (answered from the cache, or never sent).

With a ledger file the limit holds for the sum of every thread *and every process* that uses the
same ledger: each reservation and refund takes an exclusive lock (``fcntl.flock`` on the sibling
file ``<ledger>.lock``), re-reads the ledger, checks and updates the spent amounts, and writes them
back (atomically: temp file + fsync + ``os.replace``) before the lock is released and before the
request leaves. So a crash can only over-count money that may have been billed, never under-count
it, and a resumed run keeps counting from where the previous one stopped. ``spent_queries``,
``spent_cost``, ``remaining_*`` and ``affordable`` read the file, so they include what other
processes spent. A ledger that cannot be parsed is a :class:`CacheError` (never silently reset).

A reservation that does not fit raises :class:`BudgetExceeded`; with a ledger it raises its
subclass :class:`BudgetSpentError`, because the spending is persisted and rerunning the same
command can never progress: the message names the ledger file, spent vs limit, and says to raise
the limit.

With a ``parent`` (e.g. a per-fit cap inside a per-run cap) a reservation succeeds only if parent
and child both have room; on failure nothing is held in either. Locks are always taken child first,
then parent, so nested budgets cannot deadlock.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blackbox_rs.errors import BudgetExceeded, BudgetSpentError, CacheError, InvalidParameterError

try:  # POSIX
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows
    _fcntl = None  # type: ignore[assignment]

__all__ = ["JointBudget", "QueryBudget", "Reservation", "chain"]

_EPS = 1e-9
_held = threading.local()  # ledger lock files this thread holds (a budget and its parent on one file)


@dataclass(frozen=True)
class Reservation:
    """Queries and cost held for one request."""

    queries: int
    cost: float


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (created if missing), held for the ``with`` block."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise CacheError(f"cannot open budget ledger lock {path}: {exc}") from exc
    try:
        if _fcntl is not None:
            _fcntl.flock(fd, _fcntl.LOCK_EX)
        else:  # pragma: no cover - Windows: lock the first byte
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class QueryBudget:
    """Limits in queries and/or cost; ``None`` means unlimited.

    Args:
        max_queries: most image queries that may be billed.
        max_cost: most money (sum of ``cost_per_query``) that may be spent.
        ledger: optional JSON file that persists spent amounts across runs and is shared safely by
            every process that names it (the limit holds for their sum).
        parent: an enclosing budget charged with everything charged here (e.g. a per-fit cap
            inside a per-run cap); a reservation succeeds only if both have room.
    """

    def __init__(
        self,
        max_queries: int | None = None,
        max_cost: float | None = None,
        *,
        ledger: str | os.PathLike[str] | None = None,
        parent: QueryBudget | None = None,
    ) -> None:
        if max_queries is not None and (isinstance(max_queries, bool) or int(max_queries) != max_queries
                                        or max_queries < 0):
            raise InvalidParameterError(f"max_queries must be a non-negative integer, got {max_queries!r}")
        if max_cost is not None and (not math.isfinite(float(max_cost)) or float(max_cost) < 0):
            raise InvalidParameterError(f"max_cost must be a non-negative number, got {max_cost!r}")
        self.max_queries = None if max_queries is None else int(max_queries)
        self.max_cost = None if max_cost is None else float(max_cost)
        self._lock = threading.Lock()
        self._queries = 0
        self._cost = 0.0
        self._extra: dict[str, Any] = {}  # other keys found in the ledger, written back unchanged
        self.parent = parent
        self.ledger = Path(ledger) if ledger is not None else None
        if self.ledger is not None:
            self._load_ledger()

    # -- persistence ---------------------------------------------------------------------------
    @property
    def lock_file(self) -> Path | None:
        """The sibling file locked around every ledger update (``None`` without a ledger)."""
        return None if self.ledger is None else self.ledger.with_name(self.ledger.name + ".lock")

    def _load_ledger(self) -> None:
        """Replace the in-memory totals by the ledger's (zero if it does not exist yet)."""
        assert self.ledger is not None
        try:
            text = self.ledger.read_text()
        except FileNotFoundError:
            self._queries, self._cost, self._extra = 0, 0.0, {}
            return
        except OSError as exc:
            raise CacheError(f"budget ledger {self.ledger} is unreadable: {exc}") from exc
        try:
            data = json.loads(text)
            queries, cost = int(data["spent_queries"]), float(data["spent_cost"])
            if queries < 0 or not math.isfinite(cost):
                raise ValueError(f"impossible spent amounts {queries!r}, {cost!r}")
        except (ValueError, KeyError, TypeError) as exc:
            raise CacheError(f"budget ledger {self.ledger} is unreadable or corrupted: {exc}") from exc
        self._queries, self._cost = queries, cost
        self._extra = {k: v for k, v in data.items() if k not in ("spent_queries", "spent_cost")}

    def _write_ledger(self) -> None:
        if self.ledger is None:
            return
        from blackbox_rs.paths import atomic_write  # durable, atomic; a failure keeps the old ledger

        data = json.dumps({**self._extra, "spent_queries": self._queries, "spent_cost": self._cost})
        try:
            atomic_write(self.ledger, data, CacheError)
        except CacheError as exc:
            reason = str(exc).removeprefix(f"cannot write {self.ledger}: ")
            raise CacheError(f"cannot write budget ledger {self.ledger}: {reason}") from None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """Thread lock, then (with a ledger) the file lock and a fresh read of the ledger."""
        with self._lock:
            if self.ledger is None:
                yield
                return
            assert self.lock_file is not None
            held: set[str] = _held.__dict__.setdefault("paths", set())
            key = os.path.abspath(self.lock_file)
            if key in held:  # flock would wait on itself forever
                raise InvalidParameterError(f"budget ledger {self.ledger} is used by a budget and by its parent: "
                                            f"give each budget its own ledger file")
            held.add(key)
            try:
                with _file_lock(self.lock_file):
                    self._load_ledger()
                    yield
            finally:
                held.discard(key)

    def _refresh(self) -> None:
        """Read what every process has spent (the file is replaced atomically: no lock needed)."""
        if self.ledger is not None:
            with self._lock:
                self._load_ledger()

    # -- accounting ----------------------------------------------------------------------------
    @property
    def spent_queries(self) -> int:
        self._refresh()
        return self._queries

    @property
    def spent_cost(self) -> float:
        self._refresh()
        return self._cost

    @property
    def remaining_queries(self) -> int | None:
        if self.max_queries is None:
            return None
        return max(0, self.max_queries - self.spent_queries)

    @property
    def remaining_cost(self) -> float | None:
        if self.max_cost is None:
            return None
        return max(0.0, self.max_cost - self.spent_cost)

    def affordable(self, cost_per_query: float) -> int | None:
        """Most further queries the budget allows at this price (``None``: unlimited)."""
        self._refresh()
        limits = []
        if self.max_queries is not None:
            limits.append(self.max_queries - self._queries)
        if self.max_cost is not None and cost_per_query > 0:
            limits.append(math.floor((self.max_cost - self._cost) / cost_per_query + _EPS))
        return max(0, min(limits)) if limits else None

    def _refuse(self, what: str, spent: str, limit: str, need: str) -> BudgetExceeded:
        if self.ledger is None:
            return BudgetExceeded(f"{what} budget exhausted: {spent} of {limit} spent, the next request {need}")
        return BudgetSpentError(
            f"{what} budget exhausted: the ledger {self.ledger} records {spent} of {limit} spent and the next "
            f"request {need}; the spending is persisted, so running the same command again cannot progress: "
            f"raise the limit (rerun with a larger budget: --budget for blackbox-rs, --max-queries / --max-cost "
            f"for the recipes) to continue"
        )

    def reserve(self, queries: int, cost: float) -> Reservation:
        """Atomically hold ``queries`` and ``cost`` or raise :class:`BudgetExceeded`
        (:class:`BudgetSpentError` with a ledger), holding nothing here or in the parent."""
        with self._transaction():
            if self.max_queries is not None and self._queries + queries > self.max_queries:
                raise self._refuse("query", f"{self._queries}", f"{self.max_queries} queries",
                                   f"needs {queries}")
            if self.max_cost is not None and self._cost + cost > self.max_cost + _EPS:
                raise self._refuse("cost", f"{self._cost:.6g}", f"{self.max_cost:.6g}", f"costs {cost:.6g}")
            reservation = Reservation(queries=queries, cost=cost)
            if self.parent is not None:
                self.parent.reserve(queries, cost)  # raises before anything is held here
            self._queries += queries
            self._cost += cost
            try:
                self._write_ledger()
            except BaseException:
                self._queries -= queries
                self._cost -= cost
                if self.parent is not None:
                    self.parent.refund(reservation)
                raise
            return reservation

    def refund(self, reservation: Reservation) -> None:
        """Give back a reservation whose request was provably not billed."""
        with self._transaction():
            self._queries = max(0, self._queries - reservation.queries)
            self._cost = max(0.0, self._cost - reservation.cost)
            self._write_ledger()
        if self.parent is not None:
            self.parent.refund(reservation)

    def __repr__(self) -> str:
        return (f"QueryBudget(spent_queries={self._queries}, max_queries={self.max_queries}, "
                f"spent_cost={self._cost:.6g}, max_cost={self.max_cost})")


def chain(budget: QueryBudget) -> list[QueryBudget]:
    """``budget`` and every budget it charges (its parents, and a joint budget's members), each once."""
    out: list[QueryBudget] = []
    todo = [budget]
    while todo:
        b = todo.pop(0)
        if any(b is o for o in out):
            continue
        out.append(b)
        todo.extend(getattr(b, "members", ()))
        if b.parent is not None:
            todo.append(b.parent)
    return out


class JointBudget(QueryBudget):
    """Charges several independent budgets at once, without re-wiring any of them: a reservation
    succeeds only if every member (with its parents) has room, and holds nothing otherwise. Members
    already charged through another member are charged once. Used to put a user's fit budget under
    the engine's hard cap (:meth:`blackbox_rs.BlackBoxSmoother.fit`)."""

    def __init__(self, *members: QueryBudget) -> None:
        super().__init__()
        kept: list[QueryBudget] = []
        for m in members:
            if any(m is b for k in kept for b in chain(k)):
                continue  # already charged through an earlier member
            kept = [k for k in kept if not any(k is b for b in chain(m))]
            kept.append(m)
        self.members: tuple[QueryBudget, ...] = tuple(kept)

    def reserve(self, queries: int, cost: float) -> Reservation:
        held: list[QueryBudget] = []
        reservation = Reservation(queries=queries, cost=cost)
        try:
            for m in self.members:
                m.reserve(queries, cost)
                held.append(m)
        except BaseException:
            for m in reversed(held):
                m.refund(reservation)
            raise
        with self._lock:
            self._queries += queries
            self._cost += cost
        return reservation

    def refund(self, reservation: Reservation) -> None:
        for m in self.members:
            m.refund(reservation)
        with self._lock:
            self._queries = max(0, self._queries - reservation.queries)
            self._cost = max(0.0, self._cost - reservation.cost)

    def affordable(self, cost_per_query: float) -> int | None:
        limits = [a for a in (m.affordable(cost_per_query) for m in self.members) if a is not None]
        return min(limits) if limits else None

    def __repr__(self) -> str:
        return f"JointBudget({', '.join(repr(m) for m in self.members)})"
