"""Local fakes of hosted image-classification APIs (stdlib HTTP server on 127.0.0.1 only).

Each fake speaks its vendor's wire format as documented in the reference sheet: it checks the
request (path, auth, headers, body shape; a violation is logged in ``violations`` and answered with
the vendor's own 400), decodes the images and answers like the vendor would. Its "model" is the
mean brightness of the image: bright -> a cat label, dark -> a dog label, in between -> a label
no task knows (so it maps to ``other``).

Faults are queued with :meth:`VendorFake.push` and consumed one per request: ``throttle`` (the
vendor's rate-limit answer), ``quota`` (its hard quota / billing answer), ``item_error`` (batched
APIs: the first image fails with a retryable per-image error), ``item_fatal`` (a non-retryable
per-image error), ``loading`` (Hugging Face cold start), ``transient`` (a retryable server error).
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

from .loopback import LoopbackServer

__all__ = ["FAKES", "Reply", "VendorFake"]


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    n_images: int = 0
    fault: str = "ok"


def brightness_class(image: bytes) -> str:
    """The fake model: ``cat`` (bright), ``dog`` (dark) or ``sofa`` (in between)."""
    with Image.open(io.BytesIO(image)) as im:
        m = float(np.asarray(im.convert("L"), dtype=np.float64).mean()) / 255.0
    return "cat" if m > 0.55 else "dog" if m < 0.45 else "sofa"


def image_side(image: bytes) -> int:
    with Image.open(io.BytesIO(image)) as im:
        return min(im.size)


class BadRequest(Exception):
    """A request that breaks the vendor's documented shape."""


