"""blackbox-rs: certified l2 robustness (randomized smoothing) for opaque image classifiers.

The public surface is re-exported here; everything else is importable from its own module.
"""

from blackbox_rs._version import __version__
from blackbox_rs.budget import QueryBudget
from blackbox_rs.cache import QueryCache
from blackbox_rs.certificate import ABSTAIN, Certificate, SequentialCertificate, SmoothedPrediction
from blackbox_rs.certify import DatasetCertification, certified_accuracy, certify, certify_dataset, predict
from blackbox_rs.certify_sequential import certify_radius, certify_radius_dataset
from blackbox_rs.engine import QueryEngine, QueryStats
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
from blackbox_rs.fitting.config import FitConfig
from blackbox_rs.fitting.context import FitReport
from blackbox_rs.smoother import BlackBoxSmoother

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
    "predict",
]
