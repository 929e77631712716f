"""Zeroth-order (query-only) gradient estimators on a flat parameter vector.

The estimators see the objective only through a callback ``loss_fn(theta) -> scalar float tensor``
(or, with ``batched=True``, ``loss_fn(thetas: P×d) -> P``), so the caller decides how the black box
is queried (batching, budget, cache: the QueryEngine). Each estimate reports how many loss
evaluations it made; :func:`queries_per_step` gives the same count in advance.

Estimators (``u`` drawn with ``E[u uᵀ] = I``, smoothing radius ``mu``):

- :func:`rge_gradient` random-direction estimate, averaged over ``q`` directions.
  Two-sided: ``ĝ = 1/q Σ (L(θ+μu) − L(θ−μu)) / (2μ) · u`` (``2q`` evaluations; exact directional
  derivatives for quadratics). One-sided: ``ĝ = 1/q Σ (L(θ+μu) − L(θ)) / μ · u`` (``q + 1``).
- :func:`spsa_gradient` two-sided SPSA: RGE with Rademacher ``±1`` perturbations
  (for ``Δᵢ = ±1``, ``1/Δᵢ = Δᵢ``, so Spall's SPSA and RGE coincide).
- :func:`cge_gradient` coordinate-wise estimate on all ``d`` coordinates or a random block of ``k``
  (``2k`` evaluations two-sided, ``k + 1`` one-sided).

Precision: finite differences of a loss fall below half-precision resolution and silently turn into
noise (BlackVIP's mixed-precision bug). ``theta`` must be float32 or float64, the loss values must be
float32/float64, and the callback runs with autocast disabled; a float16/bfloat16 ``theta`` or loss
raises :class:`~blackbox_rs.errors.PrecisionError`.

Also here: :class:`ZOSGD` (SGD with heavy-ball or Nesterov momentum, SPSA-GC style, with a
checkpointable state), :class:`SPSAGains` (named Spall gain schedules), :func:`module_loss` (turns an
input module plus an evaluation function into a ``loss_fn``) and :func:`inject_gradient` (the ZO-AE-DS
bridge that feeds an estimate into autograd).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from blackbox_rs.errors import InvalidInputError, InvalidParameterError, PrecisionError

if TYPE_CHECKING:  # pragma: no cover
    from blackbox_rs.modules.base import InputModule

__all__ = [
    "DirectionSampler",
    "Distribution",
    "GradientEstimate",
    "SPSAGains",
    "ZOSGD",
    "cge_gradient",
    "estimate_gradient",
    "inject_gradient",
    "module_loss",
    "queries_per_step",
    "rge_gradient",
    "sample_directions",
    "spsa_gradient",
]

Distribution = Literal["gaussian", "rademacher", "sphere"]
#: ``sampler(q, d, generator) -> q×d float tensor`` with ``E[u uᵀ] = I``.
DirectionSampler = Callable[[int, int, torch.Generator], torch.Tensor]
LossFn = Callable[[torch.Tensor], Any]
Method = Literal["rge", "spsa", "cge"]

_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------- checks
def _check_theta(theta: Any) -> torch.Tensor:
    if not isinstance(theta, torch.Tensor):
        raise InvalidInputError(f"theta must be a torch.Tensor, got {type(theta).__name__}")
    if theta.dtype in _HALF:
        raise PrecisionError(
            f"theta is {theta.dtype}: zeroth-order estimates need float32 or float64 (finite differences "
            "vanish below half-precision resolution); call .float() first"
        )
    if theta.dtype not in (torch.float32, torch.float64):
        raise InvalidInputError(f"theta must be float32 or float64, got {theta.dtype}")
    if theta.dim() != 1 or theta.numel() == 0:
        raise InvalidInputError(f"theta must be a non-empty 1-D vector, got shape {tuple(theta.shape)}")
    if not torch.isfinite(theta).all():
        raise InvalidInputError("theta contains non-finite values")
    return theta.detach()


def _check_positive(name: str, v: float) -> float:
    if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
        raise InvalidParameterError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


def _check_count(name: str, v: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InvalidParameterError(f"{name} must be an integer >= 1, got {v!r}")
    return v


@contextlib.contextmanager
def _full_precision() -> Iterator[None]:
    """Disable autocast (CPU and, when present, CUDA) around loss evaluations."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast(device_type="cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast(device_type="cuda", enabled=False))
        yield


