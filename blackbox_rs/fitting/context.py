"""What every fit strategy shares: data, noise mixture, black-box labels, best-so-far tracking.

Randomness is derived per step from ``(seed, step)``, so a resumed fit draws exactly what the
uninterrupted fit would have drawn, and its black-box queries (identical payloads) hit the cache.
Every black-box query goes through the :class:`~blackbox_rs.engine.QueryEngine` of the smoother.

Device: a fit runs on one device, :func:`fit_device` (``config.device``, else the connector's device
when it is a local torch model, else the CPU), resolved once when the context is built, before any
query. The module (and the surrogate of the ``surrogate`` strategy) is moved there for the fit, with
the fit images and labels; the training noise is drawn there. What stays on the CPU: batch indices
and the sigma mixture (CPU generators, so every device type draws the same images and noise levels),
the black box's clean labels, the per-image scores of scoring rounds, and every checkpointed tensor
on disk. Queries go to the engine as CPU tensors (a local connector moves them to its own device);
the labels that come back are moved to the fit device where they meet module outputs. After the fit
(or a failed one) the module goes back to the device it was on before (:meth:`FitContext.release`).

On the CPU the draws are bit-identical to a fit before devices existed. On a CUDA device the
Gaussian noise of training steps comes from a ``torch.Generator(device=...)`` seeded with the same
per-step seed, so it differs from the CPU's: a fit checkpoint is bound to the device type.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from blackbox_rs.engine import QueryEngine, Tally
from blackbox_rs.errors import InvalidParameterError
from blackbox_rs.fitting.config import StrategyConfig
from blackbox_rs.fitting.data import FitData
from blackbox_rs.fitting.pilot import PilotReport
from blackbox_rs.modules.base import InputModule

__all__ = ["FitContext", "FitReport", "ProgressFn", "fit_device", "module_device"]

ProgressFn = Callable[[int, int, dict[str, Any]], None]


class FitReport(BaseModel):
    """What a fit did and spent."""

    strategy: str
    sigmas: list[float]
    steps_done: int
    steps_total: int
    stopped: Literal["completed", "budget", "no_gain"] = Field(
        description="why the fit ended: all steps done, the budget spent, or `patience` scoring rounds in a row "
        "without a significant gain over the best state so far (the best state is kept)"
    )
    queries: int = Field(description="black-box queries charged during this fit call (cache hits excluded)")
    cache_hits: int
    cost: float
    trainable_parameters: int
    best_score: float | None = Field(
        description="best tracked score (higher is better): the robustness score of the kept state; for a "
        "multi-sigma fit its worst per-sigma gain over the MSE-pretrained module (0: the pretrained module kept)"
    )
    best_step: int | None
    history: list[dict[str, float]] = Field(default_factory=list)
    resumed_from: int | None = None
    pilot: PilotReport | None = Field(
        default=None,
        description="the pilot that ran before the strategy's own steps (blackbox_rs.fitting.pilot); None: none ran",
    )
    queries_saved: int | None = Field(
        default=None,
        description="for a fit that stopped for no gain: the strategy's query cap of the uninterrupted fit "
        "(estimate_queries) minus the queries charged by this fit over all its calls (a resumed fit included); "
        "None for a fit that completed or stopped at the budget",
    )


def _step_seed(seed: int, step: int, salt: str) -> int:
    h = hashlib.blake2b(f"blackbox-rs/fit|{seed}|{step}|{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def fit_device(config: StrategyConfig, connector: Any) -> torch.device:
    """Where a fit with ``config`` on ``connector`` runs: ``config.device`` if set, else the connector's
    ``device`` when it is a ``torch.device`` (a local torch connector), else the CPU.

    Raises :class:`InvalidParameterError` naming the device when this process cannot use it
    (:func:`blackbox_rs.connectors.module.resolve_device`: ``'cuda'`` without CUDA, ``'cuda:3'`` with
    fewer devices, ``'mps'`` without MPS, or a string that is no torch device)."""
    from blackbox_rs.connectors.module import resolve_device

    setting = getattr(config, "device", None)
    if setting is None:
        own = getattr(connector, "device", None)
        return own if isinstance(own, torch.device) else torch.device("cpu")
    try:
        return resolve_device(setting)
    except InvalidParameterError as exc:
        raise InvalidParameterError(f"fit setting {exc}") from None


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``: its ``device`` attribute when it is a ``torch.device`` (an
    :class:`~blackbox_rs.modules.base.InputModule`), else that of its first parameter or buffer,
    else the CPU."""
    own = getattr(module, "device", None)
    if isinstance(own, torch.device):
        return own
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _moved(module: torch.nn.Module, device: torch.device, what: str) -> None:
    try:
        module.to(device)
    except Exception as exc:  # torch raises many unrelated types for a failed move
        raise InvalidParameterError(
            f"cannot move the {what} to the fit device {str(device)!r}: {type(exc).__name__}: {exc}") from None


