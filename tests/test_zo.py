"""Zeroth-order estimator: unbiasedness on quadratics, evaluation counts, precision guard, optimisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blackbox_rs.errors import InvalidInputError, InvalidParameterError, PrecisionError
from blackbox_rs.fitting.zo import ZOSGD, rge_gradient, sample_directions
from blackbox_rs.modules import create_module
from blackbox_rs.modules.base import InputModule

D = 20


def _quadratic(d: int = D, seed: int = 0, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=dtype)
    a = m @ m.T / d + torch.eye(d, dtype=dtype)
    b = torch.randn(d, generator=g, dtype=dtype)

    def loss(theta: torch.Tensor) -> torch.Tensor:
        """Works on one θ (d,) or a batch (P, d)."""
        t = theta.to(dtype)
        return 0.5 * (t @ a * t).sum(-1) + t @ b

    def grad(theta: torch.Tensor) -> torch.Tensor:
        return a @ theta.to(dtype) + b

    return loss, grad


def _cos(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(F.cosine_similarity(u.double(), v.double(), dim=0))


def _spsa(loss_fn, theta: torch.Tensor, *, q: int, c: float = 1e-2, generator: torch.Generator):
    """Two-sided SPSA with Rademacher perturbations = RGE with ``distribution="rademacher"``."""
    return rge_gradient(
        loss_fn, theta, q=q, mu=c, distribution="rademacher", two_sided=True, generator=generator, batched=True
    )


def _module_loss(module: InputModule, evaluate):
    """``loss_fn(theta)``: ``evaluate(module)`` at parameters ``theta``, the module's parameters restored."""

    def loss_fn(theta: torch.Tensor) -> torch.Tensor:
        saved = module.flat_parameters()
        module.set_flat_parameters(theta)
        try:
            with torch.no_grad():
                value = evaluate(module)
        finally:
            module.set_flat_parameters(saved)
        return value.reshape(()).to(torch.float64)

    return loss_fn


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher", "sphere"])
@pytest.mark.parametrize("two_sided", [True, False])
def test_rge_matches_true_gradient_on_quadratic(distribution: str, two_sided: bool) -> None:
    loss, grad = _quadratic()
    theta = torch.randn(D, generator=torch.Generator().manual_seed(1))
    est = rge_gradient(
        loss,
        theta,
        q=2000,
        mu=1e-3,
        distribution=distribution,  # type: ignore[arg-type]
        two_sided=two_sided,
        generator=torch.Generator().manual_seed(2),
        batched=True,
    )
    assert _cos(est.grad, grad(theta)) > 0.9
    assert est.grad.dtype == theta.dtype and est.grad.shape == theta.shape
    assert est.num_evaluations == (2 * 2000 if two_sided else 2000 + 1)
    assert est.loss == pytest.approx(float(loss(theta)), rel=1e-3, abs=1e-3)


def test_batched_and_unbatched_callbacks_agree() -> None:
    loss, _ = _quadratic()
    theta = torch.randn(D)
    calls: list[int] = []

    def one(t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return loss(t).float()

    a = rge_gradient(one, theta, q=7, generator=torch.Generator().manual_seed(0))
    b = rge_gradient(
        lambda ts: loss(ts).float(), theta, q=7, generator=torch.Generator().manual_seed(0), batched=True
    )
    assert len(calls) == 14 == a.num_evaluations == b.num_evaluations
    assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused(dtype: torch.dtype) -> None:
    loss, _ = _quadratic()
    with pytest.raises(PrecisionError, match="float32"):
        rge_gradient(loss, torch.zeros(D, dtype=dtype))
    with pytest.raises(PrecisionError, match="loss_fn returned"):
        rge_gradient(lambda t: loss(t).to(dtype), torch.zeros(D))
    with pytest.raises(PrecisionError):
        ZOSGD(lr=0.1).step(torch.zeros(D), torch.zeros(D, dtype=dtype))


def test_loss_runs_without_autocast_even_inside_autocast() -> None:
    seen: list[bool] = []

    def loss(t: torch.Tensor) -> torch.Tensor:
        seen.append(torch.is_autocast_enabled("cpu"))
        return (t.float() ** 2).sum()

    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        rge_gradient(loss, torch.ones(4), q=2)
    assert seen == [False] * 4


def test_bad_arguments_are_typed_errors() -> None:
    loss, _ = _quadratic()
    theta = torch.zeros(D)
    with pytest.raises(InvalidParameterError, match="mu"):
        rge_gradient(loss, theta, mu=0.0)
    with pytest.raises(InvalidParameterError, match="q"):
        rge_gradient(loss, theta, q=0)
    with pytest.raises(InvalidParameterError, match="distribution"):
        rge_gradient(loss, theta, distribution="cauchy")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="1-D"):
        rge_gradient(loss, torch.zeros(2, 3))
    with pytest.raises(InvalidInputError, match="float32 or float64"):
        rge_gradient(loss, torch.zeros(D, dtype=torch.int64))
    with pytest.raises(InvalidInputError, match="non-finite"):
        rge_gradient(lambda t: torch.tensor(float("nan")), theta)
    with pytest.raises(InvalidInputError, match="losses"):
        rge_gradient(lambda ts: torch.zeros(3), theta, q=2, batched=True)


