"""Which module state a query-paid fit keeps: the *robustness score* of a scoring round.

Certified accuracy at radius ``r`` counts the images whose smoothed top-class probability ``p`` is
high enough (``p >= Phi(r / sigma)`` after the confidence bound), so what matters is the per-image
*distribution* of agreement over noise, not its mean: a fit that lifts hard images from 40 % to 60 %
agreement while lowering easy ones from 100 % to 85 % raises mean agreement and lowers certified
accuracy at every radius that matters. The score therefore draws ``draws`` noise samples per image
and averages a clipped radius estimate (in units of sigma)::

    score = mean_i max(0, Phi^-1((c_i + 1/2) / (draws + 1)))

where ``c_i`` counts the draws on which the black box answered the image's stability target (its
own clean label). ``(c + 1/2) / (m + 1)`` is the posterior mean of ``p`` under the Jeffreys prior,
so an image that agreed on every draw scores a finite ``Phi^-1(1 - 1/(2m + 2))``. The score is a
*selection heuristic*, not a certificate: nothing is certified from it.

A scoring round always uses the same images and the same noise (derived from the fit seed, not the
step), so successive rounds compare module states on common random numbers: the difference of two
scores has far less variance than either score.

A multi-sigma fit must not buy one noise level with another, so its rounds are compared by
:func:`worst_gain`: the smallest, over the listed sigmas, of the per-sigma score's gain over the
first round of the strategy's own steps (the MSE-pretrained module, gain 0). A later state replaces
the pretrained module only if it is better at *every* sigma, and among those the one whose worst
sigma gained most is kept. (On Fashion-MNIST the mean over sigmas kept a state that gained at 0.25
and certified 3.6 points less than the pretrained module at sigma = 0.5, r = 0.5; the minimum of the
raw per-sigma scores would ignore the smaller sigma, whose scores in units of sigma are always higher.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from scipy.special import ndtri

from blackbox_rs.errors import InvalidParameterError
from blackbox_rs.fitting.draws import per_image, repeat_draws

if TYPE_CHECKING:
    from blackbox_rs.fitting.context import FitContext

__all__ = ["ScoreRound", "radius_scores", "score_round", "worst_gain"]


def radius_scores(correct: torch.Tensor, draws: int) -> torch.Tensor:
    """Per-image clipped radius estimates ``max(0, Phi^-1((c + 1/2) / (draws + 1)))`` (units of sigma)
    from the counts ``correct`` (integers in ``[0, draws]``)."""
    if draws < 1:
        raise InvalidParameterError(f"draws must be >= 1, got {draws}")
    c = torch.as_tensor(correct).to(torch.float64)
    if c.numel() and (bool((c < 0).any()) or bool((c > draws).any())):
        raise InvalidParameterError(f"counts must lie in [0, {draws}]")
    p = ((c + 0.5) / (draws + 1)).numpy()
    return torch.from_numpy(ndtri(p)).clamp_min(0.0)


def worst_gain(by_sigma: dict[float, float], baseline: dict[float, float]) -> float:
    """``min over sigma of by_sigma[sigma] - baseline[sigma]``: the selection score of a multi-sigma
    round against the baseline round (both scored on the same images and noise)."""
    if not by_sigma or set(by_sigma) != set(baseline):
        raise InvalidParameterError(
            f"a round scored at sigmas {sorted(by_sigma)} cannot be compared with a baseline at {sorted(baseline)}"
        )
    return min(by_sigma[sg] - baseline[sg] for sg in by_sigma)


class ScoreRound:
    """The outcome of one scoring round: the module's outputs, the black box's labels, the score."""

    def __init__(self, outputs: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, draws: int,
                 sigmas: list[float]) -> None:
        self.outputs, self.labels, self.targets, self.draws = outputs, labels, targets, draws
        correct = per_image(labels == targets, labels.shape[0] // draws, draws).sum(1)
        self.per_image = radius_scores(correct, draws)
        self.score = float(self.per_image.mean())
        self.agreement = float((labels == targets).float().mean())
        #: mean score of the images scored at each sigma (image i at sigmas[i % len(sigmas)]; keys exact)
        n = len(sigmas)
        self.by_sigma = {float(sg): float(self.per_image[lv::n].mean()) for lv, sg in enumerate(sigmas[: len(self.per_image)])}


def score_round(ctx: FitContext) -> ScoreRound:
    """Query the black box on the module's outputs for the fixed scoring set: ``score_images`` images
    of the labelled subset, ``score_draws`` noise draws each, image ``i`` at ``sigmas[i % len(sigmas)]``
    (never clean). Costs ``score_images * score_draws`` queries (fewer if the subset is smaller)."""
    cfg = ctx.config
    g = ctx.generator(-1, "score-set")
    perm = ctx.subset[torch.randperm(len(ctx.subset), generator=g)]
    idx = perm[: cfg.score_images]
    m, draws = len(idx), cfg.score_draws
    clean = repeat_draws(ctx.data.x[idx], draws)
    sig = repeat_draws(torch.tensor(ctx.sigmas, dtype=torch.float32)[torch.arange(m) % len(ctx.sigmas)], draws)
    z = torch.randn(clean.shape, generator=ctx.generator(-1, "score-noise"))
    noisy = clean + sig.view(-1, 1, 1, 1) * z
    out = ctx.module_outputs(noisy)
    labels = ctx.query(out)
    return ScoreRound(out, labels, repeat_draws(ctx.targets(idx), draws), draws, list(ctx.sigmas))
