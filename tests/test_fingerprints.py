"""Every setting that can change an answer changes ``info.fingerprint``; no other setting does (issue #16).

For each connector in :mod:`blackbox_rs.connectors.registry`: a base construction, a list of
single-setting variations that can change a Prediction (all fingerprints must be distinct, the
base's included) and a list of answer-neutral variations (timeouts, retries, concurrency,
credentials: the fingerprint must stay the base's). No construction sends a request: the vendor
connectors talk to nothing until queried and KServe is given its metadata; the URL is a loopback
address nothing listens on. Planted secrets must never appear in a fingerprint.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.vendor_fakes import RekognitionFake, VendorFake
from torch import nn

from blackbox_rs.connectors.aws_rekognition import RekognitionConnector
from blackbox_rs.connectors.azure_vision import AzureCustomVisionConnector, AzureImageAnalysisConnector
from blackbox_rs.connectors.clarifai import ClarifaiConnector
from blackbox_rs.connectors.google_vision import GoogleVisionConnector
from blackbox_rs.connectors.http import Auth, RetryPolicy, TransportSettings
from blackbox_rs.connectors.huggingface import HuggingFaceConnector
from blackbox_rs.connectors.kserve_v2 import KServeV2Connector
from blackbox_rs.connectors.labelmap import LabelMap
from blackbox_rs.connectors.onnx import ONNXConnector
from blackbox_rs.connectors.openai_chat import OpenAIChatConnector
from blackbox_rs.connectors.registry import list_connectors
from blackbox_rs.connectors.tf_serving import TFServingConnector
from blackbox_rs.connectors.torchscript import TorchScriptConnector
from blackbox_rs.connectors.torchserve import TorchServeConnector
from blackbox_rs.errors import InvalidParameterError

SECRET = VendorFake.secret
URL = "http://127.0.0.1:9"  # discard port: never contacted
OTHER_URL = "http://127.0.0.1:10"
LM = LabelMap(["cat", "dog"], {"cat": ["tabby"], "dog": ["golden retriever"]})
LM_SYN = LabelMap(["cat", "dog"], {"cat": ["tabby", "Egyptian cat"], "dog": ["golden retriever"]})
LM_ORDER = LabelMap(["dog", "cat"], {"cat": ["tabby"], "dog": ["golden retriever"]})
ENV = ["HF_TOKEN", "GOOGLE_API_KEY", "AWS_SECRET_ACCESS_KEY", "AZURE_VISION_KEY", "AZURE_CUSTOM_VISION_KEY",
       "CLARIFAI_PAT", "TORCHSERVE_TOKEN", "OPENAI_API_KEY", "OTHER_TOKEN"]

#: answer-neutral settings every HTTP connector takes (transport settings, one field at a time; a
#: credential-like header such as X-Api-Key is refused outright: tests/test_transport_settings.py)
HTTP_NEUTRAL: list[dict[str, Any]] = [
    {"transport": TransportSettings(timeout_s=3.0)},
    {"transport": TransportSettings(connect_timeout_s=1.0)},
    {"transport": TransportSettings(retry=RetryPolicy(max_attempts=9))},
    {"transport": {"max_attempts": 2}},  # the config-file (dict) form
    {"transport": TransportSettings(max_in_flight=1)},
    {"transport": TransportSettings(rate_limit=0.5)},
    {"sleep": lambda s: None},
    {"transport": TransportSettings(verify=False)},
    {"transport": TransportSettings(headers={"X-Trace": "abc"})},
    {"transport": TransportSettings(headers={"User-Agent": "me/1", "X-Request-Id": "7", "traceparent": "00-ab"})},
]
#: answer-changing settings of every hosted-vendor connector
VENDOR_CHANGES: list[dict[str, Any]] = [
    {"label_map": LM_SYN},
    {"label_map": LM_ORDER},
    {"encoding": "png"},
    {"jpeg_quality": 75},
    {"label_depth": 2},
    {"transport": TransportSettings(headers={"Host": "other-model.example.com"})},
    {"transport": TransportSettings(headers={"azureml-model-deployment": "green"})},  # header routing
]
VENDOR_NEUTRAL: list[dict[str, Any]] = [
    *HTTP_NEUTRAL,
    {"price_per_1k": 9.0},
    {"cost_per_query": 0.25},
    {"input_shape": (3, 16, 16)},
    {"label_map": LabelMap.from_dict(LM.to_dict())},  # an equal map
]


class Case:
    def __init__(self, build: Callable[..., Any], base: dict[str, Any], changes: list[dict[str, Any]],
                 neutral: list[dict[str, Any]]) -> None:
        self.build, self.base, self.changes, self.neutral = build, base, changes, neutral

    def fingerprint(self, **over: Any) -> str:
        conn = self.build(**{**self.base, **over})
        try:
            return conn.info.fingerprint
        finally:
            close = getattr(conn, "close", None)
            if close is not None:
                close()


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def _script(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.jit.save(torch.jit.script(Tiny().eval()), str(path))
    return path


def _onnx(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # the legacy exporter: no onnxscript needed
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(Tiny().eval(), (torch.zeros(2, 3, 4, 4),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "N"}})
    return path


KSERVE_META = {"name": "clf", "versions": ["3"], "platform": "test",
               "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
               "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1, 5]}]}
KSERVE_META_SCORES = {"name": "clf", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 4, 4]}],
                      "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]}


def _kserve(**kw: Any) -> KServeV2Connector:
    kw.setdefault("check_ready", False)
    return KServeV2Connector(kw.pop("base_url", URL), kw.pop("model_name", "clf"), **kw)


def _cases(tmp_path: Path) -> dict[str, Case]:
    model = _script(tmp_path / "a.pt", 0)
    other = _script(tmp_path / "b.pt", 1)
    vendor_base = {"label_map": LM, "input_shape": (3, 32, 32), "encoding": "jpeg", "jpeg_quality": 90}

    def vendor(build: Callable[..., Any], base: dict[str, Any], changes: list[dict[str, Any]],
               neutral: list[dict[str, Any]] | None = None) -> Case:
        return Case(build, {**vendor_base, **base}, [*VENDOR_CHANGES, *changes], [*VENDOR_NEUTRAL, *(neutral or [])])

    return {
        "torchscript": Case(
            TorchScriptConnector, {"path": model, "input_shape": (3, 4, 4)},
            [{"label_only": True}, {"path": other},
             {"precision": "bf16"}, {"precision": "fp16"}],  # a reduced-precision classifier is another model
            [{"max_batch": 7}, {"cost_per_query": 0.5}, {"num_classes": 3}, {"threads": 1},
             {"class_names": ["x", "y", "z"]},  # names only: the label indices are the same
             {"device": "cpu"},  # the device is not the model (its last-bit differences: the docstring)
             {"precision": "fp32"}, {"channels_last": True}, {"max_batch": "auto"}, {"compile": False}],
        ),
        "onnx": Case(
            ONNXConnector, {"path": _onnx(tmp_path / "a.onnx", 0), "input_shape": (3, 4, 4)},
            [{"label_only": True}, {"path": _onnx(tmp_path / "b.onnx", 1)}],
            [{"max_batch": 7}, {"cost_per_query": 0.5}, {"num_classes": 3}, {"threads": 1},
             {"class_names": ["x", "y", "z"]}, {"device": "cpu"}, {"providers": ["CPUExecutionProvider"]}],
        ),
        "kserve_v2": Case(
            _kserve,
            {"metadata": KSERVE_META, "encoding": "png", "input_shape": (3, 4, 4), "class_names": ["cat", "dog"]},
            [{"class_names": ["dog", "cat"]}, {"class_names": None, "label_map": LM},
             {"class_names": None, "label_map": LM_SYN}, {"encoding": "jpeg"},
             {"encoding": "jpeg", "jpeg_quality": 80}, {"bytes_content_type": None}, {"label_depth": None},
             {"model_name": "clf2"}, {"model_version": "4"}, {"base_url": OTHER_URL}, {"identity": "clf-file-abc"},
             {"transport": TransportSettings(headers={"Host": "clf.ns.example.com"})},
             {"transport": TransportSettings(headers={"X-Amzn-SageMaker-Target-Model": "m2.tar.gz"})},
             {"output_name": "label_top1", "output": "label"},
             {"input_name": "image_b64"}, {"metadata": {**KSERVE_META, "versions": ["2"]}}],
            [*HTTP_NEUTRAL, {"max_batch": 4}, {"cost_per_query": 1.0}, {"auth": Auth.bearer("OTHER_TOKEN")},
             {"jpeg_quality": 50}],  # png: the JPEG quality is never used
        ),
        "kserve_v2_scores": Case(
            _kserve, {"metadata": KSERVE_META_SCORES},
            [{"encoding": "uint8", "metadata": {**KSERVE_META_SCORES, "inputs": [
                {"name": "x", "datatype": "UINT8", "shape": [-1, 3, 4, 4]}]}}, {"layout": "NHWC", "metadata": {**KSERVE_META_SCORES, "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [-1, 4, 4, 3]}]}}, {"output": "index", "num_classes": 3},
             {"model_version": "7"}],
            [*HTTP_NEUTRAL, {"class_names": ["a", "b", "c"]}, {"num_classes": 3}, {"label_depth": 2}],
        ),
        "huggingface": vendor(
            HuggingFaceConnector, {"model_id": "google/vit-base-patch16-224", "base_url": URL,
                                   "auth": Auth.bearer("HF_TOKEN"), "top_k": 5},
            [{"model_id": "microsoft/resnet-50"}, {"top_k": 3}, {"function_to_apply": "sigmoid"},
             {"model_id": None, "endpoint_url": "http://127.0.0.1:9/my-endpoint"}, {"base_url": OTHER_URL}],
            [{"wait_for_model": True}, {"auth": Auth.bearer("OTHER_TOKEN")}],
        ),
        "google_vision": vendor(
            GoogleVisionConnector, {"base_url": URL, "auth": Auth.query("key", "GOOGLE_API_KEY")},
            [{"max_results": 5}, {"base_url": OTHER_URL}],
            [{"quota_project": "my-project"}, {"auth": Auth.bearer("OTHER_TOKEN")}],
        ),
        "aws_rekognition": vendor(
            RekognitionConnector, {"region": "eu-west-1", "base_url": URL},
            [{"region": "us-east-1"}, {"max_labels": 10}, {"min_confidence": 55.0},
             {"inclusion_filters": ["Cat", "Dog"]}, {"base_url": OTHER_URL}],
            [{"access_key_env": "OTHER_TOKEN"}, {"secret_key_env": "OTHER_TOKEN"},
             {"session_token_env": "OTHER_TOKEN"}],
        ),
        "azure_image_analysis": vendor(
            AzureImageAnalysisConnector, {"endpoint": URL,
                                          "auth": Auth.header("Ocp-Apim-Subscription-Key", "AZURE_VISION_KEY")},
            [{"api_version": "2023-10-01"}, {"model_version": "2023-10-01"}, {"language": "de"},
             {"endpoint": OTHER_URL}],
            [{"auth": Auth.header("Ocp-Apim-Subscription-Key", "OTHER_TOKEN")}],
        ),
        "azure_custom_vision": vendor(
            AzureCustomVisionConnector, {"endpoint": URL, "project_id": "proj-1", "published_name": "Iteration3",
                                         "auth": Auth.header("Prediction-Key", "AZURE_CUSTOM_VISION_KEY")},
            [{"project_id": "proj-2"}, {"published_name": "Iteration4"}, {"endpoint": OTHER_URL}],
            [{"store": True}],
        ),
        "clarifai": vendor(
            ClarifaiConnector, {"base_url": URL, "auth": Auth.scheme("Key", "CLARIFAI_PAT")},
            [{"user_id": "me"}, {"app_id": "app2"}, {"model_id": "food-item-recognition"}, {"version_id": "aa7f35c0"},
             {"max_concepts": 5}, {"min_value": 0.5}, {"select_concepts": ["cat", "dog"]}, {"base_url": OTHER_URL}],
            [{"max_batch": 16}],
        ),
        "torchserve": vendor(
            TorchServeConnector, {"model_name": "resnet-18", "base_url": URL, "auth": Auth.bearer("TORCHSERVE_TOKEN")},
            [{"model_name": "resnet-50"}, {"model_version": "2.0"}, {"base_url": OTHER_URL}],
        ),
        "tf_serving": vendor(
            TFServingConnector, {"model_name": "classifier", "base_url": URL, "vocabulary": ["cat", "dog", "sofa"]},
            [{"vocabulary": ["dog", "cat", "sofa"]}, {"vocabulary": None}, {"model_name": "other"},
             {"model_version": "2"}, {"signature_name": "serving_default"}, {"input_key": None},
             {"output_key": "probabilities"}, {"base_url": OTHER_URL}],
            [{"max_batch": 8}],
        ),
        "openai_chat": vendor(
            OpenAIChatConnector, {"model": "gpt-4o-mini", "base_url": URL, "auth": Auth.bearer("OPENAI_API_KEY")},
            [{"model": "gpt-4o"}, {"path": "/openai/v1/chat/completions"}, {"detail": "high"}, {"structured": False},
             {"guided_choice": True}, {"prompt": "Which of {labels} is it?"}, {"seed": 1}, {"max_tokens": 5},
             {"extra_body": {"top_p": 0.5}}, {"base_url": OTHER_URL}],
            [{"auth": Auth.bearer("OTHER_TOKEN")}],
        ),
    }


@pytest.fixture(scope="module", autouse=True)
def _planted() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for var in ENV:
            mp.setenv(var, SECRET)
        mp.setenv("AWS_ACCESS_KEY_ID", RekognitionFake.access_key)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        yield


@pytest.fixture(scope="module")
def cases(_planted: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    return _cases(tmp_path_factory.mktemp("fp"))


NAMES = ["torchscript", "onnx", "kserve_v2", "kserve_v2_scores", "huggingface", "google_vision", "aws_rekognition",
         "azure_image_analysis", "azure_custom_vision", "clarifai", "torchserve", "tf_serving", "openai_chat"]


def test_every_registered_connector_is_covered(cases: dict[str, Case]) -> None:
    assert set(cases) == set(NAMES)
    assert set(list_connectors()) == {name.removesuffix("_scores") for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_answer_changing_settings_change_the_fingerprint(name: str, cases: dict[str, Case]) -> None:
    case = cases[name]
    prints = {"base": case.fingerprint()}
    for change in case.changes:
        prints[repr(change)] = case.fingerprint(**change)
    seen: dict[str, str] = {}
    for what, fp in prints.items():
        assert fp not in seen, f"{name}: {what} has the same fingerprint as {seen.get(fp)}: {fp}"
        seen[fp] = what
        assert SECRET not in fp


@pytest.mark.parametrize("name", NAMES)
def test_answer_neutral_settings_keep_the_fingerprint(name: str, cases: dict[str, Case]) -> None:
    case = cases[name]
    base = case.fingerprint()
    for change in case.neutral:
        fp = case.fingerprint(**change)
        assert fp == base, f"{name}: {change!r} changed the fingerprint {base} -> {fp}"
        assert SECRET not in fp


def test_every_constructor_setting_is_classified(cases: dict[str, Case]) -> None:
    """A new constructor parameter must be listed as answer-changing or answer-neutral in a case (review
    finding: hand-written lists let an unlisted setting pass unnoticed). KServe's two cases together
    cover its parameters."""
    import inspect

    def params(build: Callable[..., Any]) -> set[str]:
        target = KServeV2Connector.__init__ if build is _kserve else build.__init__
        sig = inspect.signature(target)
        return {p for p, v in sig.parameters.items() if p != "self"
                and v.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}

    def covered(case: Case) -> set[str]:
        return set(case.base) | {k for d in case.changes for k in d} | {k for d in case.neutral for k in d}

    # settings that cannot be varied without a live server, with why they cannot change an answer
    unreachable = {"kserve_v2": {"check_ready"}}  # only waits for /ready before the first request
    groups: dict[str, list[Case]] = {}
    for name, case in cases.items():
        groups.setdefault(name.removesuffix("_scores"), []).append(case)
    for name, group in groups.items():
        missing = params(group[0].build) - set().union(*(covered(c) for c in group)) - unreachable.get(name, set())
        assert not missing, f"{name}: constructor settings {sorted(missing)} are in no fingerprint case"


def test_kserve_label_order_is_in_the_fingerprint_without_a_label_map(cases: dict[str, Case]) -> None:
    """The audit's case: BYTES labels mapped through the class names; swapping them swaps every answer."""
    case = cases["kserve_v2"]
    assert case.fingerprint(class_names=["cat", "dog"]) != case.fingerprint(class_names=["dog", "cat"])