class VendorFake(LoopbackServer):
    """Base of the fakes: server, fault queue, request log, shape checks (see the module docstring)."""

    secret = "planted-secret-value-0123456789"

    def __init__(self) -> None:
        self._faults: deque[str] = deque()
        self._lock = threading.Lock()
        self.log: list[Seen] = []
        self.violations: list[str] = []

    # ---- control -------------------------------------------------------------------------------
    def push(self, *faults: str) -> None:
        with self._lock:
            self._faults.extend(faults)

    def _fault(self) -> str:
        with self._lock:
            return self._faults.popleft() if self._faults else "ok"

    @property
    def url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> VendorFake:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
                u = urlsplit(self.path)
                seen = Seen(u.path, parse_qs(u.query), {k.lower(): v for k, v in self.headers.items()}, raw)
                seen.fault = fake._fault()
                try:
                    reply = fake.handle(seen)
                except BadRequest as e:
                    with fake._lock:
                        fake.violations.append(str(e))
                    reply = fake.bad_request(str(e))
                with fake._lock:
                    fake.log.append(seen)
                body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.headers.pop("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(body)))
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        self._serve(Handler)
        return self

    # ---- vendor part ---------------------------------------------------------------------------
    def handle(self, req: Seen) -> Reply:
        raise NotImplementedError

    def bad_request(self, message: str) -> Reply:
        return Reply(400, {"error": message})

    @staticmethod
    def expect(cond: object, message: str) -> None:
        if not cond:
            raise BadRequest(message)

    @staticmethod
    def json_body(req: Seen) -> Any:
        try:
            return json.loads(req.body)
        except ValueError:
            raise BadRequest("body is not JSON") from None

    @staticmethod
    def b64(s: Any) -> bytes:
        VendorFake.expect(isinstance(s, str) and not s.startswith("data:"), "image must be plain base64")
        try:
            return base64.b64decode(s, validate=True)
        except ValueError:
            raise BadRequest("invalid base64") from None


# ---- Hugging Face --------------------------------------------------------------------------------
class HuggingFaceFake(VendorFake):
    path = "/hf-inference/models/google/vit-base-patch16-224"
    labels = {"cat": "tabby, tabby cat", "dog": "golden retriever", "sofa": "studio couch, day bed"}

    def handle(self, req: Seen) -> Reply:
        self.expect(req.path == self.path, f"unknown path {req.path}")
        if req.headers.get("authorization") != f"Bearer {self.secret}":
            return Reply(401, {"error": "Invalid credentials in Authorization header"})
        body = self.json_body(req)
        self.expect(isinstance(body, dict) and set(body) <= {"inputs", "parameters"}, "body must be {inputs, parameters}")
        img = self.b64(body.get("inputs"))
        req.n_images = 1
        params = body.get("parameters") or {}
        self.expect(set(params) <= {"top_k", "function_to_apply"}, f"unknown parameters {params}")
        if req.fault == "throttle":
            return Reply(429, {"error": "Rate limit reached. You reached free usage limit (reset hourly)."})
        if req.fault == "quota":
            return Reply(402, {"error": "You have exceeded your monthly included credits for Inference Providers."})
        if req.fault == "loading":
            return Reply(503, {"error": "Model google/vit-base-patch16-224 is currently loading", "estimated_time": 0.01})
        top = brightness_class(img)
        ranked = [self.labels[top]] + [v for k, v in self.labels.items() if k != top]
        scores = [0.7, 0.2, 0.1]
        out = [{"label": lab, "score": s} for lab, s in zip(ranked, scores, strict=True)]
        return Reply(200, out[: int(params.get("top_k", 5))])


# ---- Google Cloud Vision -------------------------------------------------------------------------
class GoogleVisionFake(VendorFake):
    labels = {"cat": ("/m/01yrx", "Cat"), "dog": ("/m/0bt9lr", "Dog"), "sofa": ("/m/02crq1", "Couch")}
    #: if set, every image is answered with these ``(mid, description, score)`` labels (cut to maxResults)
    answer: list[tuple[str, str, float]] | None = None

    def bad_request(self, message: str) -> Reply:
        return Reply(400, {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}})

    def handle(self, req: Seen) -> Reply:
        self.expect(req.path == "/v1/images:annotate", f"unknown path {req.path}")
        if req.query.get("key") != [self.secret]:
            return Reply(403, {"error": {"code": 403, "message": "The request is missing a valid API key.",
                                         "status": "PERMISSION_DENIED"}})
        body = self.json_body(req)
        reqs = body.get("requests")
        self.expect(isinstance(reqs, list) and 1 <= len(reqs) <= 16, "requests must hold 1 to 16 images")
        req.n_images = len(reqs)
        if req.fault == "throttle":
            return Reply(429, {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message":
                               "Quota exceeded for quota metric 'Requests' and limit 'Requests per minute'"}})
        if req.fault == "quota":
            return Reply(429, {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message":
                               "Quota exceeded for quota metric 'Requests' and limit 'Requests per day'"}})
        out = []
        for i, r in enumerate(reqs):
            feats = r.get("features")
            self.expect(isinstance(feats, list) and feats and feats[0].get("type") == "LABEL_DETECTION",
                        "features must ask for LABEL_DETECTION")
            img = self.b64((r.get("image") or {}).get("content"))
            if i == 0 and req.fault == "item_error":
                out.append({"error": {"code": 14, "message": "Service temporarily unavailable."}})
                continue
            if i == 0 and req.fault == "item_fatal":
                out.append({"error": {"code": 3, "message": "Bad image data."}})
                continue
            if self.answer is not None:
                anns = [{"mid": m, "description": d, "score": sc, "topicality": sc} for m, d, sc in self.answer]
                out.append({"labelAnnotations": anns[: int(feats[0].get("maxResults", 10))]})
                continue
            top = brightness_class(img)
            mid, desc = self.labels[top]
            anns = [{"mid": mid, "description": desc, "score": 0.95, "topicality": 0.95},
                    {"mid": "/m/0jbk", "description": "Animal", "score": 0.9, "topicality": 0.9}]
            out.append({"labelAnnotations": anns[: int(feats[0].get("maxResults", 10))]})
        return Reply(200, {"responses": out})


# ---- AWS Rekognition -----------------------------------------------------------------------------
_AUTH_RE = re.compile(r"AWS4-HMAC-SHA256 Credential=(?P<akid>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/rekognition/"
                      r"aws4_request, SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=(?P<sig>[0-9a-f]{64})$")


