"""BlackBoxSmoother: the public façade (fit / predict / certify / certify_dataset / save / load).

    smoother = BlackBoxSmoother(connector, module="dncnn", sigma=0.25)
    smoother.fit((x_train, y_train), strategy="surrogate", budget=100_000)
    cert = smoother.certify(x, n0=100, n=10_000, alpha=0.001)

The smoothed classifier is ``g(x) = argmax_c P[f(clip(A(x + delta), 0, 1)) = c]``: the fitted module
``A`` and the clipping are deterministic post-processing of the noisy input, so Cohen's guarantees
hold for it unchanged. The module is the identity until fitted, so an unfitted smoother certifies
exactly what the bare model does.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from blackbox_rs import defaults
from blackbox_rs._version import __version__
from blackbox_rs.budget import JointBudget, QueryBudget, chain
from blackbox_rs.cache import QueryCache
from blackbox_rs.certificate import Certificate, SequentialCertificate, SmoothedPrediction, with_names
from blackbox_rs.certify_sequential import (
    SequentialDatasetCertification,
    certify_radius,
    certify_radius_dataset,
)
from blackbox_rs.connectors.base import Connector
from blackbox_rs.core import certify, predict
from blackbox_rs.dataset import DatasetCertification, certify_dataset
from blackbox_rs.engine import QueryEngine
from blackbox_rs.errors import ConfigError, InvalidParameterError
from blackbox_rs.fitting.config import FitConfig, merge_fit_config
from blackbox_rs.fitting.context import FitContext, FitReport, ProgressFn
from blackbox_rs.fitting.data import as_fit_data
from blackbox_rs.modules.base import InputModule, load_module
from blackbox_rs.modules.registry import create_module
from blackbox_rs.stats import check_sigma

__all__ = ["BlackBoxSmoother"]

_SMOOTHER_JSON = "smoother.json"


class BlackBoxSmoother:
    """Randomized smoothing of an opaque model with a fitted input module in front of it.

    Args:
        connector: the base model (a connector, or a :class:`QueryEngine` already set up with a
            budget and cache).
        module: ``None`` (no module), a registered module name (``"dncnn"``, ``"lora_dncnn"``,
            ``"prompt_full"``, ...), a config mapping, or an :class:`InputModule`.
        sigma / sigmas: the noise level(s) the module is fitted for and certified at. With several,
            one module is fitted on a mixture and certifies at each.
        cache: directory of the query cache (only when ``connector`` is not already an engine).
        budget: :class:`QueryBudget` for every query (only when ``connector`` is not an engine).
        init_seed: seed of a module built here from a name or config (reproducible initial weights,
            without touching torch's global RNG).
    """

    def __init__(
        self,
        connector: Connector | QueryEngine,
        *,
        module: str | InputModule | dict[str, Any] | None = "dncnn",
        sigma: float | None = None,
        sigmas: Sequence[float] | None = None,
        cache: str | os.PathLike[str] | QueryCache | None = None,
        budget: QueryBudget | None = None,
        max_in_flight: int | None = None,
        init_seed: int = 0,
    ) -> None:
        if isinstance(connector, QueryEngine):
            if cache is not None or budget is not None:
                raise InvalidParameterError("pass cache/budget to the QueryEngine, not to the smoother")
            self.engine = connector
        else:
            self.engine = QueryEngine(connector, cache=cache, budget=budget, max_in_flight=max_in_flight)
        if (sigma is None) == (sigmas is None):
            raise InvalidParameterError("give exactly one of sigma=... or sigmas=[...]")
        levels = [sigma] if sigma is not None else list(sigmas or [])
        if not levels:
            raise InvalidParameterError("sigmas must not be empty")
        self.sigmas = sorted({check_sigma(s) for s in levels})
        info = self.engine.info
        if module is None or isinstance(module, InputModule):
            self.module: InputModule | None = module
        elif isinstance(module, (str, dict)):
            spec = {"name": module} if isinstance(module, str) else module
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                self.module = create_module({"input_shape": info.input_shape, **spec})
        else:
            raise ConfigError(f"module must be a name, a config dict or an InputModule, got {type(module).__name__}")
        if self.module is not None:
            shape = tuple(self.module.config.input_shape)
            if shape != tuple(info.input_shape):
                raise ConfigError(f"the module is built for inputs {shape}, the model takes {tuple(info.input_shape)}")
            self.module.eval()
        self.fit_report: FitReport | None = None
        #: device -> (module digest, copy of the module there): the module as certification runs it
        #: on the model's accelerator (made once per device and state; the module itself never moves)
        self._device_copies: dict[str, tuple[str, InputModule]] = {}

    # ------------------------------------------------------------------------------------------
    @property
    def sigma(self) -> float:
        """The noise level when there is one; with several, pass ``sigma=`` to each call."""
        if len(self.sigmas) != 1:
            raise InvalidParameterError(f"this smoother has several sigmas {self.sigmas}: pass sigma=...")
        return self.sigmas[0]

    def _sigma(self, sigma: float | None) -> float:
        if sigma is None:
            return self.sigma
        s = check_sigma(sigma)
        if s not in self.sigmas:
            warnings.warn(f"sigma={s} is not one of the fitted noise levels {self.sigmas}", stacklevel=3)
        return s

    @property
    def transform(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The deterministic map applied to noisy inputs before the (clipping and the) model. Its
        ``identity`` is the module's digest (config + weights) at the time of the call, which binds
        certificates and resume files to exactly this module."""
        if self.module is None:
            return None
        return _ModuleTransform(self.module.eval(), self._device_copies)

    # ------------------------------------------------------------------------------------------
    def fit(
        self,
        dataset: Any,
        *,
        strategy: str | None = None,
        budget: int | QueryBudget | None = None,
        config: FitConfig | dict[str, Any] | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        surrogate: torch.nn.Module | str | None = None,
        progress: ProgressFn | Literal["auto"] | None = "auto",
        **overrides: Any,
    ) -> FitReport:
        """Fit the module on ``dataset`` (tensors ``(x, y)``, unlabeled ``x``, or a torch Dataset).

        ``strategy``: ``"denoise"`` (zero queries), ``"surrogate"``, ``"zeroth_order"`` or
        ``"passthrough"`` (differentiable connectors). ``budget`` caps the queries of this fit (an int
        or a :class:`QueryBudget`, which is placed under the engine's budget so the engine's hard cap
        holds too); at the cap the fit stops cleanly and keeps the best module so far.
        "Best" is decided by query-paid scoring rounds (:mod:`blackbox_rs.fitting.selection`) in which
        the MSE-pretrained module is a candidate, so a strategy's own steps are kept only if the black
        box rates them higher. After ``patience`` rounds in a row without a significant gain (a paired
        test on the rounds' common images and noise) the fit stops paying: ``stopped="no_gain"``, the
        best state is kept and ``report.queries_saved`` says what was not spent (``patience=0``: never).
        With ``checkpoint_dir`` the full fit state is saved regularly and a rerun resumes from it; an
        int budget is then persisted there too, so the cap holds across the interrupted and the
        resumed run together (raise it to continue a fit that stopped at the budget).
        The settings are ``config`` (a strategy config from :class:`FitConfig`, or a dict) with the
        other keyword arguments applied on top, and ``strategy=`` (if given) as the strategy. A
        ``strategy=`` that differs from the config's carries the settings the config set explicitly
        and takes the new strategy's defaults for the rest; a setting the strategy does not have (an
        unknown name, or another strategy's setting such as ``zo_lr`` on a surrogate fit) raises
        :class:`ConfigError` naming it and the strategy it belongs to.
        ``surrogate=`` (a spec string or your ``nn.Module``) is the ``surrogate`` setting of the
        ``surrogate`` strategy, set exactly like any other keyword.
        """
        from blackbox_rs.fitting.strategies import get_strategy, run_fit

        if self.module is None:
            raise InvalidParameterError("this smoother has no module to fit (module=None)")
        if surrogate is not None:
            overrides["surrogate"] = surrogate
        try:
            cfg = merge_fit_config(config, strategy, overrides)
        except ValueError as exc:
            raise ConfigError(f"invalid fit settings: {exc}") from exc
        cls = get_strategy(cfg.strategy)
        data = as_fit_data(dataset, self.engine.info)
        engine = self.engine
        if budget is not None and cls.needs_queries:
            # with a checkpoint the fit budget's ledger lives beside it: a resumed fit keeps counting
            ledger = Path(checkpoint_dir) / "fit_budget.json" if checkpoint_dir is not None else None
            if isinstance(budget, QueryBudget):
                fit_budget = _under(budget, self.engine.budget)
            else:
                fit_budget = QueryBudget(max_queries=int(budget), parent=self.engine.budget, ledger=ledger)
            engine = self.engine.with_budget(fit_budget)
        if progress == "auto":
            progress = _auto_bar("fit", engine, budget)
        ctx = FitContext(engine, self.module, data, self.sigmas, cfg, progress)  # type: ignore[arg-type]
        if budget is not None and cls.needs_queries:  # the fit budget's cap sizes the fit's pilot
            ctx.budget_cap = budget.max_queries if isinstance(budget, QueryBudget) else int(budget)
        try:
            report = run_fit(ctx, cfg.strategy, checkpoint_dir=checkpoint_dir)
        finally:
            if engine is not self.engine and engine._pool is not None:
                engine._pool.shutdown(wait=True)
        self.module = ctx.module.eval()
        self.fit_report = report
        return report

    # ------------------------------------------------------------------------------------------
    def predict(self, x: torch.Tensor, *, n: int = 1000, alpha: float = defaults.ALPHA, sigma: float | None = None,
                seed: int | None = None, batch_size: int | None = None) -> SmoothedPrediction:
        """Cohen's PREDICT for the smoothed classifier (see :func:`blackbox_rs.core.predict`)."""
        return predict(self.engine, x, sigma=self._sigma(sigma), n=n, alpha=alpha, seed=seed,
                       batch_size=batch_size, transform=self.transform)

    def certify(self, x: torch.Tensor, *, n0: int = defaults.N0, n: int = defaults.N, alpha: float = defaults.ALPHA,
                sigma: float | None = None, seed: int | None = None, batch_size: int | None = None,
                label: int | None = None) -> Certificate:
        """Cohen's CERTIFY for the smoothed classifier (see :func:`blackbox_rs.core.certify`), with the
        connector's class names (``prediction_name``, ``label_name``)."""
        cert = certify(self.engine, x, sigma=self._sigma(sigma), n0=n0, n=n, alpha=alpha, seed=seed,
                       batch_size=batch_size, label=label, transform=self.transform)
        return with_names(cert, self.engine.info.class_names)

    def certify_dataset(self, inputs: Any, labels: Sequence[int] | None = None, *, n0: int = defaults.N0,
                        n: int = defaults.N, alpha: float = defaults.ALPHA, sigma: float | None = None,
                        seed: int | None = None, batch_size: int | None = None,
                        radii: Sequence[float] = defaults.RADII,
                        output: str | os.PathLike[str] | None = None,
                        progress: Callable[[int, Certificate], None] | Literal["auto"] | None = "auto",
                        executor: Any = None,
                        ) -> DatasetCertification:
        """CERTIFY every input (see :func:`blackbox_rs.dataset.certify_dataset`, incl. JSONL resume)."""
        return certify_dataset(self.engine, inputs, labels, sigma=self._sigma(sigma), n0=n0, n=n, alpha=alpha,
                               seed=seed, batch_size=batch_size, radii=radii, output=output,
                               transform=self.transform, progress=self._dataset_bar(progress, inputs),
                               executor=executor)

    def certify_radius(self, x: torch.Tensor, *, radius: float | Sequence[float], alpha: float = defaults.ALPHA,
                       sigma: float | None = None, n0: int = defaults.SEQ_N0,
                       max_queries: int = defaults.SEQ_MAX_QUERIES, seed: int | None = None,
                       batch_size: int | None = None, label: int | None = None,
                       futility: float | None = defaults.FUTILITY, lattice: bool = False) -> SequentialCertificate:
        """Anytime-valid sequential certification of the smoothed classifier at target radii (see
        :func:`blackbox_rs.certify_sequential.certify_radius`)."""
        return certify_radius(self.engine, x, radius=radius, sigma=self._sigma(sigma), alpha=alpha, n0=n0,
                              max_queries=max_queries, batch_size=batch_size, seed=seed, label=label,
                              transform=self.transform, futility=futility, lattice=lattice)

    def certify_radius_dataset(self, inputs: Any, labels: Sequence[int] | None = None, *,
                               radius: float | Sequence[float], alpha: float = defaults.ALPHA,
                               sigma: float | None = None, n0: int = defaults.SEQ_N0,
                               max_queries: int = defaults.SEQ_MAX_QUERIES, seed: int | None = None,
                               batch_size: int | None = None, futility: float | None = defaults.FUTILITY,
                               lattice: bool = False, output: str | os.PathLike[str] | None = None,
                               progress: Callable[[int, SequentialCertificate], None] | Literal["auto"] | None = "auto",
                               executor: Any = None,
                               ) -> SequentialDatasetCertification:
        """Sequential certification of every input (see
        :func:`blackbox_rs.certify_sequential.certify_radius_dataset`, incl. JSONL resume bound to this
        module's digest)."""
        return certify_radius_dataset(self.engine, inputs, labels, radius=radius, sigma=self._sigma(sigma),
                                      alpha=alpha, n0=n0, max_queries=max_queries, seed=seed,
                                      batch_size=batch_size, output=output, transform=self.transform,
                                      futility=futility, lattice=lattice,
                                      progress=self._dataset_bar(progress, inputs), executor=executor)

    def _dataset_bar(self, progress: Any, inputs: Any) -> Any:
        """``"auto"``: a progress bar on a terminal, nothing otherwise: queries charged by this run,
        queries in total (every run on the journal), budget left from the engine's budget ledger, and
        an ETA over the inputs left (:class:`~blackbox_rs.progress.DatasetProgress`)."""
        if progress != "auto":
            return progress
        import sys

        from blackbox_rs.progress import DatasetProgress, ProgressBar

        if not getattr(sys.stderr, "isatty", lambda: False)():
            return None
        try:
            total = len(inputs)
        except TypeError:
            total = 0
        return DatasetProgress(ProgressBar(budget=self.engine.budget), total, stage="certify", engine=self.engine)

    # ------------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``smoother.json`` (sigmas, model fingerprint, SDK version, fit report) and the module
        (config JSON + safetensors) into ``directory``. Nothing is pickled."""
        from blackbox_rs.paths import atomic_write, ensure_writable_dir

        d = ensure_writable_dir(directory, "smoother directory", ConfigError)
        try:
            if self.module is not None:
                self.module.save(d / "module")
        except OSError as exc:
            raise ConfigError(f"cannot save the module into {d / 'module'}: {exc.strerror or exc}") from None
        meta = {
            "sdk_version": __version__,
            "module_digest": None if self.module is None else self.module.digest(),
            "sigmas": self.sigmas,
            "fingerprint": self.engine.info.fingerprint,
            "input_shape": list(self.engine.info.input_shape),
            "class_names": list(self.engine.info.class_names),
            "module": self.module is not None,
            "fit_report": None if self.fit_report is None else self.fit_report.model_dump(exclude={"history"}),
        }
        atomic_write(d / _SMOOTHER_JSON, json.dumps(meta, indent=1), ConfigError)  # durable; old file kept on failure
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike[str], connector: Connector | QueryEngine, **kwargs: Any) -> BlackBoxSmoother:
        """Rebuild a saved smoother in front of ``connector``. Warns when the connector's fingerprint
        differs from the one the module was fitted for (valid, but possibly a poor fit); raises
        :class:`ConfigError` when the input shape or classes differ."""
        d = Path(directory)
        try:
            meta = json.loads((d / _SMOOTHER_JSON).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{d} does not hold a saved smoother ({_SMOOTHER_JSON}): {exc}") from exc
        module = load_module(d / "module") if meta.get("module") else None
        saved_digest = meta.get("module_digest")
        if module is not None and saved_digest is not None and module.digest() != saved_digest:
            raise ConfigError(
                f"{d}: the module's files do not match the digest recorded when it was saved "
                f"({saved_digest}); the module was changed or damaged after saving"
            )
        smoother = cls(connector, module=module, sigmas=meta["sigmas"], **kwargs)
        info = smoother.engine.info
        if list(info.input_shape) != meta["input_shape"] or list(info.class_names) != meta["class_names"]:
            raise ConfigError(
                f"the saved smoother was fitted for inputs {meta['input_shape']} and {len(meta['class_names'])} "
                f"classes; this connector has {list(info.input_shape)} and {info.num_classes}"
            )
        if info.fingerprint != meta["fingerprint"]:
            warnings.warn(
                f"the module was fitted in front of model {meta['fingerprint']!r}, this connector is "
                f"{info.fingerprint!r}: certificates stay valid, but the module may not help",
                stacklevel=2,
            )
        if meta.get("fit_report"):
            smoother.fit_report = FitReport(**meta["fit_report"])
        return smoother

    def __repr__(self) -> str:
        mod = "none" if self.module is None else f"{self.module.name}({self.module.num_trainable()} params)"
        return f"BlackBoxSmoother(engine={self.engine!r}, module={mod}, sigmas={self.sigmas})"



class _ModuleTransform:
    """A fitted module as the certification transform: ``no_grad`` forward plus an ``identity``.

    ``identity`` is the module's digest *now*: it is recomputed whenever a state tensor of the module
    changed since it was last computed (an in-place update, a ``load_state_dict``, a reassigned
    ``.data``: each moves a tensor's version counter or storage), so a transform kept across a fit
    never names, or gets cached answers for, the module as it was.

    The module runs where the batch is: a batch on another device than the module (noise drawn on the
    model's accelerator) goes through a copy of the module on that device, made once per device and
    module state (``copies``, the smoother's: one per device, replaced when the module changes) and
    never moving the user's module. A module that cannot be copied (one holding an ONNX Runtime
    session) runs on its own device instead, the batch moved there and back."""

    def __init__(self, module: InputModule, copies: dict[str, tuple[str, InputModule]] | None = None) -> None:
        self.module = module
        self._copies = {} if copies is None else copies
        self._lock = threading.Lock()
        self._seen: list[tuple[str, int, int]] = []
        self._identity = ""
        self._refresh()

    def _state(self) -> list[tuple[str, int, int]]:
        return [(name, t._version, t.data_ptr())
                for name, t in itertools.chain(self.module.named_parameters(), self.module.named_buffers())]

    def _refresh(self) -> str:
        state = self._state()
        if state != self._seen or not self._identity:
            self._identity, self._seen = self.module.digest(), state
        return self._identity

    @property
    def identity(self) -> str:
        """The module's digest as it is now (see the class docstring)."""
        with self._lock:
            return self._refresh()

    @property
    def exact_identity(self) -> bool:
        """Whether the digest determines the module's function (see :func:`blackbox_rs.core.exact_identity`)."""
        return bool(getattr(self.module, "exact_identity", True))

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            module = self.on(batch.device)
            if module is None:  # cannot be copied: run it where it is
                here = next(itertools.chain(self.module.parameters(), self.module.buffers()))
                return self.module(batch.to(here.device)).to(batch.device)
            return module(batch)

    def on(self, device: torch.device) -> InputModule | None:
        """The module on ``device`` (itself when it is there or holds no tensors; ``None`` when it
        must be copied there and cannot be)."""
        here = next(itertools.chain(self.module.parameters(), self.module.buffers()), None)
        if here is None or here.device == device:
            return self.module
        ident = self.identity
        with self._lock:
            hit = self._copies.get(str(device))
            if hit is None or hit[0] != ident:
                self._copies.pop(str(device), None)  # the superseded copy goes now, not at the next call
                try:
                    hit = (ident, copy.deepcopy(self.module).to(device).eval())
                except (TypeError, RuntimeError, NotImplementedError):  # an ONNX session, a foreign handle
                    return None
                self._copies[str(device)] = hit
            return hit[1]


def _under(budget: QueryBudget, cap: QueryBudget | None) -> QueryBudget:
    """``budget`` charged together with the engine's budget ``cap`` (the hard cap holds for every fit),
    without changing either object: the budget itself when one already charges the other, else a
    :class:`~blackbox_rs.budget.JointBudget` of both."""
    if cap is None or any(b is cap for b in chain(budget)):
        return budget
    if any(b is budget for b in chain(cap)):  # the engine's budget already charges it
        return cap
    return JointBudget(budget, cap)


def _auto_bar(stage: str, engine: QueryEngine, budget: Any) -> Any:
    """A progress callback ``(done, total, info)`` drawing on stderr when it is a terminal (None
    otherwise): steps or inputs done, ETA, queries charged by the engine in this run and their cost,
    and budget left read from the engine's budget (its persisted ledger, so a resumed run shows what
    is really left; ``budget`` when the engine has none)."""
    import sys

    from blackbox_rs.progress import ProgressBar

    if not getattr(sys.stderr, "isatty", lambda: False)():
        return None
    bar = ProgressBar(budget=engine.budget if engine.budget is not None else budget)
    start = engine.stats.queries
    cpq = engine.info.cost_per_query

    def show(done: int, total: int, info: dict[str, Any]) -> None:
        q = engine.stats.queries - start
        bar(stage, done, total, {**info, "queries": q, **({"cost": q * cpq} if cpq else {})})

    return show
