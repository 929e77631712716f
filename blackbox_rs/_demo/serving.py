"""A minimal Open Inference Protocol v2 server for a local model file (the demo and the tests; private).

Serves one TorchScript/torch.export model on 127.0.0.1 with the v2 REST endpoints
``/v2/health/ready``, ``/v2/models/{name}``, ``/v2/models/{name}/ready`` and
``/v2/models/{name}/infer``. Inputs are FP32 ``[N, C, H, W]`` tensors in ``[0, 1]``. With
``label_only=True`` (default) it answers only an INT64 ``label`` tensor, like an opaque API.

It is a stand-in for a real server (MLServer, Triton, KServe: the tests certify through a real
MLServer); it binds to loopback only and is not meant for production traffic.
"""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from blackbox_rs.connectors.torchscript import TorchScriptConnector

__all__ = ["V2ModelServer"]


class V2ModelServer:
    """Serve ``model_path`` over OIP v2 on ``127.0.0.1:port`` (``port=0``: a free port).

    Use as a context manager; :attr:`url` is the base URL for :class:`KServeV2Connector`.
    """

    def __init__(self, model_path: str | os.PathLike[str], *, input_shape: tuple[int, int, int], num_classes: int,
                 model_name: str = "model", model_version: str = "1", label_only: bool = True,
                 port: int = 0, max_batch: int = 1024) -> None:
        self.model = TorchScriptConnector(model_path, input_shape=input_shape, num_classes=num_classes,
                                          max_batch=max_batch)
        self.model_name, self.model_version = model_name, model_version
        self.label_only = label_only
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.max_batch = max_batch
        self.requests = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def metadata(self) -> dict[str, Any]:
        out = ({"name": "label", "datatype": "INT64", "shape": [-1]} if self.label_only
               else {"name": "probabilities", "datatype": "FP32", "shape": [-1, self.num_classes]})
        return {"name": self.model_name, "versions": [self.model_version], "platform": "blackbox-rs/torchscript",
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *self.input_shape]}],
                "outputs": [out]}

    def infer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            inp = body["inputs"][0]
            shape = [int(d) for d in inp["shape"]]
            if inp.get("datatype") != "FP32" or shape[1:] != list(self.input_shape):
                return 400, {"error": f"expected FP32 input of shape [-1, {', '.join(map(str, self.input_shape))}]"}
            if shape[0] > self.max_batch:
                return 400, {"error": f"batch of {shape[0]} exceeds max_batch {self.max_batch}"}
            x = torch.tensor(inp["data"], dtype=torch.float32).reshape(shape)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            return 400, {"error": f"malformed infer request: {exc}"}
        try:
            pred = self.model.query(x.clamp(0.0, 1.0))
        except Exception as exc:  # the model's own failure is a server error
            return 500, {"error": f"model failed: {exc}"}
        with self._lock:
            self.requests += 1
        if self.label_only:
            out = {"name": "label", "datatype": "INT64", "shape": [shape[0]], "data": pred.labels.tolist()}
        else:
            assert pred.scores is not None
            out = {"name": "probabilities", "datatype": "FP32", "shape": [shape[0], self.num_classes],
                   "data": pred.scores.flatten().tolist()}
        return 200, {"model_name": self.model_name, "model_version": self.model_version,
                     "id": body.get("id", ""), "outputs": [out]}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self
        base = f"/v2/models/{self.model_name}"

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logs
                return

            def _send(self, code: int, payload: dict[str, Any] | None = None) -> None:
                data = json.dumps(payload or {}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?")[0].rstrip("/")
                if path in ("/v2/health/ready", "/v2/health/live", f"{base}/ready",
                            f"{base}/versions/{server.model_version}/ready"):
                    self._send(200, {"ready": True})
                elif path in (base, f"{base}/versions/{server.model_version}"):
                    self._send(200, server.metadata())
                else:
                    self._send(404, {"error": f"unknown path {path}"})

            def do_POST(self) -> None:  # noqa: N802
                path = self.path.split("?")[0].rstrip("/")
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if path not in (f"{base}/infer", f"{base}/versions/{server.model_version}/infer"):
                    self._send(404, {"error": f"unknown path {path}"})
                    return
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._send(400, {"error": "request body is not JSON"})
                    return
                self._send(*server.infer(body))

        return Handler

    def start(self) -> V2ModelServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="bbrs-v2-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> V2ModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
