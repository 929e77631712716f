"""One set of exit codes and stop messages for the ``blackbox-rs`` command line and every recipe.

=====  ====================  ==================================================================
code   name                  meaning
=====  ====================  ==================================================================
0      ``OK``                done.
1      ``INTERNAL_ERROR``    an unexpected error that is not a blackbox-rs error (a bug: please
                             report it).
2      ``USER_ERROR``        bad input, configuration, parameters or credentials (a missing or
                             refused key, an unreadable label map, settings that can never
                             certify, saved state written for other settings, a fit image that is
                             also a certification image, a model file refused as unsafe). Fix the
                             command; nothing was lost.
3      ``BUDGET_SPENT``      stopped by the query/cost budget (``--max-queries`` / ``--max-cost``,
                             ``--budget``). Finished certificates are kept. A persisted ledger
                             counts across runs, so rerunning the same command cannot progress:
                             rerun with a larger budget. With an in-memory budget, queries already
                             answered come from the cache and are not charged again.
4      ``QUOTA_EXHAUSTED``   the vendor's quota or rate limit is exhausted (it kept answering 429,
                             or a hard quota/billing limit). Progress is kept: wait for the quota
                             to reset, then run the same command again to resume.
5      ``SERVICE_FAILURE``   the service or connector failed after every allowed retry (timeouts,
                             5xx, unreachable endpoint, still rate-limited, malformed answers, a
                             model that changed version mid-run). Not a user error: progress is
                             kept; check the endpoint (or lower the request rate), then run the
                             same command again to resume.
130    ``INTERRUPTED``       interrupted (Ctrl-C). Progress is saved; run the same command again to
                             resume.
=====  ====================  ==================================================================

:func:`classify` maps an exception to ``(code, line)``: the line is a single line (no traceback)
that names the problem and the hint above, with every credential redacted
(:func:`blackbox_rs.redact.redact`). Callers print it on stderr and exit with the code.
"""

from __future__ import annotations

from blackbox_rs import errors as _errors
from blackbox_rs.redact import redact

__all__ = [
    "BUDGET_SPENT",
    "INTERNAL_ERROR",
    "INTERRUPTED",
    "OK",
    "QUOTA_EXHAUSTED",
    "SERVICE_FAILURE",
    "USER_ERROR",
    "classify",
    "one_line",
]

OK = 0
INTERNAL_ERROR = 1
USER_ERROR = 2
BUDGET_SPENT = 3
QUOTA_EXHAUSTED = 4
SERVICE_FAILURE = 5
INTERRUPTED = 130

#: Connector errors that are the user's to fix (wrong credentials, a label map without ``other``,
#: a model file refused as unsafe).
_USER_CONNECTOR_ERRORS: tuple[type[BaseException], ...] = tuple(
    c for c in (getattr(_errors, name, None) for name in ("AuthenticationError", "UnmappedLabelError",
                                                          "UnsafeModelFileError"))
    if isinstance(c, type)
)
#: Still throttled after every retry (not an exhausted quota): a service failure, with its own hint.
_RATE_LIMITED: tuple[type[BaseException], ...] = tuple(
    c for c in (getattr(_errors, "RateLimitedError", None),) if isinstance(c, type)
)


def one_line(exc: BaseException) -> str:
    """``exc`` as one redacted line (whitespace collapsed; the type name if it has no message)."""
    text = " ".join(redact(str(exc)).split())
    return text or type(exc).__name__


def classify(exc: BaseException) -> tuple[int, str]:
    """The exit code of ``exc`` and the one redacted line to print (see the module docstring)."""
    msg = one_line(exc)
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED, "interrupted: progress is saved; run the same command again to resume"
    if isinstance(exc, _errors.BudgetSpentError):
        return BUDGET_SPENT, (f"stopped: the query budget is spent ({msg}); the spending is persisted: rerun "
                              f"with a larger budget to continue")
    if isinstance(exc, _errors.BudgetExceeded):
        return BUDGET_SPENT, (f"stopped: the query budget is spent ({msg}); rerun with a larger budget to "
                              f"continue (queries already answered come from the cache and are not charged "
                              f"again)")
    if isinstance(exc, _errors.QuotaExhausted):
        wait = getattr(exc, "retry_after", None)
        when = f" (the vendor asked to wait {wait:g} s)" if isinstance(wait, (int, float)) else ""
        return QUOTA_EXHAUSTED, (f"stopped: the vendor's quota is exhausted ({msg}); wait for it to reset{when}, "
                                 f"then run the same command again to resume")
    if isinstance(exc, _USER_CONNECTOR_ERRORS):
        return USER_ERROR, f"error: {msg}"
    if isinstance(exc, _errors.ModelVersionChangedError):
        return SERVICE_FAILURE, (f"service failure: the model behind the endpoint changed version ({msg}); this "
                                 f"run's cache and certificates belong to the old version, so rerunning the same "
                                 f"command cannot progress: certify the new version into a new output/cache "
                                 f"directory (or pin the old version if the service still offers it)")
    if _RATE_LIMITED and isinstance(exc, _RATE_LIMITED):
        return SERVICE_FAILURE, (f"service failure: still rate-limited after every retry ({msg}); lower "
                                 f"--max-in-flight / --rate-limit or retry later: run the same command again to "
                                 f"resume (progress is kept)")
    if isinstance(exc, _errors.ConnectorError):  # timeouts, 5xx, unreachable, malformed answers
        return SERVICE_FAILURE, (f"service failure: {msg}; check the endpoint, then run the same command again "
                                 f"to resume (progress is kept)")
    if isinstance(exc, _errors.BlackBoxRSError):
        return USER_ERROR, f"error: {msg}"
    return INTERNAL_ERROR, f"internal error: {type(exc).__name__}: {msg}"
