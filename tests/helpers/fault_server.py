"""A local Open-Inference-Protocol-v2 server with scriptable faults (stdlib only, 127.0.0.1).

It serves one model (a deterministic linear classifier over the flattened image unless another
``model`` is given) at ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]``, ``.../ready`` and
``.../infer``. Faults are queued with :meth:`FaultServer.push` and consumed one per ``infer`` request,
in order; when the queue is empty ``default_fault`` applies (``"ok"``) to every request, GETs
included for the page-like faults (``"html"``).

Fault names: ``ok``, ``429`` (with ``Retry-After: retry_after``), ``503``, ``502``, ``504``, ``slow``
(sleep ``delay`` seconds, then answer), ``malformed_json``, ``wrong_count`` (one prediction too few),
``wrong_width`` (one score too many), ``500_text`` (text/plain body), ``html`` (200 with an HTML
page), ``400``, ``401_echo`` (401 whose body echoes the Authorization header), ``403`` (refused
before the model ran), ``redirect``, ``bad_id`` (answers with another request id), ``version_swap``.

Billing: like a vendor, the server bills every image of every infer request that reaches the model,
whether or not the client is still waiting for the answer (a ``slow`` answer after the client's read
timeout is billed too); throttled (429) and refused (401/403) requests are not billed.

Capacity: with ``capacity=K`` at most K infer requests are served at once; beyond that the server
either queues (``overflow="queue"``) or answers 503 (``overflow="reject"``). ``service_time_s`` is
added to every infer. Every infer request is logged with its arrival time (``time.monotonic``).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

import numpy as np

from .loopback import LoopbackServer

__all__ = ["Fault", "FaultServer", "RequestRecord", "linear_model", "max_in_window"]


@dataclass(frozen=True)
class Fault:
    kind: str = "ok"
    retry_after: float | None = None
    delay: float = 0.0


@dataclass(frozen=True)
class RequestRecord:
    t: float
    method: str
    path: str
    request_id: str | None
    n_images: int
    fault: str


def linear_model(input_shape: tuple[int, int, int], num_classes: int, seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """A deterministic linear classifier ``x.flatten() @ W + b`` (float64 math, float32 output)."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(input_shape))
    w = rng.standard_normal((d, num_classes))
    b = rng.standard_normal(num_classes) * 0.1

    def f(x: np.ndarray) -> np.ndarray:
        return (x.reshape(x.shape[0], -1).astype(np.float64) @ w + b).astype(np.float32)

    return f


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """Most events in any half-open interval ``[t, t + window)``."""
    ts = sorted(times)
    best, j = 0, 0
    for i in range(len(ts)):
        while ts[i] - ts[j] >= window:
            j += 1
        best = max(best, i - j + 1)
    return best


