"""Typed errors of blackbox-rs.

Every error a user can provoke is a subclass of :class:`BlackBoxRSError`, so callers can catch the
family with one ``except``. Messages name the offending argument or value. No error message ever
contains a credential: connectors redact secrets before raising (see ``blackbox_rs.redact``).
"""

from __future__ import annotations


def _restore(cls: type, args: tuple[object, ...], state: dict[str, object]) -> BaseException:
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err  # type: ignore[no-any-return]


class BlackBoxRSError(Exception):
    """Base class of every error raised by blackbox-rs. Every one survives pickling with its type and
    attributes (keyword-only constructor arguments included), so an error raised on a worker process
    reaches the driver as itself."""

    def __reduce__(self) -> tuple[object, ...]:
        return (_restore, (type(self), self.args, dict(self.__dict__)))


class InvalidInputError(BlackBoxRSError, ValueError):
    """An input tensor or dataset violates the input contract (shape, dtype, range, finiteness)."""


class InvalidParameterError(BlackBoxRSError, ValueError):
    """A numeric parameter is outside its valid range (n0 < 1, alpha outside (0, 1), sigma <= 0, ...)."""


class UncertifiableError(InvalidParameterError):
    """The requested settings can never certify: e.g. (n, alpha) cannot produce p_lower > 1/2,
    or a target radius needs more samples than the budget allows."""


class ConnectorError(BlackBoxRSError):
    """The base model behind a connector failed or answered something unusable.

    ``billed`` says whether the failed request may have been charged: ``False`` only when it provably
    was not (never sent, connection refused); ``None`` (unknown) and ``True`` keep the budget charged.
    """

    billed: bool | None = None

    def __init__(self, *args: object, billed: bool | None = None) -> None:
        super().__init__(*args)
        if billed is not None:
            self.billed = billed


class InvalidResponseError(ConnectorError):
    """A connector returned a malformed answer: wrong number of labels, a label outside the class
    range, scores of the wrong width, non-finite scores."""


class BudgetExceeded(BlackBoxRSError):
    """A query budget would be exceeded by the next request. Everything finished before it is kept."""


class CacheError(BlackBoxRSError):
    """The query cache cannot be used (unwritable, corrupted, or written for another model)."""


class ConfigError(BlackBoxRSError, ValueError):
    """A configuration file or object is invalid (unknown key, wrong type, missing credential)."""


class ResumeMismatchError(CacheError):
    """Saved state (a certificate journal, a query cache, a budget ledger, a fit checkpoint) was
    written for something other than what this run describes: another module, input, label, noise
    mode, setting or model version. ``differences`` maps each differing field to ``(saved, now)``.
    Nothing is mixed: use another output path, or the original settings."""

    def __init__(self, message: str, differences: dict[str, tuple[object, object]] | None = None) -> None:
        super().__init__(message)
        self.differences = dict(differences or {})


class BudgetSpentError(BudgetExceeded):
    """A persisted budget ledger is already spent: rerunning the same command can never progress;
    raise the limit (or use a new ledger) to continue."""


# --- HTTP connectors (connectors/http.py, connectors/kserve_v2.py) ---------------------------------


class HTTPStatusError(ConnectorError):
    """An HTTP endpoint answered with an error status that is not retried (or is no longer retried).

    Carries ``status`` (int), ``url`` (credentials redacted), ``body_excerpt`` (at most a few hundred
    characters of the response body, credentials redacted), ``attempts`` (requests sent, retries
    included) and ``request_id`` (the id the connector sent, if any).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        url: str = "",
        body_excerpt: str = "",
        attempts: int = 1,
        request_id: str | None = None,
        billed: bool | None = None,
    ) -> None:
        super().__init__(message, billed=billed)
        self.status = status
        self.url = url
        self.body_excerpt = body_excerpt
        self.attempts = attempts
        self.request_id = request_id


class AuthenticationError(HTTPStatusError):
    """The endpoint refused the credentials (HTTP 401 or 403). Never retried."""


class QuotaExhausted(HTTPStatusError):
    """The endpoint kept rate-limiting (HTTP 429) after every allowed retry, or asked to wait longer
    than the connector may wait (``retry_after`` seconds, ``None`` if it did not say)."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after


class ServiceUnavailableError(HTTPStatusError):
    """The endpoint kept answering a transient server error (502, 503, 504) after every allowed retry."""


