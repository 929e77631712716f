"""Connectors: one file per kind of base model, all speaking :mod:`blackbox_rs.connectors.base`.

Imported as ``blackbox_rs.connectors``. Backends with heavier or optional dependencies are imported
lazily on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import BaseConnector, Connector, ConnectorInfo, Prediction
from .callable import CallableConnector
from .module import ModuleConnector
from .torchscript import TorchScriptConnector

# name -> submodule, for connectors imported on first use
_LAZY: dict[str, str] = {
    "Auth": "http",
    "Credential": "http",
    "HTTPConnector": "http",
    "HTTPTransport": "http",
    "RetryPolicy": "http",
    "TransportSettings": "http",
    "RateLimiter": "_ratelimit",
    "ImageEncoding": "_encoding",
    "ONNXConnector": "onnx",
    "KServeV2Connector": "kserve_v2",
    "HuggingFaceConnector": "huggingface",
    "GoogleVisionConnector": "google_vision",
    "RekognitionConnector": "aws_rekognition",
    "AzureImageAnalysisConnector": "azure_vision",
    "AzureCustomVisionConnector": "azure_vision",
    "ClarifaiConnector": "clarifai",
    "TorchServeConnector": "torchserve",
    "TFServingConnector": "tf_serving",
    "OpenAIChatConnector": "openai_chat",
    "LabelMap": "labelmap",
    "build_connector": "registry",
    "list_connectors": "registry",
}

__all__ = [
    "BaseConnector",
    "CallableConnector",
    "Connector",
    "ConnectorInfo",
    "ModuleConnector",
    "Prediction",
    "TorchScriptConnector",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
