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

Whether a round *gained* at all is a separate question, asked by :func:`gain_test`: a one-sided paired
t-test on the per-image score differences between the round and a reference round (same images, same
noise; the fit driver uses the best round as of the last significant gain), so a fit can stop paying
when its steps stop helping (``patience``, ``gain_alpha`` of
:class:`~blackbox_rs.fitting.config.StrategyConfig`). A multi-sigma round gains only if it gains at
every sigma (the worst sigma's test decides, as in :func:`worst_gain`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from scipy.special import ndtri
from scipy.stats import t as student_t

from blackbox_rs.errors import InvalidParameterError
from blackbox_rs.fitting.draws import per_image, repeat_draws

if TYPE_CHECKING:
    from blackbox_rs.fitting.context import FitContext

__all__ = ["GainTest", "ScoreRound", "gain_test", "paired_t_pvalue", "radius_scores", "score_round", "worst_gain"]


def radius_scores(correct: torch.Tensor, draws: int) -> torch.Tensor:
    """Per-image clipped radius estimates ``max(0, Phi^-1((c + 1/2) / (draws + 1)))`` (units of sigma)
    from the counts ``correct`` (integers in ``[0, draws]``, on any device), on the CPU."""
    if draws < 1:
        raise InvalidParameterError(f"draws must be >= 1, got {draws}")
    c = torch.as_tensor(correct).to("cpu", torch.float64)
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


def paired_t_pvalue(diff: torch.Tensor) -> float:
    """One-sided p-value of the paired t-test of ``mean(diff) > 0`` (``diff``: per-pair differences
    ``a_i - b_i``), ``P(T_{n-1} >= mean / (sd / sqrt(n)))`` with ``sd`` the sample standard deviation;
    equal to ``scipy.stats.ttest_rel(a, b, alternative="greater").pvalue`` wherever scipy defines it.

    Where scipy returns NaN or a division by zero the result is defined so that no change is never a
    gain: differences that are all zero (``|d| <= 1e-12``: the same counts) give 1.0; equal non-zero
    differences give 0.0 if they are positive, else 1.0; a single pair gives its sign test, 0.5 if
    positive, else 1.0 (never significant at a level below 0.5)."""
    d = torch.as_tensor(diff, dtype=torch.float64).flatten()
    d = torch.where(d.abs() <= 1e-12, torch.zeros_like(d), d)
    n = d.numel()
    if n == 0 or not bool(d.ne(0).any()):
        return 1.0
    mean = float(d.mean())
    if n == 1:
        return 0.5 if mean > 0 else 1.0
    sd = float(d.std(correction=1))
    if sd <= 1e-12 * max(1.0, abs(mean)):
        return 0.0 if mean > 0 else 1.0
    return float(student_t.sf(mean / (sd / n ** 0.5), n - 1))


class GainTest(NamedTuple):
    """The outcome of :func:`gain_test`: the p-value that decides and the worst per-sigma mean gain."""

    p_value: float  #: the largest per-sigma one-sided p-value (the worst sigma's test)
    gain: float  #: the smallest per-sigma mean per-image score difference (round minus best)

    def significant(self, alpha: float) -> bool:
        """True when the round gained at level ``alpha`` (at every sigma)."""
        return self.p_value <= alpha


def gain_test(current: torch.Tensor, best: torch.Tensor, levels: int = 1) -> GainTest:
    """Did a scoring round gain over the best round so far? ``current`` and ``best`` are the per-image
    scores (:attr:`ScoreRound.per_image`) of two rounds on the *same* images and noise (common random
    numbers), so the per-image differences ``current - best`` are paired observations; with ``levels``
    sigmas image ``i`` was scored at sigma ``i % levels``. Each sigma's differences get a one-sided
    paired t-test of a positive mean (:func:`paired_t_pvalue`); the round gains at level ``alpha`` only
    if every sigma's test rejects, i.e. if the largest p-value is ``<= alpha`` (an intersection-union
    test, so with no true gain at some sigma a gain is declared at most about ``alpha`` of the time).

    The test is a stopping rule, not a certificate; rounds that differ in images or noise cannot be
    compared (:class:`InvalidParameterError`)."""
    a = torch.as_tensor(current, dtype=torch.float64).flatten()
    b = torch.as_tensor(best, dtype=torch.float64).flatten()
    if a.shape != b.shape or a.numel() == 0:
        raise InvalidParameterError(
            f"a round of {a.numel()} image scores cannot be compared with one of {b.numel()} (not the same scoring set)"
        )
    if levels < 1:
        raise InvalidParameterError(f"levels must be >= 1, got {levels}")
    d = a - b
    n = min(levels, d.numel())
    p = max(paired_t_pvalue(d[lv::n]) for lv in range(n))
    gain = min(float(d[lv::n].mean()) for lv in range(n))
    return GainTest(p_value=p, gain=gain)


class ScoreRound:
    """The outcome of one scoring round: the module's outputs, the black box's labels and the targets
    (on the fit device), and the per-image scores (:attr:`per_image`, on the CPU) and their summaries."""

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
    (never clean). Costs ``score_images * score_draws`` queries (fewer if the subset is smaller). The
    noise is drawn on the fit device (:meth:`FitContext.gaussian`; on the CPU exactly as always)."""
    cfg = ctx.config
    idx = ctx.scoring_indices()
    m, draws = len(idx), cfg.score_draws
    clean = repeat_draws(ctx.data.x[idx], draws)
    sig = repeat_draws(torch.tensor(ctx.sigmas, dtype=torch.float32)[torch.arange(m) % len(ctx.sigmas)], draws)
    sig = sig.to(clean.device)
    z = ctx.gaussian(clean.shape, -1, "score-noise")
    noisy = clean + sig.view(-1, 1, 1, 1) * z
    out = ctx.module_outputs(noisy)
    labels = ctx.query(out)
    return ScoreRound(out, labels, repeat_draws(ctx.targets(idx), draws), draws, list(ctx.sigmas))
