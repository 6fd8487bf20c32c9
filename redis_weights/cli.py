"""The ``redis-weights`` command: inspect and steer the weights in Redis from a shell.

Every subcommand is a thin layer over ``redis_weights.admin`` (reports and actions)
and ``redis_weights.health`` (``doctor``); ``demo`` lives in ``redis_weights.demo``.
Failures print one line on stderr and exit non-zero, never a traceback. Tables
are boxed on a terminal and plain, aligned text when piped; ``--json`` is for
scripts.

Exit codes: 0 success, 1 error, 2 bad usage, 3 ``doctor`` found something unsafe,
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import redis

from .admin import Admin, RefusedError, connection_error_message, manifest_dict, redact
from .errors import RedisWeightsError
from .health import UNSAFE, check_server, worst
from .keys import DEFAULT_NAMESPACE
from .manifest import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from .units import human_age, human_bytes, utc_time

DEFAULT_URL = "redis://localhost:6379/0"
ENV_URL, ENV_NAMESPACE = "REDIS_URL", "REDIS_WEIGHTS_NAMESPACE"  # read when --url / --namespace are not given
ENV_WORKERS = "WORKERS"  # read when ``demo --workers`` is not given (Docker Compose sets it)
DEFAULT_WORKERS = 4
EXIT_ERROR, EXIT_USAGE, EXIT_UNSAFE, EXIT_INTERRUPTED = 1, 2, 3, 130

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------
def is_tty(stream: TextIO) -> bool:
    return hasattr(stream, "isatty") and stream.isatty() and os.environ.get("TERM") != "dumb"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None,
                out: TextIO | None = None) -> None:  # fmt: skip
    """A boxed table on a terminal (rich), plain aligned columns otherwise."""
    out = out or sys.stdout
    cells = [[("" if c is None else str(c)) for c in row] for row in rows]
    if is_tty(out):
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left", header_style="bold")
        for h in headers:
            table.add_column(h, overflow="fold")
        for row in cells:
            table.add_row(*row)
        Console(file=out).print(table)
        return
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    if title:
        out.write(title + "\n")
    for row in [list(headers), *cells]:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def print_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------
def cmd_versions(admin: Admin, args: argparse.Namespace) -> int:
    rows = admin.versions()
    if args.json:
        print_json({"namespace": admin.keyspace.namespace, "latest": admin.registry.latest(),
                    "versions": [r.to_dict() for r in rows]})  # fmt: skip
        return 0
    if not rows:
        print(f"namespace {admin.keyspace.namespace!r}: no committed version")
        return 0
    table = [
        (f"{r.version}{' (latest)' if r.latest else ''}", utc_time(r.created),
         human_bytes(r.total_bytes) if not r.error else "?", r.tensors if not r.error else "?",
         ("?" if r.error else "keyframe" if r.keyframe else f"patch +{r.depth}"),
         human_bytes(r.new_bytes) if not r.error else "?",
         r.error or r.producer, ",".join(map(str, r.ranks)) or "-")
        for r in reversed(rows)
    ]  # fmt: skip
    print_table(["version", "created (UTC)", "size", "tensors", "stored", "new", "producer", "ranks"], table,
                title=f"namespace {admin.keyspace.namespace!r}")  # fmt: skip
    return 0


def cmd_show(admin: Admin, args: argparse.Namespace) -> int:
    doc = manifest_dict(admin.manifest(args.version))
    if args.json:
        print_json(doc)
        return 0
    print(f"version {doc['version']}  created {utc_time(doc['created'])} UTC  by {doc['producer'] or '-'}")
    print(f"{human_bytes(doc['total_bytes'])} ({doc['total_bytes']} bytes) in {len(doc['chunks'])} chunk(s), "
          f"{len(doc['tensors'])} tensor(s), {doc['checksum_algo']} chunk ids")  # fmt: skip
    if doc["storage"] == "full":
        storage = "full (keyframe)"
    else:
        storage = (f"patch against version {doc['base']}, chain length {doc['chain_length']} "
                   f"from keyframe {doc['keyframe']}")  # fmt: skip
    print(f"stored: {storage}; {human_bytes(doc['stored_bytes'])} stored, {human_bytes(doc['new_bytes'])} new"
          + (f"; wire dtype {doc['wire_dtype']} ({len(doc['cast'])} tensor(s) cast)" if doc["wire_dtype"] else ""))
    for key, value in doc["metadata"].items():
        print(f"metadata {key} = {value}")
    print_table(["tensor", "dtype", "shape", "bytes"],
                [(t["name"], t["dtype"], "x".join(map(str, t["shape"])) or "scalar", t["bytes"])
                 for t in doc["tensors"]])  # fmt: skip
    print_table(["chunk", "bytes", "id", "stored as"],
                [(c["index"], c["bytes"], c["id"],
                  f"base {c['base'][:12]} + {len(c['patches'])} patch(es), "
                  f"{sum(p['bytes'] for p in c['patches'])} bytes" if c["base"] else "whole")
                 for c in doc["chunks"]])  # fmt: skip
    return 0


def cmd_workers(admin: Admin, args: argparse.Namespace) -> int:
    latest, rows = admin.workers()
    if args.json:
        print_json({"namespace": admin.keyspace.namespace, "latest": latest, "workers": [r.to_dict() for r in rows]})
        return 0
    if not rows:
        print(f"namespace {admin.keyspace.namespace!r}: no worker has joined (latest version {latest})")
        return 0
    table = [(r.rank, r.status or "-", r.version, r.lag, human_age(r.heartbeat_age), "alive" if r.alive else "DEAD")
             for r in rows]  # fmt: skip
    print_table(["rank", "status", "applied", "lag", "heartbeat", "state"], table,
                title=f"namespace {admin.keyspace.namespace!r}, latest version {latest}")  # fmt: skip
    return 0


def cmd_export(admin: Admin, args: argparse.Namespace) -> int:
    manifest = admin.export(args.version, args.output)
    print(f"exported version {manifest.version} ({human_bytes(manifest.total_bytes)}, "
          f"{len(manifest.tensors)} tensors) to {args.output}")  # fmt: skip
    return 0


def cmd_import(admin: Admin, args: argparse.Namespace) -> int:
    metadata = dict(_key_value(item) for item in args.metadata or [])
    manifest = admin.import_file(args.file, chunk_size=args.chunk_size, metadata=metadata)
    print(f"imported {args.file} as version {manifest.version} ({human_bytes(manifest.total_bytes)}, "
          f"{len(manifest.tensors)} tensors); workers will apply it")  # fmt: skip
    return 0


def cmd_rollback(admin: Admin, args: argparse.Namespace) -> int:
    source = admin.resolve(args.version)
    manifest = admin.rollback(source)
    print(f"committed the weights of version {source} again as version {manifest.version}; workers will apply it")
    return 0


def cmd_gc(admin: Admin, args: argparse.Namespace) -> int:
    deleted = admin.gc(args.keep)
    print(f"deleted {len(deleted)} version(s){': ' + ', '.join(map(str, deleted)) if deleted else ''}")
    return 0


def cmd_delete(admin: Admin, args: argparse.Namespace) -> int:
    version = admin.delete(args.version, force=args.force)
    print(f"deleted version {version}")
    return 0


def cmd_watch(admin: Admin, args: argparse.Namespace) -> int:
    if not args.json:
        print(f"watching namespace {admin.keyspace.namespace!r} (Ctrl-C to stop)", flush=True)
    seen = 0
    for event in admin.watch(timeout=args.timeout):
        if args.json:
            print(json.dumps(event.to_dict()), flush=True)
        elif event.kind == "push":
            size = f"{human_bytes(event.total_bytes)}, {event.tensors} tensors" if event.total_bytes else "(gone)"
            print(f"{utc_time(event.time)}  push  v{event.version}  {size}  by {event.producer or '-'}", flush=True)
        else:
            print(f"{utc_time(event.time)}  ack   v{event.version}  rank {event.rank}: {event.status}", flush=True)
        seen += 1
        if args.count and seen >= args.count:
            break
    return 0


def cmd_doctor(admin: Admin, args: argparse.Namespace) -> int:
    findings = check_server(admin.client, admin.keyspace, chunk_size=args.chunk_size)
    verdict = worst(findings)
    if args.json:
        print_json({"url": redact(args.url), "verdict": verdict, "findings": [f.to_dict() for f in findings]})
    else:
        tty = is_tty(sys.stdout)
        colors = {"ok": "32", "warn": "33", "unsafe": "31"}
        for f in findings:
            tag = f"[{f.level.upper():^6}]"
            if tty:
                tag = f"\033[{colors[f.level]}m{tag}\033[0m"
            print(f"{tag} {f.check}: {f.what}")
            if f.fix and f.level != "ok":
                print(f"         fix: {f.fix}")
        print(f"verdict: {verdict}" + (" (exit code 3)" if verdict == UNSAFE else ""))
    return EXIT_UNSAFE if verdict == UNSAFE else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    workers = args.workers or _workers_from_environment()
    if args.role == "worker":
        return demo.run_worker(args.url, args.namespace_given or demo.ROLE_NAMESPACE, args.rank, args.size_mb,
                               workers=workers, json_lines=args.json_lines)  # fmt: skip
    if args.role == "trainer":
        return demo.run_trainer(args.url, args.namespace_given or demo.ROLE_NAMESPACE, workers, args.size_mb,
                                args.versions, args.interval, args.timeout)  # fmt: skip
    if args.versions < 1:
        raise RedisWeightsError("--versions must be at least 1 (0, forever, is for --role trainer)")
    options = demo.DemoOptions(
        workers=workers, size_mb=args.size_mb, versions=args.versions, interval=args.interval,
        url=args.url if args.url_given else None, namespace=args.namespace_given, timeout=args.timeout,
    )  # fmt: skip
    return demo.run_demo(options)


def _workers_from_environment() -> int:
    """``$WORKERS`` (a positive integer), else ``DEFAULT_WORKERS``: the ``demo --workers`` default."""
    text = os.environ.get(ENV_WORKERS)
    if not text:
        return DEFAULT_WORKERS
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError as exc:
        raise RedisWeightsError(f"{ENV_WORKERS}={text!r}: {exc}") from None


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise RedisWeightsError(f"--metadata expects KEY=VALUE, got {item!r}")
    return key, value


def _chunk_size(text: str) -> int:
    units = {"k": 1024, "m": 1024**2}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        value = int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 8m, 512k, 4194304)") from None
    if not MIN_CHUNK_SIZE <= value <= MAX_CHUNK_SIZE:
        raise argparse.ArgumentTypeError(f"chunk size must be within {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes")
    return value


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


non_negative_int, positive_int = _int_at_least(0), _int_at_least(1)  # argparse types (scripts/ use them too)


# ---------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------
def connection_options() -> argparse.ArgumentParser:
    """The ``--url`` / ``--namespace`` / ``--verbose`` options (a parent parser; scripts share it).

    Accepted before or after a subcommand; ``resolve_connection`` fills in the
    environment's values and the defaults.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS,
                        help=f"Redis URL (default: ${ENV_URL}, else {DEFAULT_URL}); user:password@ for ACL, "
                             "rediss:// for TLS")  # fmt: skip
    common.add_argument("--namespace", "-n", default=argparse.SUPPRESS,
                        help=f"namespace (default: ${ENV_NAMESPACE}, else {DEFAULT_NAMESPACE!r})")
    common.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return common


