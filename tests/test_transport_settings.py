"""Transport settings travel as one typed object (:class:`TransportSettings`), never as flat keywords.

Validation names the field; credential-like headers are refused; flat keywords are refused with the
replacement; the config-file ``[connector.transport]`` sub-table works through ``build_connector``;
and the settings really reach the wire (a local fault server on 127.0.0.1).
"""

from __future__ import annotations

import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from helpers.fault_server import Fault, FaultServer

from blackbox_rs.connectors.google_vision import GoogleVisionConnector
from blackbox_rs.connectors.http import HTTPTransport, RateLimiter, RetryPolicy, TransportSettings
from blackbox_rs.connectors.huggingface import HuggingFaceConnector
from blackbox_rs.connectors.kserve_v2 import KServeV2Connector
from blackbox_rs.connectors.registry import build_connector
from blackbox_rs.connectors.transport_settings import as_transport_settings
from blackbox_rs.errors import ConfigError, RequestTimeoutError

SHAPE = (3, 8, 8)
URL = "http://127.0.0.1:9"  # discard port: never contacted
META = {"name": "clf", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 8, 8]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]}
SECRET = "sk-transport-0f9e8d7c6b5a"


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer(input_shape=SHAPE, num_classes=4, service_time_s=0.05) as srv:
        yield srv


def offline_kserve(**kw: Any) -> KServeV2Connector:
    return KServeV2Connector(URL, "clf", metadata=META, check_ready=False, **kw)


# ---- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("timeout_s", 0), ("timeout_s", -1.0), ("timeout_s", True), ("timeout_s", "3"), ("timeout_s", float("inf")),
    ("connect_timeout_s", 0), ("max_in_flight", 0), ("max_in_flight", 2.5), ("max_in_flight", True),
    ("rate_limit", 0), ("rate_limit", -2.0), ("rate_limit", "fast"), ("rate_limit", True),
    ("max_attempts", 0), ("retry", {"max_attempts": 0}), ("retry", {"attempts": 2}), ("verify", ""),
    ("verify", 3), ("headers", {"X-Trace": 5}), ("tiemout_s", 3.0),
])
def test_a_bad_value_is_a_config_error_naming_the_field(field: str, value: Any) -> None:
    for build in (lambda: TransportSettings(**{field: value}), lambda: as_transport_settings({field: value}),
                  lambda: offline_kserve(transport={field: value})):
        with pytest.raises(ConfigError, match=f"transport.{field}") as ei:
            build()
        assert ei.value.__context__ is None and ei.value.__cause__ is None


def test_defaults_and_accepted_forms() -> None:
    s = TransportSettings()
    assert (s.timeout_s, s.connect_timeout_s, s.max_in_flight, s.rate_limit, s.max_attempts, s.retry, s.headers,
            s.verify) == (30.0, None, None, "default", None, None, {}, True)
    s = as_transport_settings({"timeout_s": 5, "rate_limit": 2, "verify": "/etc/ca.pem",
                               "retry": {"max_attempts": 2, "retry_statuses": [503]}})
    assert s.timeout_s == 5.0 and s.rate_limit == 2.0 and s.verify == "/etc/ca.pem"
    assert s.retry == RetryPolicy(max_attempts=2, retry_statuses=frozenset({503}))
    limiter = RateLimiter(3.0)
    assert TransportSettings(rate_limit=limiter).rate_limit is limiter
    assert as_transport_settings(s) is s and as_transport_settings(None) == TransportSettings()
    with pytest.raises(ConfigError, match="transport must be a TransportSettings"):
        as_transport_settings(30)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="frozen"):
        s.timeout_s = 1.0  # type: ignore[misc]
    assert all(f.description for f in TransportSettings.model_fields.values())


def test_max_attempts_and_a_contradicting_retry_policy_are_refused() -> None:
    with pytest.raises(ConfigError, match="max_attempts=2 contradicts retry.max_attempts=5"):
        TransportSettings(max_attempts=2, retry=RetryPolicy(max_attempts=5))
    assert TransportSettings(max_attempts=5, retry=RetryPolicy(max_attempts=5)).retry.max_attempts == 5


