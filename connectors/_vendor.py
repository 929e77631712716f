"""Declarative base of the hosted-vendor connectors (Hugging Face, Google Vision, Rekognition, ...).

A vendor connector is a :class:`VendorSpec` (limits, defaults, price: data, not code) plus three
small hooks: :meth:`VendorConnector._request` (wire request for a list of encoded images),
:meth:`VendorConnector._parse` (one :data:`Item` per image) and, where the vendor tells throttling
or quota apart in the body, :meth:`VendorConnector._classify`. Everything else is shared here:

* **Encoding**: lossless PNG by default, or JPEG when asked (fixed quality, deterministic), upscaled first (bilinear, deterministic)
  when the image is smaller than the vendor's minimum side, and checked against the vendor's
  per-image byte limit. This is post-processing of the noisy input, so certificates stay valid.
* **Transport**: :class:`~blackbox_rs.connectors.http.HTTPTransport` configured by one
  ``transport=`` :class:`~blackbox_rs.connectors.http.TransportSettings`, whose unset fields take the
  spec's ``max_in_flight``, ``rate_limit`` (requests/s) and retried statuses, and the
  connector's error classifier (quota -> :class:`QuotaExhausted` at once, throttling -> backoff).
* **Per-image errors** in batched answers (Google ``responses[i].error``, Clarifai per-output
  status): only the failed images are sent again, in a smaller request, with the transport's
  backoff, at most ``retry.max_attempts`` rounds; a non-retryable per-image error raises.
* **Label mapping**: each answer is a list of ``(names, score)``; ``names`` are alternatives in
  preference order (a stable id, a parent label); the first alternative the
  :class:`~blackbox_rs.connectors.labelmap.LabelMap` knows is used. The labels are ranked by score
  (ties keep the vendor's order) and only the first ``label_depth`` of them are searched for a task
  class (:meth:`LabelMap.map_ranked` with ``depth``). The default ``label_depth=1`` certifies the
  vendor's own answer, its top label: an answer whose top label maps to no task class is
  ``other``. A deeper search ("the first of my labels anywhere in the vendor's top k") is another
  classifier, with other answers and another fingerprint.
* **Identity**: the fingerprint is ``<spec name>:<url>|<identity>|enc=..|min_side=..|labels=<map
  hash>|depth=<label_depth>``: every setting that can change an answer, and none that cannot
  (timeouts, retries, rate limits, concurrency, headers, credentials). The model version the server
  reports is pinned on first sight and enforced: a change raises
  :class:`~blackbox_rs.errors.ModelVersionChangedError`, because it would mix two models in one
  cache. A resumed run restores the pin with :meth:`VendorConnector.expect_model_version`.
"""

from __future__ import annotations

import abc
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from blackbox_rs.errors import (
    ConfigError,
    ConnectorError,
    InvalidParameterError,
    InvalidResponseError,
    RateLimitedError,
)

from ._encoding import ImageEncoding, encode_images
from ._version_pin import VersionPin
from .base import ConnectorInfo, Prediction
from .http import (
    DEFAULT_RETRY_STATUSES,
    Auth,
    ErrorClass,
    HTTPConnector,
    HTTPTransport,
    RetryPolicy,
    endpoint_fingerprint,
    parse_json,
)
from .labelmap import LabelMap
from .transport_settings import TransportSettings, as_transport_settings, refuse_flat_transport_keywords

__all__ = [
    "Item", "ItemError", "Label", "VendorConnector", "VendorSpec", "WireRequest", "check_label_depth",
    "json_error_text",
]

#: one vendor label: alternative names (preferred first) and a score (any scale; only the order counts)
Label = tuple[tuple[str, ...], float]


@dataclass(frozen=True)
class ItemError:
    """A per-image failure inside a batched answer. ``kind``: ``throttle`` / ``transient`` are
    retried (only that image), ``fatal`` raises."""

    message: str
    kind: Literal["throttle", "transient", "fatal"] = "fatal"


Item = list[Label] | ItemError