def build_parser() -> argparse.ArgumentParser:
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
    p = add("show", cmd_show, "the manifest of a version: tensors, dtypes, shapes, bytes, chunk checksums")
    p.add_argument("version", help="a version number or 'latest'")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("workers", cmd_workers, "per rank: status, applied version, lag, heartbeat age, alive or dead")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("export", cmd_export, "write a version to a .safetensors file")
    p.add_argument("version", help="a version number or 'latest'")
    p.add_argument("-o", "--output", required=True, help="the file to write (FILE.safetensors)")
    p = add("import", cmd_import, "publish a .safetensors checkpoint as a new version (workers apply it)")
    p.add_argument("file", help="a .safetensors file")
    p.add_argument("--chunk-size", type=_chunk_size, default=DEFAULT_CHUNK_SIZE, help="bytes per Redis value")
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
    p.add_argument("--timeout", type=float, help="stop after this many seconds")
    p = add("doctor", cmd_doctor, "check the server's settings; exit code 3 when something is unsafe")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--chunk-size", type=_chunk_size, default=DEFAULT_CHUNK_SIZE, help="the chunk size you push with")
    p = add("demo", cmd_demo, "a trainer and N worker processes with a live view (private server unless --url)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help=f"worker processes / ranks 1..N; a worker without --rank claims one of them "
                        f"(default: ${ENV_WORKERS}, else {DEFAULT_WORKERS})")  # fmt: skip
    p.add_argument("--size-mb", type=float, default=16.0, help="model size in MB (default 16)")
    p.add_argument("--versions", type=non_negative_int, default=10,
                   help="versions to push (default 10; 0: forever, trainer)")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between pushes (default 0.2)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a push waits for acks (default 60)")
    p.add_argument("--role", choices=["all", "trainer", "worker"], default="all",
                   help="all: the whole demo here; trainer / worker: one side, against --url (Docker Compose)")
    p.add_argument("--rank", type=positive_int, default=None,
                   help="worker role: the rank (default: the lowest free one of 1..--workers)")
    p.add_argument("--json-lines", action="store_true", help=argparse.SUPPRESS)  # the local demo's children
    return parser


