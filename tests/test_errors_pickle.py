"""Every blackbox-rs error survives pickling with its type and attributes: a Ray worker's error reaches
the driver as itself (HTTPStatusError and its family have keyword-only arguments, which plain
exception pickling drops, so they could be dumped but not loaded)."""

from __future__ import annotations

import pickle

import pytest

from blackbox_rs import errors as e

CASES = [
    e.HTTPStatusError("503 from u", status=503, url="https://x/v2", attempts=3, billed=True),
    e.QuotaExhausted("daily quota", status=429, retry_after=60.0),
    e.RateLimitedError("still 429", status=429, throttled=4),
    e.AuthenticationError("401", status=401),
    e.ServiceUnavailableError("503", status=503),
    e.ResumeMismatchError("another seed", {"seed": (1, 2)}),
    e.BudgetSpentError("30 of 30"),
    e.ConfigError("bad key"),
]


@pytest.mark.parametrize("err", CASES, ids=lambda x: type(x).__name__)
def test_an_error_round_trips_through_pickle_as_itself(err: Exception) -> None:
    back = pickle.loads(pickle.dumps(err))  # noqa: S301 - our own object
    assert type(back) is type(err) and str(back) == str(err) and back.__dict__ == err.__dict__
