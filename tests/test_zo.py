"""Zeroth-order estimators: unbiasedness on quadratics, query accounting, precision guard, optimisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blackbox_rs.errors import InvalidInputError, InvalidParameterError, PrecisionError
from blackbox_rs.fitting.zo import (
    ZOSGD,
    SPSAGains,
    cge_gradient,
    estimate_gradient,
    inject_gradient,
    module_loss,
    queries_per_step,
    rge_gradient,
    sample_directions,
    spsa_gradient,
)
from blackbox_rs.modules import create_module

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
    assert est.num_evaluations == queries_per_step("rge", q=2000, two_sided=two_sided)
    assert est.loss == pytest.approx(float(loss(theta)), rel=1e-3, abs=1e-3)


def test_spsa_mean_of_small_estimates_is_unbiased() -> None:
    """Average of many q=5 SPSA estimates (BlackVIP's setting) converges to the gradient."""
    loss, grad = _quadratic()
    theta = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(4)
    ests = [spsa_gradient(loss, theta, q=5, c=1e-3, generator=gen, batched=True).grad for _ in range(200)]
    mean = torch.stack(ests).mean(0)
    assert _cos(mean, grad(theta)) > 0.95
    single = _cos(ests[0], grad(theta))
    assert single < _cos(mean, grad(theta))  # averaging helps: a single estimate is noisy


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


def test_cge_is_exact_on_quadratic_and_blocks_are_sparse() -> None:
    loss, grad = _quadratic()
    theta = torch.randn(D, dtype=torch.float64)
    full = cge_gradient(loss, theta, mu=1e-4, batched=True)
    assert torch.allclose(full.grad, grad(theta), atol=1e-6)
    assert full.num_evaluations == queries_per_step("cge", dim=D) == 2 * D
    block = cge_gradient(loss, theta, mu=1e-4, coordinates=5, generator=torch.Generator().manual_seed(0))
    nz = block.grad.nonzero().flatten()
    assert nz.numel() == 5 and torch.allclose(block.grad[nz], grad(theta)[nz], atol=1e-6)
    assert block.num_evaluations == queries_per_step("cge", dim=D, num_coordinates=5) == 10
    one_sided = cge_gradient(loss, theta, mu=1e-6, coordinates=torch.tensor([0, 3]), two_sided=False)
    assert one_sided.num_evaluations == queries_per_step("cge", num_coordinates=2, two_sided=False) == 3
    assert torch.allclose(one_sided.grad[[0, 3]], grad(theta)[[0, 3]], atol=1e-4)


def test_queries_per_step_accounting() -> None:
    assert queries_per_step("spsa", q=5, queries_per_evaluation=128) == 1280  # BlackVIP: 10 passes × 128
    assert queries_per_step("rge", q=4, two_sided=False, queries_per_evaluation=3) == 15
    assert queries_per_step("cge", dim=192) == 384  # ZO-AE-DS CGE at d = 192
    with pytest.raises(InvalidParameterError, match="q"):
        queries_per_step("rge", q=0)
    with pytest.raises(InvalidParameterError, match="dim"):
        queries_per_step("cge")
    with pytest.raises(InvalidParameterError, match="exceeds"):
        queries_per_step("cge", dim=3, num_coordinates=4)
    with pytest.raises(InvalidParameterError, match="unknown method"):
        queries_per_step("nes")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="two-sided"):
        queries_per_step("spsa", two_sided=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused(dtype: torch.dtype) -> None:
    loss, _ = _quadratic()
    with pytest.raises(PrecisionError, match="float32"):
        rge_gradient(loss, torch.zeros(D, dtype=dtype))
    with pytest.raises(PrecisionError):
        cge_gradient(loss, torch.zeros(D, dtype=dtype))
    with pytest.raises(PrecisionError, match="loss_fn returned"):
        spsa_gradient(lambda t: loss(t).to(dtype), torch.zeros(D))
    with pytest.raises(PrecisionError):
        ZOSGD(lr=0.1).step(torch.zeros(D), torch.zeros(D, dtype=dtype))
    with pytest.raises(PrecisionError):
        inject_gradient(torch.zeros(3, dtype=dtype), torch.zeros(3, dtype=dtype))


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
    with pytest.raises(InvalidParameterError, match="exceeds"):
        cge_gradient(loss, theta, coordinates=D + 1)
    with pytest.raises(InvalidInputError, match="distinct"):
        cge_gradient(loss, theta, coordinates=torch.tensor([1, 1]))
    with pytest.raises(InvalidParameterError, match="unknown method"):
        estimate_gradient("nes", loss, theta)  # type: ignore[arg-type]


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
    a = estimate_gradient("rge", loss, torch.ones(D), q=3, generator=torch.Generator().manual_seed(9))
    b = estimate_gradient("rge", loss, torch.ones(D), q=3, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a.grad, b.grad)


def test_spsa_with_nesterov_momentum_minimises_a_quadratic() -> None:
    loss, grad = _quadratic(d=50, seed=5)
    theta = torch.zeros(50)
    start = float(loss(theta))
    opt_value = float(loss(-torch.linalg.solve(*_quadratic_parts(50, 5))))
    gen = torch.Generator().manual_seed(0)
    opt = ZOSGD(lr=0.005, momentum=0.9, nesterov=True)  # ZO variance ~ d/q: lr well below 1/L
    for _ in range(300):
        est = spsa_gradient(lambda ts: loss(ts).float(), theta, q=4, c=1e-2, generator=gen, batched=True)
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

    loss_fn = module_loss(module, lambda m: ((m(x) - target) ** 2).mean())
    theta = module.flat_parameters()
    before = float(loss_fn(theta))
    assert torch.equal(module.flat_parameters(), theta)  # module_loss restores parameters
    opt = ZOSGD(lr=SPSAGains(a=2.0, c=0.05).lr, momentum=0.5)
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
            theta = opt.step(theta, spsa_gradient(loss, theta, q=2, generator=gen, batched=True).grad)
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


def test_spsa_gains_are_named_and_decay() -> None:
    gains = SPSAGains(a=1.0, c=0.1, offset=9)
    assert gains.lr(0) == pytest.approx(1.0 / 10**0.602)
    assert gains.mu(0) == pytest.approx(0.1) and gains.mu(10) < gains.mu(0)
    with pytest.raises(ValueError):
        SPSAGains(a=1.0, c=0.1, gama=0.1)  # type: ignore[call-arg]


def test_inject_gradient_feeds_an_estimate_into_autograd() -> None:
    w = torch.randn(3, requires_grad=True)
    z = w * 2.0
    g = torch.tensor([1.0, -2.0, 0.5])
    inject_gradient(z, g).backward()
    assert torch.allclose(w.grad, 2.0 * g)  # type: ignore[arg-type]