# ---- no secrets in headers ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Authorization", "authorization", "Proxy-Authorization", "X-Api-Key",
                                  "Ocp-Apim-Subscription-Key", "Prediction-Key", "Cookie", "X-Auth-Token",
                                  "X-Amz-Security-Token", "X-Client-Secret"])
def test_a_credential_like_header_is_refused_naming_the_header_not_its_value(name: str) -> None:
    for build in (lambda: TransportSettings(headers={"X-Trace": "t", name: SECRET}),
                  lambda: offline_kserve(transport={"headers": {name: SECRET}}),
                  lambda: HTTPTransport(URL, transport={"headers": {name: SECRET}})):
        with pytest.raises(ConfigError, match="looks like a credential") as ei:
            build()
        assert repr(name) in str(ei.value) and "auth=" in str(ei.value)
        assert SECRET not in str(ei.value) and ei.value.__context__ is None  # the ValidationError shows inputs


def test_repr_never_shows_a_credential_header_value() -> None:
    forced = TransportSettings.model_construct(headers={"X-Api-Key": SECRET, "Host": "m.example.com"})
    assert SECRET not in repr(forced) and "m.example.com" in repr(forced)
    ok = TransportSettings(headers={"Host": "m.example.com", "X-Trace": "abc"})
    assert "'X-Trace': 'abc'" in repr(ok) and ok.host == "m.example.com"


# ---- one way to say it: flat keywords are refused -----------------------------------------------------


@pytest.mark.parametrize(("key", "value", "shown"), [
    ("timeout_s", 5, "transport=TransportSettings(timeout_s=5)"),
    ("max_in_flight", 2, "transport=TransportSettings(max_in_flight=2)"),
    ("rate_limit", None, "transport=TransportSettings(rate_limit=None)"),
    ("retry", RetryPolicy(max_attempts=2), "transport=TransportSettings(retry=...)"),
    ("headers", {"X-Trace": SECRET}, "transport=TransportSettings(headers=...)"),
    ("verify", False, "transport=TransportSettings(verify=False)"),
    ("connect_timeout_s", 1.0, "transport=TransportSettings(connect_timeout_s=1.0)"),
])
def test_a_flat_transport_keyword_is_refused_with_the_replacement(key: str, value: Any, shown: str) -> None:
    builds = {
        "kserve": lambda: offline_kserve(**{key: value}),
        "vendor": lambda: HuggingFaceConnector("m", base_url=URL, label_map=["cat", "dog"], **{key: value}),
        "transport": lambda: HTTPTransport(URL, **{key: value}),
    }
    for what, build in builds.items():
        with pytest.raises(ConfigError) as ei:
            build()
        msg = str(ei.value)
        assert key in msg and shown in msg, (what, msg)
        assert SECRET not in msg


def test_build_connector_refuses_a_flat_transport_key_naming_the_sub_table() -> None:
    with pytest.raises(ConfigError, match=r"timeout_s is a transport setting.*\[connector.transport\]"):
        build_connector("kserve_v2", {"base_url": URL, "model_name": "clf", "metadata": META, "check_ready": False,
                                      "timeout_s": 60})
    with pytest.raises(ConfigError, match=r"max_in_flight, rate_limit are transport settings.*\[connector.transport\]"):
        build_connector("huggingface", {"model_id": "m", "label_map": ["cat", "dog"], "max_in_flight": 1,
                                        "rate_limit": 1.0})
    with pytest.raises(ConfigError, match="unknown setting 'timeout_s'"):  # not an HTTP connector: just unknown
        build_connector("torchscript", {"path": "model.pt", "timeout_s": 60})


CONFIG = """
[connector]
name = "kserve_v2"
base_url = "http://127.0.0.1:9"
model_name = "clf"
check_ready = false

[connector.transport]
timeout_s = 60
connect_timeout_s = 2.5
max_in_flight = 2
rate_limit = 4.0
verify = false
headers = { Host = "clf.ns.example.com" }
retry = { max_attempts = 3, retry_statuses = [503] }
"""


