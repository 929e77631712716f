"""The hosted APIs of ``blackbox-rs api <vendor>``: one :class:`Vendor` entry each (its connector, the
environment variables it reads, its own flags and how its connector is built from them).

Credentials are read from the environment only (by :class:`~blackbox_rs.connectors.http.Auth`, at
request time); a flag never takes a secret. Adding a vendor: write its connector
(:class:`~blackbox_rs.connectors._vendor.VendorConnector`), then :func:`register_vendor` an entry here.
"""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from blackbox_rs.errors import ConfigError
from blackbox_rs.registry import Registry

__all__ = ["VENDORS", "Vendor", "get_vendor", "register_vendor"]

Build = Callable[[argparse.Namespace, dict[str, Any]], Any]


@dataclass(frozen=True)
class Vendor:
    """One hosted API: ``connector`` is ``"module:Class"`` (imported when used), ``build(args, kw)``
    makes the connector from the parsed flags and the shared connector keyword arguments ``kw``."""

    name: str
    connector: str
    build: Build
    env: Sequence[str] = ()
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    description: str = ""

    @property
    def connector_class(self) -> type:
        module, cls = self.connector.split(":")
        return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]


#: Every vendor front door by name (``blackbox-rs api <name> ...``).
VENDORS: Registry[Vendor] = Registry("vendor", unknown=ConfigError)


def register_vendor(vendor: Vendor) -> Vendor:
    """Add ``vendor`` (its name taken: :class:`ConfigError`)."""
    VENDORS.register(vendor.name, vendor)
    return vendor


def get_vendor(name: str) -> Vendor:
    """The vendor called ``name`` (``_`` and ``-`` are the same); :class:`ConfigError` listing the known ones."""
    key = name.replace("_", "-")
    if key not in VENDORS:
        raise ConfigError(f"unknown vendor {name!r}; known: {', '.join(VENDORS.names())}")
    return VENDORS.get(key)


def _auth() -> Any:
    from blackbox_rs.connectors.http import Auth

    return Auth


_C = "blackbox_rs.connectors."


# ---- Hugging Face -----------------------------------------------------------------------------------
def _hf_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-id", default="google/vit-base-patch16-224", help="serverless model id")
    p.add_argument("--endpoint-url", help="a dedicated Inference Endpoint URL instead of serverless")
    p.add_argument("--top-k", type=int, default=20, help="labels per answer")
    p.add_argument("--wait-for-model", action="store_true", help="block while a cold model loads")


def _hf(args: argparse.Namespace, kw: dict[str, Any]) -> Any:
    from blackbox_rs.connectors.huggingface import HuggingFaceConnector

    if args.endpoint_url and args.base_url:
        raise ConfigError("give --endpoint-url or --base-url, not both")
    target = {"endpoint_url": args.endpoint_url} if args.endpoint_url else {"model_id": args.model_id}
    return HuggingFaceConnector(**target, base_url=args.base_url or "https://router.huggingface.co",
                                auth=_auth().bearer("HF_TOKEN"), top_k=args.top_k,
                                wait_for_model=args.wait_for_model, **kw)


# ---- Google Cloud Vision ----------------------------------------------------------------------------
def _google_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-results", type=int, default=20,
                   help="labels per image (maxResults); only matters with --label-depth > 1")


def _google(args: argparse.Namespace, kw: dict[str, Any]) -> Any:
    from blackbox_rs.connectors.google_vision import GoogleVisionConnector

    return GoogleVisionConnector(base_url=args.base_url or "https://vision.googleapis.com",
                                 auth=_auth().query("key", "GOOGLE_API_KEY"), max_results=args.max_results, **kw)


# ---- AWS Rekognition --------------------------------------------------------------------------------
def _aws_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--region", help="AWS region (default $AWS_REGION, else us-east-1)")
    p.add_argument("--max-labels", type=int, default=50)
    p.add_argument("--min-confidence", type=float, default=20.0, help="0-100 (the server's default is 55)")


def _aws(args: argparse.Namespace, kw: dict[str, Any]) -> Any:
    from blackbox_rs.connectors.aws_rekognition import RekognitionConnector

    return RekognitionConnector(args.region, base_url=args.base_url, max_labels=args.max_labels,
                                min_confidence=args.min_confidence, **kw)


# ---- Azure ------------------------------------------------------------------------------------------
def _azure_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", help="https://<resource>.cognitiveservices.azure.com (default $AZURE_VISION_ENDPOINT)")


def _endpoint(args: argparse.Namespace, env: str) -> str:
    endpoint = args.base_url or args.endpoint or os.environ.get(env)
    if not endpoint:
        raise ConfigError(f"give --endpoint or set {env}")
    return str(endpoint)


def _azure(args: argparse.Namespace, kw: dict[str, Any]) -> Any:
    from blackbox_rs.connectors.azure_vision import AzureImageAnalysisConnector

    return AzureImageAnalysisConnector(_endpoint(args, "AZURE_VISION_ENDPOINT"),
                                       auth=_auth().header("Ocp-Apim-Subscription-Key", "AZURE_VISION_KEY"), **kw)


def _custom_vision_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", help="prediction resource endpoint (default $AZURE_CUSTOM_VISION_ENDPOINT)")
    p.add_argument("--project-id", required=True)
    p.add_argument("--published-name", required=True, help="published iteration name")
    p.add_argument("--store", action="store_true", help="let Custom Vision store the (noisy) images")