class RekognitionFake(VendorFake):
    access_key = "AKIDFAKEEXAMPLE"
    model_version = "3.0"  # LabelModelVersion of every answer (a test may change it mid-run)
    names = {"cat": "Cat", "dog": "Dog", "sofa": "Couch"}

    def bad_request(self, message: str) -> Reply:
        return Reply(400, {"__type": "InvalidParameterException", "Message": message})

    def handle(self, req: Seen) -> Reply:
        from blackbox_rs.connectors._sigv4 import sign

        self.expect(req.path == "/", "Rekognition is POST /")
        self.expect(req.headers.get("x-amz-target") == "RekognitionService.DetectLabels", "wrong X-Amz-Target")
        self.expect(req.headers.get("content-type") == "application/x-amz-json-1.1", "wrong Content-Type")
        m = _AUTH_RE.match(req.headers.get("authorization", ""))
        self.expect(m is not None, "malformed SigV4 Authorization header")
        assert m is not None
        signed = m["signed"].split(";")
        self.expect({"host", "x-amz-date", "x-amz-target", "content-type"} <= set(signed), "headers not signed")
        when = dt.datetime.strptime(req.headers["x-amz-date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
        good = sign(method="POST", host=req.headers["host"], path="/", body=req.body,
                    headers={h: req.headers[h] for h in signed if h not in ("host", "x-amz-date")},
                    access_key=self.access_key, secret_key=self.secret, region=m["region"],
                    service="rekognition", now=when)
        if m["akid"] != self.access_key or good["Authorization"] != req.headers["authorization"]:
            return Reply(400, {"__type": "InvalidSignatureException", "message": "The request signature we "
                               "calculated does not match the signature you provided."})
        body = self.json_body(req)
        img = self.b64((body.get("Image") or {}).get("Bytes"))
        req.n_images = 1
        if req.fault == "throttle":
            return Reply(400, {"__type": "ProvisionedThroughputExceededException", "message": "Provisioned rate exceeded"})
        if req.fault == "transient":
            return Reply(500, {"__type": "ThrottlingException", "message": "Rate exceeded"})
        if image_side(img) < 80:
            return Reply(400, {"__type": "InvalidParameterException", "message": "Minimum image dimension is 80"})
        top = brightness_class(img)
        # the specific label ranks first (the connector reads the top label by default); its parent follows
        labels = [{"Name": self.names[top], "Confidence": 99.0, "Instances": [],
                   "Parents": [{"Name": "Animal"}, {"Name": "Pet"}] if top != "sofa" else [{"Name": "Furniture"}],
                   "Aliases": [], "Categories": [{"Name": "Animals and Pets"}]},
                  {"Name": "Animal", "Confidence": 97.5, "Instances": [], "Parents": [], "Aliases": [], "Categories": []}]
        if top == "sofa":
            labels.pop()
        return Reply(200, {"Labels": labels[: int(body.get("MaxLabels", 1000))],
                           "LabelModelVersion": self.model_version})


# ---- Azure ---------------------------------------------------------------------------------------
class AzureImageAnalysisFake(VendorFake):
    def bad_request(self, message: str) -> Reply:
        return Reply(400, {"error": {"code": "InvalidRequest", "message": message}})

    def _azure_common(self, req: Seen, key_header: str) -> Reply | None:
        if req.headers.get(key_header) != self.secret:
            return Reply(401, {"error": {"code": "401", "message": "Access denied due to invalid subscription key."}})
        self.expect(req.headers.get("content-type") == "application/octet-stream", "body must be octet-stream")
        req.n_images = 1
        if req.fault == "throttle":
            return Reply(429, {"error": {"code": "429", "message": "Rate limit is exceeded."}}, {"Retry-After": "0"})
        if req.fault == "quota":
            return Reply(403, {"error": {"code": "403", "message": "Out of call volume quota for ComputerVision F0 "
                                         "pricing tier. Please retry after 5 days."}})
        return None

    def handle(self, req: Seen) -> Reply:
        self.expect(req.path == "/computervision/imageanalysis:analyze", f"unknown path {req.path}")
        self.expect(req.query.get("features") == ["tags"] and "api-version" in req.query, "need features=tags")
        early = self._azure_common(req, "ocp-apim-subscription-key")
        if early:
            return early
        if image_side(req.body) < 50:
            return Reply(400, {"error": {"code": "InvalidRequest", "innererror": {"code": "InvalidImageSize"},
                                         "message": "Image size is too small."}})
        top = brightness_class(req.body)
        tags = [{"name": top, "confidence": 0.99}, {"name": "indoor", "confidence": 0.9}]
        return Reply(200, {"modelVersion": "2023-10-01", "metadata": {"width": 32, "height": 32},
                           "tagsResult": {"values": tags}})


class AzureCustomVisionFake(AzureImageAnalysisFake):
    path = "/customvision/v3.0/Prediction/proj-1/classify/iterations/Iteration3/image/nostore"

    def handle(self, req: Seen) -> Reply:
        self.expect(req.path == self.path, f"unknown path {req.path}")
        early = self._azure_common(req, "prediction-key")
        if early:
            return early
        top = brightness_class(req.body)
        p_cat = {"cat": 0.93, "dog": 0.05, "sofa": 0.4}[top]
        preds = sorted([{"probability": p_cat, "tagId": "t1", "tagName": "cat"},
                        {"probability": 1 - p_cat, "tagId": "t2", "tagName": "dog"}], key=lambda d: -d["probability"])
        return Reply(200, {"id": "x", "project": "proj-1", "iteration": "it-3", "created": "2025-01-01T00:00:00Z",
                           "predictions": preds})


# ---- Clarifai ------------------------------------------------------------------------------------
class ClarifaiFake(VendorFake):
    path = "/v2/users/clarifai/apps/main/models/general-image-recognition/outputs"

    def bad_request(self, message: str) -> Reply:
        return Reply(400, {"status": {"code": 11102, "description": "Invalid request", "details": message}})

    def handle(self, req: Seen) -> Reply:
        self.expect(req.path == self.path, f"unknown path {req.path}")
        if req.headers.get("authorization") != f"Key {self.secret}":
            return Reply(401, {"status": {"code": 11009, "description": "API key not found"}})
        body = self.json_body(req)
        inputs = body.get("inputs")
        self.expect(isinstance(inputs, list) and 1 <= len(inputs) <= 128, "inputs must hold 1 to 128 images")
        req.n_images = len(inputs)
        if req.fault == "throttle":
            return Reply(429, {"status": {"code": 11005, "description": "Making too many requests",
                                          "details": "exceeded limit of 15 requests per second"}})
        if req.fault == "quota":
            return Reply(402, {"status": {"code": 11006, "description": "Account limits exceeded"}})
        outs, mixed = [], False
        for i, inp in enumerate(inputs):
            img = self.b64(((inp.get("data") or {}).get("image") or {}).get("base64"))
            if i == 0 and req.fault in ("item_error", "item_fatal"):
                code = 10030 if req.fault == "item_error" else 30002
                outs.append({"id": f"o{i}", "status": {"code": code, "description": "Failure"}})
                mixed = True
                continue
            top = brightness_class(img)
            concepts = [{"id": f"ai_{top}", "name": top, "value": 0.98, "app_id": "main"},
                        {"id": "ai_pet", "name": "pet", "value": 0.9, "app_id": "main"}]
            outs.append({"id": f"o{i}", "status": {"code": 10000, "description": "Ok"},
                         "model": {"id": "general-image-recognition", "model_version": {"id": "aa7f35c0"}},
                         "data": {"concepts": concepts}})
        top = {"code": 10010, "description": "Mixed Success"} if mixed else {"code": 10000, "description": "Ok"}
        return Reply(200, {"status": {**top, "req_id": "r1"}, "outputs": outs})


# ---- TorchServe / TF Serving ---------------------------------------------------------------------
class TorchServeFake(VendorFake):
    labels = {"cat": "tabby", "dog": "golden_retriever", "sofa": "studio_couch"}

    def handle(self, req: Seen) -> Reply:
        self.expect(req.path == "/predictions/resnet-18", f"unknown path {req.path}")
        if req.headers.get("authorization") != f"Bearer {self.secret}":
            return Reply(401, {"code": 401, "type": "InvalidKeyException", "message": "Token Authorization failed."})
        self.expect(req.headers.get("content-type") in ("image/png", "image/jpeg"), "body must be an image")
        req.n_images = 1
        if req.fault in ("throttle", "transient"):
            return Reply(503, {"code": 503, "type": "ServiceUnavailableException",
                               "message": "Model \"resnet-18\" has no worker to serve inference request."})
        top = brightness_class(req.body)
        out = {self.labels[top]: 0.6}
        out.update({v: 0.1 for k, v in self.labels.items() if k != top})
        return Reply(200, out)


class TFServingFake(VendorFake):
    vocabulary = ("cat", "dog", "sofa")

    def handle(self, req: Seen) -> Reply:
        self.expect(req.path == "/v1/models/classifier:predict", f"unknown path {req.path}")
        body = self.json_body(req)
        inst = body.get("instances")
        self.expect(isinstance(inst, list) and inst and "inputs" not in body, "row format with instances")
        req.n_images = len(inst)
        if req.fault in ("throttle", "transient"):
            return Reply(503, {"error": "Server overloaded"})
        preds = []
        for row in inst:
            top = brightness_class(self.b64((row.get("image_bytes") or {}).get("b64")))
            preds.append([0.8 if c == top else 0.1 for c in self.vocabulary])
        return Reply(200, {"predictions": preds})


# ---- OpenAI-compatible chat ----------------------------------------------------------------------
class OpenAIChatFake(VendorFake):
    mode = "json"  # json | text | refusal

    def handle(self, req: Seen) -> Reply:
        self.expect(req.path == "/v1/chat/completions", f"unknown path {req.path}")
        if req.headers.get("authorization") != f"Bearer {self.secret}":
            return Reply(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                         "code": "invalid_api_key"}})
        body = self.json_body(req)
        self.expect(body.get("temperature") == 0 and body.get("model"), "model and temperature 0 expected")
        parts = body["messages"][-1]["content"]
        url = next(p["image_url"]["url"] for p in parts if p.get("type") == "image_url")
        self.expect(url.startswith("data:image/"), "image must be a data: URL")
        img = base64.b64decode(url.split(",", 1)[1])
        enum = body["response_format"]["json_schema"]["schema"]["properties"]["label"]["enum"]
        self.expect("other" in enum, "the label enum must contain 'other'")
        req.n_images = 1
        if req.fault == "throttle":
            return Reply(429, {"error": {"message": "Rate limit reached for requests", "type": "requests",
                                         "code": "rate_limit_exceeded"}}, {"x-ratelimit-reset-requests": "20ms"})
        if req.fault == "quota":
            return Reply(429, {"error": {"message": "You exceeded your current quota, please check your plan and "
                                         "billing details.", "type": "insufficient_quota", "code": "insufficient_quota"}})
        top = brightness_class(img)
        label = top if top in enum else "other"
        message: dict[str, Any] = {"role": "assistant", "content": json.dumps({"label": label})}
        if self.mode == "text":
            message["content"] = f"{label.capitalize()}."
        if self.mode == "refusal":
            message = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
        return Reply(200, {"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                           "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
                           "usage": {"prompt_tokens": 160, "completion_tokens": 7, "total_tokens": 167}})


