"""One ledger for every worker: the budget lives in one Ray actor; workers lease from it in batches.

:class:`Ledger` (run as a Ray actor by :class:`~blackbox_rs.distributed.RayExecutor`) wraps a
:class:`~blackbox_rs.budget.QueryBudget`. A Ray actor runs one method call at a time, so every
:meth:`Ledger.lease` is atomic. :class:`LeasedBudget` is the worker-side, QueryBudget-compatible
proxy that the worker's engine charges (its :class:`~blackbox_rs.engine.AttemptMeter` included)
*before* each request is sent: it serves reservations from a local lease and asks the actor for
another lease (at least what the request needs, up to ``lease_queries``) when the lease runs out.

Guarantee (the hard limit, queries and money, across all workers, retries and worker restarts):
the actor counts every lease it granted as spent until the worker gives the unused part back
(:meth:`LeasedBudget.settle`, after every input), and it grants only what fits the limit. So the
sum of what all workers may have sent never exceeds the limit. A worker that dies keeps its lease
counted as spent (conservative: a request whose outcome is unknown counts as spent; at most
``lease_queries`` of one worker's lease are counted but never sent). With a ledger file the actor's
budget persists there (same file, same lock, as a single-process run), so a rerun keeps counting.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from blackbox_rs.budget import QueryBudget, Reservation
from blackbox_rs.errors import BudgetExceeded, BudgetSpentError

__all__ = ["LeasedBudget", "Ledger"]

_EPS = 1e-9


class Ledger:
    """The budget of a distributed run (one instance, in one Ray actor).

    ``spent_queries``/``spent_cost``: already spent before this run (an in-memory driver budget);
    ``ledger``: the driver budget's ledger file instead (the actor then runs on the driver's node)."""

    def __init__(self, max_queries: int | None, max_cost: float | None, spent_queries: int = 0,
                 spent_cost: float = 0.0, ledger: str | None = None) -> None:
        self.budget = QueryBudget(max_queries, max_cost, ledger=None if ledger is None else Path(ledger))
        if ledger is None and (spent_queries or spent_cost):
            self.budget.max_queries = self.budget.max_cost = None  # record what was spent, unchecked
            self.budget.reserve(int(spent_queries), float(spent_cost))
            self.budget.max_queries, self.budget.max_cost = max_queries, max_cost
        self.start = (self.budget.spent_queries, self.budget.spent_cost)
        self.stopped: str | None = None
        self.leases = 0
        self.returns = 0
        self.outstanding: dict[str, tuple[int, float]] = {}
        self.t0 = time.monotonic()

    def lease(self, worker: str, need_q: int, need_c: float, want_q: int, want_c: float
              ) -> tuple[bool, int, float, str, bool]:
        """Grant ``want`` (or, when that does not fit, ``need``): ``(ok, queries, cost, message,
        persisted)``; a refusal holds nothing and says why."""
        if self.stopped is not None:
            return False, 0, 0.0, self.stopped, False
        for q, c in ((want_q, want_c), (need_q, need_c)):
            try:
                self.budget.reserve(int(q), float(c))
            except BudgetExceeded as exc:
                refusal = (str(exc), isinstance(exc, BudgetSpentError))
                continue
            self.leases += 1
            oq, oc = self.outstanding.get(worker, (0, 0.0))
            self.outstanding[worker] = (oq + int(q), oc + float(c))
            return True, int(q), float(c), "", False
        return False, 0, 0.0, refusal[0], refusal[1]

    def give_back(self, worker: str, queries: int, cost: float) -> None:
        """Unused lease that was provably never sent."""
        if queries <= 0 and cost <= 0:
            return
        self.returns += 1
        self.budget.refund(Reservation(queries=int(queries), cost=float(cost)))
        oq, oc = self.outstanding.get(worker, (0, 0.0))
        self.outstanding[worker] = (max(0, oq - int(queries)), max(0.0, oc - float(cost)))

    def stop(self, reason: str) -> None:
        """Refuse every further lease (the run is stopping): workers fail fast at their next request."""
        self.stopped = reason

    def stats(self) -> dict[str, Any]:
        return {"spent_queries": self.budget.spent_queries, "spent_cost": self.budget.spent_cost,
                "run_queries": self.budget.spent_queries - self.start[0],
                "run_cost": self.budget.spent_cost - self.start[1],
                "max_queries": self.budget.max_queries, "max_cost": self.budget.max_cost,
                "leases": self.leases, "returns": self.returns, "elapsed_s": time.monotonic() - self.t0}

    def remaining(self) -> tuple[int | None, float | None]:
        return self.budget.remaining_queries, self.budget.remaining_cost


class LeasedBudget(QueryBudget):
    """A QueryBudget for one worker's engine, charging the shared :class:`Ledger` actor in batches.

    ``max_queries``/``max_cost`` are the run's limits (so :func:`blackbox_rs.core.check_budget_limit`
    refuses an uncertifiable setting before any query); ``reserve`` raises :class:`BudgetExceeded`
    (:class:`BudgetSpentError` for a persisted ledger) when the actor cannot grant what the request
    needs; ``refund`` returns to the local lease; :meth:`settle` gives the unused lease back."""

    def __init__(self, ledger: Any, max_queries: int | None, max_cost: float | None, *, worker: str,
                 lease_queries: int = 256) -> None:
        super().__init__(max_queries, max_cost)
        self._ledger = ledger
        self._worker = worker
        self._chunk = max(1, int(lease_queries))
        self._lease_q = 0
        self._lease_c = 0.0
        self._io = threading.Lock()

    def _call(self, method: str, *args: Any) -> Any:
        import ray

        return ray.get(getattr(self._ledger, method).remote(*args))

    def reserve(self, queries: int, cost: float) -> Reservation:
        queries, cost = int(queries), float(cost)
        with self._io:
            short_q, short_c = max(0, queries - self._lease_q), max(0.0, cost - self._lease_c)
            if short_q > 0 or short_c > _EPS:
                cpq = cost / queries if queries else 0.0
                want_q = max(short_q, self._chunk)
                want_c = max(short_c, want_q * cpq)
                ok, gq, gc, message, persisted = self._call("lease", self._worker, short_q, short_c, want_q, want_c)
                if not ok:
                    raise (BudgetSpentError if persisted else BudgetExceeded)(message)
                self._lease_q += gq
                self._lease_c += gc
            self._lease_q -= queries
            self._lease_c = max(0.0, self._lease_c - cost)
            self._queries += queries
            self._cost += cost
        return Reservation(queries=queries, cost=cost)

    def refund(self, reservation: Reservation) -> None:
        with self._io:
            self._lease_q += reservation.queries
            self._lease_c += reservation.cost
            self._queries = max(0, self._queries - reservation.queries)
            self._cost = max(0.0, self._cost - reservation.cost)

    def settle(self) -> None:
        """Give the unused lease back to the ledger (after every input)."""
        with self._io:
            q, c = self._lease_q, self._lease_c
            self._lease_q, self._lease_c = 0, 0.0
        if q > 0 or c > _EPS:
            self._call("give_back", self._worker, q, c)

    def affordable(self, cost_per_query: float) -> int | None:
        rq, rc = self._call("remaining")
        limits = []
        if rq is not None:
            limits.append(rq + self._lease_q)
        if rc is not None and cost_per_query > 0:
            limits.append(int((rc + self._lease_c) / cost_per_query + _EPS))
        return max(0, min(limits)) if limits else None

    @property
    def spent_queries(self) -> int:
        return int(self._call("stats")["spent_queries"])

    @property
    def spent_cost(self) -> float:
        return float(self._call("stats")["spent_cost"])

    def __repr__(self) -> str:
        return (f"LeasedBudget(worker={self._worker!r}, charged_here={self._queries}, lease={self._lease_q}, "
                f"max_queries={self.max_queries}, max_cost={self.max_cost})")
