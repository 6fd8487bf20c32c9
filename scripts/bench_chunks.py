#!/usr/bin/env python
"""Benchmark: what a delta push costs per chunk, from 1k to 70k chunks (the 70B shape).

    python scripts/bench_chunks.py                          # 1k, 4k, 16k, 64k, 70k chunks + 520 MB (~6 min here)
    python scripts/bench_chunks.py --chunks 1000,4000 --pushes 5 --no-calibration
    python scripts/bench.py --chunks                        # the same, from the main benchmark script

The cost of a push depends on its chunk count, so 4 KiB chunks of a small model stand in for
2 MiB chunks of a big one (64k chunks: a 128 GB bf16 model). One process runs the trainer
(``delta=True``, bf16 weights in 64 tensors, ``keyframe_interval`` 20) and one worker against
a private ``redis-server``: a keyframe, then ``--pushes`` delta pushes (chain depth 1..19),
each after a sparse step that moves ~2 bf16 elements per chunk. Per delta push, medians:
planner (``DeltaPlanner.plan``), the existence check of the objects a push names, upload (the
rest of the upload phase), commit, GC, push (the whole ``update_weights``), worker apply
(``poll``), and the trainer process's CPU seconds per push (less sensitive to a busy machine
than wall time; Redis's own work is not in it); Redis commands per push and per apply (``INFO commandstats``); manifest bytes at
chain depth 1 and 19. After the last push the worker and a late joiner (the whole chain from
the keyframe) are compared bit-exact with the trainer; then ``show``, ``export`` (compared with
the trainer), a rollback to the oldest retained version (retention 3: depth N-2 of the chain; the
worker applies it), ``gc(keep=1)`` and a
fresh reader of what is left (both compared with that version). The calibration run adds a real
~520 MB model at the library's default chunk size (2 MiB), same step density.

Results: ``docs/bench/chunks.json`` and a Markdown table on stdout; targets: delta push time
per chunk at 64k at most 1.3x the one at 1k, manifest bytes per chunk at depth 19 at most 1.2x
those at depth 1, a 70,000-chunk push (end to end: push + worker apply) under 10 s, bit-exact.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import redis  # noqa: E402

from redis_weights import RedisStore, RedisWeightReceiver, RedisWeightUpdater  # noqa: E402
from redis_weights.format.delta import DeltaPlanner  # noqa: E402
from redis_weights.format.manifest import DEFAULT_CHUNK_SIZE, MIN_CHUNK_SIZE  # noqa: E402
from redis_weights.protocol.chunkstore import ChunkStore  # noqa: E402
from redis_weights.protocol.versions import VersionRegistry  # noqa: E402
from redis_weights.tools.admin import Admin, manifest_dict  # noqa: E402
from redis_weights.tools.server import LocalRedisServer  # noqa: E402

TENSORS = 64
CHANGED_PER_CHUNK = 2
CALIBRATION_BYTES = 520 * 10**6


class Timers:
    """Seconds spent in wrapped methods since the last ``take``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, cls: type, name: str, label: str) -> None:
        real = getattr(cls, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - started

        setattr(cls, name, timed)

    def take(self) -> dict[str, float]:
        taken, self.seconds = self.seconds, {}
        return taken


def command_calls(client: redis.Redis) -> int:
    """Commands the server has run (INFO commandstats), less the INFO calls themselves."""
    stats = client.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info")


def weights(chunks: int, chunk_size: int) -> dict[str, torch.Tensor]:
    """bf16 tensors whose stream fills ``chunks`` chunks (less the header's share)."""
    elements = chunks * chunk_size // 2 - 8192
    per = elements // TENSORS
    g = torch.Generator().manual_seed(0)
    return {f"layer_{i:03d}.weight": torch.randn(per, generator=g).bfloat16() for i in range(TENSORS)}


def sparse_step(tensors: dict[str, torch.Tensor], chunk_size: int, step: int) -> None:
    """Move ~``CHANGED_PER_CHUNK`` bf16 elements per chunk (random places), each by enough to change its bits."""
    g = torch.Generator().manual_seed(1000 + step)
    per_chunk = chunk_size // 2
    for t in tensors.values():
        count = max(1, t.numel() * CHANGED_PER_CHUNK // per_chunk)
        where = torch.randint(0, t.numel(), (count,), generator=g)
        t[where] = t[where] * 1.5 + 0.125


def run(url: str, timers: Timers, chunks: int, chunk_size: int, pushes: int, profile: Path | None) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    client.flushall()
    trainer = weights(chunks, chunk_size)
    worker = {k: torch.zeros_like(v) for k, v in trainer.items()}
    store = RedisStore.from_url(url, "bench")
    updater = RedisWeightUpdater(store, trainer, 1, sync=False, chunk_size=chunk_size, wire_dtype=torch.bfloat16,
                                 delta=True, keyframe_interval=20, retention=3)  # fmt: skip
    receiver = RedisWeightReceiver(RedisStore.from_url(url, "bench"), 1, worker)
    rows: list[dict[str, Any]] = []
    manifest_bytes: dict[int, int] = {}
    states: dict[int, dict[str, torch.Tensor]] = {}  # weights of two versions of the chain, for rollback
    profiler = cProfile.Profile() if profile else None
    try:
        for push in range(pushes + 1):
            if push:
                sparse_step(trainer, chunk_size, push)
            timers.take()
            calls = command_calls(client)
            started, cpu = time.perf_counter(), time.process_time()
            if profiler and push == pushes:
                profiler.enable()
            updater.update_weights()
            pushed, push_cpu = time.perf_counter() - started, time.process_time() - cpu
            push_calls = command_calls(client) - calls - 1
            applied_at, cpu = time.perf_counter(), time.process_time()
            version = receiver.poll()
            applied, apply_cpu = time.perf_counter() - applied_at, time.process_time() - cpu
            if profiler and push == pushes:
                profiler.disable()
            apply_calls = command_calls(client) - calls - push_calls - 2
            assert version == updater.version, receiver.last_error
            if push in (max(0, pushes - 2), pushes):  # retention 3: the oldest retained version, and the latest
                states[updater.version] = {k: v.clone() for k, v in trainer.items()}
            manifest = updater.registry.read_manifest(updater.version)
            manifest_bytes[manifest.depth] = int(client.strlen(updater.keyspace.manifest(updater.version)))
            seconds = dict(updater.last_push.seconds) if updater.last_push else {}
            timed = timers.take()
            rows.append({
                "depth": manifest.depth, "keyframe": manifest.is_keyframe, "push_s": pushed, "apply_s": applied, "push_cpu_s": push_cpu,
                "apply_cpu_s": apply_cpu,
                "planner_s": timed.get("plan", 0.0), "check_s": timed.get("missing", 0.0),
                "encode_s": seconds.get("encode", 0.0),
                "upload_s": seconds.get("upload", 0.0) - timed.get("plan", 0.0) - timed.get("missing", 0.0),
                "commit_s": seconds.get("commit", 0.0), "gc_s": timed.get("gc", 0.0),
                "push_commands": push_calls, "apply_commands": apply_calls,
                "uploaded_bytes": manifest.uploaded_bytes,
            })  # fmt: skip
        exact = all(torch.equal(worker[k], trainer[k]) for k in trainer)
        late_worker = {k: torch.zeros_like(v) for k, v in trainer.items()}
        late = RedisWeightReceiver(RedisStore.from_url(url, "bench"), 2, late_worker)
        try:
            started = time.perf_counter()
            late_version = late.poll()
            late_s = time.perf_counter() - started
        finally:
            late.close()
        late_exact = late_version == updater.version and all(torch.equal(late_worker[k], trainer[k]) for k in trainer)
        ops = operations(url, updater, trainer, receiver, worker, states)
    finally:
        receiver.close()
        updater.close()
    if profiler and profile:
        profiler.dump_stats(str(profile))
    deltas = [r for r in rows if not r["keyframe"]]

    def med(key: str) -> float:
        return statistics.median(r[key] for r in deltas) if deltas else float("nan")

    n = manifest.num_chunks
    return {
        "chunks": n, "chunk_size": chunk_size, "stream_bytes": manifest.total_bytes, "delta_pushes": len(deltas),
        **{key: med(key) for key in ("planner_s", "check_s", "encode_s", "upload_s", "commit_s", "gc_s", "push_s",
                                     "apply_s", "push_cpu_s", "apply_cpu_s", "push_commands", "apply_commands",
                                     "uploaded_bytes")},
        "push_cpu_us_per_chunk": med("push_cpu_s") / n * 1e6,
        "end_to_end_s": statistics.median(r["push_s"] + r["apply_s"] for r in deltas) if deltas else None,
        "push_us_per_chunk": med("push_s") / n * 1e6,
        "manifest_bytes": {str(d): b for d, b in sorted(manifest_bytes.items())},
        "manifest_bytes_per_chunk": {str(d): round(b / n, 2) for d, b in sorted(manifest_bytes.items())},
        "late_joiner_s": late_s, "bit_exact": exact, "late_joiner_bit_exact": late_exact,
        "keyframe_push_s": rows[0]["push_s"], "keyframe_apply_s": rows[0]["apply_s"], **ops,
    }  # fmt: skip


def operations(url: str, updater: RedisWeightUpdater, trainer: dict[str, torch.Tensor], receiver: RedisWeightReceiver,
               worker: dict[str, torch.Tensor], states: dict[int, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """``show``, ``export``, a rollback to the oldest retained version (inside the chain; applied by the worker)
    and a GC that keeps
    only it, then a fresh reader: seconds each, and whether every result is bit-exact."""
    import safetensors.torch

    admin = Admin(RedisStore.from_url(url, "bench"))
    out: dict[str, Any] = {}
    try:
        started = time.perf_counter()
        doc = manifest_dict(admin.manifest("latest"))
        out["show_s"] = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            admin.export("latest", Path(tmp) / "latest.safetensors")
            out["export_s"] = time.perf_counter() - started
            exported = safetensors.torch.load_file(str(Path(tmp) / "latest.safetensors"))
        exact = doc["version"] == updater.version and all(torch.equal(exported[k], trainer[k]) for k in trainer)
        middle = min(states)
        started = time.perf_counter()
        rolled = admin.rollback(middle)
        out["rollback_s"] = time.perf_counter() - started
        started = time.perf_counter()
        exact = exact and receiver.poll() == rolled.version
        out["rollback_apply_s"] = time.perf_counter() - started
        exact = exact and all(torch.equal(worker[k], states[middle][k]) for k in trainer)
        started = time.perf_counter()
        admin.gc(1)
        out["gc_keep1_s"] = time.perf_counter() - started
        fresh = {k: torch.zeros_like(v) for k, v in trainer.items()}
        reader = RedisWeightReceiver(RedisStore.from_url(url, "bench"), 3, fresh)
        try:
            exact = exact and reader.poll() == rolled.version
        finally:
            reader.close()
        out["operations_bit_exact"] = exact and all(torch.equal(fresh[k], states[middle][k]) for k in trainer)
    finally:
        admin.close()
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| chunks | chunk | planner s | check s | upload s | commit s | GC s | push s | apply s | us/chunk (push; CPU) "
            "| commands push / apply | manifest B/chunk d1 / d19 | late joiner s | show / export / rollback / GC s "
            "| bit-exact |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        per = r["manifest_bytes_per_chunk"]
        lines.append(
            f"| {r['chunks']:,} | {r['chunk_size'] // 1024} KiB | {r['planner_s']:.3f} | {r['check_s']:.3f} "
            f"| {r['upload_s']:.3f} | {r['commit_s']:.3f} | {r['gc_s']:.3f} | {r['push_s']:.3f} | {r['apply_s']:.3f} "
            f"| {r['push_us_per_chunk']:.1f} ({r['push_cpu_us_per_chunk']:.1f} CPU) | {r['push_commands']:.0f} / {r['apply_commands']:.0f} "
            f"| {per.get('1', '-')} / {per.get('19', per.get(str(max(map(int, per))), '-'))} "
            f"| {r['late_joiner_s']:.2f} | {r['show_s']:.2f} / {r['export_s']:.2f} / {r['rollback_apply_s']:.2f} "
            f"/ {r['gc_keep1_s']:.2f} | {r['bit_exact'] and r['late_joiner_bit_exact'] and r['operations_bit_exact']} |"
        )
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    small = next((r for r in rows if r["chunks"] <= 1100 and r["chunk_size"] == MIN_CHUNK_SIZE), None)
    big = next((r for r in rows if 60_000 <= r["chunks"] <= 68_000), None)
    if small and big:
        ratio = big["push_us_per_chunk"] / small["push_us_per_chunk"]
        out.append({"target": "delta push per chunk, 64k / 1k chunks", "value": round(ratio, 3), "limit": 1.3,
                    "met": ratio <= 1.3})  # fmt: skip
        cpu = big["push_cpu_us_per_chunk"] / small["push_cpu_us_per_chunk"]
        out.append({"target": "delta push CPU (trainer process) per chunk, 64k / 1k chunks", "value": round(cpu, 3),
                    "limit": 1.3, "met": cpu <= 1.3})  # fmt: skip
    for r in rows:
        per = r["manifest_bytes_per_chunk"]
        if "1" in per and "19" in per:
            ratio = per["19"] / per["1"]
            out.append({"target": f"manifest bytes per chunk, depth 19 / depth 1 ({r['chunks']:,} chunks)",
                        "value": round(ratio, 3), "limit": 1.2, "met": ratio <= 1.2})  # fmt: skip
    shape = next((r for r in rows if r["chunks"] >= 70_000), None)
    if shape:
        ok = shape["end_to_end_s"] < 10 and shape["bit_exact"] and shape["late_joiner_bit_exact"] \
            and shape["operations_bit_exact"]
        out.append({"target": "70,000-chunk delta push, end to end (push + worker apply), bit-exact",
                    "value": round(shape["end_to_end_s"], 3), "limit": 10, "met": ok})  # fmt: skip
    return out


@contextmanager
def timed_library(timers: Timers) -> Iterator[None]:
    saved: list[tuple[type, str, Callable[..., Any]]] = []
    for cls, name, label in ((DeltaPlanner, "plan", "plan"), (ChunkStore, "missing", "missing"),
                             (VersionRegistry, "gc", "gc")):  # fmt: skip
        saved.append((cls, name, getattr(cls, name)))
        timers.wrap(cls, name, label)
    try:
        yield
    finally:
        for cls, name, real in saved:
            setattr(cls, name, real)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", default="1000,4000,16000,64000,70000", help="comma-separated chunk counts")
    parser.add_argument("--pushes", type=int, default=19, help="delta pushes after the keyframe (depth 1..N)")
    parser.add_argument("--calibration-pushes", type=int, default=5)
    parser.add_argument("--no-calibration", action="store_true", help="skip the ~520 MB model at 2 MiB chunks")
    parser.add_argument("--profile", type=Path, help="cProfile the last push and apply of the largest count here")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench" / "chunks.json")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.chunks.split(",") if c.strip()]
    runs = [(c, MIN_CHUNK_SIZE, args.pushes) for c in counts]
    if not args.no_calibration:
        runs.append((CALIBRATION_BYTES // DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_SIZE, args.calibration_pushes))
    server = LocalRedisServer([]).start()
    rows = []
    started = time.monotonic()
    timers = Timers()
    try:
        with timed_library(timers):
            for chunks, chunk_size, pushes in runs:
                t = time.monotonic()
                largest = chunks == max(counts) and chunk_size == MIN_CHUNK_SIZE
                profile = args.profile if largest else None
                row = run(server.url, timers, chunks, chunk_size, pushes, profile)
                rows.append(row)
                print(f"{chunks:>6} x {chunk_size // 1024} KiB: push {row['push_s']:.3f} s, "
                      f"apply {row['apply_s']:.3f} s, "
                      f"{row['push_us_per_chunk']:.1f} us/chunk ({time.monotonic() - t:.0f}s)", file=sys.stderr,
                      flush=True)  # fmt: skip
        version = redis.Redis.from_url(server.url).info("server").get("redis_version")
    finally:
        server.close()
    doc = {"redis_server": version, "seconds": round(time.monotonic() - started, 1), "rows": rows,
           "targets": targets(rows)}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(table(rows))
    for t in doc["targets"]:
        print(f"- {t['target']}: {t['value']} (limit {t['limit']}) {'met' if t['met'] else 'NOT MET'}")
    return 0 if all(r["bit_exact"] and r["late_joiner_bit_exact"] and r["operations_bit_exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
