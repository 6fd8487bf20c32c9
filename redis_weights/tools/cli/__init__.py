"""The ``redis-weights`` command: inspect and steer the weights in Redis from a shell.

The package is split by job: ``args`` (argument types, ``--url``/``--namespace``),
``render`` (tables, JSON), ``commands`` (one handler per command), ``guard`` (the
error guard and logging set-up that the scripts in ``scripts/`` import too); this
module builds the parser and holds the entry point. Failures print one line on
stderr and exit non-zero, never a traceback. Tables are boxed on a terminal and
plain, aligned text when piped; ``--json`` is for scripts.

Exit codes: 0 success, 1 error, 2 bad usage, 3 ``doctor`` found something unsafe,
130 interrupted.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from ...format.manifest import DEFAULT_CHUNK_SIZE
from ..admin import Admin
from ..exporter import DEFAULT_ADDRESS as DEFAULT_EXPORTER_ADDRESS
from ..exporter import DEFAULT_CACHE_SECONDS as DEFAULT_EXPORTER_CACHE
from ..exporter import DEFAULT_PORT as DEFAULT_EXPORTER_PORT
from .args import (
    DEFAULT_WORKERS,
    ENV_EXPORTER_AUTH,
    ENV_WORKERS,
    chunk_size,
    connection_options,
    non_negative_float,
    non_negative_int,
    port,
    positive_float,
    positive_int,
)
from .commands import (
    cmd_delete,
    cmd_demo,
    cmd_doctor,
    cmd_export,
    cmd_exporter,
    cmd_gc,
    cmd_import,
    cmd_reindex,
    cmd_rollback,
    cmd_show,
    cmd_versions,
    cmd_watch,
    cmd_workers,
)
from .guard import run_parsed


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; each subparser sets ``func``, its handler in ``commands``."""
    common = connection_options()
    parser = argparse.ArgumentParser(
        prog="redis-weights", parents=[common],
        description="Inspect and steer the policy weights that redis_weights keeps in Redis.",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[..., int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = add("versions", cmd_versions, "committed versions: created, size, tensors, producer, ranks running it")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("show", cmd_show, "a version: full or patch, chain, stored and new bytes; tensors; chunk ids")
    p.add_argument("version", help="a version number or 'latest'")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("workers", cmd_workers, "per rank: status, applied version, lag, heartbeat age, alive or dead")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("export", cmd_export, "write a version to a .safetensors file")
    p.add_argument("version", help="a version number or 'latest'")
    p.add_argument("-o", "--output", required=True, help="the file to write (FILE.safetensors)")
    p = add("import", cmd_import, "publish a .safetensors checkpoint as a new version (workers apply it)")
    p.add_argument("file", help="a .safetensors file")
    p.add_argument("--chunk-size", type=chunk_size, default=DEFAULT_CHUNK_SIZE, help="bytes per Redis value")
    p.add_argument("--metadata", action="append", metavar="KEY=VALUE", help="extra metadata (repeatable)")
    p = add("rollback", cmd_rollback, "commit an older version again as the newest (workers apply it)")
    p.add_argument("version", help="the version to go back to")
    p = add("gc", cmd_gc, "delete all but the newest K versions (never the latest)")
    p.add_argument("--keep", type=positive_int, required=True, metavar="K")
    p = add("delete", cmd_delete, "delete one version (the latest only with --force)")
    p.add_argument("version")
    p.add_argument("--force", action="store_true", help="also delete the latest version")
    p = add("watch", cmd_watch, "live view of pushes and acks until Ctrl-C")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--count", type=positive_int, help="stop after this many events")
    p.add_argument("--timeout", type=positive_float, help="stop after this many seconds")
    p = add("doctor", cmd_doctor, "check the server's settings; exit code 3 when something is unsafe")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--chunk-size", type=chunk_size, default=DEFAULT_CHUNK_SIZE, help="the chunk size you push with")
    p.add_argument("--deep", action="store_true", help="also compare the namespace's index with a SCAN of its keys")
    p = add("reindex", cmd_reindex, "index a namespace written by an older release (a resumable SCAN of its keys)")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="pause after this many SCAN steps (each visits about 1000 keys); run again to resume")
    p = add("exporter", cmd_exporter, "serve the fleet's metrics (versions, per-rank lag and liveness) to Prometheus")
    p.add_argument("--port", type=port, default=DEFAULT_EXPORTER_PORT,
                   help=f"HTTP port of /metrics (default {DEFAULT_EXPORTER_PORT})")
    p.add_argument("--address", default=DEFAULT_EXPORTER_ADDRESS,
                   help=f"address to listen on (default {DEFAULT_EXPORTER_ADDRESS}; 0.0.0.0: every interface)")
    p.add_argument("--auth-file", metavar="FILE",
                   help=f"require basic auth: FILE holds USER:PASSWORD (or set ${ENV_EXPORTER_AUTH})")
    p.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (chain)")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key (if not in --tls-cert)")
    p.add_argument("--cache-seconds", type=non_negative_float, default=DEFAULT_EXPORTER_CACHE,
                   help=f"read Redis at most once per this many seconds (default {DEFAULT_EXPORTER_CACHE:g})")
    p = add("demo", cmd_demo, "a trainer and N worker processes with a live view (private server unless --url)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help=f"worker processes / ranks 1..N; a worker without --rank claims one of them "
                        f"(default: ${ENV_WORKERS}, else {DEFAULT_WORKERS})")  # fmt: skip
    p.add_argument("--size-mb", type=positive_float, default=16.0, help="model size in MB (default 16)")
    p.add_argument("--versions", type=non_negative_int, default=10,
                   help="versions to push (default 10; 0: forever, trainer)")
    p.add_argument("--interval", type=non_negative_float, default=0.2, help="seconds between pushes (default 0.2)")
    p.add_argument("--timeout", type=positive_float, default=60.0, help="seconds a push waits for acks (default 60)")
    p.add_argument("--role", choices=["all", "trainer", "worker"], default="all",
                   help="all: the whole demo here; trainer / worker: one side, against --url (Docker Compose)")
    p.add_argument("--rank", type=positive_int, default=None,
                   help="worker role: the rank (default: the lowest free one of 1..--workers)")
    p.add_argument("--metrics-port", type=port, default=None,
                   help="trainer / worker role: serve its Prometheus metrics on this port (needs the metrics extra)")
    p.add_argument("--json-lines", action="store_true", help=argparse.SUPPRESS)  # the local demo's children
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``redis-weights`` (and ``python -m redis_weights``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_parsed(args, lambda: cmd_demo(args) if args.func is cmd_demo else _with_admin(args))


def _with_admin(args: argparse.Namespace) -> int:
    with Admin.from_url(args.url, args.namespace) as admin:
        return int(args.func(admin, args))

