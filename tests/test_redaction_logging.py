"""A credential never reaches a log record (any logger, DEBUG on) or an exception chain, in any of
the encodings it travels in (issue #16, items 4-5). Loopback only."""

from __future__ import annotations

import base64
import io
import logging
import socket
import traceback
from collections.abc import Iterator
from urllib.parse import quote, quote_plus

import pytest
import torch
from helpers.fault_server import Fault, FaultServer
from pydantic import SecretStr

from blackbox_rs.connectors.http import Auth, Credential, HTTPTransport, RetryPolicy, TransportSettings
from blackbox_rs.connectors.kserve_v2 import KServeV2Connector
from blackbox_rs.errors import BlackBoxRSError, EndpointUnreachableError, RequestTimeoutError
from blackbox_rs.redact import redact

SHAPE = (3, 8, 8)
# '+', '/' and '=' change under percent-encoding; the parameter name is not on the sensitive list
SECRET = "ab+c/d=e==Zq7"
PARAM = "token2"


def forms(secret: str) -> list[str]:
    """Every encoding the secret may appear in (computed here, independently of the SDK)."""
    raw = secret.encode()
    out = {secret, quote(secret, safe=""), quote(secret), quote_plus(secret)}
    out |= {q.replace("%2B", "%2b").replace("%2F", "%2f").replace("%3D", "%3d") for q in list(out)}
    out |= {base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()}
    out |= {base64.b64encode(raw).decode().rstrip("=")}
    return sorted(out)


def leaks(text: str) -> list[str]:
    found = [f for f in forms(SECRET) if f in text]
    basic = base64.b64encode(f"user:{SECRET}".encode()).decode()  # as in an Authorization: Basic header
    if basic[8:-4] in text:
        found.append("basic-auth payload")
    return found


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__]
    return seen


def chain_texts(exc: BaseException) -> list[str]:
    texts = []
    for e in chain(exc):
        texts += [str(e), repr(e), repr(e.args), repr(vars(e))]
    texts.append("".join(traceback.TracebackException.from_exception(exc).format(chain=True)))
    return texts


BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, *SHAPE], "data": [0.0] * 192}]}


def auth() -> Auth:
    return Auth.query(PARAM, Credential(secret=SecretStr(SECRET)))


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[tuple[pytest.LogCaptureFixture, io.StringIO]]:
    """caplog at DEBUG on the root logger, plus a real handler with a formatter (exc_info included)."""
    caplog.set_level(logging.DEBUG)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield caplog, stream
    finally:
        root.removeHandler(handler)


def all_log_text(caplog: pytest.LogCaptureFixture, stream: io.StringIO) -> str:
    parts = [stream.getvalue(), caplog.text]
    for r in caplog.records:
        parts += [r.getMessage(), repr(r.msg), repr(r.args), r.exc_text or ""]
    return "\n".join(parts)


# ---- 5. logs ------------------------------------------------------------------------------------------


def test_query_string_secret_never_reaches_a_log_record_on_success(logs) -> None:
    caplog, stream = logs
    with FaultServer(input_shape=SHAPE, num_classes=4) as srv:
        conn = KServeV2Connector(srv.url, srv.model_name, auth=auth(), max_batch=4)
        assert len(conn.query(torch.rand(2, *SHAPE))) == 2
        sent = [r.path for r in srv.log if r.method == "POST"]
        conn.close()
    assert sent and all(f"{PARAM}={quote_plus(SECRET)}" in p for p in sent)  # it was sent, encoded
    text = all_log_text(caplog, stream)
    assert "127.0.0.1" in text and "/infer" in text  # urllib3 did log the traffic at DEBUG
    assert leaks(text) == []


def test_query_string_secret_never_reaches_logs_or_errors_when_unreachable(logs) -> None:
    caplog, stream = logs
    t = HTTPTransport(f"http://127.0.0.1:{closed_port()}", auth=auth(), sleep=lambda s: None,
                      transport=TransportSettings(timeout_s=1.0, retry=RetryPolicy(max_attempts=2, backoff_base_s=0.0)))
    with pytest.raises(EndpointUnreachableError) as ei:
        t.request("GET", "/v2/health/ready")
    logging.getLogger("blackbox_rs.test").warning("giving up: %s", ei.value)
    assert leaks("\n".join(chain_texts(ei.value))) == []
    assert leaks(all_log_text(caplog, stream)) == []