# ---- KServe v2 (Open Inference Protocol) with a BYTES label output ---------------------------------
class KServeLabelFake(VendorFake):
    """``POST /v2/models/clf[/versions/v]/infer``: ranked label rows ``[N, k]`` (``rows``, the same for every
    image) and ``model_version`` (a test may change it mid-run)."""

    model_version = "1"
    rows: list[str] = ["cat", "dog"]

    def handle(self, req: Seen) -> Reply:
        self.expect(re.fullmatch(r"/v2/models/clf(/versions/[^/]+)?/infer", req.path), f"unknown path {req.path}")
        body = self.json_body(req)
        inputs = body.get("inputs")
        self.expect(isinstance(inputs, list) and len(inputs) == 1, "one input tensor expected")
        n = int(inputs[0]["shape"][0])
        req.n_images = n
        out = {"name": "label", "datatype": "BYTES", "shape": [n, len(self.rows)], "data": list(self.rows) * n}
        return Reply(200, {"id": body.get("id"), "model_name": "clf", "model_version": self.model_version,
                           "outputs": [out]})


FAKES: dict[str, type[VendorFake]] = {
    "huggingface": HuggingFaceFake,
    "google_vision": GoogleVisionFake,
    "aws_rekognition": RekognitionFake,
    "azure_image_analysis": AzureImageAnalysisFake,
    "azure_custom_vision": AzureCustomVisionFake,
    "clarifai": ClarifaiFake,
    "torchserve": TorchServeFake,
    "tf_serving": TFServingFake,
    "openai_chat": OpenAIChatFake,
}
