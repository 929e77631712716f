"""QueryEngine: the only path from the SDK to a base model.

Every query made by certification or fitting goes through :meth:`QueryEngine.query`, which

1. validates the batch against the connector's input contract;
2. splits it into requests of at most ``info.max_batch`` images (a deterministic split, so a rerun
   sends identical requests);
3. answers each request from the cache when it can (free, counted as a cache hit);
4. otherwise reserves its queries and cost in the budget *before* sending it (raising
   :class:`BudgetExceeded` if they do not fit), sends it, validates the answer and stores it in the
   cache before returning it;
5. runs up to ``max_in_flight`` requests concurrently when the connector allows it, and returns the
   predictions in input order.

A crash, Ctrl-C or :class:`BudgetExceeded` loses at most the requests in flight at that moment:
every answered request is already in the cache, so a rerun repeats no answered query.
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from blackbox_rs.budget import QueryBudget
from blackbox_rs.cache import QueryCache, request_key
from blackbox_rs.connectors.base import (
    Connector,
    ConnectorInfo,
    Prediction,
    validate_batch,
    validate_prediction,
)
from blackbox_rs.errors import ConnectorError, InvalidParameterError

if TYPE_CHECKING:
    import os

__all__ = ["QueryEngine", "QueryStats", "Tally"]


@dataclass
class Tally:
    """Per-caller counters: pass one to :meth:`QueryEngine.query` to learn what *that* call cost."""

    queries: int = 0
    cost: float = 0.0
    cache_hits: int = 0
    requests: int = 0

    def add(self, other: Tally) -> None:
        self.queries += other.queries
        self.cost += other.cost
        self.cache_hits += other.cache_hits
        self.requests += other.requests


@dataclass
class QueryStats(Tally):
    """Engine-wide counters (all callers)."""

    failed_requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


class QueryEngine:
    """Batches, budgets, caches and counts every query to one connector.

    Args:
        connector: the base model.
        budget: optional :class:`QueryBudget` (shared ledger; may be shared by several engines).
        cache: a :class:`QueryCache` or a directory for one; ``None`` disables caching.
        max_in_flight: most concurrent requests (capped by ``info.max_concurrency``).
        validate_inputs: check every batch against the input contract (on by default).
    """

    def __init__(
        self,
        connector: Connector,
        *,
        budget: QueryBudget | None = None,
        cache: QueryCache | str | os.PathLike[str] | None = None,
        max_in_flight: int = 1,
        validate_inputs: bool = True,
    ) -> None:
        if not isinstance(connector, Connector):
            raise InvalidParameterError(
                f"connector must implement the Connector protocol (info, query), got {type(connector).__name__}"
            )
        if isinstance(max_in_flight, bool) or int(max_in_flight) < 1:
            raise InvalidParameterError(f"max_in_flight must be >= 1, got {max_in_flight!r}")
        self.connector = connector
        self.budget = budget
        self.cache = cache if (cache is None or isinstance(cache, QueryCache)) else QueryCache(cache)
        self.max_in_flight = min(int(max_in_flight), connector.info.max_concurrency)
        self.validate_inputs = validate_inputs
        self.stats = QueryStats()
        self._pool: ThreadPoolExecutor | None = None

    @property
    def info(self) -> ConnectorInfo:
        return self.connector.info

    def with_budget(self, budget: QueryBudget | None) -> QueryEngine:
        """A view of this engine charging ``budget`` instead: same connector, cache and counters
        (its queries show up in :attr:`stats`). Give the budget a ``parent`` to charge both."""
        view = copy.copy(self)
        view.budget = budget
        view._pool = None
        return view

    def __repr__(self) -> str:
        return (f"QueryEngine(connector={self.connector!r}, queries={self.stats.queries}, "
                f"cache_hits={self.stats.cache_hits}, budget={self.budget!r})")

    # ------------------------------------------------------------------------------------------
    def query(self, batch: torch.Tensor, *, tally: Tally | None = None) -> Prediction:
        """Answer a batch of any size; see the module docstring for the guarantees."""
        info = self.connector.info
        if self.validate_inputs:
            validate_batch(batch, info)
        n = int(batch.shape[0])
        if n == 0:
            return Prediction(labels=torch.empty(0, dtype=torch.int64),
                              scores=torch.empty(0, info.num_classes) if info.returns_scores else None)
        bounds = [(s, min(s + info.max_batch, n)) for s in range(0, n, info.max_batch)]
        local = Tally()
        try:
            if self.max_in_flight > 1 and len(bounds) > 1:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="bbrs-query")
                futures = [self._pool.submit(self._request, batch[s:e], local) for s, e in bounds]
                parts = [f.result() for f in futures]
            else:
                parts = [self._request(batch[s:e], local) for s, e in bounds]
        finally:
            if tally is not None:
                tally.add(local)
        return Prediction.concat(parts)

    def _request(self, sub: torch.Tensor, tally: Tally) -> Prediction:
        info = self.connector.info
        m = int(sub.shape[0])
        key = request_key(info.fingerprint, sub) if self.cache is not None else None
        if key is not None:
            hit = self.cache.get(key)  # type: ignore[union-attr]
            if hit is not None:
                pred = _decode(hit, m, info)
                self._count(tally, cache_hits=m)
                return pred
        cost = m * info.cost_per_query
        reservation = self.budget.reserve(m, cost) if self.budget is not None else None
        try:
            pred = validate_prediction(self.connector.query(sub), m, info)
        except BaseException as exc:
            with self.stats._lock:
                self.stats.failed_requests += 1
            if reservation is not None and isinstance(exc, ConnectorError) and exc.billed is False:
                self.budget.refund(reservation)  # type: ignore[union-attr]
            raise
        if key is not None:
            self.cache.set(key, _encode(pred))  # type: ignore[union-attr]
        self._count(tally, queries=m, cost=cost, requests=1)
        return pred

    def forward_logits(self, batch: torch.Tensor, *, tally: Tally | None = None) -> torch.Tensor:
        """Differentiable logits from a connector that allows it (``info.differentiable``), for
        gradient pass-through fitting. Budgeted and counted like any query; never cached (the
        autograd graph cannot be). Raises :class:`InvalidParameterError` for other connectors."""
        info = self.connector.info
        fwd = getattr(self.connector, "forward_logits", None)
        if not info.differentiable or fwd is None:
            raise InvalidParameterError(
                f"{type(self.connector).__name__} is not differentiable: gradient pass-through needs a local "
                "model (TorchScriptConnector); use strategy 'surrogate' or 'zeroth_order' instead"
            )
        if self.validate_inputs:
            validate_batch(batch.detach(), info)
        m = int(batch.shape[0])
        cost = m * info.cost_per_query
        if self.budget is not None:
            self.budget.reserve(m, cost)
        logits = fwd(batch)
        self._count(tally if tally is not None else Tally(), queries=m, cost=cost, requests=1)
        return logits

    def _count(self, tally: Tally, *, queries: int = 0, cost: float = 0.0, cache_hits: int = 0,
               requests: int = 0) -> None:
        with self.stats._lock:
            for t in (self.stats, tally):
                t.queries += queries
                t.cost += cost
                t.cache_hits += cache_hits
                t.requests += requests

    def close(self) -> None:
        """Shut the worker pool down and close the cache (the connector stays open)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> QueryEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def as_engine(connector_or_engine: Connector | QueryEngine) -> QueryEngine:
    """Wrap a bare connector in an engine without budget or cache; return an engine unchanged."""
    if isinstance(connector_or_engine, QueryEngine):
        return connector_or_engine
    return QueryEngine(connector_or_engine)


def _encode(pred: Prediction) -> dict[str, object]:
    return {
        "labels": pred.labels.tolist(),
        "scores": None if pred.scores is None else pred.scores.double().tolist(),
    }


def _decode(value: dict[str, object], m: int, info: ConnectorInfo) -> Prediction:
    try:
        labels = torch.tensor(value["labels"], dtype=torch.int64)
        raw = value.get("scores")
        scores = None if raw is None else torch.tensor(raw, dtype=torch.float32)
    except (KeyError, TypeError, ValueError) as exc:
        from blackbox_rs.errors import CacheError

        raise CacheError(f"malformed cache entry: {exc}") from exc
    return validate_prediction(Prediction(labels=labels, scores=scores), m, info)
