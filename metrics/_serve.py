"""Metrics over HTTP for a script with no web server of its own."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from p11guard.metrics._prom import CollectorRegistry, start_http_server

__all__ = ["MetricsServer", "serve_metrics"]


class MetricsServer:
    """A running metrics endpoint (``GET /metrics``, or any path); :meth:`stop` ends it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        """The port it listens on (useful after ``port=0``)."""
        return int(self._server.server_port)

    @property
    def url(self) -> str:
        address = self._server.server_address[0]
        host = address.decode() if isinstance(address, bytes) else str(address)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_metrics(registry: CollectorRegistry, port: int = 0, addr: str = "127.0.0.1") -> MetricsServer:
    """Serve ``registry`` at ``http://addr:port/metrics`` from a daemon thread
    (:func:`prometheus_client.start_http_server`). ``port=0`` picks a free port.
    Listens on the loopback by default: give ``addr="0.0.0.0"`` for Prometheus elsewhere."""
    server, thread = start_http_server(port, addr=addr, registry=registry)
    return MetricsServer(server, thread)