def _as_loss(value: Any, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dtype in _HALF:
            raise PrecisionError(
                f"loss_fn returned {value.dtype} at {where}: zeroth-order differences need a float32/float64 "
                "loss (is autocast or a half-precision model involved?)"
            )
        if value.dtype not in (torch.float32, torch.float64):
            raise InvalidInputError(
                f"loss_fn must return a float32/float64 tensor, got {value.dtype} at {where}"
            )
        t = value.detach()
    elif isinstance(value, float | int) and not isinstance(value, bool):
        t = torch.tensor(float(value), dtype=torch.float64)
    else:
        raise InvalidInputError(
            f"loss_fn must return a scalar tensor or float, got {type(value).__name__} at {where}"
        )
    if not torch.isfinite(t).all():
        raise InvalidInputError(f"loss_fn returned a non-finite value at {where}")
    return t


def _evaluate(loss_fn: LossFn, thetas: torch.Tensor, batched: bool) -> torch.Tensor:
    """Evaluate the loss at every row of ``thetas`` (P×d); returns P float64 values on the CPU."""
    with _full_precision():
        if batched:
            out = _as_loss(loss_fn(thetas), "batched call")
            if out.dim() != 1 or out.shape[0] != thetas.shape[0]:
                raise InvalidInputError(
                    f"batched loss_fn must return {thetas.shape[0]} losses, got shape {tuple(out.shape)}"
                )
            return out.to("cpu", torch.float64)
        values = []
        for i in range(thetas.shape[0]):
            v = _as_loss(loss_fn(thetas[i]), f"evaluation {i}")
            if v.numel() != 1:
                raise InvalidInputError(
                    f"loss_fn must return a scalar, got shape {tuple(v.shape)} at evaluation {i}"
                )
            values.append(v.reshape(()).to("cpu", torch.float64))
        return torch.stack(values)


# ---------------------------------------------------------------------------- directions
def _gaussian(q: int, d: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(q, d, generator=g, dtype=torch.float64)


def _rademacher(q: int, d: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (q, d), generator=g, dtype=torch.int64).to(torch.float64) * 2.0 - 1.0


def _sphere(q: int, d: int, g: torch.Generator) -> torch.Tensor:
    u = torch.randn(q, d, generator=g, dtype=torch.float64)
    return u / u.norm(dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(d)


_SAMPLERS: dict[str, DirectionSampler] = {"gaussian": _gaussian, "rademacher": _rademacher, "sphere": _sphere}


def sample_directions(
    distribution: Distribution | DirectionSampler,
    q: int,
    d: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``q×d`` perturbation directions with ``E[u uᵀ] = I`` (so ``‖u‖ ≈ √d``).

    ``"gaussian"``: ``N(0, I)``; ``"rademacher"``: i.i.d. ``±1``; ``"sphere"``: uniform on the sphere of
    radius ``√d``; or a callable ``sampler(q, d, generator)``. Sampling happens on the CPU (values do
    not depend on the device) from ``generator`` (the global CPU generator when ``None``, so
    ``torch.manual_seed`` makes runs reproducible).
    """
    q, d = _check_count("q", q), _check_count("d", d)
    g = generator if generator is not None else torch.default_generator
    if isinstance(distribution, str):
        if distribution not in _SAMPLERS:
            raise InvalidParameterError(f"unknown distribution {distribution!r}; known: {sorted(_SAMPLERS)}")
        u = _SAMPLERS[distribution](q, d, g)
    elif callable(distribution):
        u = distribution(q, d, g)
        if not isinstance(u, torch.Tensor) or tuple(u.shape) != (q, d) or not u.is_floating_point():
            got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
            raise InvalidInputError(f"direction sampler must return a float {q}x{d} tensor, got {got}")
    else:
        raise InvalidParameterError(
            f"distribution must be a name or a callable, got {type(distribution).__name__}"
        )
    return u.to(device=device or "cpu", dtype=dtype)


# ---------------------------------------------------------------------------- estimates
@dataclass(frozen=True)
class GradientEstimate:
    """Result of one zeroth-order estimate.

    ``grad``: the estimate (same dtype/device as θ). ``loss``: an estimate of ``L(θ)`` (the centre value
    when it was evaluated, else the mean of the ± evaluations, which is ``L(θ) + O(μ²)``).
    ``num_evaluations``: loss_fn evaluations spent (= :func:`queries_per_step` with
    ``queries_per_evaluation=1``). ``evaluations``: every loss value, in evaluation order (float64).
    """

    grad: torch.Tensor
    loss: float
    num_evaluations: int
    evaluations: torch.Tensor


def queries_per_step(
    method: Method,
    *,
    q: int = 1,
    dim: int | None = None,
    num_coordinates: int | None = None,
    two_sided: bool = True,
    queries_per_evaluation: int = 1,
) -> int:
    """Black-box queries one gradient estimate costs.

    Loss evaluations: ``rge``/``spsa``: ``2q`` two-sided, ``q + 1`` one-sided; ``cge`` over ``k``
    coordinates (``k = num_coordinates`` or ``dim``): ``2k`` two-sided, ``k + 1`` one-sided. Each
    evaluation costs ``queries_per_evaluation`` queries (e.g. batch size × noise draws).
    """
    per = _check_count("queries_per_evaluation", queries_per_evaluation)
    if method in ("rge", "spsa"):
        q = _check_count("q", q)
        if method == "spsa" and not two_sided:
            raise InvalidParameterError("spsa is two-sided by definition; use method='rge' for one-sided")
        evals = 2 * q if two_sided else q + 1
    elif method == "cge":
        k = num_coordinates if num_coordinates is not None else dim
        if k is None:
            raise InvalidParameterError("cge needs dim (all coordinates) or num_coordinates")
        k = _check_count("num_coordinates" if num_coordinates is not None else "dim", k)
        if dim is not None and k > _check_count("dim", dim):
            raise InvalidParameterError(f"num_coordinates={k} exceeds dim={dim}")
        evals = 2 * k if two_sided else k + 1
    else:
        raise InvalidParameterError(f"unknown method {method!r}; known: 'rge', 'spsa', 'cge'")
    return evals * per


def rge_gradient(
    loss_fn: LossFn,
    theta: torch.Tensor,
    *,
    q: int = 1,
    mu: float = 1e-2,
    distribution: Distribution | DirectionSampler = "gaussian",
    two_sided: bool = True,
    generator: torch.Generator | None = None,
    batched: bool = False,
) -> GradientEstimate:
    """Random-direction gradient estimate averaged over ``q`` directions (see the module docstring).

    For a smooth loss the two-sided estimate is unbiased for the gradient of the Gaussian-smoothed loss
    and, for a quadratic, unbiased for the true gradient. Costs ``queries_per_step("rge", q=q,
    two_sided=two_sided)`` evaluations. ``theta`` is not modified.
    """
    theta = _check_theta(theta)
    q = _check_count("q", q)
    mu = _check_positive("mu", mu)
    d = theta.numel()
    u = sample_directions(distribution, q, d, generator=generator, dtype=theta.dtype, device=theta.device)
    if two_sided:
        thetas = torch.cat([theta + mu * u, theta - mu * u], dim=0)  # rows: +u_1..+u_q, -u_1..-u_q
        values = _evaluate(loss_fn, thetas, batched)
        diffs = (values[:q] - values[q:]) / (2.0 * mu)
        loss = float(values.mean())
    else:
        thetas = torch.cat([theta[None], theta + mu * u], dim=0)
        values = _evaluate(loss_fn, thetas, batched)
        diffs = (values[1:] - values[0]) / mu
        loss = float(values[0])
    grad = (diffs.to(device=theta.device, dtype=theta.dtype)[:, None] * u).mean(dim=0)
    return GradientEstimate(grad=grad, loss=loss, num_evaluations=int(values.numel()), evaluations=values)


def spsa_gradient(
    loss_fn: LossFn,
    theta: torch.Tensor,
    *,
    q: int = 1,
    c: float = 1e-2,
    generator: torch.Generator | None = None,
    batched: bool = False,
) -> GradientEstimate:
    """Two-sided SPSA with Rademacher perturbations, averaged over ``q`` draws (BlackVIP's ``SP_AVG``);
    ``c`` is the perturbation size. Costs ``2q`` evaluations."""
    return rge_gradient(
        loss_fn,
        theta,
        q=q,
        mu=c,
        distribution="rademacher",
        two_sided=True,
        generator=generator,
        batched=batched,
    )


def cge_gradient(
    loss_fn: LossFn,
    theta: torch.Tensor,
    *,
    mu: float = 1e-3,
    coordinates: int | torch.Tensor | None = None,
    two_sided: bool = True,
    generator: torch.Generator | None = None,
    batched: bool = False,
) -> GradientEstimate:
    """Coordinate-wise finite differences.

    ``coordinates``: ``None`` = all ``d`` coordinates; an ``int k`` = a uniformly random block of ``k``
    distinct coordinates (drawn from ``generator``, default the global CPU generator); a 1-D integer tensor = those coordinates.
    Coordinates not estimated are 0 in ``grad`` (a block-coordinate step; scale by ``d/k`` for an
    unbiased full-gradient estimate). Costs ``2k`` evaluations two-sided, ``k + 1`` one-sided.
    """
    theta = _check_theta(theta)
    mu = _check_positive("mu", mu)
    d = theta.numel()
    if coordinates is None:
        idx = torch.arange(d)
    elif isinstance(coordinates, int) and not isinstance(coordinates, bool):
        k = _check_count("coordinates", coordinates)
        if k > d:
            raise InvalidParameterError(f"coordinates={k} exceeds the dimension {d}")
        g = generator if generator is not None else torch.default_generator
        idx = torch.randperm(d, generator=g)[:k].sort().values
    elif isinstance(coordinates, torch.Tensor):
        if coordinates.dim() != 1 or coordinates.numel() == 0 or coordinates.is_floating_point():
            raise InvalidInputError("coordinates must be a non-empty 1-D integer tensor")
        idx = coordinates.to("cpu", torch.int64)
        if int(idx.min()) < 0 or int(idx.max()) >= d or idx.unique().numel() != idx.numel():
            raise InvalidInputError(f"coordinates must be distinct indices in [0, {d})")
    else:
        raise InvalidParameterError(
            f"coordinates must be None, an int or a tensor, got {type(coordinates).__name__}"
        )
    k = idx.numel()
    eye = torch.zeros(k, d, dtype=theta.dtype, device=theta.device)
    eye[torch.arange(k), idx.to(theta.device)] = mu
    if two_sided:
        values = _evaluate(loss_fn, torch.cat([theta + eye, theta - eye], dim=0), batched)
        partial = (values[:k] - values[k:]) / (2.0 * mu)
        loss = float(values.mean())
    else:
        values = _evaluate(loss_fn, torch.cat([theta[None], theta + eye], dim=0), batched)
        partial = (values[1:] - values[0]) / mu
        loss = float(values[0])
    grad = torch.zeros_like(theta)
    grad[idx.to(theta.device)] = partial.to(device=theta.device, dtype=theta.dtype)
    return GradientEstimate(grad=grad, loss=loss, num_evaluations=int(values.numel()), evaluations=values)


def estimate_gradient(
    method: Method, loss_fn: LossFn, theta: torch.Tensor, **kwargs: Any
) -> GradientEstimate:
    """Dispatch to :func:`rge_gradient`, :func:`spsa_gradient` or :func:`cge_gradient` by name."""
    table: dict[str, Callable[..., GradientEstimate]] = {
        "rge": rge_gradient,
        "spsa": spsa_gradient,
        "cge": cge_gradient,
    }
    if method not in table:
        raise InvalidParameterError(f"unknown method {method!r}; known: {sorted(table)}")
    return table[method](loss_fn, theta, **kwargs)


# ---------------------------------------------------------------------------- optimisation
class SPSAGains(BaseModel):
    """Spall's gain schedules with named fields: step ``a_k = a / (k + 1 + offset)^alpha`` and
    perturbation ``c_k = c / (k + 1)^gamma`` for step ``k = 0, 1, ...``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    a: float = Field(gt=0, description="step-size numerator")
    c: float = Field(gt=0, description="perturbation-size numerator")
    alpha: float = Field(default=0.602, ge=0, description="step-size decay exponent")
    gamma: float = Field(default=0.101, ge=0, description="perturbation decay exponent")
    offset: float = Field(default=0.0, ge=0, description="stability constant A added to k + 1")

    def lr(self, k: int) -> float:
        """Step size at step ``k``."""
        return self.a / (k + 1 + self.offset) ** self.alpha

    def mu(self, k: int) -> float:
        """Perturbation size at step ``k``."""
        return self.c / (k + 1) ** self.gamma


class ZOSGD:
    """SGD on a flat vector with optional momentum: ``m ← β·m + ĝ``; step ``ĝ + β·m`` (Nesterov, the
    SPSA-GC correction) or ``m`` (heavy ball); ``θ ← θ − lr_k · step``.

    ``lr`` is a constant or a schedule ``k -> lr`` (e.g. :meth:`SPSAGains.lr`). ``max_grad_norm`` clips
    the estimate before momentum. :meth:`state_dict` / :meth:`load_state_dict` make resumption exact.
    Works in θ's dtype (float32/float64 only).
    """

    def __init__(
        self,
        lr: float | Callable[[int], float],
        *,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
    ) -> None:
        if not callable(lr):
            _check_positive("lr", lr)
        if not (0.0 <= momentum < 1.0):
            raise InvalidParameterError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0.0:
            raise InvalidParameterError("nesterov=True needs momentum > 0")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise InvalidParameterError(f"weight_decay must be >= 0, got {weight_decay}")
        if max_grad_norm is not None:
            _check_positive("max_grad_norm", max_grad_norm)
        self.lr = lr
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.weight_decay = float(weight_decay)
        self.max_grad_norm = max_grad_norm
        self.step_count = 0
        self.buffer: torch.Tensor | None = None

    def current_lr(self) -> float:
        """Step size the next :meth:`step` will use."""
        lr = self.lr(self.step_count) if callable(self.lr) else self.lr
        return _check_positive("lr", lr)

    def step(self, theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Return the updated θ (a new tensor; ``theta`` is not modified)."""
        theta = _check_theta(theta)
        if not isinstance(grad, torch.Tensor) or grad.shape != theta.shape:
            raise InvalidInputError(f"grad must have shape {tuple(theta.shape)}")
        if grad.dtype in _HALF:
            raise PrecisionError(f"grad is {grad.dtype}; zeroth-order updates need float32/float64")
        g = grad.detach().to(device=theta.device, dtype=theta.dtype)
        if not torch.isfinite(g).all():
            raise InvalidInputError("grad contains non-finite values")
        if self.max_grad_norm is not None:
            n = float(g.norm())
            if n > self.max_grad_norm:
                g = g * (self.max_grad_norm / n)
        if self.weight_decay:
            g = g + self.weight_decay * theta
        lr = self.current_lr()
        if self.momentum:
            if self.buffer is None or self.buffer.shape != g.shape:
                self.buffer = torch.zeros_like(g)
            self.buffer = self.momentum * self.buffer.to(g) + g
            direction = g + self.momentum * self.buffer if self.nesterov else self.buffer
        else:
            direction = g
        self.step_count += 1
        return theta - lr * direction

    def state_dict(self) -> dict[str, Any]:
        """``{"step_count": int, "momentum_buffer": tensor | None}`` (tensors cloned)."""
        return {
            "step_count": self.step_count,
            "momentum_buffer": None if self.buffer is None else self.buffer.detach().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state written by :meth:`state_dict`."""
        try:
            step = int(state["step_count"])
            buf = state["momentum_buffer"]
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"invalid ZOSGD state: {exc!r}") from None
        if step < 0 or (buf is not None and not isinstance(buf, torch.Tensor)):
            raise InvalidInputError("invalid ZOSGD state: step_count < 0 or momentum_buffer is not a tensor")
        self.step_count = step
        self.buffer = None if buf is None else buf.detach().clone()


# ---------------------------------------------------------------------------- bridges
def module_loss(
    module: InputModule, evaluate: Callable[[InputModule], Any]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``loss_fn(theta)`` for the estimators: sets ``module``'s trainable parameters to ``theta``,
    runs ``evaluate(module)`` under ``torch.no_grad()``, restores the previous parameters and returns
    the loss as a float64 scalar. ``module`` is unchanged after every call."""

    def loss_fn(theta: torch.Tensor) -> torch.Tensor:
        saved = module.flat_parameters()
        module.set_flat_parameters(theta)
        try:
            with torch.no_grad():
                value = evaluate(module)
        finally:
            module.set_flat_parameters(saved)
        return _as_loss(value, "module_loss").reshape(()).to(torch.float64)

    return loss_fn


def inject_gradient(tensor: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Scalar ``Σ tensor · grad.detach()`` whose autograd gradient w.r.t. ``tensor`` is exactly ``grad``.

    The ZO-AE-DS bridge: estimate ``∂L/∂z`` by zeroth order at an intermediate ``z`` (e.g. the module
    output, or a low-dimensional latent), then ``inject_gradient(z, ĝ).backward()`` propagates it through
    the white-box part that produced ``z``, so a normal ``torch.optim`` optimizer can step.
    """
    if (
        not isinstance(tensor, torch.Tensor)
        or not isinstance(grad, torch.Tensor)
        or tensor.shape != grad.shape
    ):
        raise InvalidInputError("tensor and grad must be tensors of the same shape")
    if tensor.dtype in _HALF or grad.dtype in _HALF:
        raise PrecisionError("inject_gradient needs float32/float64 tensors")
    return (tensor * grad.detach().to(tensor)).sum()
