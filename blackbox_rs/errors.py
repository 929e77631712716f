"""Typed errors of blackbox-rs.

Every error a user can provoke is a subclass of :class:`BlackBoxRSError`, so callers can catch the
family with one ``except``. Messages name the offending argument or value. No error message ever
contains a credential: connectors redact secrets before raising (see ``blackbox_rs.secrets``).
"""

from __future__ import annotations


class BlackBoxRSError(Exception):
    """Base class of every error raised by blackbox-rs."""


class InvalidInputError(BlackBoxRSError, ValueError):
    """An input tensor or dataset violates the input contract (shape, dtype, range, finiteness)."""


class InvalidParameterError(BlackBoxRSError, ValueError):
    """A numeric parameter is outside its valid range (n0 < 1, alpha outside (0, 1), sigma <= 0, ...)."""


class UncertifiableError(InvalidParameterError):
    """The requested settings can never certify: e.g. (n, alpha) cannot produce p_lower > 1/2,
    or a target radius needs more samples than the budget allows."""


class ConnectorError(BlackBoxRSError):
    """The base model behind a connector failed or answered something unusable."""


class InvalidResponseError(ConnectorError):
    """A connector returned a malformed answer: wrong number of labels, a label outside the class
    range, scores of the wrong width, non-finite scores."""


class BudgetExceeded(BlackBoxRSError):
    """A query budget would be exceeded by the next request. Everything finished before it is kept."""


class CacheError(BlackBoxRSError):
    """The query cache cannot be used (unwritable, corrupted, or written for another model)."""


class ConfigError(BlackBoxRSError, ValueError):
    """A configuration file or object is invalid (unknown key, wrong type, missing credential)."""