class FitContext:
    """Shared state of one fit (see the module docstring).

    Building it resolves the fit device (:func:`fit_device`; an unusable device raises
    :class:`InvalidParameterError` before any query) and moves ``module`` (in place) and the fit data
    there. :meth:`release` moves the module back where it was."""

    def __init__(self, engine: QueryEngine, module: InputModule, data: FitData, sigmas: list[float],
                 config: StrategyConfig, progress: ProgressFn | None = None) -> None:
        self.engine = engine
        #: where the module, the surrogate, the fit images and the training noise live during the fit
        self.device = fit_device(config, engine.connector)
        #: where the module was before the fit (it goes back there: :meth:`release`)
        self.home = module_device(module)
        self._given = module
        _moved(module, self.device, "module")
        self.module = module
        self.data = data if self.device.type == "cpu" else FitData(
            x=data.x.to(self.device), y=None if data.y is None else data.y.to(self.device))
        self.sigmas = list(sigmas)
        self.config = config
        self.progress = progress
        self.tally = Tally()
        n = len(data)
        # the subset whose clean images the black box labels (stability targets)
        g = self.generator(-1, "subset")
        self.subset = torch.randperm(n, generator=g)[: max(1, min(n, config.clean_queries))]
        self.clean_labels: torch.Tensor | None = None
        #: clean labels already paid for (a pilot's; -1 where unknown): never queried again
        self.known_labels: torch.Tensor | None = None
        #: the fit budget's cap (queries), which sizes the fit's pilot; None: no fit budget
        self.budget_cap: int | None = None
        #: hold the scoring set out of every training draw (a pilot: its labelled pool is small, so
        #: rounds scored on images the module trained on would see gains that are not there)
        self.holdout = False
        self._train_pool: torch.Tensor | None = None
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        #: per-image scores of the best scoring round so far
        self.best_per_image: torch.Tensor | None = None
        #: per-image scores of the reference round, which later rounds are tested against: the best
        #: round so far as of the last significant gain (at first the pretrained module's round)
        self.gain_reference: torch.Tensor | None = None
        #: scoring rounds in a row without a significant gain over the reference (the patience counter)
        self.no_gain_rounds = 0
        #: the step whose scoring round has been run (a fit resumed inside that step does not re-run it)
        self.scored_step: int | None = None
        self.history: list[dict[str, float]] = []

    # -- randomness --------------------------------------------------------------------------
    def generator(self, step: int, salt: str = "") -> torch.Generator:
        """The CPU generator of draw ``(step, salt)`` (indices, sigma choices, CPU noise)."""
        return torch.Generator().manual_seed(_step_seed(self.config.seed, step, salt))

    def gaussian(self, shape: torch.Size | tuple[int, ...], step: int, salt: str,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal noise of ``shape`` on the fit device for draw ``(step, salt)``. On the CPU it
        continues ``generator`` when given (else a fresh :meth:`generator`), as fits always drew it; on
        another device it comes from a ``torch.Generator`` of that device seeded with the same per-step
        seed (reproducible on that device type, not equal to the CPU's)."""
        if self.device.type == "cpu":
            return torch.randn(shape, generator=generator if generator is not None else self.generator(step, salt))
        g = torch.Generator(device=self.device).manual_seed(_step_seed(self.config.seed, step, salt))
        return torch.randn(shape, generator=g, device=self.device)

    def batch_indices(self, step: int, size: int, *, labelled_only: bool = False, salt: str = "batch") -> torch.Tensor:
        """``size`` dataset indices for draw ``(step, salt)``: from the whole fit set, or with
        ``labelled_only`` from the labelled pool (:meth:`labelled_pool`)."""
        if not labelled_only:
            return torch.randint(0, len(self.data), (size,), generator=self.generator(step, salt))
        pool = self.labelled_pool()
        return pool[torch.randint(0, len(pool), (size,), generator=self.generator(step, salt))]

    def scoring_indices(self) -> torch.Tensor:
        """The fixed scoring set: ``score_images`` images of the labelled subset, the same every round
        (drawn from the fit seed alone)."""
        perm = self.subset[torch.randperm(len(self.subset), generator=self.generator(-1, "score-set"))]
        return perm[: self.config.score_images]

    def labelled_pool(self) -> torch.Tensor:
        """The labelled images training draws come from: the labelled subset, less the scoring set when
        :attr:`holdout` is set (unless that would leave nothing)."""
        if not self.holdout:
            return self.subset
        if self._train_pool is None:
            held = torch.zeros(len(self.data), dtype=torch.bool)
            held[self.scoring_indices()] = True
            rest = self.subset[~held[self.subset]]
            self._train_pool = rest if len(rest) else self.subset
        return self._train_pool

    def noisy(self, clean: torch.Tensor, step: int, salt: str = "noise") -> torch.Tensor:
        """``clean + sigma_i * z`` with sigma_i drawn from the mixture: one of ``sigmas`` or, with
        probability ``clean_fraction``, 0 (clean)."""
        g = self.generator(step, salt)
        m = clean.shape[0]
        levels = torch.tensor(self.sigmas, dtype=torch.float32)
        sig = levels[torch.randint(0, len(self.sigmas), (m,), generator=g)]
        if self.config.clean_fraction > 0:
            sig = torch.where(torch.rand(m, generator=g) < self.config.clean_fraction, torch.zeros_like(sig), sig)
        z = self.gaussian(clean.shape, step, salt, generator=g)  # on the CPU: the same generator, continued
        return clean + sig.to(clean.device).view(-1, 1, 1, 1) * z

    def module_outputs(self, noisy: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        """The module's outputs on ``noisy`` in eval mode and without gradients, clipped to [0, 1] as
        they are sent to the black box (in chunks; the module's training mode is restored)."""
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                out = torch.cat([self.module(noisy[i:i + chunk]) for i in range(0, len(noisy), chunk)])
        finally:
            self.module.train(was_training)
        return out.clamp(0.0, 1.0)

    # -- black box -----------------------------------------------------------------------------
    def query(self, batch: torch.Tensor) -> torch.Tensor:
        """Black-box labels of images in [0, 1] (through the engine: budgeted, cached, counted), on the
        fit device. The batch is sent as a CPU tensor (a local connector moves it to its own device)."""
        sent = batch.detach().clamp(0.0, 1.0).to("cpu").contiguous()
        return self.engine.query(sent, tally=self.tally).labels.to(self.device)

    def ensure_clean_labels(self) -> torch.Tensor:
        """Black-box labels of the clean images of the labelled subset (queried once, then cached); the
        ones in :attr:`known_labels` (a pilot's) are taken from there, not queried again."""
        if self.clean_labels is None:
            labels = torch.full((len(self.data),), -1, dtype=torch.int64)  # on the CPU (checkpointed as it is)
            if self.known_labels is not None:
                labels[self.subset] = self.known_labels.to("cpu", torch.int64)[self.subset]
            todo = self.subset[labels[self.subset] < 0]
            if len(todo):
                labels[todo] = self.query(self.data.x[todo]).cpu()
            self.clean_labels = labels
        return self.clean_labels

    def targets(self, idx: torch.Tensor) -> torch.Tensor:
        """Stability targets (black-box clean labels) for dataset indices ``idx``, on the fit device."""
        t = self.ensure_clean_labels()[idx.cpu()]
        assert bool((t >= 0).all()), "targets requested outside the labelled subset"
        return t.to(self.device)

    # -- best so far ------------------------------------------------------------------------------
    def offer(self, step: int, score: float, *, per_image: torch.Tensor | None = None, **extra: float) -> None:
        """Record a score (higher is better) of the module's *current* state; keep it if best (with
        ``per_image``, the round's per-image scores)."""
        self.record(step, score=score, **extra)
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_step = float(score), step
            self.best_state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
            self.best_per_image = None if per_image is None else per_image.detach().clone()

    def record(self, step: int, **extra: float) -> None:
        """Add a history entry that is not a score (diagnostics)."""
        self.history.append({"step": float(step), **{k: float(v) for k, v in extra.items()}})

    def forget_best(self) -> None:
        """Drop the best-so-far state (when later scores are not comparable with earlier ones) and
        restart the patience counter."""
        self.best_state, self.best_score, self.best_step = None, None, None
        self.best_per_image, self.gain_reference, self.no_gain_rounds = None, None, 0

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.module.load_state_dict(self.best_state)

    def release(self) -> None:
        """Move the module (and the module given to the fit, if a strategy replaced it) back to the
        device it was on before the fit. Saving works from any device; certification moves a module
        to the connector's device itself."""
        for m in {id(self.module): self.module, id(self._given): self._given}.values():
            if module_device(m) != self.home:
                m.to(self.home)

    def report(self, step: int, total: int, info: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress(step, total, {**info, "queries": self.tally.queries, "cache_hits": self.tally.cache_hits})
