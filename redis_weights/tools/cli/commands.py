"""One handler per ``redis-weights`` command: ``cmd_<name>(admin, args) -> exit code``.

Each is a thin layer over ``redis_weights.tools.admin`` (reports and actions) and
``redis_weights.observe.health`` (``doctor``); ``cmd_demo(args)`` runs ``redis_weights.tools.demo``
and needs no ``Admin``. The scripts in ``scripts/`` print the same tables through them.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from ...backend.deployment import redacted
from ...errors import RedisWeightsError
from ...observe.health import UNSAFE, check_deployment, check_namespace, worst
from ...units import human_age, human_bytes, human_seconds, utc_time
from .. import exporter
from ..admin import Admin, manifest_dict
from ..httpd import parse_credentials
from .args import ENV_EXPORTER_AUTH, key_value, workers_from_environment
from .guard import EXIT_UNSAFE
from .render import is_tty, json_line, print_json, print_table, printable


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
    print(f"version {doc['version']}  created {utc_time(doc['created'])} UTC  by {printable(doc['producer'] or '-')}")
    print(f"{human_bytes(doc['total_bytes'])} ({doc['total_bytes']} bytes) in {len(doc['chunks'])} chunk(s), "
          f"{len(doc['tensors'])} tensor(s), {doc['checksum_algo']} chunk ids")  # fmt: skip
    if doc["storage"] == "full":
        storage = "full (keyframe)"
    else:
        storage = (f"patch against version {doc['base']}, chain length {doc['chain_length']} "
                   f"from keyframe {doc['keyframe']}")  # fmt: skip
    if doc["packs"]:
        storage += f", {doc['chained_chunks']} chunk(s) patched by {len(doc['packs'])} pack(s)"
    print(f"stored: {storage}; {human_bytes(doc['stored_bytes'])} stored, {human_bytes(doc['new_bytes'])} new"
          + (f"; wire dtype {printable(doc['wire_dtype'])} ({len(doc['cast'])} tensor(s) cast)"
             if doc["wire_dtype"] else ""))  # fmt: skip
    for key, value in doc["metadata"].items():
        print(f"metadata {printable(key)} = {printable(value)}")
    print_table(["tensor", "dtype", "shape", "bytes"],
                [(t["name"], t["dtype"], "x".join(map(str, t["shape"])) or "scalar", t["bytes"])
                 for t in doc["tensors"]])  # fmt: skip
    print_table(["chunk", "bytes", "id", "stored as"],
                [(c["index"], c["bytes"], c["id"],
                  _stored_as(c))
                 for c in doc["chunks"]])  # fmt: skip
    return 0


def _stored_as(chunk: dict[str, Any]) -> str:
    if not chunk["base"]:
        return "whole"
    if not chunk["patches"]:  # patched by the records of the version's packs
        return f"base {chunk['base'][:12]} + packs"
    return (f"base {chunk['base'][:12]} + {len(chunk['patches'])} patch(es), "
            f"{sum(p['bytes'] for p in chunk['patches'])} bytes")


def cmd_workers(admin: Admin, args: argparse.Namespace) -> int:
    latest, rows = admin.workers()
    if args.json:
        print_json({"namespace": admin.keyspace.namespace, "latest": latest, "workers": [r.to_dict() for r in rows]})
        return 0
    if not rows:
        print(f"namespace {admin.keyspace.namespace!r}: no worker has joined (latest version {latest})")
        return 0
    table = [(r.rank, r.status or "-", r.version, r.lag, human_seconds(r.ack_latency), human_age(r.heartbeat_age),
              "alive" if r.alive else "DEAD") for r in rows]  # fmt: skip
    print_table(["rank", "status", "applied", "lag", "ack latency", "heartbeat", "state"], table,
                title=f"namespace {admin.keyspace.namespace!r}, latest version {latest}")  # fmt: skip
    return 0


def cmd_export(admin: Admin, args: argparse.Namespace) -> int:
    manifest = admin.export(args.version, args.output)
    print(f"exported version {manifest.version} ({human_bytes(manifest.total_bytes)}, "
          f"{len(manifest.tensors)} tensors) to {args.output}")  # fmt: skip
    return 0


def cmd_import(admin: Admin, args: argparse.Namespace) -> int:
    metadata = dict(key_value(item) for item in args.metadata or [])
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
            print(json_line(event.to_dict()), flush=True)
        elif event.kind == "push":
            size = f"{human_bytes(event.total_bytes)}, {event.tensors} tensors" if event.total_bytes else "(gone)"
            print(f"{utc_time(event.time)}  push  v{event.version}  {size}  by {printable(event.producer or '-')}",
                  flush=True)  # fmt: skip
        else:
            print(f"{utc_time(event.time)}  ack   v{event.version}  rank {event.rank}: {printable(event.status)}  "
                  f"lag {event.lag}  ack latency {human_seconds(event.ack_latency)}", flush=True)  # fmt: skip
        seen += 1
        if args.count and seen >= args.count:
            break
    return 0


def cmd_doctor(admin: Admin, args: argparse.Namespace) -> int:
    findings = check_deployment(admin.store.deployment, admin.keyspace, chunk_size=args.chunk_size)
    findings += check_namespace(admin.store.deployment, admin.keyspace, deep=args.deep)
    verdict = worst(findings)
    if args.json:
        print_json({"url": redacted(args.url), "verdict": verdict, "findings": [f.to_dict() for f in findings]})
    else:
        tty = is_tty(sys.stdout)
        colors = {"ok": "32", "warn": "33", "unsafe": "31"}
        for f in findings:
            tag = f"[{f.level.upper():^6}]"
            if tty:
                tag = f"\033[{colors[f.level]}m{tag}\033[0m"
            print(f"{tag} {f.check}{f' ({printable(f.node)})' if f.node else ''}: {printable(f.what)}")
            if f.fix:
                print(f"         {'fix' if f.level != 'ok' else 'tip'}: {printable(f.fix)}")
        print(f"verdict: {verdict}" + (" (exit code 3)" if verdict == UNSAFE else ""))
    return EXIT_UNSAFE if verdict == UNSAFE else 0


def cmd_reindex(admin: Admin, args: argparse.Namespace) -> int:
    report = admin.reindex(max_steps=args.max_steps)
    state = "complete" if report.complete else "paused (run it again to resume)"
    print(f"reindex {state}: {report.steps:,} SCAN steps; added {report.objects:,} objects, {report.ranks} ranks, "
          f"{report.pushes} pending pushes, {report.names} store keys")  # fmt: skip
    return 0


def cmd_exporter(admin: Admin, args: argparse.Namespace) -> int:
    credentials = exporter_credentials(args.auth_file)
    try:
        server = exporter.serve(admin, args.port, args.address, cache_seconds=args.cache_seconds,
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
    text = os.environ.get(ENV_EXPORTER_AUTH)
    return None if text is None else parse_credentials(text)


def cmd_demo(args: argparse.Namespace) -> int:
    from .. import demo  # imports torch: only this command needs it
    from ..demo import roles

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

