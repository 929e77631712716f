"""blackbox-rs: certified l2 robustness (randomized smoothing) for opaque image classifiers.

The public surface is re-exported here, lazily: ``import blackbox_rs`` (and the ``blackbox-rs --help``
command) does not import torch until a name that needs it is used. No exported name is also the name
of a submodule, so ``blackbox_rs.<name>`` always means the same thing. Everything else is importable
from its own module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from blackbox_rs._version import __version__
from blackbox_rs.errors import (
    BlackBoxRSError,
    BudgetExceeded,
    BudgetSpentError,
    CacheError,
    ConfigError,
    ConnectorError,
    InvalidInputError,
    InvalidParameterError,
    InvalidResponseError,
    ResumeMismatchError,
    UncertifiableError,
)

_LAZY = {
    "QueryBudget": "blackbox_rs.budget",
    "QueryCache": "blackbox_rs.cache",
    "ABSTAIN": "blackbox_rs.certificate",
    "Certificate": "blackbox_rs.certificate",
    "SequentialCertificate": "blackbox_rs.certificate",
    "SmoothedPrediction": "blackbox_rs.certificate",
    "certify": "blackbox_rs.core",
    "predict": "blackbox_rs.core",
    "DatasetCertification": "blackbox_rs.dataset",
    "certified_accuracy": "blackbox_rs.dataset",
    "certify_dataset": "blackbox_rs.dataset",
    "certify_radius": "blackbox_rs.certify_sequential",
    "certify_radius_dataset": "blackbox_rs.certify_sequential",
    "robustify": "blackbox_rs.robust.train",
    "QueryEngine": "blackbox_rs.engine",
    "QueryStats": "blackbox_rs.engine",
    "FitConfig": "blackbox_rs.fitting.config",
    "FitReport": "blackbox_rs.fitting.context",
    "BlackBoxSmoother": "blackbox_rs.smoother",
    "defaults": "blackbox_rs.defaults",
}

if TYPE_CHECKING:
    from blackbox_rs import defaults
    from blackbox_rs.budget import QueryBudget
    from blackbox_rs.cache import QueryCache
    from blackbox_rs.certificate import ABSTAIN, Certificate, SequentialCertificate, SmoothedPrediction
    from blackbox_rs.certify_sequential import certify_radius, certify_radius_dataset
    from blackbox_rs.core import certify, predict
    from blackbox_rs.dataset import DatasetCertification, certified_accuracy, certify_dataset
    from blackbox_rs.engine import QueryEngine, QueryStats
    from blackbox_rs.fitting.config import FitConfig
    from blackbox_rs.fitting.context import FitReport
    from blackbox_rs.smoother import BlackBoxSmoother


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'blackbox_rs' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module == f"blackbox_rs.{name}" else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ABSTAIN",
    "BlackBoxRSError",
    "BlackBoxSmoother",
    "BudgetExceeded",
    "BudgetSpentError",
    "CacheError",
    "Certificate",
    "ConfigError",
    "ConnectorError",
    "DatasetCertification",
    "FitConfig",
    "FitReport",
    "InvalidInputError",
    "InvalidParameterError",
    "InvalidResponseError",
    "QueryBudget",
    "QueryCache",
    "QueryEngine",
    "QueryStats",
    "ResumeMismatchError",
    "SequentialCertificate",
    "SmoothedPrediction",
    "UncertifiableError",
    "__version__",
    "certified_accuracy",
    "certify",
    "certify_dataset",
    "certify_radius",
    "certify_radius_dataset",
    "robustify",
    "defaults",
    "predict",
]
