"""QueryBudget: a hard limit on queries and money, safe under concurrency and across crashes.

Guarantee: the sum of all reservations that were not refunded never exceeds ``max_queries`` or
``max_cost``. A request is reserved *before* it is sent; it is refunded only when it is provably not
billed (answered from the cache, or never sent). With a ledger file the spent amounts are written
(atomically, temp file + ``os.replace``) at every reservation, before the request leaves, so a crash
can only over-count money that may have been billed, never under-count it; a resumed run keeps
counting from where the previous one stopped.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from blackbox_rs.errors import BudgetExceeded, CacheError, InvalidParameterError

__all__ = ["QueryBudget", "Reservation"]

_EPS = 1e-9


@dataclass(frozen=True)
class Reservation:
    """Queries and cost held for one request."""

    queries: int
    cost: float


class QueryBudget:
    """Limits in queries and/or cost; ``None`` means unlimited.

    Args:
        max_queries: most image queries that may be billed.
        max_cost: most money (sum of ``cost_per_query``) that may be spent.
        ledger: optional JSON file that persists spent amounts across runs.
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
        self.parent = parent
        self.ledger = Path(ledger) if ledger is not None else None
        if self.ledger is not None:
            self._load_ledger()

    # -- persistence ---------------------------------------------------------------------------
    def _load_ledger(self) -> None:
        assert self.ledger is not None
        if not self.ledger.exists():
            return
        try:
            data = json.loads(self.ledger.read_text())
            self._queries = int(data["spent_queries"])
            self._cost = float(data["spent_cost"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CacheError(f"budget ledger {self.ledger} is unreadable or corrupted: {exc}") from exc

    def _write_ledger(self) -> None:
        if self.ledger is None:
            return
        tmp = self.ledger.with_name(self.ledger.name + f".tmp{os.getpid()}.{threading.get_ident()}")
        try:
            self.ledger.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as f:
                json.dump({"spent_queries": self._queries, "spent_cost": self._cost}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.ledger)
        except OSError as exc:
            raise CacheError(f"cannot write budget ledger {self.ledger}: {exc}") from exc

    # -- accounting ----------------------------------------------------------------------------
    @property
    def spent_queries(self) -> int:
        return self._queries

    @property
    def spent_cost(self) -> float:
        return self._cost

    @property
    def remaining_queries(self) -> int | None:
        return None if self.max_queries is None else max(0, self.max_queries - self._queries)

    @property
    def remaining_cost(self) -> float | None:
        return None if self.max_cost is None else max(0.0, self.max_cost - self._cost)

    def affordable(self, cost_per_query: float) -> int | None:
        """Most further queries the budget allows at this price (``None``: unlimited)."""
        limits = []
        if self.max_queries is not None:
            limits.append(self.max_queries - self._queries)
        if self.max_cost is not None and cost_per_query > 0:
            limits.append(math.floor((self.max_cost - self._cost) / cost_per_query + _EPS))
        return max(0, min(limits)) if limits else None

    def reserve(self, queries: int, cost: float) -> Reservation:
        """Atomically hold ``queries`` and ``cost`` or raise :class:`BudgetExceeded` (holding nothing)."""
        with self._lock:
            if self.max_queries is not None and self._queries + queries > self.max_queries:
                raise BudgetExceeded(
                    f"query budget exhausted: {self._queries} of {self.max_queries} queries spent, "
                    f"the next request needs {queries}"
                )
            if self.max_cost is not None and self._cost + cost > self.max_cost + _EPS:
                raise BudgetExceeded(
                    f"cost budget exhausted: {self._cost:.6g} of {self.max_cost:.6g} spent, "
                    f"the next request costs {cost:.6g}"
                )
            if self.parent is not None:
                self.parent.reserve(queries, cost)  # raises before anything is held here
            self._queries += queries
            self._cost += cost
            self._write_ledger()
            return Reservation(queries=queries, cost=cost)

    def refund(self, reservation: Reservation) -> None:
        """Give back a reservation whose request was provably not billed."""
        with self._lock:
            self._queries -= reservation.queries
            self._cost -= reservation.cost
            self._write_ledger()
            if self.parent is not None:
                self.parent.refund(reservation)

    def __repr__(self) -> str:
        return (f"QueryBudget(spent_queries={self._queries}, max_queries={self.max_queries}, "
                f"spent_cost={self._cost:.6g}, max_cost={self.max_cost})")
