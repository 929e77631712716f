"""Open Inference Protocol v2 (KServe v2) REST connector: Triton, Seldon MLServer, KServe.

On construction the connector checks that the model is ready (``GET /v2/models/{m}[/versions/{v}]/
ready``) and reads its metadata (``GET /v2/models/{m}[/versions/{v}]``): input name, datatype and
shape, output name and datatype. Explicit arguments win over metadata; a contradiction between the
two (an FP32 input declared as BYTES, a 3x32x32 input declared as 1x28x28) is a :class:`ConfigError`.

Each :meth:`query` sends ``POST .../infer`` with one ``id`` (a fresh UUID, also sent as
``X-Request-ID``) per request and at most ``max_batch`` images per request. The image travels as

* ``encoding="fp32"``: an FP32 tensor ``[N, C, H, W]`` (or NHWC), values in ``[0, 1]``;
* ``encoding="uint8"``: a UINT8 tensor, ``round(255 x)``;
* ``encoding="png" | "jpeg"``: a BYTES tensor ``[N]`` (or ``[N, 1]`` if the model declares it) of
  base64 strings, with ``parameters.content_type = "base64"`` (MLServer then hands the model raw
  bytes; Triton models decode base64 themselves; set ``bytes_content_type=None`` to omit it).

The answer is one output tensor, read as (``output="auto"`` picks from the declared datatype):

* ``"scores"``: float ``[N, K]`` logits or probabilities; label = first argmax. A width other than
  the connector's K classes raises :class:`InvalidResponseError` naming both widths.
* ``"index"``: integer ``[N]`` or ``[N, 1]`` class indices.
* ``"label"``: BYTES ``[N]`` label strings, or ``[N, k]`` top-k lists in rank order, mapped through a
  :class:`~blackbox_rs.connectors.labelmap.LabelMap` (an unmapped label is the map's ``other``
  class). Without ``label_map`` the labels must be the class names exactly (case-insensitive);
  anything else raises :class:`UnmappedLabelError`. ``label_depth=k`` searches the first k labels of
  a ranked list for a task class; the default 1 reads the model's top answer only (a deeper search
  certifies a different classifier: "the first of your labels anywhere in the top k"); ``None``
  searches the whole list the server returns. Recorded in the fingerprint.

Every answer is checked: a JSON body (an HTML page is :class:`InvalidResponseError`), the same
``id`` as sent (if echoed), exactly N predictions, the expected width, and the same model version
throughout: a model swapped behind the URL would poison the query cache, so another version than
the pinned one (``model_version=``), the one the metadata declares, or the first one an answer
reported raises :class:`~blackbox_rs.errors.ModelVersionChangedError` naming both. A resumed run
restores the binding with :meth:`KServeV2Connector.expect_model_version`.

The fingerprint is ``kserve-v2:<url>|model=..|version=..|host=..|input=..|output=..|encoding=..``
``|read=<scores|index|label>`` (+ ``content_type=`` for png/jpeg, and for label outputs the label map's
hash, which covers the class order, and ``depth=``): identity, version (``unpinned`` when neither pinned
nor declared: the version first observed is then enforced, and persisted by the engine) and every
setting that changes answers; never a credential, a query string, a timeout or a retry setting.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal
from urllib.parse import quote

import torch

from blackbox_rs.errors import (
    ConfigError,
    HTTPStatusError,
    InvalidParameterError,
    InvalidResponseError,
    ModelNotReadyError,
)

from ._encoding import ImageEncoding, Layout
from ._kserve_wire import FLOAT_TYPES, INT_TYPES, check_envelope, decode_output, encode_input
from ._version_pin import VersionPin
from .base import ConnectorInfo, Prediction
from .http import Auth, HTTPConnector, HTTPTransport, endpoint_fingerprint, parse_json
from .labelmap import LabelMap
from .transport_settings import TransportSettings, as_transport_settings, refuse_flat_transport_keywords

__all__ = ["KServeV2Connector"]

OutputKind = Literal["auto", "scores", "index", "label"]



class KServeV2Connector(HTTPConnector):
    """A model behind an Open Inference Protocol v2 REST endpoint (see the module docstring).

    Args:
        base_url: server root, e.g. ``http://127.0.0.1:8080`` (a path prefix is kept).
        model_name: the model's name on the server; model_version: pin a version (recommended: it
            goes into the fingerprint and every answer is checked against it).
        input_shape: ``(C, H, W)``; default from the metadata's input shape.
        class_names / num_classes / label_map: the task classes; default: ``label_map.class_names``,
            else ``K`` from a declared ``[-1, K]`` score output (classes named ``"0".."K-1"``).
        input_name, output_name: tensor names; default from metadata.
        encoding, layout, jpeg_quality, bytes_content_type: how images travel (module docstring).
        output: how to read the answer (module docstring); label_depth: labels of a ranked label
            output searched for a task class (default 1: the top answer only; None: all of them).
        max_batch: most images per request.
        transport: :class:`~blackbox_rs.connectors.http.TransportSettings` (or its dict form, for
            config files): timeouts, ``max_in_flight`` (default 4; = the connector's
            ``info.max_concurrency``), ``rate_limit`` (default: none), retries, static headers (a
            ``Host`` header is in the fingerprint), TLS verification. A flat transport keyword
            (``timeout_s=``) raises :class:`~blackbox_rs.errors.ConfigError`.
        auth: the credential (:class:`Auth`); ``label_map`` may be a :meth:`LabelMap.to_dict` dict.
        check_ready: call the readiness endpoint first (raises :class:`ModelNotReadyError`).
        cost_per_query: price of one image query, for budgets.
        metadata: skip discovery and use this metadata dict instead (endpoints without it).
        identity: a stable name for the endpoint used in the fingerprint instead of its URL (e.g. a
            local server whose port changes between runs, or a model file hash). Only give one
            that truly identifies the model: cached answers are shared by equal fingerprints.
    """

    @refuse_flat_transport_keywords
    def __init__(
        self,
        base_url: str,
        model_name: str,
        *,
        model_version: str | None = None,
        input_shape: Sequence[int] | None = None,
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        label_map: LabelMap | Mapping[str, Any] | None = None,
        input_name: str | None = None,
        output_name: str | None = None,
        encoding: ImageEncoding | str = ImageEncoding.FP32,
        layout: Layout = "NCHW",
        jpeg_quality: int = 95,
        bytes_content_type: str | None = "base64",
        output: OutputKind = "auto",
        label_depth: int | None = 1,
        max_batch: int = 32,
        transport: TransportSettings | Mapping[str, Any] | None = None,
        auth: Auth | None = None,
        check_ready: bool = True,
        cost_per_query: float = 0.0,
        metadata: Mapping[str, Any] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        identity: str | None = None,
    ) -> None:
        self._identity = identity
        if not model_name:
            raise InvalidParameterError("model_name must be a non-empty string")
        if output not in ("auto", "scores", "index", "label"):
            raise InvalidParameterError(f"output must be auto, scores, index or label, got {output!r}")
        if layout not in ("NCHW", "NHWC"):
            raise InvalidParameterError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
        if label_depth is not None and (isinstance(label_depth, bool) or not isinstance(label_depth, int)
                                        or label_depth < 1):
            raise InvalidParameterError(f"label_depth must be an integer >= 1 or None, got {label_depth!r}")
        self.label_depth = label_depth
        self._version = VersionPin()
        if isinstance(label_map, Mapping):  # from a config file: LabelMap.to_dict() form
            label_map = LabelMap.from_dict(label_map)
        settings = as_transport_settings(transport).with_defaults(max_in_flight=4, rate_limit=None)
        self.encoding = ImageEncoding(encoding)
        self.layout: Layout = layout
        self.jpeg_quality = int(jpeg_quality)
        self.bytes_content_type = bytes_content_type
        self.model_name = model_name
        self.model_version = model_version
        self.transport = HTTPTransport(base_url, auth=auth, transport=settings, sleep=sleep)
        prefix = f"/v2/models/{quote(model_name, safe='')}"
        if model_version:
            prefix += f"/versions/{quote(str(model_version), safe='')}"
        self._prefix = prefix
        try:
            if check_ready and not self.ready():
                raise ModelNotReadyError(f"model {model_name!r} at {self.transport.base_url} is not ready")
            meta = dict(metadata) if metadata is not None else self._fetch_metadata()
            self.metadata: dict[str, Any] = meta
            self._routing_headers = settings.routing_headers  # may route to another model: fingerprinted
            self._configure(meta, input_shape, class_names, num_classes, label_map, input_name,
                            output_name, output, max_batch, cost_per_query, settings.host)
        except BaseException:
            self.transport.close()
            raise

    # ---- discovery -------------------------------------------------------------------------------

    def ready(self) -> bool:
        """True if the model's readiness endpoint answers 2xx. A 404 (unknown model or version) raises
        :class:`HTTPStatusError`; other refusals (400, 503 after retries) return False."""
        try:
            self.transport.request("GET", f"{self._prefix}/ready")
        except HTTPStatusError as e:
            if e.status == 404:
                raise HTTPStatusError(
                    f"model {self.model_name!r}"
                    + (f" version {self.model_version!r}" if self.model_version else "")
                    + f" not found at {self.transport.base_url} (404 on the readiness endpoint); body: "
                    f"{e.body_excerpt!r}",
                    status=404, url=e.url, body_excerpt=e.body_excerpt, attempts=e.attempts,
                    request_id=e.request_id,
                ) from None
            return False
        return True

    def _fetch_metadata(self) -> dict[str, Any]:
        meta = self.transport.get_json(self._prefix)
        if not isinstance(meta, dict):
            raise InvalidResponseError(
                f"model metadata of {self.model_name!r} is a {type(meta).__name__}, not a JSON object"
            )
        for key in ("inputs", "outputs"):
            if key in meta and not isinstance(meta[key], list):
                raise InvalidResponseError(f"model metadata field {key!r} must be a list")
        return meta

    def _configure(
        self,
        meta: Mapping[str, Any],
        input_shape: Sequence[int] | None,
        class_names: Sequence[str] | None,
        num_classes: int | None,
        label_map: LabelMap | None,
        input_name: str | None,
        output_name: str | None,
        output: OutputKind,
        max_batch: int,
        cost_per_query: float,
        host: str | None,
    ) -> None:
        inputs = [t for t in meta.get("inputs") or [] if isinstance(t, dict)]
        outputs = [t for t in meta.get("outputs") or [] if isinstance(t, dict)]
        # ---- input tensor
        tin = _pick(inputs, input_name, "input")
        if input_name is None:
            if tin is None:
                raise ConfigError(
                    f"model {self.model_name!r} declares no inputs in its metadata; pass input_name="
                )
            input_name = str(tin["name"])
        self.input_name = input_name
        want = {"fp32": "FP32", "uint8": "UINT8", "png": "BYTES", "jpeg": "BYTES"}[self.encoding.value]
        declared = str(tin.get("datatype", "")).upper() if tin else ""
        if declared and declared != want:
            if self.encoding is ImageEncoding.FP32 and declared in FLOAT_TYPES:
                want = declared  # send floats, declared as the model's float type
            else:
                raise ConfigError(
                    f"input {input_name!r} is declared {declared}, but encoding={self.encoding.value!r} sends "
                    f"{want}; choose a matching encoding"
                )
        self.input_datatype = want
        dshape = [int(d) for d in tin.get("shape", [])] if tin else []
        if self.encoding.is_bytes:
            self._bytes_shape_2d = len(dshape) == 2
            if input_shape is None:
                raise ConfigError("with png/jpeg encoding the image shape is not in the metadata; pass input_shape=")
        else:
            image_dims = dshape[1:] if len(dshape) == 4 else []
            if image_dims and self.layout == "NHWC":
                image_dims = [image_dims[2], image_dims[0], image_dims[1]]
            if input_shape is None:
                if len(image_dims) != 3 or any(d < 1 for d in image_dims):
                    raise ConfigError(
                        f"cannot infer the image shape from the declared input shape {dshape}; pass input_shape="
                    )
                input_shape = image_dims
            elif len(image_dims) == 3:
                for got, exp in zip(input_shape, image_dims, strict=True):
                    if exp > 0 and int(got) != exp:
                        raise ConfigError(
                            f"input_shape {tuple(input_shape)} (C, H, W) contradicts the model's declared input "
                            f"shape {dshape} ({self.layout})"
                        )
        shape = tuple(int(d) for d in input_shape)
        if len(shape) != 3:
            raise InvalidParameterError(f"input_shape must be (C, H, W), got {shape}")
        # ---- output tensor
        tout = _pick(outputs, output_name, "output")
        if output_name is None and tout is not None:
            output_name = str(tout["name"])
        self.output_name = output_name
        odtype = str(tout.get("datatype", "")).upper() if tout else ""
        oshape = [int(d) for d in tout.get("shape", [])] if tout else []
        if output == "auto":
            if odtype == "BYTES":
                output = "label"
            elif odtype in INT_TYPES:
                output = "index"
            elif odtype in FLOAT_TYPES:
                output = "scores"
            elif label_map is not None:
                output = "label"
            else:
                raise ConfigError(
                    f"cannot tell how to read model {self.model_name!r}'s output (metadata declares no datatype); "
                    f"pass output='scores', 'index' or 'label'"
                )
        self.output_kind: Literal["scores", "index", "label"] = output
        # ---- classes
        if label_map is not None:
            if class_names is not None and tuple(class_names) != label_map.class_names:
                raise ConfigError("class_names and label_map.class_names differ; pass one of them")
            class_names = label_map.class_names
        elif class_names is None:
            if num_classes is None and output == "scores" and len(oshape) == 2 and oshape[1] > 1:
                num_classes = oshape[1]
            if num_classes is None:
                raise ConfigError("cannot infer the classes from the metadata; pass class_names= or num_classes=")
            class_names = [str(i) for i in range(int(num_classes))]
        if output == "scores" and len(oshape) == 2 and oshape[1] > 0 and oshape[1] != len(class_names):
            raise ConfigError(
                f"output {output_name!r} is declared with {oshape[1]} scores per image, but {len(class_names)} "
                f"classes were given"
            )
        self.label_map = label_map if label_map is not None else (
            LabelMap.identity(class_names) if output == "label" else None
        )
        # ---- identity
        versions = meta.get("versions")
        seen_version = self.model_version
        if seen_version is None and isinstance(versions, list) and len(versions) == 1:
            seen_version = str(versions[0])
        self._version.value = seen_version
        enc = self.encoding.value + (f"-q{self.jpeg_quality}" if self.encoding is ImageEncoding.JPEG else "")
        labels_read = self.label_map is not None  # a label output: class order and label map decide answers
        fingerprint = endpoint_fingerprint(
            "kserve-v2",
            self._identity if self._identity is not None else self.transport.base_url,
            model=self.model_name,
            version=seen_version or "unpinned",
            host=host,
            headers=getattr(self, "_routing_headers", None),
            input=self.input_name,
            output=self.output_name,
            encoding=f"{enc}-{self.layout}",
            labelmap=self.label_map.fingerprint if labels_read else None,  # type: ignore[union-attr]
            read=output,
            content_type=(self.bytes_content_type or "none") if self.encoding.is_bytes else None,
            depth=(self.label_depth or "all") if labels_read else None,
        )
        self._info = ConnectorInfo(
            input_shape=shape,  # type: ignore[arg-type]
            class_names=tuple(class_names),
            returns_scores=output == "scores",
            max_batch=int(max_batch),
            max_concurrency=self.transport.max_in_flight,
            cost_per_query=float(cost_per_query),
            fingerprint=fingerprint,
            differentiable=False,
            other_index=self.label_map.other_index if self.label_map is not None else None,
        )

    # ---- inference -------------------------------------------------------------------------------

    def _input_tensor(self, batch: torch.Tensor) -> dict[str, Any]:
        return encode_input(batch, name=self.input_name, datatype=self.input_datatype, encoding=self.encoding,
                            layout=self.layout, jpeg_quality=self.jpeg_quality,
                            bytes_2d=getattr(self, "_bytes_shape_2d", False), content_type=self.bytes_content_type)

    def _query_chunk(self, batch: torch.Tensor) -> Prediction:
        n = int(batch.shape[0])
        rid = uuid.uuid4().hex
        body: dict[str, Any] = {"id": rid, "inputs": [self._input_tensor(batch)]}
        if self.output_name:
            body["outputs"] = [{"name": self.output_name}]
        resp = self.transport.request("POST", f"{self._prefix}/infer", json_body=body, request_id=rid)
        return self._parse(parse_json(resp, self.transport.redact), n, rid)

    def _parse(self, doc: Any, n: int, rid: str) -> Prediction:
        where = f"model {self.model_name!r} (request {rid})"
        outs = check_envelope(doc, rid, where)
        self._check_version(doc.get("model_version"), where)
        return decode_output(outs, n, where, output_name=self.output_name, kind=self.output_kind,
                             num_classes=self._info.num_classes, label_map=self.label_map,
                             label_depth=self.label_depth)

    def _check_version(self, version: Any, where: str) -> None:
        self._version.observe(version, f"{where}: the server answered with model version {{seen}}, expected "
                              "{bound}; a model swapped behind the URL would mix answers of two models in one "
                              "cache (pin model_version=)")

    @property
    def observed_model_version(self) -> str | None:
        """The model version this connector is bound to: the pinned ``model_version``, else the only
        version the metadata declares, else the first one an answer reported (or the one given to
        :meth:`expect_model_version`); None until known."""
        return self._version.value

    def expect_model_version(self, version: str) -> None:
        """Bind this connector to ``version`` (e.g. the one a resumed run's cache observed): any answer
        with another version raises :class:`ModelVersionChangedError`, naming both. Raises at once if
        the connector is already bound to a different one (pinned, declared or observed)."""
        self._version.expect(version, f"model {self.model_name!r} is bound to version {{bound}}, but the run being "
                             "resumed observed {seen}; answers of two model versions are never mixed in one cache")


def _pick(tensors: list[dict[str, Any]], name: str | None, what: str) -> dict[str, Any] | None:
    """The declared tensor called ``name``, or the only one if ``name`` is None."""
    if name is not None:
        return next((t for t in tensors if t.get("name") == name), None)
    if len(tensors) > 1:
        raise ConfigError(
            f"the model declares {len(tensors)} {what}s {[t.get('name') for t in tensors]}; pass {what}_name="
        )
    return tensors[0] if tensors else None
