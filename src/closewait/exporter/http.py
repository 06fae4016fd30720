"""The exporter's HTTP side: serve a registry at /metrics, and parse ``--listen``.

Collecting lives in ``closewait.exporter.collector``; this module only serves whatever registry it
is given (prometheus_client keeps the two apart the same way: ``registry.py`` vs ``exposition.py``).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from closewait.display import format_address
from closewait.errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:9947"


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` -> (host, port). Port 0 asks the kernel for a free port.

    Raises UsageError with one line for anything else.
    """
    value = text.strip()
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise UsageError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9947 or [::1]:9947")
    port = int(port_text)
    if port > 65535:
        raise UsageError(f"--listen {text!r}: port {port} is out of range (0-65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise UsageError(f"--listen {text!r}: give a host (0.0.0.0 to listen on every interface)")
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICSERV)
    except socket.gaierror as err:
        raise UsageError(f"--listen {text!r}: cannot resolve {host!r}: {err.strerror}") from None
    return host, port


class _QuietHandler(WSGIRequestHandler):
    """Do not log every scrape to stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


def _app(registry: CollectorRegistry) -> Callable[..., Iterable[bytes]]:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            result: Iterable[bytes] = metrics_app(environ, start_response)
            return result
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
            return [b'<html><body><h1>closewait exporter</h1><a href="/metrics">/metrics</a></body></html>\n']
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: the metrics are at /metrics\n"]

    return app


class MetricsServer:
    """A threaded HTTP server serving ``registry`` at /metrics. Binding happens in the constructor,
    so a bad address or a port in use raises (UsageError) before anything else starts."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

        class Server(ThreadingWSGIServer):
            address_family = family

        try:
            self._httpd = make_server(host, port, _app(registry), Server, handler_class=_QuietHandler)
        except OSError as err:
            raise UsageError(f"cannot listen on {format_address(host, port)}: {err.strerror or err}") from None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        return f"http://{format_address(*self.address)}/metrics"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="closewait-exporter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, let the serving thread end, close the listening socket."""
        self._httpd.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._httpd.server_close()


__all__ = ["DEFAULT_LISTEN", "MetricsServer", "parse_listen"]
