"""A threaded HTTP server on 127.0.0.1 (free port) that the test servers share."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackServer:
    """Start/stop/context-manager plumbing around a ``ThreadingHTTPServer`` bound to loopback."""

    _httpd: ThreadingHTTPServer | None = None

    def _serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.daemon_threads = True
        httpd.request_queue_size = 128
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return int(self._httpd.server_address[1])

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def start(self) -> LoopbackServer:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):  # noqa: ANN204 - returns the subclass instance
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