def _custom_vision(args: argparse.Namespace, kw: dict[str, Any]) -> Any:
    from blackbox_rs.connectors.azure_vision import AzureCustomVisionConnector

    return AzureCustomVisionConnector(_endpoint(args, "AZURE_CUSTOM_VISION_ENDPOINT"), args.project_id,
                                      args.published_name, store=args.store,
                                      auth=_auth().header("Prediction-Key", "AZURE_CUSTOM_VISION_KEY"), **kw)


# ---- Clarifai ---------------------------------------------------------------------------------------
def _clarifai_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user-id", default="clarifai")
    p.add_argument("--app-id", default="main")
    p.add_argument("--model-id", default="general-image-recognition")
    p.add_argument("--version-id", help="pin a model version (recommended)")
    p.add_argument("--max-concepts", type=int, default=20)


def _clarifai(args: argparse.Namespace, kw: dict[str, Any]) -> Any:
    from blackbox_rs.connectors.clarifai import ClarifaiConnector

    return ClarifaiConnector(base_url=args.base_url or "https://api.clarifai.com",
                             auth=_auth().scheme("Key", "CLARIFAI_PAT"), user_id=args.user_id, app_id=args.app_id,
                             model_id=args.model_id, version_id=args.version_id, max_concepts=args.max_concepts,
                             **kw)


# ---- OpenAI-compatible vision chat ------------------------------------------------------------------
def _openai_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gpt-4o-mini")
    p.add_argument("--detail", default="low", choices=["low", "high", "auto"])
    p.add_argument("--key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--api-key-header", action="store_true", help="send it as 'api-key' (Azure OpenAI)")


def _openai(args: argparse.Namespace, kw: dict[str, Any]) -> Any:
    from blackbox_rs.connectors.openai_chat import OpenAIChatConnector

    auth = _auth().header("api-key", args.key_env) if args.api_key_header else _auth().bearer(args.key_env)
    return OpenAIChatConnector(args.model, base_url=args.base_url or "https://api.openai.com", detail=args.detail,
                               auth=auth, **kw)


# ---- model servers ----------------------------------------------------------------------------------
def _tfs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name on the server")
    p.add_argument("--model-version")
    p.add_argument("--signature-name")
    p.add_argument("--input-key", default="image_bytes", help="instance key holding {b64: ...}; '' = none")
    p.add_argument("--vocabulary", help="comma-separated class names of the model's score vector")


def _tfs(args: argparse.Namespace, kw: dict[str, Any]) -> Any:
    from blackbox_rs.connectors.tf_serving import TFServingConnector

    vocab = args.vocabulary.split(",") if args.vocabulary else None
    return TFServingConnector(args.model, base_url=args.base_url or "http://127.0.0.1:8501",
                              model_version=args.model_version, signature_name=args.signature_name,
                              input_key=args.input_key or None, vocabulary=vocab, **kw)


def _ts_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name on the server")
    p.add_argument("--model-version")
    p.add_argument("--no-auth", action="store_true", help="the server runs with --disable-token-auth")


def _ts(args: argparse.Namespace, kw: dict[str, Any]) -> Any:
    from blackbox_rs.connectors.torchserve import TorchServeConnector

    auth = None if args.no_auth else _auth().bearer("TORCHSERVE_TOKEN")
    return TorchServeConnector(args.model, base_url=args.base_url or "http://127.0.0.1:8080",
                               model_version=args.model_version, auth=auth, **kw)


for _v in (
    Vendor("huggingface", _C + "huggingface:HuggingFaceConnector", _hf, ("HF_TOKEN",), _hf_args,
           "Hugging Face image classification (serverless or an Inference Endpoint)"),
    Vendor("google-vision", _C + "google_vision:GoogleVisionConnector", _google, ("GOOGLE_API_KEY",), _google_args,
           "Google Cloud Vision LABEL_DETECTION (16 images per request)"),
    Vendor("aws-rekognition", _C + "aws_rekognition:RekognitionConnector", _aws,
           ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION"), _aws_args,
           "AWS Rekognition DetectLabels (SigV4-signed)"),
    Vendor("azure-vision", _C + "azure_vision:AzureImageAnalysisConnector", _azure,
           ("AZURE_VISION_KEY", "AZURE_VISION_ENDPOINT"), _azure_args, "Azure AI Vision Image Analysis 4.0 tags"),
    Vendor("azure-custom-vision", _C + "azure_vision:AzureCustomVisionConnector", _custom_vision,
           ("AZURE_CUSTOM_VISION_KEY", "AZURE_CUSTOM_VISION_ENDPOINT"), _custom_vision_args,
           "an Azure Custom Vision classifier (published iteration)"),
    Vendor("clarifai", _C + "clarifai:ClarifaiConnector", _clarifai, ("CLARIFAI_PAT",), _clarifai_args,
           "a Clarifai concept model (128 images per request)"),
    Vendor("openai-chat", _C + "openai_chat:OpenAIChatConnector", _openai, ("OPENAI_API_KEY",), _openai_args,
           "an OpenAI-compatible vision chat model as a zero-shot classifier over the task's labels"),
    Vendor("tf-serving", _C + "tf_serving:TFServingConnector", _tfs, (), _tfs_args,
           "a model served by TensorFlow Serving (REST :predict)"),
    Vendor("torchserve", _C + "torchserve:TorchServeConnector", _ts, ("TORCHSERVE_TOKEN",), _ts_args,
           "a model served by TorchServe"),
):
    register_vendor(_v)
