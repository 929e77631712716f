"""Hosted-vendor connectors against local fakes of their wire formats (127.0.0.1 only)."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from helpers.vendor_fakes import (
    FAKES,
    GoogleVisionFake,
    KServeLabelFake,
    OpenAIChatFake,
    RekognitionFake,
    VendorFake,
)

from blackbox_rs.connectors._sigv4 import sign
from blackbox_rs.connectors._vendor import VendorConnector
from blackbox_rs.connectors.aws_rekognition import RekognitionConnector
from blackbox_rs.connectors.azure_vision import AzureCustomVisionConnector, AzureImageAnalysisConnector
from blackbox_rs.connectors.clarifai import ClarifaiConnector
from blackbox_rs.connectors.google_vision import GoogleVisionConnector
from blackbox_rs.connectors.http import Auth, RetryPolicy, TransportSettings
from blackbox_rs.connectors.huggingface import HuggingFaceConnector
from blackbox_rs.connectors.kserve_v2 import KServeV2Connector
from blackbox_rs.connectors.labelmap import LabelMap
from blackbox_rs.connectors.openai_chat import OpenAIChatConnector, parse_duration
from blackbox_rs.connectors.registry import build_connector, list_connectors
from blackbox_rs.connectors.tf_serving import TFServingConnector
from blackbox_rs.connectors.torchserve import TorchServeConnector
from blackbox_rs.engine import QueryEngine
from blackbox_rs.errors import (
    ConnectorError,
    HTTPStatusError,
    ModelVersionChangedError,
    QuotaExhausted,
    RateLimitedError,
)

SECRET = VendorFake.secret
LM = LabelMap(["cat", "dog"], {"cat": ["tabby, tabby cat", "tabby"], "dog": ["golden retriever", "golden_retriever"]})
ENV = {"HF_TOKEN", "GOOGLE_API_KEY", "AWS_SECRET_ACCESS_KEY", "AZURE_VISION_KEY", "AZURE_CUSTOM_VISION_KEY",
       "CLARIFAI_PAT", "TORCHSERVE_TOKEN", "OPENAI_API_KEY"}

Builder = Callable[[str, dict[str, Any]], VendorConnector]
BUILD: dict[str, Builder] = {
    "huggingface": lambda url, kw: HuggingFaceConnector("google/vit-base-patch16-224", base_url=url,
                                                        auth=Auth.bearer("HF_TOKEN"), top_k=5, **kw),
    "google_vision": lambda url, kw: GoogleVisionConnector(base_url=url, auth=Auth.query("key", "GOOGLE_API_KEY"), **kw),
    "aws_rekognition": lambda url, kw: RekognitionConnector("eu-west-1", base_url=url, **kw),
    "azure_image_analysis": lambda url, kw: AzureImageAnalysisConnector(
        url, auth=Auth.header("Ocp-Apim-Subscription-Key", "AZURE_VISION_KEY"), **kw),
    "azure_custom_vision": lambda url, kw: AzureCustomVisionConnector(
        url, "proj-1", "Iteration3", auth=Auth.header("Prediction-Key", "AZURE_CUSTOM_VISION_KEY"), **kw),
    "clarifai": lambda url, kw: ClarifaiConnector(base_url=url, auth=Auth.scheme("Key", "CLARIFAI_PAT"), **kw),
    "torchserve": lambda url, kw: TorchServeConnector("resnet-18", base_url=url, auth=Auth.bearer("TORCHSERVE_TOKEN"),
                                                      **kw),
    "tf_serving": lambda url, kw: TFServingConnector("classifier", base_url=url, vocabulary=["cat", "dog", "sofa"],
                                                     **kw),
    "openai_chat": lambda url, kw: OpenAIChatConnector("gpt-4o-mini", base_url=url, auth=Auth.bearer("OPENAI_API_KEY"),
                                                       **kw),
}
QUOTA_VENDORS = ["huggingface", "google_vision", "azure_image_analysis", "azure_custom_vision", "clarifai",
                 "openai_chat"]


class Sleeps(list[float]):
    def __call__(self, s: float) -> None:
        self.append(s)


@pytest.fixture(autouse=True)
def _planted(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ENV:
        monkeypatch.setenv(var, SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", RekognitionFake.access_key)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


@pytest.fixture(params=sorted(BUILD))
def vendor(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.param


def make(name: str, fake: VendorFake, sleep: Sleeps | None = None, **kw: Any) -> VendorConnector:
    statuses = frozenset({429, 500, 502, 503, 504}) if name == "google_vision" else frozenset({429, 502, 503, 504})
    transport = {"rate_limit": None,
                 "retry": RetryPolicy(max_attempts=4, backoff_base_s=0.001, backoff_max_s=0.002, retry_statuses=statuses),
                 **{k: kw.pop(k) for k in list(kw) if k in TransportSettings.model_fields}}
    kw = {"label_map": LM, "input_shape": (3, 32, 32), "sleep": Sleeps() if sleep is None else sleep,
          "transport": TransportSettings(**transport), **kw}
    return BUILD[name](fake.url, kw)


def images(*levels: float) -> torch.Tensor:
    return torch.stack([torch.full((3, 32, 32), v) for v in levels])


CAT, DOG, OTHER = LM.class_names.index("cat"), LM.class_names.index("dog"), LM.class_names.index("other")


# ---- the matrix ------------------------------------------------------------------------------------
def test_answers_are_mapped_and_requests_match_the_wire_format(vendor: str) -> None:
    with FAKES[vendor]() as fake:
        conn = make(vendor, fake)
        pred = conn.query(images(0.9, 0.1, 0.5, 0.95))
        # grey: a label no task knows ranks first, so the vendor's answer is `other` (label_depth=1 by default:
        # runner-ups are not searched); Custom Vision scores only the project's own tags, so its top is dog
        grey = DOG if vendor == "azure_custom_vision" else OTHER
        assert pred.labels.tolist() == [CAT, DOG, grey, CAT]
        assert "|depth=1" in conn.info.fingerprint
        assert fake.violations == []
        assert sum(r.n_images for r in fake.log) == 4
        assert len(fake.log) == -(-4 // conn.info.max_batch)  # batched vendors: one request
        assert SECRET not in conn.info.fingerprint and SECRET not in repr(conn)
        assert conn.info.class_names == ("cat", "dog", "other")
        conn.close()


def test_throttling_is_retried_with_backoff(vendor: str) -> None:
    with FAKES[vendor]() as fake:
        sleeps = Sleeps()
        conn = make(vendor, fake, sleeps)
        fake.push("throttle", "throttle")
        assert conn.query(images(0.9)).labels.tolist() == [CAT]
        assert len(fake.log) == 3 and conn.transport_stats()["retries"] == 2
        assert len(sleeps) == 2


@pytest.mark.parametrize("name", QUOTA_VENDORS)
def test_quota_exhaustion_is_not_retried_and_not_billed(name: str) -> None:
    with FAKES[name]() as fake:
        conn = make(name, fake)
        fake.push("quota")
        with pytest.raises(QuotaExhausted, match="quota") as ei:
            conn.query(images(0.9))
        assert len(fake.log) == 1 and ei.value.billed is False
        assert SECRET not in str(ei.value)


def test_persistent_throttling_ends_as_rate_limited_not_quota() -> None:
    with RekognitionFake() as fake:
        conn = make("aws_rekognition", fake)
        fake.push(*["throttle"] * 4)  # 400 ProvisionedThroughputExceededException, told by __type
        with pytest.raises(RateLimitedError) as ei:
            conn.query(images(0.9))
        assert not isinstance(ei.value, QuotaExhausted)
        assert len(fake.log) == 4 and ei.value.throttled == 4


def test_rekognition_retries_internal_errors_but_not_bad_requests() -> None:
    with RekognitionFake() as fake:
        conn = make("aws_rekognition", fake)
        fake.push("transient")
        assert conn.query(images(0.1)).labels.tolist() == [DOG]
        assert len(fake.log) == 2
        assert conn.model_version == "3.0"
        small = make("aws_rekognition", fake, input_shape=(3, 32, 32))
        assert small.encode(images(0.5))[0][:4] == b"\x89PNG"  # lossless PNG by default, upscaled to the 80 px minimum
        jpeg = make("aws_rekognition", fake, input_shape=(3, 32, 32), encoding="jpeg")
        assert jpeg.encode(images(0.5))[0][:4] == b"\xff\xd8\xff\xe0"  # JPEG only when asked for


def test_rekognition_wrong_secret_is_a_signature_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with RekognitionFake() as fake:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "another-secret-key")
        conn = make("aws_rekognition", fake)
        with pytest.raises(HTTPStatusError, match="InvalidSignature") as ei:
            conn.query(images(0.9))
        assert ei.value.status == 400 and len(fake.log) == 1
        assert "another-secret-key" not in str(ei.value)


@pytest.mark.parametrize("name", ["google_vision", "clarifai"])
def test_per_image_errors_retry_only_that_image(name: str) -> None:
    with FAKES[name]() as fake:
        conn = make(name, fake)
        fake.push("item_error")
        pred = conn.query(images(0.9, 0.1, 0.9, 0.1, 0.9))
        assert pred.labels.tolist() == [CAT, DOG, CAT, DOG, CAT]
        assert [r.n_images for r in fake.log] == [5, 1] and conn.item_retries == 1
        fake.push("item_fatal")
        with pytest.raises(ConnectorError, match="refused image 0"):
            conn.query(images(0.8, 0.2))
        assert [r.n_images for r in fake.log][2:] == [2]


def test_huggingface_cold_model_waits_estimated_time() -> None:
    with FAKES["huggingface"]() as fake:
        sleeps = Sleeps()
        conn = make("huggingface", fake, sleeps)
        fake.push("loading")
        assert conn.query(images(0.9)).labels.tolist() == [CAT]
        assert sleeps == [0.01]


def test_openai_non_answers_are_other_and_reset_header_is_used() -> None:
    with OpenAIChatFake() as fake:
        sleeps = Sleeps()
        conn = make("openai_chat", fake, sleeps)
        fake.push("throttle")
        assert conn.query(images(0.1)).labels.tolist() == [DOG]
        assert sleeps == [pytest.approx(0.02)]
        fake.mode = "text"
        assert conn.query(images(0.9)).labels.tolist() == [CAT]
        fake.mode = "refusal"
        assert conn.query(images(0.9)).labels.tolist() == [OTHER]
        assert parse_duration("6m0s") == 360 and parse_duration("20ms") == pytest.approx(0.02)
        assert parse_duration("soon") is None


def test_engine_caches_vendor_answers() -> None:
    with FAKES["google_vision"]() as fake:
        engine = QueryEngine(make("google_vision", fake))
        engine.query(images(0.9, 0.1))
        assert engine.info.cost_per_query == pytest.approx(0.0015)
        assert engine.stats.cost == pytest.approx(0.003)


def test_every_vendor_is_registered(tmp_path: Any) -> None:
    for name in BUILD:
        assert name in list_connectors()
    with FAKES["tf_serving"]() as fake:
        conn = build_connector("tf_serving", {"model_name": "classifier", "base_url": fake.url,
                                              "label_map": LM.to_dict(), "input_shape": [3, 32, 32],
                                              "vocabulary": ["cat", "dog", "sofa"], "transport": {"rate_limit": None}})
        assert conn.query(images(0.9)).labels.tolist() == [CAT]


# ---- SigV4 against AWS's published examples ----------------------------------------------------------
def test_sigv4_matches_aws_examples() -> None:
    # AWS SigV4 test suite, "get-vanilla"
    got = sign(method="GET", host="example.amazonaws.com", path="/", body=b"", headers={},
               access_key="AKIDEXAMPLE", secret_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
               region="us-east-1", service="service", now=dt.datetime(2015, 8, 30, 12, 36, tzinfo=dt.UTC))
    assert got["X-Amz-Date"] == "20150830T123600Z"
    assert got["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        "SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31")
    # S3 developer guide, "GET Object" header-signing example
    got = sign(method="GET", host="examplebucket.s3.amazonaws.com", path="/test.txt", body=b"",
               headers={"Range": "bytes=0-9", "x-amz-content-sha256": hashlib.sha256(b"").hexdigest()},
               access_key="AKIAIOSFODNN7EXAMPLE", secret_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
               region="us-east-1", service="s3", now=dt.datetime(2013, 5, 24, tzinfo=dt.UTC))
    assert got["Authorization"].endswith("Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")
    with_token = sign(method="POST", host="h", path="/", body=b"{}", headers={}, access_key="A", secret_key="S",
                      region="r", service="s", session_token="tok")
    assert with_token["X-Amz-Security-Token"] == "tok" and "x-amz-security-token" in with_token["Authorization"]


# ---- label depth: the vendor's top answer by default (issue #16, item 4) ------------------------------
#: Google's ranked answer: top label unmapped, the task label only 5th (the audit's case)
DEEP = [("/m/05s2s", "Plant", 0.97), ("/m/0c9ph5", "Flower", 0.95), ("/m/07j7r", "Tree", 0.9),
        ("/m/0d4v4", "Window", 0.85), ("/m/01yrx", "tabby", 0.8), ("/m/0bt9lr", "golden retriever", 0.7)]


def test_top_label_unmapped_is_other_by_default_and_deep_match_is_opt_in() -> None:
    with GoogleVisionFake() as fake:
        fake.answer = DEEP
        top1 = make("google_vision", fake)
        deep = make("google_vision", fake, label_depth=5)
        four = make("google_vision", fake, label_depth=4)
        assert top1.label_depth == 1
        assert top1.query(images(0.9, 0.2)).labels.tolist() == [OTHER, OTHER]
        assert deep.query(images(0.9, 0.2)).labels.tolist() == [CAT, CAT]
        assert four.query(images(0.9)).labels.tolist() == [OTHER]  # the 5th label is not searched
        assert len({top1.info.fingerprint, deep.info.fingerprint, four.info.fingerprint}) == 3
        assert fake.violations == []


def test_label_depth_applies_to_every_vendor(vendor: str) -> None:
    """The shared mapping, on one ranked answer: 4 labels no task knows, then a task label."""
    item = [((f"unknown-{i}",), 0.9 - 0.1 * i) for i in range(4)] + [(("tabby",), 0.4), (("golden retriever",), 0.3)]
    with FAKES[vendor]() as fake:
        assert make(vendor, fake).map_labels(item) == OTHER
        assert make(vendor, fake, label_depth=5).map_labels(item) == CAT
        assert make(vendor, fake, label_depth=5).map_labels(list(reversed(item))) == CAT  # order is by score


def test_a_parent_label_ranked_first_is_the_answer_by_default() -> None:
    """Rekognition often is most confident of a parent ("Animal"): that is its top answer."""
    item = [(("Animal",), 0.99), (("Cat", "Animal", "Pet"), 0.975)]
    with RekognitionFake() as fake:
        assert make("aws_rekognition", fake).map_labels(item) == OTHER
        assert make("aws_rekognition", fake, label_depth=2).map_labels(item) == CAT


# ---- model versions: pinned, enforced, restorable (issue #16, item 2) --------------------------------
def test_vendor_model_version_change_is_a_model_version_error() -> None:
    with RekognitionFake() as fake:
        conn = make("aws_rekognition", fake)
        assert conn.query(images(0.9)).labels.tolist() == [CAT]
        fake.model_version = "3.1"
        with pytest.raises(ModelVersionChangedError) as ei:  # on main: a plain InvalidResponseError
            conn.query(images(0.9))
        assert "'3.1'" in str(ei.value) and "'3.0'" in str(ei.value)
        assert conn.observed_model_version == "3.0"
        assert make("aws_rekognition", fake).observed_model_version is None  # until an answer says


def test_vendor_expected_model_version_is_enforced_from_the_first_answer() -> None:
    with RekognitionFake() as fake:
        resumed = make("aws_rekognition", fake)
        resumed.expect_model_version("2.0")  # what the resumed run's cache observed
        assert resumed.observed_model_version == "2.0"
        with pytest.raises(ModelVersionChangedError, match=r"'3\.0'.*'2\.0'"):
            resumed.query(images(0.9))
        same = make("aws_rekognition", fake)
        same.expect_model_version("3.0")
        assert same.query(images(0.1)).labels.tolist() == [DOG]
        with pytest.raises(ModelVersionChangedError):
            same.expect_model_version("2.0")  # already bound to another one
        same.expect_model_version("3.0")  # the same one: fine


def _kserve(fake: VendorFake, **kw: Any) -> KServeV2Connector:
    meta = {"name": "clf", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1, 2]}]}
    kw.setdefault("class_names", ["cat", "dog"])
    return KServeV2Connector(fake.url, "clf", metadata=meta, check_ready=False, encoding="png", input_shape=(3, 8, 8),
                             transport=TransportSettings(retry=RetryPolicy(max_attempts=1)), **kw)


def test_kserve_unpinned_version_is_observed_and_enforced() -> None:
    with KServeLabelFake() as fake:
        conn = _kserve(fake)
        assert "|version=unpinned|" in conn.info.fingerprint
        x = torch.rand(2, 3, 8, 8)
        assert conn.query(x).labels.tolist() == [0, 0]
        fake.model_version = "2"
        with pytest.raises(ModelVersionChangedError) as ei:  # on main: a plain InvalidResponseError
            conn.query(x)
        assert "'2'" in str(ei.value) and "'1'" in str(ei.value)
        assert conn.observed_model_version == "1"
        assert _kserve(fake).observed_model_version is None  # until an answer says


def test_kserve_pinned_and_expected_versions() -> None:
    with KServeLabelFake() as fake:
        pinned = _kserve(fake, model_version="1")
        assert "|version=1|" in pinned.info.fingerprint and pinned.observed_model_version == "1"
        with pytest.raises(ModelVersionChangedError):
            pinned.expect_model_version("0")
        fake.model_version = "2"
        with pytest.raises(ModelVersionChangedError):
            pinned.query(torch.rand(1, 3, 8, 8))
        resumed = _kserve(fake)
        resumed.expect_model_version("1")
        with pytest.raises(ModelVersionChangedError, match="'2'.*'1'"):
            resumed.query(torch.rand(1, 3, 8, 8))


def test_kserve_label_depth_reads_the_top_label_only_when_asked() -> None:
    with KServeLabelFake() as fake:
        fake.rows = ["sofa", "dog"]
        x = torch.rand(1, 3, 8, 8)
        lm = LabelMap(["cat", "dog"])
        deep = _kserve(fake, class_names=None, label_map=lm, label_depth=None)
        assert deep.query(x).labels.tolist() == [1]  # the whole row, only when asked
        top1 = _kserve(fake, class_names=None, label_map=lm)  # default: the model's top answer
        assert top1.label_depth == 1 and top1.query(x).labels.tolist() == [lm.other_index]
        assert top1.info.fingerprint != deep.info.fingerprint
