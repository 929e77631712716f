"""blackbox-rs: certified l2 robustness (randomized smoothing) for opaque image classifiers.

The public surface is re-exported here; everything else is importable from its own module.
"""

from blackbox_rs._version import __version__
from blackbox_rs.budget import QueryBudget
from blackbox_rs.cache import QueryCache
from blackbox_rs.certificate import ABSTAIN, Certificate, SmoothedPrediction
from blackbox_rs.certify import DatasetCertification, certified_accuracy, certify, certify_dataset, predict
from blackbox_rs.engine import QueryEngine, QueryStats
from blackbox_rs.errors import (
    BlackBoxRSError,
    BudgetExceeded,
    CacheError,
    ConfigError,
    ConnectorError,
    InvalidInputError,
    InvalidParameterError,
    InvalidResponseError,
    UncertifiableError,
)

__all__ = [
    "ABSTAIN",
    "BlackBoxRSError",
    "BudgetExceeded",
    "CacheError",
    "Certificate",
    "ConfigError",
    "ConnectorError",
    "DatasetCertification",
    "InvalidInputError",
    "InvalidParameterError",
    "InvalidResponseError",
    "QueryBudget",
    "QueryCache",
    "QueryEngine",
    "QueryStats",
    "SmoothedPrediction",
    "UncertifiableError",
    "__version__",
    "certified_accuracy",
    "certify",
    "certify_dataset",
    "predict",
]
