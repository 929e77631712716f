"""CertifyWorker: one worker of a distributed run (a Ray actor; a plain class, so Ray stays optional).

It builds its engine once: the connector from a :class:`~blackbox_rs.distributed.spec.ConnectorSpec`
(credentials from *this* process's environment), the shared cache directory, a
:class:`~blackbox_rs.distributed.ledger.LeasedBudget` on the run's ledger actor, and the module from a
saved smoother directory. It refuses to start (:class:`ConfigError`) when its model fingerprint or
transform identity differ from the driver's (the certificates would not be the ones the journal is
bound to). :meth:`CertifyWorker.certify` runs the *same* per-input function as the single-process path
(:func:`blackbox_rs.dataset.cohen_maker`, :func:`blackbox_rs.certify_sequential.sequential_maker`)
with the run's seed, so input i's certificate is the one a single process computes. It never raises:
it returns the certificate or the error, with what the input was charged, and gives its unused lease
back after every input.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch

from blackbox_rs.errors import BlackBoxRSError, ConfigError

__all__ = ["CertifyWorker"]

_COUNTERS = ("queries", "cost", "cache_hits", "requests", "answered", "attempted", "retried")


class CertifyWorker:
    def __init__(self, spec: dict[str, Any], ledger: Any, limits: tuple[int | None, float | None], job: dict[str, Any],
                 *, worker: str, cache: str | None = None, module_dir: str | None = None, lease_queries: int = 256,
                 max_in_flight: int | None = None) -> None:
        self.name = worker
        self.init_error: BaseException | None = None
        try:
            self._build(spec, ledger, limits, job, worker, cache, module_dir, lease_queries, max_in_flight)
        except Exception as exc:  # raised, typed, by ready(): an actor that dies in __init__ loses the type
            self.init_error = exc

    def _build(self, spec: dict[str, Any], ledger: Any, limits: tuple[int | None, float | None], job: dict[str, Any],
               worker: str, cache: str | None, module_dir: str | None, lease_queries: int,
               max_in_flight: int | None) -> None:
        from blackbox_rs.binding import identified, transform_identity
        from blackbox_rs.certify_sequential import sequential_maker
        from blackbox_rs.dataset import cohen_maker
        from blackbox_rs.distributed.ledger import LeasedBudget
        from blackbox_rs.distributed.spec import ConnectorSpec
        from blackbox_rs.engine import QueryEngine

        connector = ConnectorSpec(**spec).build()
        version = job.get("model_version")
        if version is not None and hasattr(connector, "expect_model_version"):
            connector.expect_model_version(version)  # an answer of another version: ModelVersionChangedError
        self.budget = LeasedBudget(ledger, *limits, worker=worker, lease_queries=lease_queries)
        self.engine = QueryEngine(connector, budget=self.budget, cache=cache, max_in_flight=max_in_flight)
        transform = None
        if module_dir is not None:
            import warnings

            from blackbox_rs.smoother import BlackBoxSmoother

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the fingerprint is checked below, against the driver's
                transform = BlackBoxSmoother.load(module_dir, self.engine).transform
        transform = identified(transform)
        params = job["params"]
        if self.engine.info.fingerprint != params["fingerprint"]:
            raise ConfigError(f"worker {worker}: its connector is model {self.engine.info.fingerprint!r}, the driver "
                              f"certifies {params['fingerprint']!r}: give the workers the same model")
        if transform_identity(transform) != params["transform"]:
            raise ConfigError(f"worker {worker}: its transform is {transform_identity(transform)!r}, the driver "
                              f"certifies with {params['transform']!r}: pass module_dir= (the smoother saved with "
                              f"BlackBoxSmoother.save) that holds the driver's module, or none for no module")
        from blackbox_rs.core import noise_mode

        noise = noise_mode(self.engine, bool(params.get("lattice", False)))
        if "noise" in params and noise != params["noise"]:
            raise ConfigError(f"worker {worker}: its noise would be {noise!r}, the driver's journal is bound to "
                              f"{params['noise']!r} (noise is drawn on the model's device, and device types or GPU "
                              "models draw different values): run the driver's connector on the workers' device")
        makers = {"cohen_certify": cohen_maker, "sequential_certify": sequential_maker}
        self.one = makers[job["method"]](self.engine, transform, **job["settings"])(int(job["seed"]))

    def ready(self) -> str:
        """The worker's name, or the error that kept it from starting."""
        if self.init_error is not None:
            raise self.init_error
        return self.name

    def certify(self, idx: int, x: torch.Tensor, y: int | None, key: str) -> dict[str, Any]:
        """``{"index", "cert", "error", "tally"}``: the certificate of input ``idx`` or the error that
        stopped it, and what it was charged (the engine's counters over the call)."""
        from blackbox_rs.dataset import observed_version

        s = self.engine.stats
        before = [getattr(s, k) for k in _COUNTERS]
        cert: Any = None
        error: BaseException | None = None
        try:
            cert = self.one(idx, x, y, key)
            version = observed_version(self.engine)
            if version is not None and hasattr(cert, "model_version"):
                cert = cert.model_copy(update={"model_version": version})
        except Exception as exc:  # returned, typed, to the driver
            error = exc
        finally:
            try:
                self.budget.settle()
            except Exception as exc:  # the lease stays counted as spent: conservative
                error = error or exc
        tally = {k: getattr(s, k) - b for k, b in zip(_COUNTERS, before, strict=True)}
        if error is not None:
            try:  # the driver must be able to rebuild it, not only this side to serialise it
                pickle.loads(pickle.dumps(error))  # noqa: S301 - our own object, round-tripped
            except Exception:
                from blackbox_rs.redact import redact

                error = BlackBoxRSError(redact(f"{type(error).__name__}: {error}"))
        return {"index": idx, "cert": cert, "error": error, "tally": tally}

    def stats(self) -> dict[str, Any]:
        return {k: getattr(self.engine.stats, k) for k in _COUNTERS}
