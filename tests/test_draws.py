"""The one row layout of noise draws (image-major): expansion, fold, round trip, and the trap it avoids."""

from __future__ import annotations

import pytest
import torch

from blackbox_rs.errors import InvalidInputError, InvalidParameterError
from blackbox_rs.fitting.draws import per_image, repeat_draws


def test_repeat_draws_is_image_major() -> None:
    assert repeat_draws(torch.tensor([4, 7]), 3).tolist() == [4, 4, 4, 7, 7, 7]
    x = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).view(2, 1, 2, 2)
    r = repeat_draws(x, 3)
    assert r.shape == (6, 1, 2, 2) and r.dtype == x.dtype
    for row in range(6):
        assert torch.equal(r[row], x[row // 3])  # row i * draws + j is image i


def test_per_image_folds_rows_of_one_image_together() -> None:
    values = torch.arange(6)
    assert per_image(values, 2, 3).tolist() == [[0, 1, 2], [3, 4, 5]]
    scores = torch.arange(12.0).view(6, 2)
    folded = per_image(scores, 3, 2)
    assert folded.shape == (3, 2, 2) and torch.equal(folded[1, 0], scores[2])


def test_round_trip_pairs_every_draw_with_its_image() -> None:
    n, draws = 4, 5
    images = torch.rand(n, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 1, 4, 1])
    rows = repeat_draws(images, draws)
    # a row-wise "model": the image's mean, so each folded row must be constant and equal image i's mean
    folded = per_image(rows.mean(dim=(1, 2, 3)), n, draws)
    assert torch.equal(folded, images.mean(dim=(1, 2, 3))[:, None].expand(n, draws))
    assert torch.equal(per_image(repeat_draws(labels, draws), n, draws), labels[:, None].expand(n, draws))
    assert torch.equal(per_image(repeat_draws(images, draws), n, draws)[2, 4], images[2])


def test_a_draw_major_expansion_does_not_fold_back() -> None:
    """The trap: ``Tensor.repeat`` has the same shape but another layout; the fold exposes it."""
    labels = torch.tensor([3, 1, 4])
    draw_major = labels.repeat(2)
    assert draw_major.shape == repeat_draws(labels, 2).shape
    assert not torch.equal(draw_major, repeat_draws(labels, 2))
    assert not torch.equal(per_image(draw_major, 3, 2), labels[:, None].expand(3, 2))


def test_draws_of_one_and_empty_batches() -> None:
    x = torch.rand(3, 2)
    assert torch.equal(repeat_draws(x, 1), x)
    assert per_image(torch.empty(0), 0, 4).shape == (0, 4)
    assert per_image(x[:, 0], 3, 1).shape == (3, 1)


def test_bad_arguments_are_typed_errors() -> None:
    with pytest.raises(InvalidParameterError, match="draws"):
        repeat_draws(torch.tensor([1]), 0)
    with pytest.raises(InvalidParameterError, match="draws"):
        repeat_draws(torch.tensor([1]), True)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="torch.Tensor"):
        repeat_draws([1, 2], 2)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="0-d"):
        repeat_draws(torch.tensor(1), 2)
    with pytest.raises(InvalidInputError, match=r"expected n \* draws = 2 \* 3 = 6"):
        per_image(torch.arange(5), 2, 3)
    with pytest.raises(InvalidParameterError, match="n must"):
        per_image(torch.arange(6), -2, -3)
