"""Executors for the one dataset loop (:func:`blackbox_rs.dataset.certify_each`).

:class:`LocalExecutor` (the default behaviour) certifies in-process. :class:`RayExecutor` sends the
inputs the journal has not finished to Ray worker actors (:class:`~blackbox_rs.distributed.worker.CertifyWorker`)
and hands their results back to the loop *in input order* (out-of-order completions are buffered), so
the driver journals them exactly as a single process does: same format, same resume rules.

Guarantees:

- **One budget.** One :class:`~blackbox_rs.distributed.ledger.Ledger` actor holds the engine's
  budget; workers lease from it before sending (see that module): the limit, queries and money,
  holds across all workers, retries and restarts. An in-memory driver budget is charged with what
  the run spent when it finishes; a budget with a ledger file is shared through that file.
- **Stopping.** The first error in input order (budget spent, service error) stops the run: the
  ledger refuses every further lease, so running inputs stop at their next request; the driver waits
  for them (``drain_s``), records what each was charged in the journal (a progress record, as an
  interrupted single-process run does) and raises the error, typed, after the finished certificates
  in order are journaled.
- **A worker that dies** (killed, node lost): its input is sent again, to a restarted worker, up to
  ``max_retries`` times. What it had in flight may be paid twice (its answers never reached the shared
  cache); its unused lease stays counted as spent.
- **Counters.** What each input was charged on a worker is added to the driver engine's
  :attr:`~blackbox_rs.engine.QueryEngine.stats`, so progress bars and journal records read as in a
  single process.
"""

from __future__ import annotations

import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from blackbox_rs.distributed.spec import ConnectorSpec
from blackbox_rs.engine import Tally
from blackbox_rs.errors import BlackBoxRSError, ConfigError, InvalidParameterError

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "WorkerLostError"]


class WorkerLostError(BlackBoxRSError):
    """A worker died on the same input more often than ``max_retries`` allows."""


class Executor(Protocol):
    """What :func:`blackbox_rs.dataset.certify_each` needs: ``certifier`` returns the per-input
    function (``None``: certify in-process) for the unfinished ``pending`` inputs; ``finish`` ends
    the run (always called)."""

    def certifier(self, engine: Any, job: dict[str, Any] | None,
                  pending: Iterator[tuple[int, torch.Tensor, int | None, str]],
                  journal: Any) -> Callable[[int, torch.Tensor, int | None, str], Any] | None: ...

    def finish(self) -> None: ...


class LocalExecutor:
    """In-process certification: exactly what ``executor=None`` does."""

    def certifier(self, engine: Any, job: Any, pending: Any, journal: Any) -> None:
        return None

    def finish(self) -> None:
        return None


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("RayExecutor needs Ray: pip install 'blackbox-rs[ray]'") from None
    return ray