@dataclass(frozen=True)
class WireRequest:
    """One HTTP request: a path (may carry a query string) and a JSON or raw body."""

    path: str
    json_body: Any = None
    data: bytes | None = None
    content_type: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class VendorSpec:
    """The documented limits and defaults of one vendor API (see the reference sheet).

    ``rate_limit`` is in requests/s (None: no client-side limit); ``price_per_1k`` is the list
    price of 1,000 images in USD (0 for self-hosted or compute-time billing).
    """

    name: str
    vendor: str
    max_batch: int = 1
    max_in_flight: int = 4
    rate_limit: float | None = None
    price_per_1k: float = 0.0
    encoding: str = "png"
    jpeg_quality: int = 90
    min_side: int = 1
    max_image_bytes: int | None = None
    retry_statuses: frozenset[int] = DEFAULT_RETRY_STATUSES
    env: tuple[str, ...] = ()


def json_error_text(body: bytes) -> tuple[dict[str, Any], str]:
    """A JSON error body as a dict (``{}`` if it is not a JSON object) and its lower-cased text."""
    import json

    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}, body.decode("utf-8", "replace").lower()
    return (obj if isinstance(obj, dict) else {}), json.dumps(obj).lower()


class VendorConnector(HTTPConnector):
    """Shared machinery of the hosted-vendor connectors (see the module docstring).

    Common keyword arguments of every vendor connector:
        label_map: the task's :class:`LabelMap` (or its ``to_dict()`` form, or a list of task
            class names: vendor labels must then equal them, anything else is ``other``).
        input_shape: ``(C, H, W)`` of the images the SDK certifies (default ``(3, 224, 224)``).
        max_batch: override the vendor's most images per request; price_per_1k / cost_per_query:
            override the list price.
        encoding (``"jpeg"``/``"png"``), jpeg_quality: how images travel.
        label_depth: how many of the vendor's ranked labels are searched for a task label; 1 (the
            default) = the vendor's top answer only; deeper matching certifies a different
            classifier (it is part of the fingerprint). How many labels are *requested*
            (``max_results``, ``max_labels``, ...) is a separate, vendor-specific setting and must be
            at least ``label_depth``.
        transport: :class:`~blackbox_rs.connectors.http.TransportSettings` (or its dict form);
            unset ``max_in_flight`` / ``rate_limit="default"`` / retries take the vendor's defaults
            (its spec, its retried statuses); ``rate_limit=None``: no client-side limit. A flat
            transport keyword (``timeout_s=``) raises :class:`~blackbox_rs.errors.ConfigError`.
        auth: the credential (:class:`~blackbox_rs.connectors.http.Auth`); sleep: injectable backoff
            sleep (tests).
    """

    spec: ClassVar[VendorSpec]

    @refuse_flat_transport_keywords
    def __init__(
        self,
        base_url: str,
        *,
        label_map: LabelMap | Mapping[str, Any] | Sequence[str],
        identity: Mapping[str, object],
        auth: Auth | None = None,
        input_shape: Sequence[int] = (3, 224, 224),
        max_batch: int | None = None,
        price_per_1k: float | None = None,
        cost_per_query: float | None = None,
        encoding: str | None = None,
        jpeg_quality: int | None = None,
        label_depth: int = 1,
        transport: TransportSettings | Mapping[str, Any] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        spec = self.spec
        self.label_map = _as_label_map(label_map)
        self.label_depth = check_label_depth(label_depth)
        settings = as_transport_settings(transport).with_defaults(
            max_in_flight=spec.max_in_flight, rate_limit=spec.rate_limit,
            retry=RetryPolicy(retry_statuses=spec.retry_statuses))
        self.encoding = ImageEncoding(encoding or spec.encoding)
        if not self.encoding.is_bytes:
            raise InvalidParameterError(f"{spec.vendor} takes image files: encoding must be png or jpeg, got "
                                        f"{self.encoding.value!r}")
        self.jpeg_quality = int(jpeg_quality if jpeg_quality is not None else spec.jpeg_quality)
        batch = int(max_batch if max_batch is not None else spec.max_batch)
        if not 1 <= batch <= spec.max_batch:
            raise InvalidParameterError(f"{spec.vendor} accepts 1 to {spec.max_batch} images per request, "
                                        f"got max_batch={batch}")
        shape = tuple(int(d) for d in input_shape)
        if len(shape) != 3 or any(d < 1 for d in shape):
            raise InvalidParameterError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
        if cost_per_query is None:
            cost_per_query = (spec.price_per_1k if price_per_1k is None else float(price_per_1k)) / 1000.0
        self._sleep = sleep
        self.item_retries = 0  # images re-sent because of a per-image error in a batched answer
        self._version = VersionPin()
        self.transport = HTTPTransport(base_url, auth=auth, transport=settings, sleep=sleep, classify=self._classify)
        enc = self.encoding.value + (f"{self.jpeg_quality}" if self.encoding is ImageEncoding.JPEG else "")
        # a Host header (or another routing header) may route to another model behind one address
        host = settings.host
        self._info = ConnectorInfo(
            input_shape=shape,  # type: ignore[arg-type]
            class_names=self.label_map.class_names,
            returns_scores=False,
            max_batch=batch,
            max_concurrency=self.transport.max_in_flight,
            cost_per_query=float(cost_per_query),
            fingerprint=endpoint_fingerprint(spec.name, self.transport.base_url, **identity, host=host,
                                             headers=settings.routing_headers, enc=enc,
                                             min_side=spec.min_side, labels=self.label_map.fingerprint,
                                             depth=self.label_depth),
            other_index=self.label_map.other_index,
        )

    # ---- hooks -----------------------------------------------------------------------------------

    @abc.abstractmethod
    def _request(self, images: list[bytes]) -> WireRequest:
        """The request for these encoded images (at most ``info.max_batch``)."""

    @abc.abstractmethod
    def _parse(self, body: Any, n: int) -> list[Item]:
        """One :data:`Item` per image of the request, in order."""

    def _classify(self, status: int, headers: Mapping[str, str], body: bytes) -> ErrorClass | None:
        """Vendor meaning of an error answer (default: the transport's status rules)."""
        return None

    def _model_version(self, body: Any) -> str | None:
        """The model version the answer reports, if any (pinned on first sight)."""
        return None

    def _decode(self, resp: Any) -> Any:
        return parse_json(resp, self.transport.redact)

    # ---- shared machinery --------------------------------------------------------------------------

    def encode(self, batch: torch.Tensor) -> list[bytes]:
        """The bytes each image of ``batch`` travels as (deterministic)."""
        h, w = int(batch.shape[2]), int(batch.shape[3])
        side = self.spec.min_side
        if min(h, w) < side:
            scale = side / min(h, w)
            size = (max(side, math.ceil(h * scale)), max(side, math.ceil(w * scale)))
            batch = F.interpolate(batch, size=size, mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
        images = encode_images(batch, self.encoding, jpeg_quality=self.jpeg_quality)
        limit = self.spec.max_image_bytes
        if limit is not None:
            big = max(len(b) for b in images)
            if big > limit:
                raise InvalidParameterError(
                    f"an encoded image has {big:,} bytes, more than {self.spec.vendor}'s limit of {limit:,}; "
                    f"use a smaller input_shape or encoding='jpeg'"
                )
        return images

    def _query_chunk(self, batch: torch.Tensor) -> Prediction:
        images = self.encode(batch)
        labels: list[int] = [0] * len(images)
        pending = list(range(len(images)))
        policy = self.transport.retry
        for attempt in range(1, policy.max_attempts + 1):
            req = self._request([images[i] for i in pending])
            resp = self.transport.request("POST", req.path, json_body=req.json_body, data=req.data,
                                          content_type=req.content_type, headers=req.headers,
                                          images=len(pending))  # each retry round bills only what it re-sends
            body = self._decode(resp)
            self._pin_version(self._model_version(body))
            items = self._parse(body, len(pending))
            if len(items) != len(pending):
                raise InvalidResponseError(
                    f"{self.spec.vendor} answered {len(items)} results for {len(pending)} images"
                )
            failed: list[tuple[int, ItemError]] = []
            for i, item in zip(pending, items, strict=True):
                if isinstance(item, ItemError):
                    if item.kind == "fatal":
                        raise ConnectorError(f"{self.spec.vendor} refused image {i} of the request: "
                                             f"{self.transport.redact(item.message)} (not retried)")
                    failed.append((i, item))
                else:
                    labels[i] = self.map_labels(item)
            if not failed:
                break
            if attempt == policy.max_attempts:
                i, err = failed[0]
                msg = (f"{self.spec.vendor}: {len(failed)} image(s) still failing after {attempt} attempts "
                       f"(image {i}: {self.transport.redact(err.message)})")
                if err.kind == "throttle":  # throttling, not an exhausted quota (as the transport says)
                    raise RateLimitedError(msg, status=200, url=self.transport.base_url, attempts=attempt,
                                           throttled=attempt)
                raise ConnectorError(msg)
            pending = [i for i, _ in failed]
            self.item_retries += len(pending)
            cap = min(policy.backoff_max_s, policy.backoff_base_s * 2 ** (attempt - 1))
            self._sleep(random.uniform(0.0, cap))  # full jitter, as the transport's backoff
        return Prediction(labels=torch.tensor(labels, dtype=torch.int64))

    #: called with each answer's ranked raw labels ``[(label, score), ...]`` before mapping (None: off)
    label_observer: Callable[[list[tuple[str, float]]], None] | None = None

    def map_labels(self, item: list[Label]) -> int:
        """Task class of one answer: labels ranked by descending score (ties keep the vendor's order),
        first mapped alternative per label; only the first ``label_depth`` labels are searched, so
        by default the answer is the vendor's top label's class, or ``other``."""
        lm = self.label_map
        ranked = sorted(item, key=lambda p: -float(p[1]))
        if self.label_observer is not None:  # raw labels for `blackbox-rs api <vendor> labels`
            self.label_observer([(str(alts[0]), float(s)) for alts, s in ranked if alts])
        names = [next((a for a in alts if lm.lookup(a) is not None), alts[0]) for alts, _ in ranked if alts]
        return lm.map_ranked(names, depth=self.label_depth)

    def _pin_version(self, version: str | None) -> None:
        self._version.observe(version, f"{self.spec.vendor} answered with model version {{seen}}, but this run "
                              "is bound to {bound}; answers of two model versions are never mixed in one cache "
                              "(pin a model version, or start a fresh cache for the new one)")

    @property
    def observed_model_version(self) -> str | None:
        """The model version this connector is bound to: the first one an answer reported, or the one
        given to :meth:`expect_model_version`; None until known (or if the vendor reports none)."""
        return self._version.value

    def expect_model_version(self, version: str) -> None:
        """Bind this connector to ``version`` (e.g. the one a resumed run's cache observed): any answer
        with another version raises :class:`ModelVersionChangedError`, naming both. Raises at once if
        this connector already observed a different version."""
        self._version.expect(version, f"{self.spec.vendor} answered with model version {{bound}}, but the run "
                             "being resumed observed {seen}; answers of two model versions are never mixed in "
                             "one cache")

    @property
    def model_version(self) -> str | None:
        """Alias of :attr:`observed_model_version` (kept for compatibility)."""
        return self._version.value


def check_label_depth(label_depth: object, requested: int | None = None, what: str = "max_results") -> int:
    """``label_depth`` as an int >= 1 (and <= ``requested``, the number of labels asked for, if given);
    :class:`InvalidParameterError` otherwise."""
    if isinstance(label_depth, bool) or not isinstance(label_depth, int) or label_depth < 1:
        raise InvalidParameterError(
            f"label_depth must be an integer >= 1 (1 = the vendor's top answer only), got {label_depth!r}"
        )
    if requested is not None and label_depth > requested:
        raise InvalidParameterError(
            f"label_depth={label_depth} searches more labels than {what}={requested} requests; raise {what} or "
            f"lower label_depth"
        )
    return label_depth


def _as_label_map(label_map: LabelMap | Mapping[str, Any] | Sequence[str]) -> LabelMap:
    if isinstance(label_map, LabelMap):
        return label_map
    if isinstance(label_map, Mapping):
        return LabelMap.from_dict(label_map)
    if isinstance(label_map, str) or not isinstance(label_map, Sequence):
        raise ConfigError("label_map must be a LabelMap, its dict form, or a list of task class names")
    return LabelMap(list(label_map))
