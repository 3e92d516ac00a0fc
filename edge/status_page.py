"""The gateway's HTTP endpoint: ``/metrics`` (Prometheus), ``/status.json`` and ``/`` (the
status page), on ``http_host:http_port`` from the config (port 0: no endpoint).

The page is one static file shipped in the package (``static/status.html``: HTML, CSS and
a few lines of JavaScript, no build step, nothing fetched from elsewhere) that polls
``/status.json`` every second. The server is the standard library's: a handful of requests a
second at most, from a phone on the site or a Prometheus scraper.

Nothing served holds a secret (see :mod:`tern.edge.health`); the endpoint listens on
loopback unless ``http_host`` says otherwise.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from tern.edge.health import Health
from tern.edge.metrics import CONTENT_TYPE_LATEST, GatewayMetrics

log = logging.getLogger(__name__)

#: Seconds between the samples drain rate and time to empty are computed from.
SAMPLE_INTERVAL_S = 1.0


def page_html() -> bytes:
    """The status page, from the package data."""
    return resources.files("tern.edge").joinpath("static/status.html").read_bytes()


class StatusServer:
    """Serves the endpoint in a background thread; :meth:`start`, :meth:`stop`."""

    def __init__(self, health: Health, metrics: GatewayMetrics, host: str, port: int) -> None:
        self.health = health
        self.metrics = metrics
        self._page = page_html()
        self._stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server._handle(self)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                log.debug("http %s: " + format, self.client_address[0], *args)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._threads = [
            threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="tern-http", daemon=True),
            threading.Thread(target=self._sample, name="tern-health-sampler", daemon=True),
        ]

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound (the port is the kernel's choice when 0 was asked)."""
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        """Base URL of the endpoint."""
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> "StatusServer":
        """Start serving and sampling."""
        for thread in self._threads:
            thread.start()
        log.info("status page %s/, metrics %s/metrics", self.url, self.url)
        return self

    def stop(self) -> None:
        """Stop serving; returns once the listening socket is closed."""
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        for thread in self._threads:
            thread.join(5.0)
        self.health.close()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            try:
                self.health.sample()
            except Exception:  # a failed sample costs a rate figure, never the endpoint
                log.debug("health sample failed", exc_info=True)

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        path = request.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                body, ctype = self.metrics.exposition(), CONTENT_TYPE_LATEST
            elif path == "/status.json":
                body, ctype = json.dumps(self.health.snapshot(), separators=(",", ":")).encode(), "application/json"
            elif path in ("/", "/index.html"):
                body, ctype = self._page, "text/html; charset=utf-8"
            else:
                request.send_error(HTTPStatus.NOT_FOUND, "not found: try /, /status.json or /metrics")
                return
        except Exception as exc:  # the gateway is stopping, or a fact could not be read
            log.debug("http %s failed", path, exc_info=True)
            request.send_error(HTTPStatus.SERVICE_UNAVAILABLE, f"gateway not ready: {type(exc).__name__}")
            return
        request.send_response(HTTPStatus.OK)
        request.send_header("Content-Type", ctype)
        request.send_header("Content-Length", str(len(body)))
        request.send_header("Cache-Control", "no-store")
        request.end_headers()
        request.wfile.write(body)