class FaultServer(LoopbackServer):
    def __init__(
        self,
        *,
        model: Callable[[np.ndarray], np.ndarray] | None = None,
        model_name: str = "toy",
        version: str = "1",
        input_name: str = "input",
        output_name: str = "scores",
        input_shape: tuple[int, int, int] = (3, 8, 8),
        num_classes: int = 4,
        output_kind: str = "scores",
        labels_fn: Callable[[np.ndarray], list[list[str]]] | None = None,
        service_time_s: float = 0.0,
        capacity: int | None = None,
        overflow: str = "queue",
        declare_metadata: bool = True,
        input_datatype: str = "FP32",
    ) -> None:
        self.model = model or linear_model(input_shape, num_classes)
        self.model_name = model_name
        self.version = version
        self.input_name = input_name
        self.output_name = output_name
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.output_kind = output_kind
        self.labels_fn = labels_fn
        self.service_time_s = service_time_s
        self.capacity = capacity
        self.overflow = overflow
        self.declare_metadata = declare_metadata
        self.input_datatype = input_datatype
        self.default_fault = Fault("ok")
        self.model_ready = True
        self._faults: deque[Fault] = deque()
        self._lock = threading.Lock()
        self._cap = threading.BoundedSemaphore(capacity) if capacity else None
        self.log: list[RequestRecord] = []
        self.in_flight = 0
        self.max_in_flight_seen = 0
        self.rejected = 0
        self.handling_times: list[float] = []  # arrival to answer written, successful infers only
        self.last_body: dict[str, Any] | None = None
        self.last_headers: dict[str, str] = {}

    # ---- control ---------------------------------------------------------------------------------

    def push(self, *faults: Fault | str) -> None:
        with self._lock:
            self._faults.extend(Fault(f) if isinstance(f, str) else f for f in faults)

    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    def _next_fault(self) -> Fault:
        with self._lock:
            return self._faults.popleft() if self._faults else self.default_fault

    def infer_records(self) -> list[RequestRecord]:
        with self._lock:
            return [r for r in self.log if r.path.split("?", 1)[0].endswith("/infer")]
    @property
    def url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultServer:
        self._serve(_make_handler(self))
        return self

    # ---- model -----------------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        if not self.declare_metadata:
            return {"name": self.model_name, "versions": [self.version]}
        odt = {"scores": "FP32", "index": "INT64", "label": "BYTES"}[self.output_kind]
        oshape = [-1, self.num_classes] if self.output_kind == "scores" else [-1, -1]
        return {
            "name": self.model_name,
            "versions": [self.version],
            "platform": "fault-server",
            "inputs": [{"name": self.input_name, "datatype": self.input_datatype,
                        "shape": [-1] if self.input_datatype == "BYTES" else [-1, *self.input_shape]}],
            "outputs": [{"name": self.output_name, "datatype": odt, "shape": oshape}],
        }

    def infer(self, body: dict[str, Any], fault: Fault) -> dict[str, Any]:
        inp = body["inputs"][0]
        dt = inp.get("datatype")
        if dt == "BYTES":  # base64 PNG/JPEG images, decoded like a server-side preprocessor would
            import base64
            import io

            from PIL import Image

            imgs = [np.asarray(Image.open(io.BytesIO(base64.b64decode(s)))) for s in inp["data"]]
            x = np.stack([im[None] if im.ndim == 2 else im.transpose(2, 0, 1) for im in imgs]) / 255.0
        else:
            x = np.asarray(inp["data"], dtype=np.float64).reshape(inp["shape"])
        if dt == "UINT8":
            x = x / 255.0
        scores = self.model(x.astype(np.float32))
        n = scores.shape[0]
        if fault.kind == "wrong_count":
            scores = scores[: n - 1]
        if fault.kind == "wrong_width":
            scores = np.concatenate([scores, np.zeros((scores.shape[0], 1), np.float32)], axis=1)
        rows = scores.shape[0]
        if self.output_kind == "scores":
            out = {"name": self.output_name, "datatype": "FP32", "shape": list(scores.shape),
                   "data": scores.ravel().tolist()}
        elif self.output_kind == "index":
            out = {"name": self.output_name, "datatype": "INT64", "shape": [rows],
                   "data": scores.argmax(axis=1).tolist()}
        else:
            assert self.labels_fn is not None
            lists = self.labels_fn(scores)
            k = len(lists[0]) if lists else 1
            out = {"name": self.output_name, "datatype": "BYTES", "shape": [rows, k],
                   "data": [s for row in lists for s in row]}
        version = self.version + "-swapped" if fault.kind == "version_swap" else self.version
        rid = "someone-else" if fault.kind == "bad_id" else body.get("id")
        return {"model_name": self.model_name, "model_version": version, "id": rid, "outputs": [out]}


