"""``redis-weights exporter``: the fleet's metrics served to Prometheus (``tools.exporter``) until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

from ....errors import RedisWeightsError
from ... import exporter as fleet
from ...admin import Admin
from ...httpd import parse_credentials
from ..args import ENV_EXPORTER_AUTH, non_negative_float, port
from .base import Command

NAME = "exporter"
HELP = "serve the fleet's metrics (versions, per-rank lag and liveness) to Prometheus"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=port, default=fleet.DEFAULT_PORT,
                        help=f"HTTP port of /metrics (default {fleet.DEFAULT_PORT})")  # fmt: skip
    parser.add_argument("--address", default=fleet.DEFAULT_ADDRESS,
                        help=f"address to listen on (default {fleet.DEFAULT_ADDRESS}; 0.0.0.0: every interface)")
    parser.add_argument("--auth-file", metavar="FILE",
                        help=f"require basic auth: FILE holds USER:PASSWORD (or set ${ENV_EXPORTER_AUTH})")
    parser.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (chain)")
    parser.add_argument("--tls-key", metavar="PEM", help="the certificate's private key (if not in --tls-cert)")
    parser.add_argument("--cache-seconds", type=non_negative_float, default=fleet.DEFAULT_CACHE_SECONDS,
                        help=f"read Redis at most once per this many seconds "
                             f"(default {fleet.DEFAULT_CACHE_SECONDS:g})")  # fmt: skip


def run(admin: Admin, args: argparse.Namespace) -> int:
    """Serve ``/metrics`` until Ctrl-C or SIGTERM; a port or address it cannot listen on is one error line."""
    credentials = exporter_credentials(args.auth_file)
    try:
        server = fleet.serve(admin, args.port, args.address, cache_seconds=args.cache_seconds,
                             credentials=credentials, certfile=args.tls_cert, keyfile=args.tls_key)  # fmt: skip
    except OSError as exc:  # a port taken or privileged, an address that is not this host's
        raise RedisWeightsError(f"cannot listen on {args.address}:{args.port}: {exc.strerror or exc}") from None
    scheme, auth = ("https" if args.tls_cert else "http"), (", basic auth" if credentials else "")
    print(f"serving the fleet metrics of namespace {admin.keyspace.namespace!r} on "
          f"{scheme}://{args.address}:{server.server_port}/metrics{auth} (Ctrl-C to stop)", flush=True)  # fmt: skip
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        server.shutdown()
    return 0


def exporter_credentials(auth_file: str | None) -> tuple[str, str] | None:
    """The exporter's basic auth: ``--auth-file``'s first line, else ``$REDIS_WEIGHTS_EXPORTER_AUTH``, else None."""
    if auth_file:
        try:
            text = Path(auth_file).read_text().splitlines()[0] if Path(auth_file).stat().st_size else ""
        except OSError as exc:
            raise RedisWeightsError(f"--auth-file {auth_file}: {exc.strerror or exc}") from None
        return parse_credentials(text)
    variable = os.environ.get(ENV_EXPORTER_AUTH)
    return None if variable is None else parse_credentials(variable)


COMMAND = Command(NAME, HELP, add_arguments, run)