class EndpointUnreachableError(ConnectorError):
    """No HTTP connection could be made (connection refused, unknown host, reset) after every retry."""


class TLSError(EndpointUnreachableError):
    """The TLS handshake failed (wrong scheme, untrusted or mismatched certificate). Never retried."""


class RequestTimeoutError(ConnectorError):
    """The endpoint did not answer within the per-request timeout, on every allowed attempt."""


class ModelNotReadyError(ConnectorError):
    """The server is up but the model is not loaded or not ready to serve."""


class UnknownModuleError(ConfigError):
    """An input-module name is not in the registry. The message lists the registered names."""


class RegistryError(ConfigError):
    """An input module cannot be registered: duplicate name, or a config class that does not match."""


class ModuleCheckpointError(BlackBoxRSError):
    """A saved input module cannot be loaded: a file is missing or malformed, or a tensor is missing,
    unexpected, or has the wrong shape. The message names the file or tensor."""


class PrecisionError(InvalidInputError):
    """A zeroth-order estimate was asked for in reduced precision (fp16/bf16). Finite differences of a
    loss fall below half-precision resolution and silently become noise, so they are refused."""


class CompatibilityWarning(UserWarning):
    """A saved artifact was written by another SDK version and something in it was ignored
    (for example an unknown config key from a newer version)."""


# --- Offline datasets (blackbox_rs/_demo/datasets.py) -----------------------------------------------


class DatasetError(BlackBoxRSError):
    """A bundled or system-installed dataset cannot be used."""


class DatasetNotFoundError(DatasetError):
    """A dataset is not installed where the loader looks. The message says how to install it
    (for Fashion-MNIST: ``sudo apt-get install dataset-fashion-mnist``) and lists the places searched."""


class DatasetCorruptedError(DatasetError):
    """A dataset file is present but malformed: wrong IDX magic number, wrong dimensions, truncated
    or oversized payload, unreadable gzip stream, or image and label files that disagree in count."""


class ModelVersionChangedError(InvalidResponseError):
    """The model behind an endpoint answered with another version than the one this run (or the
    run it resumes, as persisted in its cache) observed: answers of two models are never mixed."""


class UnsafeModelFileError(ConnectorError):
    """A local model file would make its loader run arbitrary Python (a pickled payload, a compiled
    native library, a symbolic expression or graph call outside the safe set): it is refused before
    anything in it is loaded. ``path`` names the file, ``reason`` what was found."""

    def __init__(self, message: str, *, path: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason


class RateLimitedError(HTTPStatusError):
    """The endpoint kept throttling (HTTP 429, or a vendor's throttle answer) on every allowed attempt,
    or asked to wait longer than the connector may (``retry_after`` seconds, ``None`` if it did not
    say). Throttling, not an exhausted quota (that is :class:`QuotaExhausted`): retry later, or lower
    ``max_in_flight`` / the rate limit. ``throttled`` counts the throttled attempts; not billed."""

    def __init__(self, message: str, *, retry_after: float | None = None, throttled: int = 0,
                 **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after
        self.throttled = throttled


class SplitOverlapError(ConfigError):
    """An image given for fitting is also a certification image (same file content): accuracy
    measured on images the module was fitted on would be optimistic. The message names the files."""


class FitTooSlowError(InvalidParameterError):
    """A fit's measured time estimate exceeds the stated limit; the message names the estimate, the
    limit and how to cut it (fewer steps, a smaller batch, the ``lowres`` module)."""


class MissingDependencyError(ConnectorError, ImportError):
    """An optional package a connector needs is not installed; the message names it and the
    ``pip install`` command that adds it."""


class ModelStructureError(ConfigError):
    """A model lacks the structure a robustify method needs: no Linear/Conv2d module matches the
    LoRA/adapter target modules, no classifier head can be found, or "prompt" was asked of a model
    that is not a timm VisionTransformer. The message names what was looked for and what exists."""


class DenoiserModelError(ModuleCheckpointError, ConfigError):
    """An off-the-shelf denoiser (a diffusers directory, a TorchScript/ONNX file) cannot be used: a
    file is missing or malformed, its scheduler does not match its model, it cannot take the
    configured image size, or its content differs from the digest recorded when it was first used.
    The message names the file or directory and the problem."""


class UnmappedLabelError(InvalidResponseError):
    """A vendor label has no task class and the label map has no ``other`` class to put it in."""