def _make_handler(srv: FaultServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, so the client's pool reuses connections
        disable_nagle_algorithm = True  # headers and body go out in two writes: avoid the 40 ms delayed-ACK stall

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes | str | dict[str, Any], ctype: str = "application/json",
                  headers: dict[str, str] | None = None) -> None:
            if isinstance(body, dict):
                body = json.dumps(body)
            if isinstance(body, str):
                body = body.encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                # end_headers() + wfile.write(body) would be two socket writes; like production servers,
                # send head and body in one
                self._headers_buffer.append(b"\r\n" + body)
                self.flush_headers()
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _model_path(self) -> str | None:
            base = f"/v2/models/{srv.model_name}"
            path = self.path.split("?", 1)[0]
            for prefix in (f"{base}/versions/{srv.version}", base):
                if path == prefix or path.startswith(prefix + "/"):
                    return path[len(prefix):]
            return None

        def _page_fault(self) -> bool:
            if srv.default_fault.kind == "html":
                self._send(200, "<html><body><h1>Welcome to nginx!</h1></body></html>", "text/html")
                return True
            return False

        def do_GET(self) -> None:
            if self._page_fault():
                return
            path = self.path.split("?", 1)[0]
            if path in ("/v2/health/ready", "/v2/health/live"):
                return self._send(200, b"")
            rest = self._model_path()
            if rest is None:
                return self._send(404, {"error": f"Model for path {path} not found"})
            if rest == "/ready":
                return self._send(200, b"") if srv.model_ready else self._send(400, {"error": "Model not ready"})
            if rest == "":
                return self._send(200, srv.metadata())
            return self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            t = time.monotonic()
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length) if length else b""
            rest = self._model_path()
            if rest != "/infer":
                return self._send(404, {"error": "not found"})
            fault = srv._next_fault()
            n = 0
            try:
                body = json.loads(raw)
                n = int(body["inputs"][0]["shape"][0])
            except (ValueError, KeyError, IndexError, TypeError):
                body = None
            with srv._lock:
                srv.log.append(RequestRecord(t, "POST", self.path, self.headers.get("X-Request-ID"), n, fault.kind))
                srv.last_body = body
                srv.last_headers = dict(self.headers.items())
            if self._page_fault():
                return
            k = fault.kind
            if k in ("429", "503", "502", "504"):
                hdrs = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
                return self._send(int(k), {"error": "slow down" if k == "429" else "unavailable"}, headers=hdrs)
            if k == "500_text":
                return self._send(500, "Internal Server Error: model raised ValueError", "text/plain")
            if k == "400":
                return self._send(400, {"error": "bad input tensor"})
            if k == "401_echo":
                return self._send(401, f"denied for {self.headers.get('Authorization')}", "text/plain")
            if k == "403":
                return self._send(403, {"error": "forbidden: this key may not call the model"})
            if k == "redirect":
                return self._send(307, b"", headers={"Location": "http://127.0.0.1:1/elsewhere?token=abc123"})
            if body is None:
                return self._send(400, {"error": "request body is not valid JSON"})
            if k == "slow":
                time.sleep(fault.delay)
            if srv._cap is not None:
                if srv.overflow == "reject":
                    if not srv._cap.acquire(blocking=False):
                        with srv._lock:
                            srv.rejected += 1
                        return self._send(503, {"error": "exceeds maximum queue size"})
                else:
                    srv._cap.acquire()
            try:
                with srv._lock:
                    srv.in_flight += 1
                    srv.max_in_flight_seen = max(srv.max_in_flight_seen, srv.in_flight)
                if srv.service_time_s:
                    time.sleep(srv.service_time_s)
                answer = srv.infer(body, fault) if k != "malformed_json" else None
            finally:
                # the slot frees before the answer leaves: a client that sends its next request as soon
                # as it has this answer must never find the slot still taken
                with srv._lock:
                    srv.in_flight -= 1
                if srv._cap is not None:
                    srv._cap.release()
            if answer is None:
                return self._send(200, '{"model_name": "toy", "outputs": [{"name": "sco')
            self._send(200, answer)
            with srv._lock:
                srv.handling_times.append(time.monotonic() - t)

    return Handler
