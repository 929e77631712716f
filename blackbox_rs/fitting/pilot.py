"""The pilot of a query-paid fit: spend a small share of the cap to learn whether the steps help.

Why: on every setting measured so far (Fashion-MNIST at sigma = 0.25 and 0.5, a 224x224 photo
classifier, the demo) the scoring rounds of a query-paid fit kept the free MSE-pretrained module, and
the early stop alone (``patience`` rounds without a significant gain) still pays the clean labels, the
first distillation rounds and ``patience + 1`` full scoring rounds before it can stop: about 60 % of
the cap at the default settings (64 % on the demo). A user paying per query should learn that the
steps do not help for a tenth of that.

What: before the strategy's first step, the driver runs a *pilot*: the same strategy, from the same
MSE-pretrained module, at a smaller scale (:meth:`Strategy.pilot_config
<blackbox_rs.fitting.strategies.base.Strategy.pilot_config>`: fewer clean labels, a smaller scoring
set, smaller distillation rounds or fewer zeroth-order steps between rounds) for ``patience`` scoring
rounds after the pretrained module's round. Its scoring set is held out of every training draw (and
of the surrogate's data): with a pool of a few hundred labelled images, rounds scored on images the
module trained on see gains that are not there (on the demo a pilot without the hold-out "gained"
+0.18 at p = 0.0002 where the full fit then lost). :func:`plan_pilot` sizes it so that its whole cap is
at most ``pilot`` (the setting, default 0.1) times the fit's cap (the full fit's query estimate, or the
fit budget if that is smaller).

* No round of the pilot gains significantly (the same paired test and level as the early stop): the fit
  stops there (``stopped="no_gain"``), keeps the pretrained module (a pilot state that merely scored
  higher on the small scoring set is not evidence: the best of a few noisy rounds is biased upwards)
  and has spent at most that share of its cap.
* A round gains: the pilot's module is discarded and the full fit runs from the pretrained module
  exactly as it would have without a pilot (same draws, same rounds, its own early stop), reusing the
  pilot's clean labels (a prefix of its own labelled subset: never paid twice). The cap of the whole
  fit is then the pilot's cap plus the full fit's, minus those labels: at most ``pilot`` more than
  without a pilot.

The pilot is a cost rule, not a certificate: a pilot of a few thousand queries can miss a gain that a
full fit would have found (a smaller surrogate training set, a smaller scoring set), and a pilot whose
noise looks like a gain lets the full fit run (with no true gain at most about ``patience * gain_alpha``
of the time: each round's test has level ``gain_alpha``, ``tests/test_fit_early_stop.py``, and a union
bound over the rounds);
``pilot=0`` turns it off. No pilot runs where it would not save much: when the fit cannot stop early
anyway (``patience=0``, or ``patience * score_every >= steps``), or when the smallest pilot would cost
more than half of what the early stop alone spends (small fits whose scoring set is already at the
pilot's floor of :data:`MIN_SCORE_IMAGES` images), when even the smallest pilot would cost more than
its share of the cap (a small budget), or when the fit has too few labelled images for the pilot to
hold a scoring set as large as its training pool out of training (fewer than ``2 * MIN_SCORE_IMAGES``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from blackbox_rs.fitting.config import StrategyConfig

__all__ = ["MIN_SCORE_IMAGES", "PilotPlan", "PilotReport", "pilot_plan_at", "plan_pilot"]

#: fewest scoring images of a pilot round (with 8 draws each the paired test still tells a real
#: gain from the rounds' noise: ``tests/test_fit_early_stop.py``)
MIN_SCORE_IMAGES = 64
_BISECTIONS = 40


class PilotPlan(NamedTuple):
    """A sized pilot: its scale ``factor`` (0..1 of the full fit's query settings, floors applied), its
    ``config`` (the strategy's config at that scale, ``pilot=0``), its query cap ``queries`` (what it
    spends uncached, whatever its rounds show) and ``reused``: the clean labels the full fit takes
    from it instead of paying for them again."""

    factor: float
    config: Any
    queries: int
    reused: int


class PilotReport(BaseModel):
    """What the pilot of a fit did (:attr:`FitReport.pilot <blackbox_rs.fitting.context.FitReport.pilot>`)."""

    factor: float = Field(description="scale of the pilot's query settings relative to the full fit's (floors applied)")
    cap: int = Field(description="the pilot's query cap (uncached, it spends this whatever its rounds show)")
    queries: int = Field(description="queries the pilot charged in this fit call (0 when a rerun found it done)")
    gained: bool = Field(description="whether one of its rounds gained significantly (then the full fit ran)")
    stopped: str = Field(description="how the pilot ended: completed (its rounds ran), no_gain, or budget")
    steps: int = Field(description="strategy steps the pilot took")
    outcome: str = Field(default="", description="what the fit did with it: gain (the full fit ran), no_gain (the "
                         "fit stopped there), budget (stopped inside it), skipped (a rerun with pilot=0 ran the full "
                         "fit after it)")
    score_images: int = Field(description="images of the pilot's scoring set")
    clean_queries: int = Field(description="clean labels of the pilot (reused by the full fit)")


def _subset(config: StrategyConfig, n_images: int) -> int:
    return max(1, min(int(n_images), int(config.clean_queries)))


def pilot_plan_at(cls: Any, config: StrategyConfig, n_images: int, factor: float) -> PilotPlan:
    """The pilot of strategy class ``cls`` at scale ``factor`` (see :meth:`Strategy.pilot_config`)."""
    pc = cls.pilot_config(config, n_images, factor)
    return PilotPlan(float(factor), pc, int(cls.base_queries(pc, n_images)), _subset(pc, n_images))


def plan_pilot(cls: Any, config: StrategyConfig, n_images: int, budget: int | None = None) -> PilotPlan | None:
    """The pilot a fit of ``n_images`` images with ``config`` runs, or ``None`` when it runs none (see the
    module docstring): the largest scale whose cap is at most ``config.pilot`` times the fit's cap
    (``min(base_queries, budget)``) and at most half of what the early stop alone would spend
    (``base_expected_queries``); none when even the smallest pilot (every floor) costs more than that.
    So a pilot never spends more than its share of the cap. Deterministic in its arguments (a resumed
    fit re-derives the same pilot from the scale its checkpoint recorded)."""
    share = float(getattr(config, "pilot", 0.0))
    patience = int(getattr(config, "patience", 0))
    if share <= 0 or patience <= 0 or not cls.needs_queries or config.steps == 0:
        return None
    if patience * config.score_every >= config.steps:  # the fit cannot stop early: nothing to save
        return None
    full = int(cls.base_queries(config, n_images))
    if full <= 0:
        return None
    cap = full if budget is None else min(full, int(budget))
    stop_alone = int(cls.base_expected_queries(config, n_images))
    limit = 0.5 * stop_alone  # a pilot costs at most half of what the early stop alone would spend
    target = min(share * cap, limit)
    lo = pilot_plan_at(cls, config, n_images, 0.0)
    if lo.queries > target:  # even the smallest pilot is over its share
        return None
    if lo.config.clean_queries - lo.config.score_images < lo.config.score_images:
        return None  # too few labelled images to hold its scoring set out of training: its rounds would flatter it
    if pilot_plan_at(cls, config, n_images, 1.0).queries <= target:
        return pilot_plan_at(cls, config, n_images, 1.0)
    a, b = 0.0, 1.0
    for _ in range(_BISECTIONS):
        mid = 0.5 * (a + b)
        if pilot_plan_at(cls, config, n_images, mid).queries <= target:
            a = mid
        else:
            b = mid
    return pilot_plan_at(cls, config, n_images, a)


def scaled(value: int, factor: float, floor: int) -> int:
    """``ceil(factor * value)``, at least ``floor`` and at most ``value``."""
    return min(int(value), max(int(floor), math.ceil(float(factor) * int(value))))
