"""Zeroth-order (query-only) gradient estimation on a flat parameter vector, and its optimiser.

The estimator sees the objective only through a callback ``loss_fn(theta) -> scalar float tensor``
(or, with ``batched=True``, ``loss_fn(thetas: P×d) -> P``), so the caller decides how the black box
is queried (batching, budget, cache: the QueryEngine). Each estimate reports how many loss
evaluations it made.

:func:`rge_gradient`: random-direction estimate averaged over ``q`` directions ``u`` drawn with
``E[u uᵀ] = I`` (:func:`sample_directions`), smoothing radius ``mu``. Two-sided:
``ĝ = 1/q Σ (L(θ+μu) − L(θ−μu)) / (2μ) · u`` (``2q`` evaluations; exact directional derivatives for
quadratics). One-sided: ``ĝ = 1/q Σ (L(θ+μu) − L(θ)) / μ · u`` (``q + 1``). Rows of the perturbed
batch are perturbation-major (``+u_1..+u_q, −u_1..−u_q``); they carry no noise draws (those are laid
out by :mod:`blackbox_rs.fitting.draws`).

:class:`ZOSGD`: SGD with heavy-ball or Nesterov momentum (SPSA-GC style) and a checkpointable state.

Precision: finite differences of a loss fall below half-precision resolution and silently turn into
noise (BlackVIP's mixed-precision bug). ``theta`` must be float32 or float64, the loss values must be
float32/float64, and the callback runs with autocast disabled; a float16/bfloat16 ``theta`` or loss
raises :class:`~blackbox_rs.errors.PrecisionError`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from blackbox_rs.errors import InvalidInputError, InvalidParameterError, PrecisionError

__all__ = [
    "ZOSGD",
    "DirectionSampler",
    "Distribution",
    "GradientEstimate",
    "rge_gradient",
    "sample_directions",
]

Distribution = Literal["gaussian", "rademacher", "sphere"]
#: ``sampler(q, d, generator) -> q×d float tensor`` with ``E[u uᵀ] = I``.
DirectionSampler = Callable[[int, int, torch.Generator], torch.Tensor]
LossFn = Callable[[torch.Tensor], Any]

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
    ``num_evaluations``: loss_fn evaluations spent (``2q`` two-sided, ``q + 1`` one-sided; each
    costs what one ``loss_fn`` row costs). ``evaluations``: every loss value, in evaluation order (float64).
    """

    grad: torch.Tensor
    loss: float
    num_evaluations: int
    evaluations: torch.Tensor


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
    and, for a quadratic, unbiased for the true gradient. Costs ``2q`` evaluations two-sided,
    ``q + 1`` one-sided. ``theta`` is not modified.
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


# ---------------------------------------------------------------------------- optimisation
class ZOSGD:
    """SGD on a flat vector with optional momentum: ``m ← β·m + ĝ``; step ``ĝ + β·m`` (Nesterov, the
    SPSA-GC correction) or ``m`` (heavy ball); ``θ ← θ − lr_k · step``.

    ``lr`` is a constant or a schedule ``k -> lr`` (e.g. Spall's ``a / (k + 1 + A)^0.602``).
    ``max_grad_norm`` clips the estimate before momentum. :meth:`state_dict` / :meth:`load_state_dict` make resumption exact.
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
