"""Robustify a model you own with PEFT (PEFTSmoothing): train LoRA, bottleneck adapters or visual
prompt tokens on Gaussian-noise-augmented data, save/load the artefact, merge and export it.

- :mod:`.config`:   :class:`RobustifyConfig` (typed, validated settings).
- :mod:`.wrap`:     wrapping a ``torch.nn.Module`` with the PEFT modules, everything else frozen.
- :mod:`.train`:    :func:`robustify` (the training loop: noise mixture, clipping, checkpoint/resume).
- :mod:`.artefact`: :class:`RobustModel` (save_pretrained / from_pretrained / merge_and_export).

The heavy imports (peft, which imports transformers) happen only when a LoRA model is wrapped.
"""

from .artefact import ParameterCounts, RobustModel
from .config import RobustifyConfig, make_config
from .train import RobustifyReport, robustify

__all__ = ["ParameterCounts", "RobustModel", "RobustifyConfig", "RobustifyReport", "make_config", "robustify"]
