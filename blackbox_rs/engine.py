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
every answered request is already in the cache, so a rerun repeats no answered query. When one
request of a call fails, the call's requests that have not started are cancelled (never reserved,
never sent); those already running finish (answers cached, counted) before the error is raised.

**Every attempt that may be billed is charged.** A remote connector's transport may send one request
several times (read timeouts, 5xx). Each engine request installs an :class:`AttemptMeter` (a context
variable of the thread that runs it) that the transport charges *before* each attempt leaves: the
first attempt of each image is covered by the reservation made above, every further one is reserved
in the budget first, and a re-send that does not fit raises :class:`BudgetExceeded` unsent. Attempts
that provably never reached the model (never sent, connection refused, 401/403, throttled) are
credited, and at the end of the request the reservation is settled to exactly the images that may
have been billed (conservative: never under-counted). Local connectors (no transport) never touch
the meter and are charged once per request, as the budget docstring says.

**Model version.** With a cache and a connector that reports the model version it observes
(``observed_model_version``) and accepts a pin (``expect_model_version(v)``), the version is stored
in the cache under the connector fingerprint as soon as an answer shows it (before that answer is
cached), and a later engine over the same cache pins the connector to it: a model upgraded behind
the endpoint raises :class:`ModelVersionChangedError` instead of mixing answers of two models.
"""

from __future__ import annotations

import base64
import binascii
import copy
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from blackbox_rs.budget import QueryBudget, Reservation
from blackbox_rs.cache import QueryCache, origin_key, request_key
from blackbox_rs.connectors.base import (
    Connector,
    ConnectorInfo,
    Prediction,
    validate_batch,
    validate_prediction,
)
from blackbox_rs.errors import BudgetExceeded, ConnectorError, InvalidParameterError, ModelVersionChangedError

if TYPE_CHECKING:
    import os

__all__ = ["AttemptMeter", "QueryEngine", "QueryStats", "Tally", "current_meter"]


@dataclass
class Tally:
    """Per-caller counters: pass one to :meth:`QueryEngine.query` to learn what *that* call cost.

    ``queries``/``cost``: images (money) charged to the budget, i.e. that may have been billed:
    answered requests, plus every charged attempt of a failed request to a remote connector.
    ``answered``: images answered by the model (cache hits excluded). ``attempted``: images sent,
    every attempt counted (throttled and refused ones included). ``retried``: the part of
    ``attempted`` that re-sent images already sent once. ``requests``: answered engine requests.
    """

    queries: int = 0
    cost: float = 0.0
    cache_hits: int = 0
    requests: int = 0
    answered: int = 0
    attempted: int = 0
    retried: int = 0

    def add(self, other: Tally) -> None:
        self.queries += other.queries
        self.cost += other.cost
        self.cache_hits += other.cache_hits
        self.requests += other.requests
        self.answered += other.answered
        self.attempted += other.attempted
        self.retried += other.retried


@dataclass
class QueryStats(Tally):
    """Engine-wide counters (all callers)."""

    failed_requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


class AttemptMeter:
    """What one engine request has sent and charged, attempt by attempt (thread-safe).

    The engine reserves ``prepaid`` images before the request starts. A transport calls
    :meth:`attempt` before each HTTP attempt (images in that HTTP request) and :meth:`not_billed` when
    that attempt provably never reached the model. Invariant: ``reserved >= billable`` where
    ``billable = attempted - unbilled``; an attempt that would break it reserves the difference in
    the budget first, or raises :class:`BudgetExceeded` (the attempt is then not sent).
    """

    def __init__(self, budget: QueryBudget | None, cost_per_query: float, prepaid: int) -> None:
        self.budget = budget
        self.cost_per_query = float(cost_per_query)
        self.prepaid = int(prepaid)
        self.reserved = int(prepaid)
        self.attempted = 0
        self.retried = 0
        self.unbilled = 0
        self.metered = False
        self._lock = threading.Lock()

    @property
    def billable(self) -> int:
        """Images that may have been billed so far."""
        return self.attempted - self.unbilled

    def begin(self) -> None:
        """Called by a remote connector or transport: this request is charged per attempt."""
        self.metered = True

    def attempt(self, images: int, *, retry: bool = False) -> None:
        """Charge an attempt of ``images`` images before it is sent (raises :class:`BudgetExceeded`,
        charging nothing, if it does not fit the budget)."""
        images = max(0, int(images))
        with self._lock:
            self.metered = True
            extra = self.billable + images - self.reserved
            if extra > 0:
                if self.budget is not None:
                    refused: BudgetExceeded | None = None
                    try:
                        self.budget.reserve(extra, extra * self.cost_per_query)
                    except BudgetExceeded as exc:
                        refused = exc
                    if refused is not None:  # same type (BudgetSpentError stays one), says why
                        refused.args = (
                            f"not sending {'a re-send' if retry else 'another attempt'} of {images} image(s) "
                            f"(every attempt that may be billed is charged): {refused}",
                        )
                        raise refused
                self.reserved += extra
            self.attempted += images
            if retry:
                self.retried += images

    def not_billed(self, images: int) -> None:
        """The last attempt of ``images`` images provably never reached the model."""
        with self._lock:
            self.unbilled += min(max(0, int(images)), self.billable)

    def settle(self) -> int:
        """Refund what was reserved beyond :attr:`billable`; return the images charged in the end."""
        with self._lock:
            excess = self.reserved - self.billable
            if excess > 0 and self.budget is not None:
                self.budget.refund(Reservation(queries=excess, cost=excess * self.cost_per_query))
            self.reserved -= max(0, excess)
            return self.reserved


_METER: ContextVar[AttemptMeter | None] = ContextVar("bbrs_attempt_meter", default=None)


def current_meter() -> AttemptMeter | None:
    """The :class:`AttemptMeter` of the engine request running in this thread (``None`` outside one)."""
    return _METER.get()


class QueryEngine:
    """Batches, budgets, caches and counts every query to one connector.

    Args:
        connector: the base model.
        budget: optional :class:`QueryBudget` (shared ledger; may be shared by several engines).
        cache: a :class:`QueryCache` or a directory for one; ``None`` disables caching.
        max_in_flight: most concurrent requests; default (None): the connector's declared
            ``info.max_concurrency`` (set once, on the connector); never more than it.
        validate_inputs: check every batch against the input contract (on by default).
    """

    def __init__(
        self,
        connector: Connector,
        *,
        budget: QueryBudget | None = None,
        cache: QueryCache | str | os.PathLike[str] | None = None,
        max_in_flight: int | None = None,
        validate_inputs: bool = True,
    ) -> None:
        if not isinstance(connector, Connector):
            raise InvalidParameterError(
                f"connector must implement the Connector protocol (info, query), got {type(connector).__name__}"
            )
        if max_in_flight is None:
            max_in_flight = connector.info.max_concurrency
        if isinstance(max_in_flight, bool) or int(max_in_flight) < 1:
            raise InvalidParameterError(f"max_in_flight must be >= 1, got {max_in_flight!r}")
        self.connector = connector
        self.budget = budget
        self.cache = cache if (cache is None or isinstance(cache, QueryCache)) else QueryCache(cache)
        self.max_in_flight = min(int(max_in_flight), connector.info.max_concurrency)
        self.validate_inputs = validate_inputs
        self.stats = QueryStats()
        self._pool: ThreadPoolExecutor | None = None
        self._version_key = f"model_version|{connector.info.fingerprint}"
        self._version_saved = False
        self._pin_saved_version()

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
    @property
    def caches_by_origin(self) -> bool:
        """Whether generated requests are cached by their generating identity (a cache is set and the
        connector is a model in this process: ``cache_by_origin`` on the connector), not payload bytes."""
        return self.cache is not None and bool(getattr(self.connector, "cache_by_origin", False))

    def query(self, batch: torch.Tensor, *, tally: Tally | None = None,
              origin: tuple[str, int] | None = None) -> Prediction:
        """Answer a batch of any size; see the module docstring for the guarantees.

        ``origin = (identity, first)`` says that row ``j`` of ``batch`` is sample ``first + j`` of the
        generated payload stream ``identity`` (see :func:`blackbox_rs.cache.origin_key`); with
        :attr:`caches_by_origin` each request is then cached under that identity and its sample range,
        and its payload bytes are never hashed on the host."""
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
                stop = threading.Event()  # set by the first failure: no request starts after it

                def run(sub: torch.Tensor, where: str | None) -> Prediction:
                    if stop.is_set():
                        raise _NotStarted
                    try:
                        return self._request(sub, local, where)
                    except BaseException:
                        stop.set()
                        raise

                futures = [self._pool.submit(run, batch[s:e], self._origin(origin, s, e)) for s, e in bounds]
                try:
                    wait(futures, return_when=FIRST_EXCEPTION)
                except BaseException:  # Ctrl-C while waiting
                    stop.set()
                    for f in futures:
                        f.cancel()
                    raise
                failed = [f for f in futures if f.done() and not f.cancelled() and f.exception() is not None
                          and not isinstance(f.exception(), _NotStarted)]
                if failed:
                    stop.set()
                    for f in futures:  # not started: never reserved, never sent
                        f.cancel()
                    wait(futures)  # running ones finish, so the counts below are complete
                    raise failed[0].exception()  # type: ignore[misc]
                parts = [f.result() for f in futures]
            else:
                parts = [self._request(batch[s:e], local, self._origin(origin, s, e)) for s, e in bounds]
        finally:
            if tally is not None:
                tally.add(local)
        return Prediction.concat(parts)

    def _origin(self, origin: tuple[str, int] | None, s: int, e: int) -> str | None:
        """The generating identity of rows ``s:e`` of a batch from ``origin`` (None: key by payload)."""
        if origin is None or not self.caches_by_origin:
            return None
        return f"{origin[0]}|samples={int(origin[1]) + s}+{e - s}"

    def _request(self, sub: torch.Tensor, tally: Tally, origin: str | None = None) -> Prediction:
        info = self.connector.info
        m = int(sub.shape[0])
        key = None
        if self.cache is not None:
            key = (origin_key(info.fingerprint, origin, tuple(sub.shape)) if origin is not None
                   else request_key(info.fingerprint, sub))
        if key is not None:
            hit = self.cache.get(key)  # type: ignore[union-attr]
            if hit is not None:
                pred = _decode(hit, m, info)
                self._count(tally, cache_hits=m)
                return pred
        cpq = info.cost_per_query
        reservation = self.budget.reserve(m, m * cpq) if self.budget is not None else None
        meter = AttemptMeter(self.budget, cpq, m)
        token = _METER.set(meter)
        try:
            pred = validate_prediction(self.connector.query(sub), m, info)
            self._save_version()
        except BaseException as exc:
            _METER.reset(token)
            with self.stats._lock:
                self.stats.failed_requests += 1
            if meter.metered:  # charged attempt by attempt: keep what may have been billed, refund the rest
                charged = meter.settle()
                self._count(tally, queries=charged, cost=charged * cpq, attempted=meter.attempted,
                            retried=meter.retried)
            else:
                self._count(tally, attempted=m)
                if reservation is not None and isinstance(exc, ConnectorError) and exc.billed is False:
                    self.budget.refund(reservation)  # type: ignore[union-attr]
            raise
        _METER.reset(token)
        if meter.metered:
            charged, attempted, retried = meter.settle(), meter.attempted, meter.retried
        else:
            charged, attempted, retried = m, m, 0
        if key is not None:
            self.cache.set(key, _encode(pred))  # type: ignore[union-attr]
        self._count(tally, queries=charged, cost=charged * cpq, requests=1, answered=m, attempted=attempted,
                    retried=retried)
        return pred

    # ---- model version persistence -------------------------------------------------------------
    def _versioned(self) -> bool:
        c = self.connector
        return (self.cache is not None and hasattr(c, "observed_model_version")
                and callable(getattr(c, "expect_model_version", None)))

    def _pin_saved_version(self) -> None:
        if not self._versioned():
            return
        saved = self.cache.get_meta(self._version_key)  # type: ignore[union-attr]
        if saved is not None:
            self.connector.expect_model_version(str(saved))  # type: ignore[attr-defined]
            self._version_saved = True

    def _save_version(self) -> None:
        """Store the connector's observed model version in the cache, once, before the first answer
        that shows it is cached; a different version already stored there is refused."""
        if self._version_saved or not self._versioned():
            return
        seen = getattr(self.connector, "observed_model_version", None)
        if not seen:
            return
        stored = self.cache.set_meta(self._version_key, str(seen), keep_existing=True)  # type: ignore[union-attr]
        if stored != str(seen):
            raise ModelVersionChangedError(
                f"the model behind {self.connector.info.fingerprint!r} answered with version {seen!r}, but the "
                f"cache {self.cache!r} holds answers of version {stored!r}; use another cache directory for "
                f"the new model version"
            )
        self._version_saved = True

    def forward_logits(self, batch: torch.Tensor, *, tally: Tally | None = None) -> torch.Tensor:
        """Differentiable logits from a connector that allows it (``info.differentiable``), for
        gradient pass-through fitting. Budgeted and counted like any query; never cached (the
        autograd graph cannot be). Raises :class:`InvalidParameterError` for other connectors."""
        info = self.connector.info
        fwd = getattr(self.connector, "forward_logits", None)
        if not info.differentiable or fwd is None:
            raise InvalidParameterError(
                f"{type(self.connector).__name__} is not differentiable: gradient pass-through needs a local "
                "model (TorchScriptConnector, ModuleConnector); use strategy 'surrogate' or 'zeroth_order' instead"
            )
        if self.validate_inputs:
            validate_batch(batch.detach(), info)
        m = int(batch.shape[0])
        cost = m * info.cost_per_query
        if self.budget is not None:
            self.budget.reserve(m, cost)
        logits = fwd(batch)
        self._count(tally if tally is not None else Tally(), queries=m, cost=cost, requests=1, answered=m,
                    attempted=m)
        return logits

    def _count(self, tally: Tally, *, queries: int = 0, cost: float = 0.0, cache_hits: int = 0,
               requests: int = 0, answered: int = 0, attempted: int = 0, retried: int = 0) -> None:
        with self.stats._lock:
            for t in (self.stats, tally):
                t.queries += queries
                t.cost += cost
                t.cache_hits += cache_hits
                t.requests += requests
                t.answered += answered
                t.attempted += attempted
                t.retried += retried

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


class _NotStarted(Exception):
    """A request that did not start because another request of the same query had failed."""


def as_engine(connector_or_engine: Connector | QueryEngine) -> QueryEngine:
    """Wrap a bare connector in an engine without budget or cache; return an engine unchanged."""
    if isinstance(connector_or_engine, QueryEngine):
        return connector_or_engine
    return QueryEngine(connector_or_engine)


def _encode(pred: Prediction) -> dict[str, object]:
    """A cache value: labels as a JSON list; scores as base64 of their little-endian float32 bytes
    (bit-exact, and milliseconds for a 500 x 1000 batch where a JSON list of floats takes ~1 s)."""
    value: dict[str, object] = {"labels": pred.labels.tolist()}
    if pred.scores is not None:
        arr = np.ascontiguousarray(pred.scores.detach().to("cpu", torch.float32).numpy(), dtype="<f4")
        value["scores_f32"] = base64.b64encode(arr.tobytes()).decode("ascii")
    else:
        value["scores"] = None
    return value


def _decode(value: dict[str, object], m: int, info: ConnectorInfo) -> Prediction:
    """A cached answer back; reads both value forms (scores as base64 float32 bytes, or, as written by
    earlier releases, a JSON list). Raises :class:`CacheError` for a malformed entry."""
    from blackbox_rs.errors import CacheError

    try:
        labels = torch.tensor(value["labels"], dtype=torch.int64)
        packed = value.get("scores_f32")
        if packed is not None:
            if not isinstance(packed, str):
                raise TypeError(f"scores_f32 is a {type(packed).__name__}, not base64 text")
            flat = np.frombuffer(base64.b64decode(packed.encode("ascii"), validate=True), dtype="<f4")
            if flat.size != m * info.num_classes:
                raise ValueError(f"{flat.size} scores for {m} images x {info.num_classes} classes")
            scores = torch.from_numpy(flat.astype(np.float32).reshape(m, info.num_classes))
        else:
            raw = value.get("scores")
            scores = None if raw is None else torch.tensor(raw, dtype=torch.float32)
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise CacheError(f"malformed cache entry: {exc}") from exc
    return validate_prediction(Prediction(labels=labels, scores=scores), m, info)
