"""The MSE objective term and a toy MSE fit of the denoiser."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blackbox_rs.errors import InvalidInputError
from blackbox_rs.fitting.objectives import mse_loss
from blackbox_rs.modules import create_module


def test_mse_term() -> None:
    x = torch.zeros(2, 1, 2, 2)
    out = torch.ones(2, 1, 2, 2)
    assert float(mse_loss(out, x)) == pytest.approx(1.0)
    outputs, clean = torch.rand(3, 1, 2, 2), torch.rand(3, 1, 2, 2)
    assert torch.equal(mse_loss(outputs, clean), F.mse_loss(outputs, clean))
    assert mse_loss(outputs.double(), clean).dtype == torch.float64


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: mse_loss(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 3)), "same shape"),
        (lambda: mse_loss(torch.full((1, 1, 2, 2), math.nan), torch.zeros(1, 1, 2, 2)), "non-finite"),
        (lambda: mse_loss(torch.zeros(0, 1, 2, 2), torch.zeros(0, 1, 2, 2)), "empty"),
        (lambda: mse_loss(torch.zeros(2, 2), torch.zeros(2, 2)), "4 dims"),
        (lambda: mse_loss(torch.zeros(1, 1, 2, 2, dtype=torch.long), torch.zeros(1, 1, 2, 2)), "floating point"),
    ],
)
def test_bad_inputs_are_typed_errors(call, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        call()


# ---------------------------------------------------------------------------- toy fit
def _toy_images(n: int, g: torch.Generator) -> torch.Tensor:
    """Piecewise-constant 1×16×16 images: a random rectangle of one grey level on another."""
    imgs = torch.empty(n, 1, 16, 16)
    bg = torch.rand(n, generator=g) * 0.4
    fg = 0.6 + torch.rand(n, generator=g) * 0.4
    for i in range(n):
        imgs[i] = bg[i]
        r0, c0 = torch.randint(0, 8, (2,), generator=g).tolist()
        h, w = torch.randint(4, 9, (2,), generator=g).tolist()
        imgs[i, :, r0 : r0 + h, c0 : c0 + w] = fg[i]
    return imgs


def test_fitting_the_denoiser_with_mse_beats_the_identity() -> None:
    """A few hundred Adam steps on the MSE objective must clearly beat the identity (= σ²)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: one thread is fastest and robust to a busy machine
    try:
        _fit_and_check()
    finally:
        torch.set_num_threads(threads)


def _fit_and_check() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    sigma = 0.25
    train = _toy_images(256, g)
    test = _toy_images(64, g)
    test_noisy = test + sigma * torch.randn(test.shape, generator=g)
    module = create_module("dncnn", input_shape=(1, 16, 16), depth=4, width=16)

    def test_mse() -> float:
        with torch.no_grad():
            return float(mse_loss(module(test_noisy), test))

    identity_mse = test_mse()
    assert identity_mse == pytest.approx(sigma**2, rel=0.1)
    opt = torch.optim.Adam(module.trainable_parameters(), lr=3e-3)
    for _ in range(250):
        idx = torch.randint(0, train.shape[0], (32,), generator=g)
        clean = train[idx]
        noisy = clean + sigma * torch.randn(clean.shape, generator=g)
        loss = mse_loss(module(noisy), clean)
        opt.zero_grad()
        loss.backward()
        opt.step()
    fitted_mse = test_mse()
    assert fitted_mse < 0.3 * identity_mse, (identity_mse, fitted_mse)
