"""The exporter's HTTP server: ``/metrics`` only, GET or HEAD, optional basic auth and TLS.

prometheus-client's own ``start_http_server`` answers on every path and has no
authentication; the fleet exporter is a process an operator runs beside Redis, so
it answers ``/metrics`` alone (404 elsewhere), checks a ``user:password`` when one
is set (compared in constant time) and speaks TLS when given a certificate, as the
exporters of the Prometheus project do with their web configuration.
"""

from __future__ import annotations

import base64
import hmac
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ..errors import ConfigurationError

METRICS_PATH = "/metrics"
_App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    timeout = 10  # seconds a client may take to send its request: an idle connection does not hold a thread

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        """No line on stderr per request."""


def parse_credentials(text: str) -> tuple[str, str]:
    """``user:password`` as a pair; a ``ConfigurationError`` without a user or a password."""
    user, sep, password = text.strip("\r\n").partition(":")
    if not sep or not user or not password:
        raise ConfigurationError("basic auth credentials must be USER:PASSWORD, both non-empty")
    return user, password


def guarded_app(app: _App, credentials: tuple[str, str] | None) -> _App:
    """``app`` behind the checks: path ``/metrics``, method GET or HEAD, basic auth if ``credentials``."""
    expected = None
    if credentials is not None:
        expected = b"Basic " + base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode())

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def refuse(status: str, headers: list[tuple[str, str]] | None = None) -> list[bytes]:
            start_response(status, [("Content-Type", "text/plain; charset=utf-8"), *(headers or [])])
            return [status.encode() + b"\n"]

        if environ.get("PATH_INFO") != METRICS_PATH:
            return refuse("404 Not Found")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return refuse("405 Method Not Allowed", [("Allow", "GET, HEAD")])
        if expected is not None:
            given = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
            if not hmac.compare_digest(given, expected):
                return refuse("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="redis-weights"')])
        return app(environ, start_response)

    return guarded


def serve_wsgi(app: _App, port: int, address: str, *, certfile: str | None = None,
               keyfile: str | None = None) -> WSGIServer:  # fmt: skip
    """Serve ``app`` on ``address:port`` from a daemon thread (TLS with ``certfile``); the server.

    ``server.server_port`` is the port (useful with ``port=0``); ``shutdown()`` and
    ``server_close()`` stop it.
    """
    family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("Server", (_Server,), {"address_family": family})
    server = make_server(address, port, app, server_class=server_class, handler_class=_QuietHandler)
    if certfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(certfile, keyfile)
        except (OSError, ssl.SSLError) as exc:
            server.server_close()
            raise ConfigurationError(f"cannot load the TLS certificate {certfile}: {exc}") from None
        # The handshake runs in the request's thread, under its timeout, never in the accept loop.
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    elif keyfile:
        server.server_close()
        raise ConfigurationError("a TLS key needs its certificate (--tls-cert)")
    threading.Thread(target=server.serve_forever, name="redis-weights-exporter", daemon=True).start()
    return server
