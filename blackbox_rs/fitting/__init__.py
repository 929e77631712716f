"""Fitting building blocks for input modules: objectives, noise-draw layout and zeroth order.

- :mod:`blackbox_rs.fitting.objectives`: the ``mse`` loss term.
- :mod:`blackbox_rs.fitting.draws`: the one (image-major) row layout of noise draws.
- :mod:`blackbox_rs.fitting.zo`: the random-direction zeroth-order gradient estimator on a flat
  parameter vector and momentum SGD.

Fit strategies (denoise, surrogate, zeroth-order, pass-through) build on these and the QueryEngine.
"""

from blackbox_rs.fitting.draws import per_image, repeat_draws
from blackbox_rs.fitting.objectives import mse_loss
from blackbox_rs.fitting.zo import ZOSGD, GradientEstimate, rge_gradient, sample_directions

__all__ = [
    "ZOSGD",
    "GradientEstimate",
    "mse_loss",
    "per_image",
    "repeat_draws",
    "rge_gradient",
    "sample_directions",
]