def test_records_of_any_logger_are_redacted_args_and_tracebacks_too(logs) -> None:
    caplog, stream = logs
    Credential(secret=SecretStr(SECRET))  # registers it
    log = logging.getLogger("someone.elses.library")
    log.debug("GET /x?%s=%s", PARAM, quote_plus(SECRET))
    log.info("header %r", {"Authorization": "Basic " + base64.b64encode(f"user:{SECRET}".encode()).decode()})
    try:
        raise RuntimeError(f"failed with {quote(SECRET, safe='')}")
    except RuntimeError:
        log.exception("boom")
    assert len(caplog.records) == 3
    assert leaks(all_log_text(caplog, stream)) == []
    assert "boom" in stream.getvalue() and "RuntimeError" in stream.getvalue()  # the traceback is kept, redacted


def test_redact_masks_every_encoding() -> None:
    Credential(secret=SecretStr(SECRET))
    for f in forms(SECRET):
        assert leaks(redact(f"x={f}&y=1")) == [], f
    basic = base64.b64encode(f"someone:{SECRET}".encode()).decode()
    assert leaks(redact(f"payload {basic}")) == []
    assert redact("plain text stays") == "plain text stays"


# ---- 4. exception chains --------------------------------------------------------------------------


def test_transport_errors_carry_no_chain_with_the_secret() -> None:
    errors: list[BlackBoxRSError] = []
    t = HTTPTransport(f"http://127.0.0.1:{closed_port()}", auth=auth(), sleep=lambda s: None,
                      transport=TransportSettings(timeout_s=1.0, retry=RetryPolicy(max_attempts=2, backoff_base_s=0.0)))
    with pytest.raises(EndpointUnreachableError) as ei:
        t.request("GET", "/v2/health/ready")
    errors.append(ei.value)
    with FaultServer(input_shape=SHAPE, num_classes=4) as srv:
        t2 = HTTPTransport(srv.url, auth=auth(), sleep=lambda s: None, transport=TransportSettings(
            timeout_s=0.15, retry=RetryPolicy(max_attempts=2, backoff_base_s=0.0)))
        srv.push(Fault("slow", delay=0.4), Fault("slow", delay=0.4))
        with pytest.raises(RequestTimeoutError) as ei2:
            t2.request("POST", f"/v2/models/{srv.model_name}/infer", json_body=BODY)
        errors.append(ei2.value)
        t3 = HTTPTransport(srv.url, auth=auth(), sleep=lambda s: None, transport=TransportSettings(
            timeout_s=0.15, retry=RetryPolicy(max_attempts=1, retry_timeouts=False)))
        srv.push(Fault("slow", delay=0.4))
        with pytest.raises(RequestTimeoutError) as ei3:
            t3.request("POST", f"/v2/models/{srv.model_name}/infer", json_body=BODY)
        errors.append(ei3.value)
    for err in errors:
        assert err.__cause__ is None
        assert leaks("\n".join(chain_texts(err))) == [], type(err).__name__
        # nothing in the chain is a raw requests/urllib3 exception
        assert all(isinstance(e, BlackBoxRSError) for e in chain(err)), [type(e) for e in chain(err)]


def test_chain_is_cut_even_where_the_message_was_already_redacted() -> None:
    """``key`` is a sensitive parameter name, so the message was always clean; the raw exception that
    ``raise ... from None`` left in ``__context__`` was not."""
    secret = "sk-CHAIN-5b1f0c9e77a2"
    t = HTTPTransport(f"http://127.0.0.1:{closed_port()}", auth=Auth.query("key", Credential(secret=SecretStr(secret))),
                      transport=TransportSettings(timeout_s=1.0, retry=RetryPolicy(max_attempts=1)), sleep=lambda s: None)
    with pytest.raises(EndpointUnreachableError) as ei:
        t.request("GET", "/v2/health/ready")
    assert secret not in str(ei.value)
    assert chain(ei.value) == [ei.value]
    assert all(secret not in text for text in chain_texts(ei.value))


def test_extra_fields_are_redacted_and_logging_never_raises(logs) -> None:
    """Review findings: `extra=` fields are set after the record factory ran (a JSON handler or a
    `%(url)s` formatter printed the secret), and an argument whose __str__ raised made the logging call
    itself raise once a secret was registered."""
    caplog, stream = logs
    Credential(secret=SecretStr(SECRET))
    log = logging.getLogger("someone.elses.library")
    log.info("request", extra={"url": f"https://h/x?foo={SECRET}", "meta": {"token": quote(SECRET, safe="")}})
    (rec,) = [r for r in caplog.records if r.getMessage() == "request"]
    assert leaks(f"{rec.url} {rec.meta}") == [] and "https://h/x" in rec.url  # type: ignore[attr-defined]

    class Hostile:
        def __str__(self) -> str:
            raise RuntimeError(f"cannot show {SECRET}")

        __repr__ = __str__

    log.warning("value %s", Hostile())  # must not raise
    assert leaks(all_log_text(caplog, stream)) == []
