"""Connectors by name, for config files and the command line.

``build_connector("torchscript", {"path": "model.pt", "input_shape": [1, 28, 28], "num_classes": 10})``.
Settings are the connector's keyword arguments; unknown keys are :class:`ConfigError` naming the key.
Credentials are given by *environment variable name* only (``bearer_token_env``, ``api_key_env`` with
``api_key_header``), so a config file never holds a secret.

Transport settings of an HTTP connector are one ``transport`` sub-table, validated as
:class:`~blackbox_rs.connectors.http.TransportSettings`::

    [connector]
    name = "kserve_v2"
    base_url = "http://127.0.0.1:8080"
    model_name = "resnet"

    [connector.transport]
    timeout_s = 60
    max_in_flight = 2
    retry = { max_attempts = 3 }

A transport key at the top level (``timeout_s = 60`` under ``[connector]``) is a :class:`ConfigError`
naming the key and its place, ``[connector.transport]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from blackbox_rs.errors import ConfigError
from blackbox_rs.registry import Registry

from .base import Connector

__all__ = ["CONNECTORS", "build_connector", "list_connectors", "register_connector"]

#: Every connector by name, as a lazy ``module:class`` entry: listing them imports no backend.
CONNECTORS: Registry[type[Connector]] = Registry("connector", unknown=ConfigError, lazy={
    "torchscript": ("blackbox_rs.connectors.torchscript", "TorchScriptConnector"),
    "onnx": ("blackbox_rs.connectors.onnx", "ONNXConnector"),
    "kserve_v2": ("blackbox_rs.connectors.kserve_v2", "KServeV2Connector"),
    "huggingface": ("blackbox_rs.connectors.huggingface", "HuggingFaceConnector"),
    "google_vision": ("blackbox_rs.connectors.google_vision", "GoogleVisionConnector"),
    "aws_rekognition": ("blackbox_rs.connectors.aws_rekognition", "RekognitionConnector"),
    "azure_image_analysis": ("blackbox_rs.connectors.azure_vision", "AzureImageAnalysisConnector"),
    "azure_custom_vision": ("blackbox_rs.connectors.azure_vision", "AzureCustomVisionConnector"),
    "clarifai": ("blackbox_rs.connectors.clarifai", "ClarifaiConnector"),
    "torchserve": ("blackbox_rs.connectors.torchserve", "TorchServeConnector"),
    "tf_serving": ("blackbox_rs.connectors.tf_serving", "TFServingConnector"),
    "openai_chat": ("blackbox_rs.connectors.openai_chat", "OpenAIChatConnector"),
})

_AUTH_KEYS = {"bearer_token_env", "api_key_env", "api_key_header"}


def register_connector(name: str, module: str, class_name: str) -> None:
    """Make ``module:class_name`` buildable as ``name`` (imported lazily on first use). The same
    path again is a no-op; another one under a taken name raises :class:`ConfigError` naming it."""
    CONNECTORS.register_lazy(name, module, class_name)


def list_connectors() -> list[str]:
    """Sorted names of every registered connector (imports none of them)."""
    return CONNECTORS.names()


def _auth(settings: dict[str, Any]) -> Any:
    from .http import Auth

    if "bearer_token_env" in settings:
        return Auth.bearer(str(settings.pop("bearer_token_env")))
    if "api_key_env" in settings:
        header = str(settings.pop("api_key_header", "x-api-key"))
        return Auth.header(header, str(settings.pop("api_key_env")))
    if "api_key_header" in settings:
        raise ConfigError("api_key_header needs api_key_env (the environment variable holding the key)")
    return None


def _takes_transport(cls: type) -> bool:
    """True if ``cls`` (or the base its ``**kwargs`` reach) takes ``transport=``: an HTTP connector."""
    return any("transport" in inspect.signature(k.__init__).parameters
               for k in cls.__mro__ if "__init__" in vars(k))


def build_connector(name: str, settings: Mapping[str, Any] | None = None) -> Connector:
    """Instantiate the connector registered as ``name`` with ``settings``."""
    cls = CONNECTORS.get(name)  # unknown: ConfigError listing the known names
    kwargs = dict(settings or {})
    from .transport_settings import FLAT_TRANSPORT_KEYWORDS

    params = inspect.signature(cls.__init__).parameters
    flat = sorted(FLAT_TRANSPORT_KEYWORDS & kwargs.keys()) if _takes_transport(cls) else []
    if flat:
        what = "is a transport setting" if len(flat) == 1 else "are transport settings"
        raise ConfigError(
            f"connector {name!r}: {', '.join(flat)} {what}: "
            f"put {'it' if len(flat) == 1 else 'them'} in the [connector.transport] sub-table "
            f"([connector.transport] {flat[0]} = ...; in a dict: settings['transport'] = {{{flat[0]!r}: ...}})"
        )
    if _AUTH_KEYS & kwargs.keys():
        auth = _auth(kwargs)
        if auth is not None:
            kwargs["auth"] = auth
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        known = [p for p in params if p != "self"]
        for key in kwargs:
            if key not in params:
                raise ConfigError(
                    f"unknown setting {key!r} for connector {name!r}; known: {', '.join(sorted(known + list(_AUTH_KEYS)))}"
                )
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"connector {name!r}: {exc}") from exc