def resolve_connection(args: argparse.Namespace) -> None:
    """Set ``args.url``, ``args.namespace`` (and whether each was given) from the options, the environment, defaults."""
    args.url_given = getattr(args, "url", None) is not None or bool(os.environ.get(ENV_URL))
    args.url = getattr(args, "url", None) or os.environ.get(ENV_URL) or DEFAULT_URL
    given = getattr(args, "namespace", None) or os.environ.get(ENV_NAMESPACE)
    args.namespace_given = given
    args.namespace = given or DEFAULT_NAMESPACE
    args.verbose = getattr(args, "verbose", False)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``redis-weights`` (and ``python -m redis_weights``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_connection(args)
    setup_logging(args.verbose)
    if args.func is cmd_demo:
        return guarded(args.url, lambda: cmd_demo(args))
    return guarded(args.url, lambda: _with_admin(args))


def _with_admin(args: argparse.Namespace) -> int:
    with Admin.from_url(args.url, args.namespace) as admin:
        return int(args.func(admin, args))


def run_script(
    parser: argparse.ArgumentParser, action: Callable[[argparse.Namespace], int], argv: Sequence[str] | None, prog: str
) -> int:
    """Parse (a parser built on ``connection_options``), resolve the connection, run ``action`` guarded.

    The entry point of the admin scripts in ``scripts/``.
    """
    args = parser.parse_args(argv)
    resolve_connection(args)
    setup_logging(args.verbose)
    return guarded(args.url, lambda: action(args), prog=prog)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")  # fmt: skip


def guarded(url: str, action: Callable[[], int], prog: str = "redis-weights") -> int:
    """Run ``action``; turn every expected failure into one line on stderr and an exit code.

    Used by the CLI and by the admin scripts in ``scripts/``.
    """
    try:
        return action()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `redis-weights versions | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (RefusedError, RedisWeightsError, ValueError) as exc:
        return _fail(prog, str(exc))
    except redis.exceptions.RedisError as exc:
        return _fail(prog, connection_error_message(exc, url))
    except OSError as exc:
        return _fail(prog, f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}")


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
