"""Cohen et al.'s PREDICT and CERTIFY over any connector: the certification core (datasets:
:mod:`blackbox_rs.dataset`; anytime-valid sequential certification: :mod:`blackbox_rs.certify_sequential`).

The base classifier that is smoothed is ``x -> f(clip(T(x), 0, 1))`` where ``T`` is an optional
deterministic input transform (a fitted input module) and ``f`` the opaque model behind the engine;
clipping and whatever the connector does on the wire are deterministic post-processing, so the
guarantees below hold for that composed classifier.

Guarantees (Cohen, Rosenfeld, Kolter 2019), for one call, over the randomness of the noise:

* :func:`certify`: with probability >= 1 - alpha, if it returns a class c with radius R, the smoothed
  classifier returns c everywhere in the l2 ball of radius R around x. Selection (n0) and estimation
  (n) samples come from independent noise streams.
* :func:`predict`: with probability >= 1 - alpha it returns either ABSTAIN or the smoothed class.

Noise is counter-based (:mod:`blackbox_rs.noise`): the samples are a function of (seed, key, stream,
index), so reruns send identical requests and hit the query cache. Gaussian noise is drawn on the
device the model runs on (:func:`noise_device`: a local torch model's ``device``, else the CPU); the
input, the noise, the input module and the clipping stay there, and only labels come back to the host.
The device type is part of the noise identity every record carries. The seed defaults to a fresh one
from the OS's entropy source (:func:`blackbox_rs.binding.fresh_seed`), recorded in every certificate
and journal: nobody can compute an input's noise draws in advance. Pass a seed for reproducible runs.

Every certificate records what it is bound to (:mod:`blackbox_rs.binding`): model fingerprint,
transform identity, noise mode, settings, seed, input key, label and what the label is. Dataset runs
with ``output`` refuse to resume from a journal written for anything else.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from blackbox_rs import defaults, stats
from blackbox_rs.binding import fresh_seed, noise_identity, transform_identity
from blackbox_rs.budget import chain
from blackbox_rs.certificate import ABSTAIN, Certificate, SmoothedPrediction
from blackbox_rs.connectors.base import Connector, ConnectorInfo, check_images
from blackbox_rs.engine import QueryEngine, Tally, as_engine
from blackbox_rs.errors import (
    BudgetExceeded,
    InvalidParameterError,
    UncertifiableError,
)
from blackbox_rs.noise import NoiseStream, device_tag, input_key

__all__ = [
    "Transform",
    "certify",
    "check_budget_limit",
    "check_certifiable",
    "exact_identity",
    "noise_device",
    "noise_mode",
    "run_transform",
    "positive_int",
    "predict",
    "prepare",
    "record_binding",
    "sample_counts",
    "validate_input",
]

Transform = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# validation
def validate_input(x: object, info: ConnectorInfo) -> torch.Tensor:
    """Check one input image ``C x H x W`` (float, the model's shape, finite, in [0, 1]) with
    :func:`~blackbox_rs.connectors.base.check_images`; return it as a detached contiguous float32
    CPU tensor (the range is checked after that cast). Raises :class:`InvalidInputError`."""
    return check_images(x, shape=info.input_shape, batched=False, as_float32_cpu=True, what="input")


def positive_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < 1:
        raise InvalidParameterError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def resolve_seed(seed: object) -> int:
    """A validated seed; ``None`` draws a fresh one from the OS's entropy source."""
    if seed is None:
        return fresh_seed()
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise InvalidParameterError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_certifiable(n: int, alpha: float, sigma: float) -> None:
    """Raise :class:`UncertifiableError` when ``n`` estimation samples at ``alpha`` can never give
    ``p_lower > 1/2`` (so every CERTIFY would abstain: locuslab/smoothing#8)."""
    need = stats.min_samples_to_certify(alpha)
    if n < need:
        raise UncertifiableError(
            f"n={n} estimation samples at alpha={alpha} can never certify: even if all agree, the "
            f"Clopper-Pearson bound is alpha**(1/n) = {alpha ** (1 / n):.4f} <= 0.5. Use n >= {need} "
            f"(n=100 reaches radius {stats.max_radius(100, sigma, alpha):.3f} at sigma={sigma})."
        )


# ---------------------------------------------------------------------------------------------
# sampling
def noise_device(engine: QueryEngine) -> torch.device:
    """Where Gaussian noise for ``engine``'s model is drawn: the connector's ``device`` attribute when
    it is a :class:`torch.device` other than the CPU (a local torch model on an accelerator), else the
    CPU (remote APIs, ONNX Runtime and CPU models: their payloads are built on the host anyway)."""
    dev = getattr(engine.connector, "device", None)
    if isinstance(dev, torch.device) and dev.type != "cpu":
        return dev
    return torch.device("cpu")


def noise_mode(engine: QueryEngine, lattice: bool = False) -> str:
    """The noise identity of a run on ``engine``: mode and the device tag of its generator
    (:func:`blackbox_rs.noise.device_tag`; exact lattice noise is always drawn on the CPU)."""
    return noise_identity(lattice, "cpu" if lattice else device_tag(noise_device(engine)))


def run_transform(transform: Transform, batch: torch.Tensor) -> torch.Tensor:
    """``transform(batch)`` where the transform can run it: a fitted module's transform (it has
    ``on``) where the batch is; a plain ``nn.Module`` on its own device; any other callable on the CPU
    (what it was always given). The result stays where the transform put it (the connector moves it)."""
    target = getattr(transform, "fn", transform)  # an identified() wrapper
    if callable(getattr(target, "on", None)):
        return transform(batch)
    if isinstance(target, torch.nn.Module):
        t = next(itertools.chain(target.parameters(), target.buffers()), None)
        dev = batch.device if t is None else t.device
    else:
        dev = torch.device("cpu")
    return transform(batch if batch.device == dev else batch.to(dev))


def exact_identity(transform: Transform | None) -> bool:
    """Whether ``transform``'s identity determines its function exactly, so answers may be cached
    under it: the bare model, a fitted module (an :class:`~blackbox_rs.modules.base.InputModule` digest
    of config and every tensor, unless the module says otherwise, e.g. a ``frozen`` denoiser around
    an in-memory ``nn.Module``), or a callable that declares an ``identity`` string. Not: a plain
    ``nn.Module``'s best-effort digest (settings it cannot read, globals), or a callable without one."""
    if transform is None:
        return True
    ident = transform_identity(transform)
    if ident.startswith(("unidentified:", "nn:")):
        return False
    return bool(getattr(getattr(transform, "fn", transform), "exact_identity", True))


def payload_origin(engine: QueryEngine, x: torch.Tensor, *, noise: str, sigma: float, seed: int, key: str,
                   stream: str, transform: Transform | None) -> str | None:
    """The generating identity of the payloads :func:`sample_counts` sends for one input and stream
    (cached by it, not by payload bytes, when the engine :attr:`~QueryEngine.caches_by_origin`): the
    input's content hash, noise mode and device tag, seed, noise key, stream, sigma, transform identity,
    the clip to [0, 1] and the torch version (kernels that draw noise or run the module may change
    with it); :func:`sample_counts` adds each batch's sample range (a module's output may differ in
    the last bits with the batch it ran in). ``None`` (key by payload) when the engine does not cache
    by origin or the transform's identity is not exact (:func:`exact_identity`)."""
    if not engine.caches_by_origin or not exact_identity(transform):
        return None
    return (f"v1|torch={torch.__version__}|{noise}|input={input_key(x)}|seed={int(seed)}|key={key}|stream={stream}"
            f"|sigma={float(sigma)!r}|transform={transform_identity(transform)}|clip=0,1")


def sample_counts(
    engine: QueryEngine,
    x: torch.Tensor,
    *,
    sigma: float,
    num: int,
    seed: int,
    key: str,
    stream: str,
    batch_size: int,
    transform: Transform | None = None,
    tally: Tally | None = None,
    start: int = 0,
    noisy_batch: Callable[[int, int], torch.Tensor] | None = None,
    _origin_mode: str | None = None,
) -> np.ndarray:
    """Per-class counts of ``f(clip(T(x + delta_i)))`` for noise samples ``start .. start+num-1``.

    The default source is Gaussian ``x + NoiseStream(...)`` drawn on :func:`noise_device`.
    ``noisy_batch(start, count)`` replaces it (e.g. exact lattice noise); it must be counter-based
    too. Its requests are keyed by payload bytes; ``_origin_mode`` is for the SDK's own sources only
    (the exact lattice source passes ``"lattice-v1:cpu"``): it must be a complete identity of the
    source, or the cache would serve wrong answers. Memory is one batch; counting uses
    ``torch.bincount`` (no per-sample Python loop).
    """
    info = engine.info
    k = info.num_classes
    if noisy_batch is None:
        dev = noise_device(engine)
        noise = NoiseStream(seed=seed, key=key, stream=stream, shape=info.input_shape, sigma=sigma, device=dev)
        x_dev = x.to(dev)
        _origin_mode = noise_identity(False, noise.device_tag)

        def noisy_batch(s: int, m: int) -> torch.Tensor:
            return noise.samples(s, m).add_(x_dev)

    origin = None if _origin_mode is None else payload_origin(
        engine, x, noise=_origin_mode, sigma=sigma, seed=seed, key=key, stream=stream, transform=transform)
    counts = torch.zeros(k, dtype=torch.int64)
    done = 0
    while done < num:
        m = min(batch_size, num - done)
        batch = noisy_batch(start + done, m)
        where = origin
        if transform is not None:
            with torch.no_grad():
                batch = run_transform(transform, batch)
            if where is not None:
                where = f"{where}|tbatch={start + done}+{m}"
        batch = batch.clamp_(0.0, 1.0) if not batch.requires_grad else batch.detach().clamp(0.0, 1.0)
        pred = engine.query(batch, tally=tally, origin=None if where is None else (where, start + done))
        counts += torch.bincount(pred.labels, minlength=k)
        done += m
    return counts.numpy()


def prepare(
    connector: Connector | QueryEngine, x: object, sigma: float, alpha: float, batch_size: int | None,
    seed: int | None, key: str | None,
) -> tuple[QueryEngine, torch.Tensor, float, float, int, int, str]:
    engine = as_engine(connector)
    sigma = stats.check_sigma(sigma)
    alpha = stats.check_alpha(alpha)
    seed = resolve_seed(seed)
    bs = engine.info.max_batch if batch_size is None else positive_int("batch_size", batch_size)
    xt = validate_input(x, engine.info)
    return engine, xt, sigma, alpha, bs, seed, (key if key is not None else input_key(xt))


# ---------------------------------------------------------------------------------------------
# PREDICT / CERTIFY
def predict(
    connector: Connector | QueryEngine,
    x: torch.Tensor,
    *,
    sigma: float,
    n: int,
    alpha: float = defaults.ALPHA,
    batch_size: int | None = None,
    seed: int | None = None,
    key: str | None = None,
    label: int | None = None,
    transform: Transform | None = None,
) -> SmoothedPrediction:
    """Cohen's PREDICT: the top class of n noisy samples if a two-sided binomial test of the top two
    counts rejects p = 1/2 at level alpha, else ABSTAIN. With probability >= 1 - alpha the answer is
    ABSTAIN or the smoothed classifier's class."""
    n = positive_int("n", n)
    engine, xt, sigma, alpha, bs, seed, key = prepare(connector, x, sigma, alpha, batch_size, seed, key)
    tally = Tally()
    counts = sample_counts(engine, xt, sigma=sigma, num=n, seed=seed, key=key, stream="predict",
                           batch_size=bs, transform=transform, tally=tally)
    order = np.argsort(-counts, kind="stable")
    n_a, n_b = int(counts[order[0]]), int(counts[order[1]])
    p_value = stats.abstain_test_pvalue(n_a, n_b)
    return SmoothedPrediction(
        prediction=int(order[0]) if p_value <= alpha else ABSTAIN, counts=counts.tolist(), n=n,
        alpha=alpha, sigma=sigma, seed=seed, key=key, fingerprint=engine.info.fingerprint,
        queries=tally.queries, cache_hits=tally.cache_hits, label=label, p_value=p_value,
        **record_binding(engine, transform, label=label),
    )


def certify(
    connector: Connector | QueryEngine,
    x: torch.Tensor,
    *,
    sigma: float,
    n0: int = defaults.N0,
    n: int = defaults.N,
    alpha: float = defaults.ALPHA,
    batch_size: int | None = None,
    seed: int | None = None,
    key: str | None = None,
    label: int | None = None,
    index: int | None = None,
    transform: Transform | None = None,
    reference: str | None = None,
) -> Certificate:
    """Cohen's CERTIFY: select the top class from n0 noisy samples, bound its probability from n
    fresh samples with a one-sided (1 - alpha) Clopper-Pearson bound, and certify radius
    ``sigma * Phi^-1(p_lower)`` if ``p_lower > 1/2`` (else ABSTAIN).

    ``seed=None`` draws a fresh seed (recorded in the certificate). ``reference`` says what
    ``label`` is (default: ``"labels"`` when a label is given).

    Raises :class:`UncertifiableError` before any query when (n, alpha) can never certify, and
    :class:`BudgetExceeded` before any query when the budget's limit is below n0 + n.
    """
    n0 = positive_int("n0", n0)
    n = positive_int("n", n)
    engine, xt, sigma, alpha, bs, seed, key = prepare(connector, x, sigma, alpha, batch_size, seed, key)
    check_certifiable(n, alpha, sigma)
    check_budget_limit(engine, n0 + n, "n0 + n")
    tally = Tally()
    sel = sample_counts(engine, xt, sigma=sigma, num=n0, seed=seed, key=key, stream="selection",
                        batch_size=bs, transform=transform, tally=tally)
    c_hat = int(np.argmax(sel))  # ties: lowest index (deterministic)
    est = sample_counts(engine, xt, sigma=sigma, num=n, seed=seed, key=key, stream="estimation",
                        batch_size=bs, transform=transform, tally=tally)
    n_a = int(est[c_hat])
    p_lower = float(stats.cp_lower(n_a, n, alpha))
    certified = p_lower > 0.5
    return Certificate(
        prediction=c_hat if certified else ABSTAIN,
        radius=stats.radius(p_lower, sigma) if certified else 0.0,
        p_lower=p_lower, counts=est.tolist(), selection_counts=sel.tolist(), n0=n0, n=n, alpha=alpha,
        sigma=sigma, seed=seed, key=key, fingerprint=engine.info.fingerprint, queries=tally.queries,
        cache_hits=tally.cache_hits, label=label, index=index,
        **record_binding(engine, transform, label=label, reference=reference),
    )


def record_binding(engine: QueryEngine, transform: Transform | None, *, label: int | None = None,
                   reference: str | None = None, lattice: bool = False) -> dict[str, Any]:
    """The binding fields every record carries (see :mod:`blackbox_rs.binding`)."""
    return {
        "transform": transform_identity(transform),
        "noise": noise_mode(engine, lattice),
        "other_index": engine.info.other_index,
        "reference": reference if reference is not None else ("labels" if label is not None else None),
    }


def check_budget_limit(engine: QueryEngine, needed: int, what: str = "") -> None:
    """Raise :class:`BudgetExceeded` before any query when the limits of the engine's budget (and of
    every budget above it) allow fewer than ``needed`` queries in total: one certificate could never
    finish. ``what`` spells out how ``needed`` is made up (e.g. "1 clean + n0 + n")."""
    cap: int | None = None
    for b in (chain(engine.budget) if engine.budget is not None else []):
        for c in (b.max_queries,
                  math.floor(b.max_cost / engine.info.cost_per_query + 1e-9)
                  if b.max_cost is not None and engine.info.cost_per_query > 0 else None):
            if c is not None:
                cap = c if cap is None else min(cap, c)
    if cap is not None and cap < needed:
        how = f"{what} = " if what else ""
        raise BudgetExceeded(
            f"the budget allows at most {cap} queries in total, but one certificate needs {how}{needed}; "
            "nothing was sent: raise the budget"
        )
