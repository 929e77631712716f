"""Every attempt that may be billed is charged to the budget before it leaves; what provably never
reached the model is refunded (issue #16, items 1-3). Loopback servers only, a few seconds in all."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
from helpers.fault_server import Fault, FaultServer

from blackbox_rs.budget import QueryBudget
from blackbox_rs.connectors.http import RetryPolicy, TransportSettings
from blackbox_rs.connectors.kserve_v2 import KServeV2Connector
from blackbox_rs.engine import QueryEngine
from blackbox_rs.errors import (
    AuthenticationError,
    BudgetExceeded,
    ConnectorError,
    HTTPStatusError,
    QuotaExhausted,
    RequestTimeoutError,
)

SHAPE = (3, 8, 8)
K = 4


class NoSleep:
    def __call__(self, s: float) -> None:
        pass


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer(input_shape=SHAPE, num_classes=K) as srv:
        yield srv


def connect(srv: FaultServer, **kw: object) -> KServeV2Connector:
    """A connector for ``srv``; transport fields among ``kw`` go into its :class:`TransportSettings`."""
    t = {k: kw.pop(k) for k in list(kw) if k in TransportSettings.model_fields}
    t.setdefault("retry", RetryPolicy(max_attempts=4, backoff_base_s=0.0, backoff_max_s=0.0))
    return KServeV2Connector(srv.url, srv.model_name, sleep=NoSleep(),  # type: ignore[arg-type]
                             transport=TransportSettings(**t), **kw)


def batch(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def billed(srv: FaultServer) -> int:
    """Images the server billed: like a vendor, every image of every infer request that reached the
    model, answered in time or not; throttled (429) and refused (401/403) requests are not billed."""
    return sum(r.n_images for r in srv.infer_records() if r.fault not in {"429", "401_echo", "403"})


def settle(srv: FaultServer, delay: float) -> None:
    """Let answers the client gave up on finish on the server (they are billed all the same)."""
    time.sleep(delay)


# ---- 1. retries are charged, before they are sent --------------------------------------------------


def test_read_timeouts_never_bill_beyond_the_budget_acceptance(tmp_path) -> None:
    """A server slow enough that the client read-times-out while the server still answers and bills:
    the server never bills more than the budget, and the SDK never counts less than the server."""
    with FaultServer(input_shape=SHAPE, num_classes=K) as srv:
        conn = connect(srv, max_batch=4, max_in_flight=4, timeout_s=0.2)
        budget = QueryBudget(max_queries=40)
        engine = QueryEngine(conn, budget=budget, max_in_flight=4, cache=tmp_path / "cache")
        srv.push(*[Fault("slow", delay=0.5)] * 8)  # 8 attempts time out at the client, billed at the server
        x = batch(32)  # 8 requests of 4 images
        try:
            engine.query(x)
        except BudgetExceeded as exc:  # a re-send or a first send that no longer fit: refused, unsent
            assert "re-send" in str(exc) or "next request" in str(exc), exc
        settle(srv, 0.6)
        vendor = billed(srv)
        assert vendor <= budget.max_queries  # the vendor never bills past the user's cap
        assert budget.spent_queries >= vendor  # the SDK never under-counts
        assert engine.stats.queries >= vendor
        assert vendor > 32 - 4 * engine.stats.failed_requests  # re-sends did happen and were billed
        assert engine.stats.retried > 0 and engine.stats.attempted >= vendor
        assert conn.transport_stats()["images"] == engine.stats.attempted
        assert conn.transport_stats()["retried_images"] == engine.stats.retried
        # nothing answered is lost: a rerun with more budget sends only what was not answered
        answered, before = engine.stats.answered, len(srv.infer_records())
        engine.close()
        again = QueryEngine(conn, budget=QueryBudget(max_queries=100), cache=tmp_path / "cache", max_in_flight=4)
        assert len(again.query(x)) == 32
        assert again.stats.cache_hits == answered > 0
        assert len(srv.infer_records()) - before == (32 - answered) // 4
        again.close()
        conn.close()


def test_slow_vendor_with_retries_charges_every_attempt() -> None:
    """The whole query succeeds through timeouts: charged == billed by the server, and every answer
    counted once in ``answered``."""
    with FaultServer(input_shape=SHAPE, num_classes=K) as srv:
        conn = connect(srv, max_batch=4, max_in_flight=4, timeout_s=0.2)
        budget = QueryBudget(max_queries=100)
        engine = QueryEngine(conn, budget=budget, max_in_flight=4)
        srv.push(*[Fault("slow", delay=0.4)] * 5)
        assert len(engine.query(batch(24))) == 24
        settle(srv, 0.5)
        assert billed(srv) == 24 + 5 * 4
        assert budget.spent_queries == engine.stats.queries == billed(srv)
        assert engine.stats.answered == 24 and engine.stats.retried == 20 and engine.stats.failed_requests == 0


def test_a_resend_that_does_not_fit_is_not_sent(server: FaultServer) -> None:
    conn = connect(server, max_batch=4)
    budget = QueryBudget(max_queries=4)
    engine = QueryEngine(conn, budget=budget)
    server.push("503")  # may have been billed: the re-send needs 4 more queries
    with pytest.raises(BudgetExceeded, match="re-send"):
        engine.query(batch(4))
    assert len(server.infer_records()) == 1  # the re-send never left
    assert budget.spent_queries == 4 == billed(server) == engine.stats.queries
    assert engine.stats.failed_requests == 1


def test_throttled_attempts_are_not_charged(server: FaultServer) -> None:
    conn = connect(server, max_batch=4)
    budget = QueryBudget(max_queries=4)
    engine = QueryEngine(conn, budget=budget)
    server.push(Fault("429", retry_after=0.0), Fault("429", retry_after=0.0))
    assert len(engine.query(batch(4))) == 4  # refused before the model ran: the re-sends fit
    assert budget.spent_queries == 4 == engine.stats.queries and engine.stats.attempted == 12


def test_local_connectors_are_charged_once_per_request() -> None:
    from blackbox_rs.connectors.callable import CallableConnector

    calls: list[int] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return torch.zeros(len(x), dtype=torch.int64)

    conn = CallableConnector(fn, input_shape=SHAPE, num_classes=K, max_batch=3, fingerprint="local:test")
    budget = QueryBudget(max_queries=10)
    engine = QueryEngine(conn, budget=budget)
    engine.query(batch(7))
    assert budget.spent_queries == 7 == engine.stats.queries == engine.stats.attempted == sum(calls)
    assert engine.stats.retried == 0


# ---- 2. refunds: refused before the model ran, or never sent ---------------------------------------


@pytest.mark.parametrize("fault", ["401_echo", "403"])
def test_401_and_403_are_refunded(server: FaultServer, fault: str) -> None:
    conn = connect(server, max_batch=4)
    budget = QueryBudget(max_queries=10)
    engine = QueryEngine(conn, budget=budget)
    server.push(fault)
    with pytest.raises(AuthenticationError) as ei:
        engine.query(batch(4))
    assert ei.value.status == int(fault[:3]) and ei.value.billed is False
    assert budget.spent_queries == 0 == engine.stats.queries == billed(server)
    assert len(server.infer_records()) == 1  # never retried


def test_failure_before_the_first_attempt_is_refunded(server: FaultServer) -> None:
    conn = connect(server, max_batch=4)
    budget = QueryBudget(max_queries=10)
    engine = QueryEngine(conn, budget=budget)
    conn.transport.close()
    with pytest.raises(ConnectorError, match="closed"):
        engine.query(batch(4))
    assert budget.spent_queries == 0 and engine.stats.queries == 0 and not server.infer_records()


def test_queued_requests_are_not_sent_when_another_request_fails() -> None:
    with FaultServer(input_shape=SHAPE, num_classes=K, service_time_s=0.3) as srv:
        conn = connect(srv, max_batch=1, max_in_flight=2)
        budget = QueryBudget(max_queries=100)
        engine = QueryEngine(conn, budget=budget, max_in_flight=2)
        srv.push("400")  # the first request to arrive fails at once, the other takes 0.3 s
        with pytest.raises(HTTPStatusError) as ei:
            engine.query(batch(8))
        assert ei.value.status == 400
        engine.close()  # waits for the pool: anything still queued would run now
        time.sleep(0.2)
        sent = srv.infer_records()
        assert len(sent) <= 3  # the two in flight (and at most one that started before the failure)
        # what was charged is exactly what may have been billed (the 400 cannot be proven unbilled)
        assert budget.spent_queries == billed(srv) == len(sent)
        assert engine.stats.queries == len(sent)
        conn.close()


# ---- 3. throttling is not an exhausted quota --------------------------------------------------------


def test_throttling_to_the_end_is_rate_limited_and_refunded(server: FaultServer) -> None:
    from blackbox_rs.errors import RateLimitedError  # new in issue #16

    conn = connect(server, max_batch=4, retry=RetryPolicy(max_attempts=3, backoff_base_s=0.0))
    budget = QueryBudget(max_queries=4)
    engine = QueryEngine(conn, budget=budget)
    server.push(*[Fault("429", retry_after=0.0)] * 3)
    with pytest.raises(RateLimitedError) as ei:
        engine.query(batch(4))
    err = ei.value
    assert not isinstance(err, QuotaExhausted)
    assert err.throttled == 3 and err.attempts == 3 and err.billed is False
    assert "3 of 3 attempts throttled" in str(err) and "retry later" in str(err)
    assert budget.spent_queries == 0 and engine.stats.attempted == 12


def test_timeout_after_the_last_retry_stays_a_timeout(server: FaultServer) -> None:
    conn = connect(server, max_batch=4, timeout_s=0.15, retry=RetryPolicy(max_attempts=2, backoff_base_s=0.0))
    budget = QueryBudget(max_queries=8)
    engine = QueryEngine(conn, budget=budget)
    server.push(Fault("slow", delay=0.4), Fault("slow", delay=0.4))
    with pytest.raises(RequestTimeoutError):
        engine.query(batch(4))
    settle(server, 0.4)
    assert budget.spent_queries == 8 == billed(server) == engine.stats.queries


def _tls_error(inner: BaseException):  # noqa: ANN202 - the requests exception urllib3 would raise
    import urllib3.exceptions
    from requests.exceptions import SSLError

    return SSLError(urllib3.exceptions.MaxRetryError(None, "/v2/models/m/infer", urllib3.exceptions.SSLError(inner)))


@pytest.mark.parametrize("inner,charged", [
    (__import__("ssl").SSLEOFError(8, "EOF occurred in violation of protocol"), True),  # after the request left
    (__import__("ssl").SSLCertVerificationError(1, "certificate verify failed"), False),  # handshake refused
])
def test_tls_errors_are_credited_only_when_the_handshake_failed(server: FaultServer, inner: BaseException,
                                                               charged: bool) -> None:
    """Review finding: every SSLError was refunded, including an SSLEOFError while reading the answer of
    a request the server had processed (the SDK would count below the vendor)."""
    from blackbox_rs.connectors.http import _tls_handshake_failed
    from blackbox_rs.errors import TLSError

    assert _tls_handshake_failed(_tls_error(inner)) is (not charged)
    budget = QueryBudget(max_queries=100)
    conn = connect(server, retry=RetryPolicy(max_attempts=1))
    engine = QueryEngine(conn, budget=budget)

    def send(*a: object, **k: object) -> None:
        raise _tls_error(inner)

    conn.transport._session.send = send  # type: ignore[method-assign]
    with pytest.raises(TLSError):
        engine.query(batch(3))
    assert budget.spent_queries == (3 if charged else 0)
    conn.close()
