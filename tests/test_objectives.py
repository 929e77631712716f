"""Objective terms, the weighted Objective, and a toy MSE fit of the denoiser."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blackbox_rs.errors import ConfigError, InvalidInputError
from blackbox_rs.fitting.objectives import (
    TERM_NAMES,
    Objective,
    ObjectiveConfig,
    ObjectiveInputs,
    classification_loss,
    label_disagreement_loss,
    mse_loss,
    repeat_per_draw,
    score_cross_entropy_loss,
    stability_loss,
)
from blackbox_rs.modules import create_module


def test_mse_and_cross_entropy_terms() -> None:
    x = torch.zeros(2, 1, 2, 2)
    out = torch.ones(2, 1, 2, 2)
    assert float(mse_loss(out, x)) == pytest.approx(1.0)
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 0])
    expected = F.cross_entropy(logits, y)
    assert torch.equal(stability_loss(logits, y), expected)
    assert torch.equal(classification_loss(logits, y), expected)


def test_label_only_losses() -> None:
    pred = torch.tensor([0, 1, 1, 2])
    target = torch.tensor([0, 1, 2, 2])
    loss = label_disagreement_loss(pred, target)
    assert loss.dtype == torch.float32 and float(loss) == pytest.approx(0.25)
    probs = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    ce = score_cross_entropy_loss(probs, torch.tensor([0, 0]), eps=1e-4)
    assert float(ce) == pytest.approx((-math.log(0.5) - math.log(1e-4)) / 2)
    logits = torch.randn(3, 4)
    y = torch.tensor([1, 3, 0])
    assert torch.allclose(score_cross_entropy_loss(logits, y, kind="logits"), F.cross_entropy(logits, y))
    with pytest.raises(InvalidInputError, match="probabilities"):
        score_cross_entropy_loss(logits * 10, y)


def test_repeat_per_draw_is_image_major() -> None:
    assert repeat_per_draw(torch.tensor([4, 7]), 3).tolist() == [4, 4, 4, 7, 7, 7]
    with pytest.raises(InvalidInputError):
        repeat_per_draw(torch.tensor([1]), 0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: mse_loss(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 3)), "same shape"),
        (lambda: mse_loss(torch.full((1, 1, 2, 2), math.nan), torch.zeros(1, 1, 2, 2)), "non-finite"),
        (lambda: stability_loss(torch.zeros(2, 3), torch.tensor([0, 3])), "only 3 classes"),
        (lambda: stability_loss(torch.zeros(2, 3), torch.tensor([0.0, 1.0])), "integer"),
        (lambda: classification_loss(torch.zeros(2, 3), torch.tensor([0])), r"shape \(2,\)"),
        (lambda: label_disagreement_loss(torch.tensor([0, 1]), torch.tensor([0, -1])), "negative"),
        (lambda: label_disagreement_loss(torch.tensor([], dtype=torch.long), torch.tensor([])), "empty"),
    ],
)
def test_bad_inputs_are_typed_errors(call, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        call()


def test_objective_config_validation() -> None:
    with pytest.raises(ConfigError, match="unknown objective term.*stabilty"):
        Objective({"mse": 1.0, "stabilty": 0.5})
    with pytest.raises(ConfigError, match="finite and >= 0"):
        Objective({"mse": -1.0})
    with pytest.raises(ConfigError, match="finite and >= 0"):
        Objective({"mse": math.inf})
    with pytest.raises(ConfigError, match="at least one weight"):
        Objective({"mse": 0.0})
    with pytest.raises(ConfigError, match="zo_target"):
        Objective({"weights": {"mse": 1.0}, "zo_target": "truth"})
    with pytest.raises(ConfigError, match="extra"):
        Objective({"weights": {"mse": 1.0}, "extra_key": 1})


def test_objective_declares_its_needs() -> None:
    mse = Objective({"mse": 1.0, "stability": 0.0})
    assert mse.terms == ("mse",) and mse.required_inputs == {"outputs", "clean"}
    assert mse.differentiable and not mse.needs_queries and not mse.needs_logits and not mse.needs_labels
    mixed = Objective({"mse": 1.0, "stability": 0.5})
    assert mixed.needs_logits and not mixed.needs_labels
    zo = Objective(ObjectiveConfig(weights={"label_disagreement": 1.0}, zo_target="label"))
    assert zo.needs_queries and not zo.differentiable and zo.required_inputs == {"query_labels", "labels"}
    assert set(TERM_NAMES) == {"mse", "stability", "classification", "label_disagreement", "score_ce"}


def test_objective_weighted_sum_and_missing_inputs() -> None:
    torch.manual_seed(0)
    outputs = torch.rand(4, 1, 3, 3, requires_grad=True)
    clean = torch.rand(4, 1, 3, 3)
    logits = torch.randn(4, 5, requires_grad=True)
    pred = torch.tensor([0, 1, 2, 3])
    obj = Objective({"mse": 1.0, "stability": 0.5})
    res = obj(outputs=outputs, clean=clean, logits=logits, clean_predictions=pred)
    expected = mse_loss(outputs, clean) + 0.5 * stability_loss(logits, pred)
    assert torch.allclose(res.total, expected)
    assert set(res.terms) == {"mse", "stability"} and set(res.as_floats()) == {"total", "mse", "stability"}
    res.total.backward()
    assert outputs.grad is not None and logits.grad is not None
    with pytest.raises(InvalidInputError, match="clean_predictions"):
        obj(ObjectiveInputs(outputs=outputs, clean=clean, logits=logits))
    with pytest.raises(InvalidInputError, match="unknown objective input"):
        obj(output=outputs)


def test_zero_order_objective_from_black_box_answers() -> None:
    obj = Objective({"label_disagreement": 1.0, "score_ce": 2.0})
    pred = torch.tensor([1, 1, 0, 0])
    scores = torch.tensor([[0.2, 0.8], [0.4, 0.6], [0.9, 0.1], [0.5, 0.5]])
    clean_pred = repeat_per_draw(torch.tensor([1, 0]), 2)
    res = obj(query_labels=pred, query_scores=scores, clean_predictions=clean_pred)
    assert float(res.terms["label_disagreement"]) == 0.0
    ce = -(math.log(0.8) + math.log(0.6) + math.log(0.9) + math.log(0.5)) / 4
    assert float(res.total) == pytest.approx(2 * ce, rel=1e-6)
    assert res.total.dtype == torch.float32 and not res.total.requires_grad


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
    objective = Objective({"mse": 1.0})

    def test_mse() -> float:
        with torch.no_grad():
            return float(objective(outputs=module(test_noisy), clean=test).total)

    identity_mse = test_mse()
    assert identity_mse == pytest.approx(sigma**2, rel=0.1)
    opt = torch.optim.Adam(module.trainable_parameters(), lr=3e-3)
    for _ in range(250):
        idx = torch.randint(0, train.shape[0], (32,), generator=g)
        clean = train[idx]
        noisy = clean + sigma * torch.randn(clean.shape, generator=g)
        loss = objective(outputs=module(noisy), clean=clean).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    fitted_mse = test_mse()
    assert fitted_mse < 0.3 * identity_mse, (identity_mse, fitted_mse)
