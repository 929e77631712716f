"""HTTP core and the KServe v2 connector against a local fault-injecting server (127.0.0.1 only)."""

from __future__ import annotations

import base64
import io
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from helpers.fault_server import Fault, FaultServer, max_in_window
from pydantic import SecretStr

from blackbox_rs.connectors._encoding import ImageEncoding, encode_images, to_uint8_array
from blackbox_rs.connectors._ratelimit import RateLimiter
from blackbox_rs.connectors.http import (
    Auth,
    Credential,
    HTTPTransport,
    RetryPolicy,
    TransportSettings,
    parse_retry_after,
)
from blackbox_rs.connectors.kserve_v2 import KServeV2Connector
from blackbox_rs.connectors.labelmap import LabelMap
from blackbox_rs.errors import (
    AuthenticationError,
    ConfigError,
    EndpointUnreachableError,
    HTTPStatusError,
    InvalidParameterError,
    InvalidResponseError,
    ModelNotReadyError,
    QuotaExhausted,
    RateLimitedError,
    RequestTimeoutError,
    ServiceUnavailableError,
    TLSError,
    UnmappedLabelError,
)
from blackbox_rs.redact import MASK, redact, redact_headers, redact_url, register_secret

SHAPE = (3, 8, 8)
K = 4


class SleepRecorder:
    """Injected instead of time.sleep for backoff: records the waits, sleeps almost nothing."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, s: float) -> None:
        self.waits.append(s)


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer(input_shape=SHAPE, num_classes=K) as srv:
        yield srv


def make(srv: FaultServer, sleep: SleepRecorder | None = None, **kw: object) -> KServeV2Connector:
    """A connector for ``srv``; transport fields among ``kw`` go into its :class:`TransportSettings`."""
    t = {k: kw.pop(k) for k in list(kw) if k in TransportSettings.model_fields}
    t.setdefault("retry", RetryPolicy(max_attempts=5, backoff_base_s=0.01, backoff_max_s=0.05))
    return KServeV2Connector(srv.url, srv.model_name, sleep=sleep or SleepRecorder(),  # type: ignore[arg-type]
                             transport=TransportSettings(**t), **kw)


def batch(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def reference(srv: FaultServer, x: torch.Tensor) -> np.ndarray:
    return srv.model(x.numpy().astype(np.float64).astype(np.float32))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- discovery and the happy path ---------------------------------------------------------------


def test_discovery_and_scores(server: FaultServer) -> None:
    with make(server) as c:
        info = c.info
        assert info.input_shape == SHAPE and info.num_classes == K and info.returns_scores
        assert info.max_concurrency == 4
        assert c.input_name == "input" and c.output_name == "scores" and c.output_kind == "scores"
        assert info.fingerprint.startswith("kserve-v2:http://127.0.0.1:")
        assert "|model=toy|version=1|" in info.fingerprint
        x = batch(5)
        pred = c.query(x)
        ref = reference(server, x)
        np.testing.assert_allclose(pred.scores.numpy(), ref, rtol=1e-6)
        assert pred.labels.tolist() == ref.argmax(1).tolist()


def test_batches_are_split_at_max_batch(server: FaultServer) -> None:
    with make(server, max_batch=3) as c:
        x = batch(7)
        pred = c.query(x)
        sizes = [r.n_images for r in server.infer_records()]
        assert sizes == [3, 3, 1]
        assert pred.labels.tolist() == reference(server, x).argmax(1).tolist()
        assert c.query(x[:0]).labels.shape == (0,)
        assert len(server.infer_records()) == 3  # an empty batch sends nothing


def test_each_request_has_an_id_kept_across_retries(server: FaultServer) -> None:
    with make(server) as c:
        server.push("503")
        c.query(batch(2))
        c.query(batch(2))
        recs = server.infer_records()
        assert [r.fault for r in recs] == ["503", "ok", "ok"]
        assert recs[0].request_id == recs[1].request_id != recs[2].request_id
        assert server.last_body is not None and server.last_body["id"] == recs[2].request_id


def test_uint8_encoding_is_the_quantised_image(server: FaultServer) -> None:
    server.input_datatype = "UINT8"
    with make(server, encoding="uint8") as c:
        assert "encoding=uint8-NCHW" in c.info.fingerprint
        x = batch(4)
        pred = c.query(x)
        assert server.last_body["inputs"][0]["datatype"] == "UINT8"
        q = to_uint8_array(x).astype(np.float64) / 255.0
        assert pred.labels.tolist() == server.model(q.astype(np.float32)).argmax(1).tolist()


def test_png_bytes_encoding(server: FaultServer) -> None:
    server.input_datatype = "BYTES"
    with make(server, encoding="png", input_shape=SHAPE) as c:
        x = batch(3)
        pred = c.query(x)
        sent = server.last_body["inputs"][0]
        assert sent["datatype"] == "BYTES" and sent["shape"] == [3]
        assert sent["parameters"] == {"content_type": "base64"}
        assert [base64.b64decode(s) for s in sent["data"]] == encode_images(x, "png")
        q = to_uint8_array(x).astype(np.float64) / 255.0
        assert pred.labels.tolist() == server.model(q.astype(np.float32)).argmax(1).tolist()


def test_fp32_input_declared_as_bytes_is_a_config_error(server: FaultServer) -> None:
    with pytest.raises(ConfigError, match="declared FP32"):
        make(server, encoding="jpeg", input_shape=SHAPE, input_name="input")


def test_host_header_override_is_sent_and_identifies_the_model(server: FaultServer) -> None:
    host = "classifier.team-a.example.com"
    with make(server, headers={"Host": host}) as c:
        c.query(batch(1))
        assert server.last_headers["Host"] == host
        assert f"|host={host}|" in c.info.fingerprint
    with make(server) as plain:
        assert plain.info.fingerprint != c.info.fingerprint


def test_index_output() -> None:
    with FaultServer(input_shape=SHAPE, num_classes=K, output_kind="index") as srv, \
            make(srv, num_classes=K) as c:
        assert c.output_kind == "index" and not c.info.returns_scores
        x = batch(6)
        assert c.query(x).labels.tolist() == reference(srv, x).argmax(1).tolist()


# ---- retries -------------------------------------------------------------------------------------


def test_429_honours_retry_after(server: FaultServer) -> None:
    sleep = SleepRecorder()
    with make(server, sleep) as c:
        server.push(Fault("429", retry_after=0.7), Fault("429", retry_after=1.5))
        pred = c.query(batch(2))
        assert len(pred) == 2
        assert sleep.waits == [0.7, 1.5]
        st = c.transport_stats()
        # ready + metadata + three attempts of one infer call
        assert st["requests"] == 5 and st["calls"] == 3 and st["retries"] == 2 and st["throttled"] == 2


def test_retry_after_http_date() -> None:
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_503_burst_then_success_uses_jittered_backoff(server: FaultServer) -> None:
    sleep = SleepRecorder()
    with make(server, sleep, retry=RetryPolicy(max_attempts=6, backoff_base_s=0.1, backoff_max_s=0.3)) as c:
        server.push("503", "502", "504", "503")
        x = batch(3)
        assert c.query(x).labels.tolist() == reference(server, x).argmax(1).tolist()
        assert len(sleep.waits) == 4
        caps = [0.1, 0.2, 0.3, 0.3]
        assert all(0 <= w <= cap for w, cap in zip(sleep.waits, caps, strict=True))


def test_503_forever_raises_service_unavailable(server: FaultServer) -> None:
    with make(server, retry=RetryPolicy(max_attempts=3, backoff_base_s=0.0)) as c:
        server.push(*["503"] * 3)
        with pytest.raises(ServiceUnavailableError) as ei:
            c.query(batch(1))
        assert ei.value.status == 503 and ei.value.attempts == 3
        assert "unavailable" in ei.value.body_excerpt
        assert len(server.infer_records()) == 3


def test_429_forever_is_rate_limited_not_quota_and_not_billed(server: FaultServer) -> None:
    with make(server, retry=RetryPolicy(max_attempts=2, backoff_base_s=0.0)) as c:
        server.push(Fault("429", retry_after=0.01), Fault("429", retry_after=0.01))
        with pytest.raises(RateLimitedError) as ei:
            c.query(batch(1))
        err = ei.value
        assert not isinstance(err, QuotaExhausted) and isinstance(err, HTTPStatusError)
        assert err.status == 429 and err.billed is False and err.retry_after == 0.01 and err.throttled == 2
        assert "2 of 2 attempts throttled" in str(err) and "retry later" in str(err)
        assert "max_in_flight" in str(err) and "quota exhausted" not in str(err)


def test_retry_after_beyond_limit_gives_up_at_once(server: FaultServer) -> None:
    sleep = SleepRecorder()
    with make(server, sleep, retry=RetryPolicy(max_retry_after_s=5.0)) as c:
        server.push(Fault("429", retry_after=3600))
        with pytest.raises(RateLimitedError, match="retry after 3600 s") as ei:
            c.query(batch(1))
        assert ei.value.retry_after == 3600 and sleep.waits == []
        assert len(server.infer_records()) == 1


def test_slow_answer_times_out_and_is_retried(server: FaultServer) -> None:
    with make(server, timeout_s=0.3) as c:
        server.push(Fault("slow", delay=2.0))
        t0 = time.monotonic()
        assert len(c.query(batch(2))) == 2
        assert 0.25 < time.monotonic() - t0 < 1.5  # gave up on the slow answer, did not wait 2 s
        assert [r.fault for r in server.infer_records()] == ["slow", "ok"]


def test_always_slow_raises_timeout_error(server: FaultServer) -> None:
    with make(server, timeout_s=0.2, retry=RetryPolicy(max_attempts=2, backoff_base_s=0.0)) as c:
        server.push(Fault("slow", delay=0.6), Fault("slow", delay=0.6))
        with pytest.raises(RequestTimeoutError, match="0.2 s timeout on 2 attempts") as ei:
            c.query(batch(1))
        assert ei.value.billed is None  # the server may have run the model


# ---- non-retried failures ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "error", "pattern"),
    [
        ("malformed_json", InvalidResponseError, "not JSON"),
        ("wrong_count", InvalidResponseError, "predictions for 2 images, 3 were sent"),
        ("wrong_width", InvalidResponseError, "scores of width 5 .*4 classes"),
        ("500_text", HTTPStatusError, "HTTP 500"),
        ("400", HTTPStatusError, "HTTP 400"),
        ("bad_id", InvalidResponseError, "id 'someone-else'"),
        ("version_swap", InvalidResponseError, "model version '1-swapped', expected '1'"),
        ("redirect", HTTPStatusError, "redirects are not followed"),
    ],
)
def test_bad_answers_raise_typed_errors_without_retry(
    server: FaultServer, fault: str, error: type[Exception], pattern: str
) -> None:
    with make(server) as c:
        server.push(fault)
        with pytest.raises(error, match=pattern) as ei:
            c.query(batch(3))
        assert len(server.infer_records()) == 1, "must not be retried"
        if fault == "500_text":
            assert ei.value.status == 500 and "model raised ValueError" in ei.value.body_excerpt
        if fault == "redirect":
            assert "abc123" not in str(ei.value) and "token=***" in str(ei.value)


def test_html_endpoint_is_a_clear_error(server: FaultServer) -> None:
    server.default_fault = Fault("html")
    with pytest.raises(InvalidResponseError, match="not JSON.*text/html.*nginx"):
        make(server)


def test_unknown_model_is_404(server: FaultServer) -> None:
    with pytest.raises(HTTPStatusError, match="'nope' not found") as ei:
        KServeV2Connector(server.url, "nope")
    assert ei.value.status == 404


def test_model_not_ready_is_typed(server: FaultServer) -> None:
    server.model_ready = False
    with pytest.raises(ModelNotReadyError, match="'toy' .* is not ready"):
        make(server)
    with make(server, check_ready=False) as c:  # opt out, e.g. for servers without the endpoint
        assert len(c.query(batch(1))) == 1


def test_unreachable_host_is_retried_then_typed_and_not_billed() -> None:
    sleep = SleepRecorder()
    port = closed_port()
    with pytest.raises(EndpointUnreachableError, match="cannot connect after 3 attempts") as ei:
        KServeV2Connector(f"http://127.0.0.1:{port}", "toy", sleep=sleep,
                          transport=TransportSettings(retry=RetryPolicy(max_attempts=3, backoff_base_s=0.01)))
    assert ei.value.billed is False and len(sleep.waits) == 2


def test_tls_to_plain_http_port_fails_fast(server: FaultServer) -> None:
    sleep = SleepRecorder()
    with pytest.raises(TLSError, match="TLS handshake") as ei:
        KServeV2Connector(server.url.replace("http://", "https://"), "toy", sleep=sleep)
    assert sleep.waits == [] and ei.value.billed is False


def test_scores_width_contradicting_metadata_is_config_error(server: FaultServer) -> None:
    with pytest.raises(ConfigError, match="declared with 4 scores per image, but 5 classes"):
        make(server, num_classes=5)


# ---- vendor labels --------------------------------------------------------------------------------

VOCAB = ["tabby", "Labrador", "sports car", "Photograph", "toaster", "Rectangle"]


def _pixel_model(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1)[:, :6].astype(np.float32)  # diverse argmax on random images


def _labels_fn(scores: np.ndarray) -> list[list[str]]:
    order = np.argsort(-scores, axis=1, kind="stable")[:, :2]
    return [[VOCAB[i] for i in row] for row in order]


def test_label_output_through_labelmap_with_other() -> None:
    lm = LabelMap(["cat", "dog"], {"cat": ["Tabby"], "dog": ["labrador"]})
    with FaultServer(input_shape=SHAPE, num_classes=6, output_kind="label", labels_fn=_labels_fn,
                     model=_pixel_model) as srv, \
            make(srv, label_map=lm) as c:
        assert c.info.class_names == ("cat", "dog", "other") and c.output_kind == "label"
        assert f"labelmap={lm.fingerprint}" in c.info.fingerprint
        x = batch(40)
        got = c.query(x).labels.tolist()
        want = []
        for row in _labels_fn(reference(srv, x)):
            want.append(lm.map_ranked(row, depth=1))  # the model's top answer (label_depth=1, the default)
        assert got == want
        with make(srv, label_map=lm, label_depth=None) as deep:
            assert deep.info.fingerprint != c.info.fingerprint
            assert deep.query(x).labels.tolist() == [lm.map_ranked(r) for r in _labels_fn(reference(srv, x))]
        assert set(got) == {0, 1, 2}, "this batch should exercise every class, other included"
        assert "sports car" in lm.unmapped_counts()


def test_config_file_forms_of_labelmap_and_retry() -> None:
    lm = LabelMap(["cat", "dog"], {"cat": ["Tabby"], "dog": ["labrador"]})
    with FaultServer(input_shape=SHAPE, num_classes=6, output_kind="label", labels_fn=_labels_fn,
                     model=_pixel_model) as srv, \
            KServeV2Connector(srv.url, "toy", label_map=lm.to_dict(),
                              transport={"retry": {"max_attempts": 2, "retry_statuses": [503]}}) as c:
        assert c.label_map == lm and c.transport.retry.retry_statuses == frozenset({503})
    with pytest.raises(ConfigError, match="invalid retry settings"):
        KServeV2Connector("http://127.0.0.1:1", "toy", transport={"retry": {"attempts": 2}})


def test_unknown_label_without_labelmap_raises() -> None:
    with FaultServer(input_shape=SHAPE, num_classes=6, output_kind="label", labels_fn=_labels_fn,
                     model=_pixel_model) as srv, \
            make(srv, class_names=["tabby", "Labrador"]) as c:
        with pytest.raises(UnmappedLabelError, match="none of the labels"):
            c.query(batch(40))


# ---- concurrency and rate limit ---------------------------------------------------------------------


def test_concurrent_callers_never_exceed_max_in_flight() -> None:
    with FaultServer(input_shape=SHAPE, num_classes=K, service_time_s=0.05) as srv, \
            make(srv, max_in_flight=2) as c:
        x = batch(1)
        with ThreadPoolExecutor(8) as pool:
            preds = list(pool.map(lambda _: c.query(x), range(12)))
        assert srv.max_in_flight_seen == 2
        assert all(p.labels.tolist() == preds[0].labels.tolist() for p in preds)


def test_rate_limit_holds_server_side() -> None:
    with FaultServer(input_shape=SHAPE, num_classes=K) as srv, \
            make(srv, max_in_flight=4, rate_limit=RateLimiter(10, burst=3, margin_s=0.1)) as c:
        x = batch(1)
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda _: c.query(x), range(16)))
        times = [r.t for r in srv.infer_records()]
        assert len(times) == 16
        assert max_in_window(times, 1.0) <= 10


def test_rate_limiter_window_guarantee_with_fake_clock() -> None:
    now = [0.0]
    lim = RateLimiter(5, burst=5, margin_s=0.0, clock=lambda: now[0], sleep=lambda s: None)
    slots = [lim.reserve() for _ in range(23)]
    assert slots == sorted(slots)
    assert slots[:5] == [0.0] * 5  # a burst after idle
    assert max_in_window(slots, 1.0) == 5
    now[0] = 100.0  # after idling, the burst is available again
    assert [lim.reserve() for _ in range(5)] == pytest.approx([100.0] * 5)


def test_rate_limiter_spacing_and_threads() -> None:
    lim = RateLimiter(50, margin_s=0.0)
    stamps: list[float] = []
    lock = threading.Lock()

    def take() -> None:
        for _ in range(10):
            lim.acquire()
            with lock:
                stamps.append(time.monotonic())

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stamps.sort()
    gaps = np.diff(stamps)
    assert len(stamps) == 40 and np.median(gaps) >= 0.015  # ~1/50 s apart, not bunched
    with pytest.raises(InvalidParameterError):
        RateLimiter(0)


# ---- credentials never leak ---------------------------------------------------------------------------

TOKEN = "sk-test-1234567890abcdef"


def test_credential_from_env_never_shown(monkeypatch: pytest.MonkeyPatch, server: FaultServer) -> None:
    monkeypatch.setenv("BBRS_TEST_TOKEN", TOKEN)
    cred = Credential(env="BBRS_TEST_TOKEN")
    assert TOKEN not in repr(cred) and "env:BBRS_TEST_TOKEN" in repr(cred)
    with pytest.raises(TypeError):
        pickle.dumps(cred)
    with make(server, auth=Auth.bearer(cred)) as c:
        c.query(batch(1))
        assert server.last_headers["Authorization"] == f"Bearer {TOKEN}"
        server.push("401_echo")
        with pytest.raises(AuthenticationError) as ei:
            c.query(batch(1))
        e = ei.value
        assert e.status == 401 and len(server.infer_records()) == 2  # never retried
        for shown in (str(e), repr(e), e.body_excerpt, repr(c), repr(c.transport), c.info.fingerprint,
                      c.info.model_dump_json()):
            assert TOKEN not in shown
        assert "denied for Bearer ***" in e.body_excerpt


def test_missing_env_credential_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BBRS_NOT_SET", raising=False)
    with pytest.raises(ConfigError, match="'BBRS_NOT_SET'"):
        Auth.bearer("BBRS_NOT_SET")


def test_query_string_key_is_redacted_in_errors(server: FaultServer) -> None:
    secret = "AIzaSy-query-key-000111"
    with make(server, auth=Auth.query("key", Credential(secret=SecretStr(secret)))) as c:
        assert TOKEN not in c.info.fingerprint and secret not in c.info.fingerprint
        server.push("400")
        with pytest.raises(HTTPStatusError) as ei:
            c.query(batch(1))
        assert secret not in str(ei.value)


def test_credentials_in_url_are_refused() -> None:
    with pytest.raises(ConfigError, match="not in the URL"):
        HTTPTransport("http://user:pw@127.0.0.1:1")


def test_redact_helpers() -> None:
    register_secret("reg-secret-42")
    assert redact("x reg-secret-42 y") == f"x {MASK} y"
    assert redact("Authorization: Bearer abcdefghijkl") == f"Authorization: {MASK}"
    assert "hunter2" not in redact("https://bob:hunter2@example.com/x")
    assert redact_url("https://h/p?key=AIza123&x=1") == "https://h/p?key=***&x=1"
    assert redact_headers({"X-Api-Key": "v", "Accept": "reg-secret-42"}) == {"X-Api-Key": MASK, "Accept": MASK}
    with pytest.raises(ValueError):
        register_secret("abc")


# ---- encodings are deterministic --------------------------------------------------------------------


@pytest.mark.parametrize("enc", ["png", "jpeg"])
def test_byte_encodings_are_deterministic(enc: str) -> None:
    x = batch(3)
    a, b = encode_images(x, enc), encode_images(x.clone(), enc)
    assert a == b and all(len(v) > 0 for v in a)
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(a[0])))
    if enc == "png":  # lossless: exactly the uint8 quantisation
        assert np.array_equal(img.transpose(2, 0, 1), to_uint8_array(x)[0])


def test_uint8_rounding_and_encoding_errors() -> None:
    x = torch.tensor([0.0, 0.5 / 255, 1.5 / 255, 1.0]).reshape(1, 1, 2, 2)
    assert to_uint8_array(x).ravel().tolist() == [0, 0, 2, 255]  # round half to even
    with pytest.raises(InvalidParameterError, match="2 channels"):
        encode_images(torch.zeros(1, 2, 4, 4), "png")
    with pytest.raises(InvalidParameterError, match="4 channels"):
        encode_images(torch.zeros(1, 4, 4, 4), ImageEncoding.JPEG)


# ---- through the engine: faults change nothing ------------------------------------------------------


def test_certify_through_faults_equals_clean_run_and_charges_every_billable_attempt() -> None:
    certify_mod = pytest.importorskip("blackbox_rs.core")
    from blackbox_rs.budget import QueryBudget
    from blackbox_rs.engine import QueryEngine

    def proto_model(x: np.ndarray) -> np.ndarray:  # class = which third of the image is brightest
        v = x.reshape(x.shape[0], 3, -1).mean(axis=2)
        return (8.0 * v).astype(np.float32)

    xs = [torch.full(SHAPE, 0.3) for _ in range(3)]
    for c in range(3):
        xs[c][c] = 0.8
    kw = dict(sigma=0.25, n0=16, n=96, alpha=0.01, seed=11)
    per_input = 16 + 96
    # all of them may hit one request: it still has an attempt left
    faults = [Fault("429", retry_after=0.01), "503", "503", "502", "504", Fault("slow", delay=0.6),
              Fault("429", retry_after=0.02), "503"]
    billable_faults = 6  # 5xx and the timed-out answer may be billed; the two 429s were refused unbilled
    with FaultServer(input_shape=SHAPE, num_classes=3, model=proto_model) as srv, \
            make(srv, max_batch=16, max_in_flight=3, timeout_s=0.3,
                 retry=RetryPolicy(max_attempts=len(faults) + 1, backoff_base_s=0.01, backoff_max_s=0.02)) as conn:

        def run(extra: int = 0) -> tuple[list[object], QueryEngine, QueryBudget]:
            budget = QueryBudget(max_queries=len(xs) * per_input + extra)  # exact: one more charge would raise
            engine = QueryEngine(conn, budget=budget, max_in_flight=3)
            return [certify_mod.certify(engine, x, **kw) for x in xs], engine, budget

        clean, clean_engine, _ = run()
        n_clean = len(srv.infer_records())
        srv.push(*faults)
        faulty, engine, budget = run(extra=16 * billable_faults)
        assert srv.pending_faults() == 0, "every fault was served"
        assert len(srv.infer_records()) == 2 * n_clean + len(faults)  # each fault cost exactly one retry
    paid = {"queries", "queries_total"}  # retries are charged: only what was paid differs
    same = [{k: v for k, v in c.model_dump().items() if k not in paid} for c in faulty]
    assert same == [{k: v for k, v in c.model_dump().items() if k not in paid} for c in clean]
    assert [c.prediction for c in clean] == [0, 1, 2] and all(c.radius > 0 for c in clean)
    assert clean_engine.stats.queries == len(xs) * per_input
    # every attempt that may have been billed is charged (16 images a request), throttled ones are not
    assert engine.stats.queries == budget.spent_queries == len(xs) * per_input + 16 * billable_faults
    assert engine.stats.answered == len(xs) * per_input and engine.stats.failed_requests == 0
    assert engine.stats.attempted == len(xs) * per_input + 16 * len(faults)
    assert engine.stats.retried == 16 * len(faults)
    assert conn.transport_stats()["retried_images"] == 16 * len(faults)
    assert sum(c.queries for c in faulty) == budget.spent_queries  # each certificate carries its retries