def test_config_file_transport_sub_table_through_build_connector() -> None:
    section = tomllib.loads(CONFIG)["connector"]
    name = section.pop("name")
    conn = build_connector(name, {**section, "metadata": META})
    with conn:
        t = conn.transport
        assert (t.timeout_s, t.connect_timeout_s, t.max_in_flight, t.verify) == (60.0, 2.5, 2, False)
        assert t.limiter is not None and t.limiter.rate == 4.0
        assert t.retry == RetryPolicy(max_attempts=3, retry_statuses=frozenset({503}))
        assert conn.info.max_concurrency == 2 and "|host=clf.ns.example.com|" in conn.info.fingerprint
    bad = tomllib.loads(CONFIG.replace("max_in_flight = 2", "max_in_flight = 0"))["connector"]
    bad.pop("name")
    with pytest.raises(ConfigError, match="transport.max_in_flight"):
        build_connector(name, {**bad, "metadata": META})


# ---- defaults: the connector's declared ones fill what is unset ------------------------------------------


def test_unset_fields_take_the_connectors_declared_defaults() -> None:
    with offline_kserve() as k:
        assert (k.transport.max_in_flight, k.transport.limiter, k.transport.retry) == (4, None, RetryPolicy())
        assert k.transport.connect_timeout_s == 10.0 and k.transport.timeout_s == 30.0
    with offline_kserve(transport=TransportSettings(timeout_s=4.0)) as k:
        assert k.transport.connect_timeout_s == 4.0  # min(timeout_s, 10)
    spec = HuggingFaceConnector.spec
    with HuggingFaceConnector("m", base_url=URL, label_map=["cat", "dog"]) as hf:
        assert hf.transport.max_in_flight == spec.max_in_flight == hf.info.max_concurrency
        assert hf.transport.limiter is not None and hf.transport.limiter.rate == spec.rate_limit
    with HuggingFaceConnector("m", base_url=URL, label_map=["cat", "dog"],
                              transport=TransportSettings(rate_limit=None, max_in_flight=1)) as hf:
        assert hf.transport.limiter is None and hf.transport.max_in_flight == hf.info.max_concurrency == 1
    # max_attempts alone keeps the vendor's retried statuses (Google retries its 500s)
    with GoogleVisionConnector(base_url=URL, label_map=["cat", "dog"], quota_project="proj",
                               transport={"max_attempts": 2, "headers": {"X-Trace": "t"}}) as g:
        assert g.transport.retry.max_attempts == 2 and 500 in g.transport.retry.retry_statuses
        assert g.transport.settings.headers == {"X-Trace": "t", "x-goog-user-project": "proj"}


# ---- the settings reach the wire ----------------------------------------------------------------------


def test_one_in_flight_really_serialises_requests(server: FaultServer) -> None:
    with KServeV2Connector(server.url, server.model_name, transport=TransportSettings(max_in_flight=1)) as c:
        x = torch.rand(1, *SHAPE)
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda _: c.query(x), range(8)))
        assert len(server.infer_records()) == 8
        assert server.max_in_flight_seen == 1


def test_timeout_really_times_out(server: FaultServer) -> None:
    with KServeV2Connector(server.url, server.model_name,
                           transport=TransportSettings(timeout_s=0.2, max_attempts=1)) as c:
        server.push(Fault("slow", delay=1.5))
        t0 = time.monotonic()
        with pytest.raises(RequestTimeoutError, match="0.2 s"):
            c.query(torch.rand(1, *SHAPE))
        assert time.monotonic() - t0 < 1.2  # gave up after the timeout, did not wait for the slow answer
        assert len(server.infer_records()) == 1  # max_attempts=1: not retried


def test_extra_headers_are_sent(server: FaultServer) -> None:
    with KServeV2Connector(server.url, server.model_name,
                           transport={"headers": {"X-Trace": "trace-42"}}) as c:
        c.query(torch.rand(1, *SHAPE))
        assert server.last_headers["X-Trace"] == "trace-42"


def test_a_rejected_header_value_never_shows_and_headers_cannot_be_edited_after_validation() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as ei:
        TransportSettings.model_validate({"headers": {"Authorization": "Bearer SECRET123"}})
    assert "SECRET123" not in str(ei.value) and "SECRET123" not in repr(ei.value)
    s = TransportSettings(headers={"X-Trace": "1"})
    with pytest.raises(ConfigError, match="immutable"):
        s.headers["Authorization"] = "Bearer SECRET123"
    assert dict(s.headers) == {"X-Trace": "1"}