def test_kserve_version_in_the_fingerprint(cases: dict[str, Case]) -> None:
    case = cases["kserve_v2"]
    assert "|version=4|" in case.fingerprint(model_version="4")
    assert "|version=3|" in case.fingerprint()  # the only version the metadata declares
    unpinned = case.fingerprint(metadata={k: v for k, v in KSERVE_META.items() if k != "versions"})
    assert "|version=unpinned|" in unpinned


def test_torchscript_label_only_is_in_the_fingerprint(cases: dict[str, Case]) -> None:
    case = cases["torchscript"]
    assert case.fingerprint(label_only=True) != case.fingerprint()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_label_depth_is_validated(bad: object) -> None:
    with pytest.raises(InvalidParameterError, match="label_depth"):
        GoogleVisionConnector(base_url=URL, label_map=LM, label_depth=bad)
    with pytest.raises(InvalidParameterError, match="label_depth"):
        _kserve(metadata=KSERVE_META, encoding="png", input_shape=(3, 4, 4), class_names=["a", "b"], label_depth=bad)


def test_label_depth_cannot_exceed_the_labels_requested() -> None:
    with pytest.raises(InvalidParameterError, match="max_results"):
        GoogleVisionConnector(base_url=URL, label_map=LM, max_results=3, label_depth=5)
    with pytest.raises(InvalidParameterError, match="max_labels"):
        RekognitionConnector("eu-west-1", base_url=URL, label_map=LM, max_labels=2, label_depth=3)
    with pytest.raises(InvalidParameterError, match="max_concepts"):
        ClarifaiConnector(base_url=URL, label_map=LM, max_concepts=1, label_depth=2)
    with pytest.raises(InvalidParameterError, match="top_k"):
        HuggingFaceConnector("m", base_url=URL, label_map=LM, top_k=1, label_depth=2)


def test_every_transport_setting_is_answer_neutral() -> None:
    """Each :class:`TransportSettings` field is varied in ``HTTP_NEUTRAL`` (a new field must be classified)."""
    varied = set()
    for change in HTTP_NEUTRAL:
        t = change.get("transport")
        if t is not None:
            varied |= set(t.model_fields_set if isinstance(t, TransportSettings) else t)
    assert varied == set(TransportSettings.model_fields)
