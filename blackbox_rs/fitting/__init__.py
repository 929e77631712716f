"""Fitting building blocks for input modules: objectives and zeroth-order estimators.

- :mod:`blackbox_rs.fitting.objectives`: loss terms (``mse``, ``stability``, ``classification``,
  label-only ``label_disagreement``, score-based ``score_ce``) and the weighted :class:`Objective`.
- :mod:`blackbox_rs.fitting.zo`: zeroth-order gradient estimators (RGE, SPSA, CGE) on a flat
  parameter vector, their query cost, momentum SGD and bridges to modules and autograd.

Fit strategies (denoise, surrogate, zeroth-order, pass-through) build on these and the QueryEngine.
"""

from blackbox_rs.fitting.objectives import (
    TERM_NAMES,
    Objective,
    ObjectiveConfig,
    ObjectiveInputs,
    ObjectiveResult,
    classification_loss,
    label_disagreement_loss,
    mse_loss,
    repeat_per_draw,
    score_cross_entropy_loss,
    stability_loss,
)
from blackbox_rs.fitting.zo import (
    ZOSGD,
    GradientEstimate,
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

__all__ = [
    "TERM_NAMES",
    "ZOSGD",
    "GradientEstimate",
    "Objective",
    "ObjectiveConfig",
    "ObjectiveInputs",
    "ObjectiveResult",
    "SPSAGains",
    "cge_gradient",
    "classification_loss",
    "estimate_gradient",
    "inject_gradient",
    "label_disagreement_loss",
    "module_loss",
    "mse_loss",
    "queries_per_step",
    "repeat_per_draw",
    "rge_gradient",
    "sample_directions",
    "score_cross_entropy_loss",
    "spsa_gradient",
    "stability_loss",
]
