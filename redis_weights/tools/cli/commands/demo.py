"""``redis-weights demo``: a trainer and N worker processes with a live view (``tools.demo``).

A ``StandaloneCommand``: it needs no ``Admin``. Without ``--url`` it starts a private server;
``--role trainer`` / ``worker`` run one side against ``--url`` (Docker Compose).
"""

from __future__ import annotations

import argparse

from ....errors import RedisWeightsError
from ..args import (
    DEFAULT_WORKERS,
    ENV_WORKERS,
    non_negative_float,
    non_negative_int,
    port,
    positive_float,
    positive_int,
    workers_from_environment,
)
from .base import StandaloneCommand

NAME = "demo"
HELP = "a trainer and N worker processes with a live view (private server unless --url)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=positive_int, default=None,
                        help=f"worker processes / ranks 1..N; a worker without --rank claims one of them "
                             f"(default: ${ENV_WORKERS}, else {DEFAULT_WORKERS})")  # fmt: skip
    parser.add_argument("--size-mb", type=positive_float, default=16.0, help="model size in MB (default 16)")
    parser.add_argument("--versions", type=non_negative_int, default=10,
                        help="versions to push (default 10; 0: forever, trainer)")
    parser.add_argument("--interval", type=non_negative_float, default=0.2, help="seconds between pushes (default 0.2)")
    parser.add_argument("--timeout", type=positive_float, default=60.0,
                        help="seconds a push waits for acks (default 60)")
    parser.add_argument("--role", choices=["all", "trainer", "worker"], default="all",
                        help="all: the whole demo here; trainer / worker: one side, against --url (Docker Compose)")
    parser.add_argument("--rank", type=positive_int, default=None,
                        help="worker role: the rank (default: the lowest free one of 1..--workers)")
    parser.add_argument("--metrics-port", type=port, default=None,
                        help="trainer / worker role: serve its Prometheus metrics on this port "
                             "(needs the metrics extra)")  # fmt: skip
    parser.add_argument("--json-lines", action="store_true", help=argparse.SUPPRESS)  # the local demo's children


def run(args: argparse.Namespace) -> int:
    """Run one role (``--role trainer`` / ``worker``) or the whole demo."""
    from ... import demo  # imports torch: only this command needs it
    from ...demo import roles

    workers = args.workers or workers_from_environment()
    if args.role == "worker":
        return roles.run_worker(args.url, args.namespace_given or roles.ROLE_NAMESPACE, args.rank, args.size_mb,
                                workers=workers, json_lines=args.json_lines,
                                metrics_port=args.metrics_port)  # fmt: skip
    if args.role == "trainer":
        return roles.run_trainer(args.url, args.namespace_given or roles.ROLE_NAMESPACE, workers, args.size_mb,
                                 args.versions, args.interval, args.timeout,
                                 metrics_port=args.metrics_port)  # fmt: skip
    if args.metrics_port is not None:
        raise RedisWeightsError("--metrics-port is for --role trainer / worker (one process per port)")
    if args.versions < 1:
        raise RedisWeightsError("--versions must be at least 1 (0, forever, is for --role trainer)")
    options = demo.DemoOptions(
        workers=workers, size_mb=args.size_mb, versions=args.versions, interval=args.interval,
        url=args.url if args.url_given else None, namespace=args.namespace_given, timeout=args.timeout,
    )  # fmt: skip
    return demo.run_demo(options)


COMMAND = StandaloneCommand(NAME, HELP, add_arguments, run)