def test_pluggable_distribution_and_reproducibility() -> None:
    def ones(q: int, d: int, g: torch.Generator) -> torch.Tensor:
        return torch.ones(q, d)

    u = sample_directions(ones, 3, 4)
    assert torch.equal(u, torch.ones(3, 4)) and u.dtype == torch.float32
    with pytest.raises(InvalidInputError, match="3x4"):
        sample_directions(lambda q, d, g: torch.ones(d, q), 3, 4)
    r = sample_directions("rademacher", 50, 30, generator=torch.Generator().manual_seed(0))
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    s = sample_directions("sphere", 5, 30, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(s.norm(dim=1), torch.full((5,), 30**0.5))
    loss, _ = _quadratic()
    a = rge_gradient(loss, torch.ones(D), q=3, generator=torch.Generator().manual_seed(9))
    b = rge_gradient(loss, torch.ones(D), q=3, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a.grad, b.grad)


def test_spsa_with_nesterov_momentum_minimises_a_quadratic() -> None:
    loss, grad = _quadratic(d=50, seed=5)
    theta = torch.zeros(50)
    start = float(loss(theta))
    opt_value = float(loss(-torch.linalg.solve(*_quadratic_parts(50, 5))))
    gen = torch.Generator().manual_seed(0)
    opt = ZOSGD(lr=0.005, momentum=0.9, nesterov=True)  # ZO variance ~ d/q: lr well below 1/L
    for _ in range(300):
        est = _spsa(lambda ts: loss(ts).float(), theta, q=4, c=1e-2, generator=gen)
        theta = opt.step(theta, est.grad)
    final = float(loss(theta))
    assert final - opt_value < 0.01 * (start - opt_value), (start, final, opt_value)
    assert opt.step_count == 300


def _quadratic_parts(d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    a = m @ m.T / d + torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    return a, b


def test_zo_fits_a_prompt_module_through_a_loss_callback() -> None:
    """End to end on a module: RGE + momentum moves a full-frame prompt towards a target shift."""
    torch.manual_seed(0)
    module = create_module("prompt_full", input_shape=(1, 4, 4))
    x = torch.rand(8, 1, 4, 4)
    target = x + 0.3

    loss_fn = _module_loss(module, lambda m: ((m(x) - target) ** 2).mean())
    theta = module.flat_parameters()
    before = float(loss_fn(theta))
    assert torch.equal(module.flat_parameters(), theta)  # the loss callback restores parameters
    opt = ZOSGD(lr=lambda k: 2.0 / (k + 1) ** 0.602, momentum=0.5)  # Spall's a / (k + 1)^alpha
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        theta = opt.step(theta, rge_gradient(loss_fn, theta, q=4, mu=0.05, generator=gen).grad)
    module.set_flat_parameters(theta)
    after = float(loss_fn(theta))
    assert after < 0.1 * before, (before, after)


def test_zosgd_state_round_trip_resumes_exactly() -> None:
    loss, _ = _quadratic()

    def run(opt: ZOSGD, theta: torch.Tensor, seed: int, steps: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            theta = opt.step(theta, _spsa(loss, theta, q=2, generator=gen).grad)
        return theta

    opt = ZOSGD(lr=0.01, momentum=0.9, nesterov=True, max_grad_norm=10.0)
    mid = run(opt, torch.zeros(D), 0, 5)
    state = opt.state_dict()
    end_a = run(opt, mid, 1, 5)
    opt_b = ZOSGD(lr=0.01, momentum=0.9, nesterov=True, max_grad_norm=10.0)
    opt_b.load_state_dict(state)
    end_b = run(opt_b, mid, 1, 5)
    assert torch.equal(end_a, end_b)
    with pytest.raises(InvalidParameterError, match="nesterov"):
        ZOSGD(lr=0.1, nesterov=True)
    with pytest.raises(InvalidParameterError, match="momentum"):
        ZOSGD(lr=0.1, momentum=1.0)
    with pytest.raises(InvalidInputError, match="state"):
        opt_b.load_state_dict({})