class RayExecutor:
    """Certify on Ray workers.

    Args:
        address: the Ray cluster (``"auto"``, ``"ray://host:10001"``, a GCS address); None: the
            cluster this process already joined, else a new local one.
        num_workers: worker actors.
        resources: per-worker Ray resources, e.g. ``{"CPU": 1, "GPU": 0.5}`` (default ``{"CPU": 0.25}``:
            HTTP clients wait on the network); a local model runs on the device its connector
            settings name (``"device": "cuda"``) on the worker's node.
        connector: the :class:`ConnectorSpec` every worker builds its connector from (required).
        module_dir: a directory written by :meth:`BlackBoxSmoother.save`; the workers load the module
            from it (its digest must be the driver's transform identity).
        cache: a query cache directory that every worker reads and writes (a shared directory;
            diskcache is safe for concurrent processes on one machine or one POSIX shared file system).
        lease_queries: how many queries a worker leases from the ledger at once.
        max_retries: resends of an input whose worker died.
        drain_s: how long the driver waits for running inputs when the run stops.
    """

    def __init__(self, address: str | None = None, num_workers: int = 2, resources: dict[str, float] | None = None,
                 *, connector: ConnectorSpec | dict[str, Any], module_dir: str | os.PathLike[str] | None = None,
                 cache: str | os.PathLike[str] | None = None, lease_queries: int = 256, max_retries: int = 2,
                 max_in_flight: int | None = None, drain_s: float = 60.0) -> None:
        if isinstance(num_workers, bool) or int(num_workers) < 1:
            raise InvalidParameterError(f"num_workers must be >= 1, got {num_workers!r}")
        self.address = address
        self.num_workers = int(num_workers)
        self.resources = dict(resources) if resources else {"CPU": 0.25}
        self.spec = connector if isinstance(connector, ConnectorSpec) else ConnectorSpec(**connector)
        self.module_dir = None if module_dir is None else os.path.abspath(module_dir)
        self.cache = None if cache is None else os.path.abspath(cache)
        self.lease_queries = int(lease_queries)
        self.max_retries = int(max_retries)
        self.max_in_flight = max_in_flight
        self.drain_s = float(drain_s)
        self.last_stats: dict[str, Any] | None = None
        self._run: _RayRun | None = None

    def __repr__(self) -> str:
        return (f"RayExecutor(address={self.address!r}, num_workers={self.num_workers}, resources={self.resources}, "
                f"connector={self.spec.name!r})")

    def _options(self) -> dict[str, Any]:
        r = dict(self.resources)
        opts: dict[str, Any] = {"num_cpus": r.pop("CPU", 0), "num_gpus": r.pop("GPU", 0)}
        if r:
            opts["resources"] = r
        return opts

    def certifier(self, engine: Any, job: dict[str, Any] | None, pending: Iterator[Any], journal: Any) -> _RayRun:
        if job is None:
            raise InvalidParameterError("RayExecutor needs the dataset method's job (use certify_dataset or "
                                        "certify_radius_dataset)")
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, ignore_reinit_error=True)
        self._run = _RayRun(self, ray, engine, job, pending, journal)
        return self._run

    def finish(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            self.last_stats = run.close()


def _ledger_args(engine: Any) -> dict[str, Any]:
    b = engine.budget
    if b is None:
        return {"max_queries": None, "max_cost": None}
    if getattr(b, "members", None) or b.parent is not None or type(b).__name__ != "QueryBudget":
        raise InvalidParameterError(
            "executor= takes an engine whose budget is one QueryBudget (with or without a ledger file), "
            f"got {b!r}: give the run one budget"
        )
    if b.ledger is not None:
        return {"max_queries": b.max_queries, "max_cost": b.max_cost, "ledger": str(os.path.abspath(b.ledger))}
    return {"max_queries": b.max_queries, "max_cost": b.max_cost, "spent_queries": b.spent_queries,
            "spent_cost": b.spent_cost}


class _RayRun:
    """One run: the ledger actor, the workers, the window of inputs in flight, the ordered buffer."""

    def __init__(self, ex: RayExecutor, ray: Any, engine: Any, job: dict[str, Any], pending: Iterator[Any],
                 journal: Any) -> None:
        from blackbox_rs.distributed.ledger import Ledger
        from blackbox_rs.distributed.worker import CertifyWorker

        self.ex, self.ray, self.engine, self.journal = ex, ray, engine, journal
        self.pending = pending
        self.inflight: dict[Any, tuple[tuple[Any, ...], int, int]] = {}
        self.done: dict[int, dict[str, Any]] = {}
        self.keys: dict[int, str] = {}
        self.deferred: list[dict[str, Any]] = []  # charges of inputs drained after a stop
        self.exhausted = False
        self._stopping = False
        self.workers: list[Any] = []
        args = _ledger_args(engine)
        self.persisted = "ledger" in args
        lopts: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 1}
        if self.persisted:  # the ledger file is on the driver's node
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            lopts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                          soft=False)
        self.ledger = ray.remote(Ledger).options(**lopts).remote(**args)
        limits = (args["max_queries"], args["max_cost"])
        run_id = uuid.uuid4().hex[:8]
        wopts = {**ex._options(), "max_restarts": max(0, ex.max_retries), "max_task_retries": 0}
        actor = ray.remote(CertifyWorker).options(**wopts)
        spec = ex.spec.model_dump()
        self.workers = [actor.remote(spec, self.ledger, limits, job, worker=f"{run_id}-{i}", cache=ex.cache,
                                     module_dir=ex.module_dir, lease_queries=ex.lease_queries,
                                     max_in_flight=ex.max_in_flight) for i in range(ex.num_workers)]
        self.t_start = time.perf_counter()
        try:
            ray.get([w.ready.remote() for w in self.workers])
        except Exception as exc:
            self.close()
            cause = getattr(exc, "cause", None)
            raise (cause if isinstance(cause, BaseException) else exc) from None
        self.t_ready = time.perf_counter()  # workers started: what follows is certification alone
        self.load = [0] * len(self.workers)
        self.lost: set[int] = set()  # workers that died and could not be restarted
        self._fill()

    def _revive(self, wi: int) -> None:
        """After worker ``wi`` died: wait until Ray has restarted it (its constructor re-runs: connector,
        cache, budget lease), or take it out of rotation when it cannot come back."""
        try:
            self.ray.get(self.workers[wi].ready.remote(), timeout=120)
        except Exception:  # noqa: BLE001 - restarts exhausted, or the node is gone: never use it again
            self.lost.add(wi)

    def _submit(self, item: tuple[Any, ...], tries: int) -> None:
        alive = [i for i in range(len(self.workers)) if i not in self.lost]
        if not alive:
            raise WorkerLostError(f"input {item[0]}: every worker died and none could be restarted")
        wi = min(alive, key=lambda i: self.load[i])
        ref = self.workers[wi].certify.remote(*item)
        self.inflight[ref] = (item, wi, tries)
        self.keys[int(item[0])] = str(item[3])
        self.load[wi] += 1

    def _fill(self) -> None:
        while not self.exhausted and len(self.inflight) < 2 * len(self.workers):
            try:
                item = next(self.pending)
            except StopIteration:
                self.exhausted = True
                return
            self._submit(item, 0)

    def _collect(self, timeout: float | None = None) -> bool:
        if not self.inflight:
            return False
        ready, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=timeout)
        for ref in ready:
            item, wi, tries = self.inflight.pop(ref)
            self.load[wi] -= 1
            try:
                out = self.ray.get(ref)
            except self.ray.exceptions.RayActorError:  # the worker died mid-input: send the input again
                self._revive(wi)
                if tries < self.ex.max_retries and not self.exhausted_by_stop():
                    self._submit(item, tries + 1)
                    continue
                out = {"index": item[0], "cert": None, "tally": {},
                       "error": WorkerLostError(f"input {item[0]}: its worker died {tries + 1} time(s); what it had "
                                                f"in flight is counted as spent")}
            except Exception as exc:  # noqa: BLE001 - a result the driver cannot read: still stop cleanly
                out = {"index": item[0], "cert": None, "tally": {},
                       "error": BlackBoxRSError(f"input {item[0]}: the worker's result could not be read "
                                                f"({type(exc).__name__}); what it had in flight is counted as spent")}
            self.done[int(out["index"])] = out
        self._fill()
        return bool(ready)

    def exhausted_by_stop(self) -> bool:
        return self._stopping

    def _charge(self, tally: dict[str, Any]) -> None:
        if tally:
            self.engine._count(Tally(), **{k: v for k, v in tally.items()})

    def __call__(self, idx: int, xt: torch.Tensor, y: int | None, key: str) -> Any:
        while idx not in self.done:
            if not self._collect():
                raise BlackBoxRSError(f"input {idx} was never sent to a worker")  # pragma: no cover - a bug
        out = self.done.pop(idx)
        self._charge(out["tally"])
        if out["error"] is not None:
            self._stop(f"the run stopped at input {idx}: {out['error']}")
            raise out["error"]
        return out["cert"]

    def _stop(self, reason: str) -> None:
        """No further input starts, running ones fail at their next request; their charges are
        recorded in the journal as progress records (what an interrupted run records)."""
        self._stopping = True
        self.exhausted = True
        self.ray.get(self.ledger.stop.remote(reason))
        deadline = time.monotonic() + self.ex.drain_s
        while self.inflight and time.monotonic() < deadline:
            self._collect(timeout=max(0.1, deadline - time.monotonic()))
        for i, out in sorted(self.done.items()):
            self.deferred.append(out["tally"])  # counted in close(): not part of the failing input's charge
            if self.journal is not None and out.get("tally"):
                key = self.keys[i]
                try:
                    self.journal.note_unfinished(i, key, int(out["tally"]["queries"]), int(out["tally"]["cache_hits"]))
                except BlackBoxRSError as exc:
                    warnings.warn(f"the queries charged for input {i} could not be recorded: {exc}", stacklevel=2)
        self.done.clear()

    def close(self) -> dict[str, Any] | None:
        for tally in self.deferred:
            self._charge(tally)
        self.deferred.clear()
        stats = None
        try:
            stats = self.ray.get(self.ledger.stats.remote())
        except Exception:  # noqa: S110 - the ledger is gone: nothing more to report
            pass
        for w in self.workers:
            self.ray.kill(w, no_restart=True)
        b = self.engine.budget
        if stats is not None and b is not None and not self.persisted and (stats["run_queries"] or stats["run_cost"]):
            from blackbox_rs.errors import BudgetExceeded

            try:  # the driver's in-memory budget learns what the run spent
                b.reserve(int(stats["run_queries"]), float(stats["run_cost"]))
            except BudgetExceeded:
                warnings.warn(f"the driver budget {b!r} was spent elsewhere during the run", stacklevel=2)
        self.ray.kill(self.ledger)
        if stats is not None and getattr(self, "t_ready", None) is not None:
            stats = {**stats, "startup_s": round(self.t_ready - self.t_start, 3),
                     "certify_s": round(time.perf_counter() - self.t_ready, 3)}
        return stats

