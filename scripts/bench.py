#!/usr/bin/env python
"""Benchmark: this project against its peers, side by side in one run, same machine, same model.

    python scripts/bench.py                                  # the full run: the size sweep (15 min with 1, 2,
                                                             # 4 workers on 2 cores; 8 workers add about as
                                                             # much), then the classic RL policy trained
                                                             # between pushes to 1, 2, 4 workers, without and
                                                             # with the host cache (~8 min)
    python scripts/bench.py --sizes 100MB --workers 2 --systems rw-sync,raw --repeats 3

For every (model size, worker count, system) it starts a trainer and N workers as
separate processes (``scripts/bench_procs.py``), does one warm-up push and
``--repeats`` timed pushes, and reports medians: seconds per push (the trainer's
call until every worker runs the new weights), MB/s, trainer stall (how long the
push call blocks the trainer), time to first apply (push start -> first worker
applied), Redis egress per push, and the peak RSS growth of the trainer and of
one worker. A row is *verified* when every worker recorded, for every timed push,
an apply after which the first element of its first weight held that push's index
(the trainer writes it there before pushing): a per-push marker, not a comparison
of every byte. Results go to a JSON file and a PNG plot; the table is printed as
Markdown. All Redis systems share one private ``redis-server`` (flushed between
configurations); nothing touches a Redis you run. See docs/benchmarks.md.

    python scripts/bench.py --workloads finetune,frozen,classic    # issue 11 (~25 min here)
    python scripts/bench.py --cluster                              # scripts/bench_cluster.py
    python scripts/bench.py --keyspace                             # a shared Redis: scripts/bench_keyspace.py
    python scripts/bench.py --chunks                               # big models: scripts/bench_chunks.py
    python scripts/bench.py --vllm                                 # a vLLM engine's pause: scripts/bench_vllm.py
    python scripts/bench.py --workloads finetune --lrs 1e-6 --workers 4 --systems rw-delta,torchrl

The training workloads (``scripts/bench_train.py``) take real optimizer steps between
pushes: a >= 250M-parameter decoder-only transformer with fp32 master weights and
AdamW (``finetune``; ``frozen``: half its blocks frozen), and an fp32 MLP policy with
Adam at lr 3e-4 (``classic``). Per push: the fraction of changed wire-dtype elements,
the bytes written to Redis and its egress (``INFO stats``), the trainer's encode
seconds, the push seconds, the slowest worker's apply seconds; a row is *bit-exact*
when every worker's xxh3-128 digest of all its weight bytes equalled the trainer's
digest of its wire-dtype weights after every push. Results: docs/bench/workloads.json.

    python scripts/bench.py --neighbour 1GB --chunk-sizes 1MB,2MB,4MB,8MB       # issue 14

The good-neighbour measure: rw-sync pushes with Redis's SLOWLOG logging every command and
another client PINGing every millisecond; the library's commands (how many took 1 ms or more,
the slowest, per command p50/p99/max) and the PING latency during the pushes against idle.
``--server-bin``/``--server-args``/``--server-nice`` choose the private server (e.g. Valkey,
io-threads). Results: docs/bench/neighbour.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import redis  # noqa: E402

from redis_weights.tools.server import LocalRedisServer, free_port  # noqa: E402
from scripts.bench_procs import CHUNK, RW_SYSTEMS, SYSTEMS  # noqa: E402
from scripts.bench_train import (  # noqa: E402
    MODEL_FLAGS,
    TRAIN_SYSTEMS,
    WORKLOADS,
    Workload,
    add_arguments,
    model_flags,
)

DEFAULT_SYSTEMS = ("rw-sync", "rw-async", "rw-shm", "raw", "naive", "torchrl")
PROCS = str(REPO / "scripts" / "bench_procs.py")
LARGE = 512 << 20  # sizes from here on use --repeats-large
UNITS = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "B": 1}
HEADER = 64 << 10  # room for the safetensors header and manifest in the trainer's memory target
# Why a memory target cannot be met by a system, printed next to its verdict.
RSS_NOTES = {
    "rw-async": "by design: background=True snapshots the whole model into a staging buffer, so the "
    "trainer may change its weights while the upload runs; one model copy, not one chunk",
}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 1MB, 100MB, 1GB)")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def size_label(size: int) -> str:
    for unit in ("GB", "MB", "KB"):
        if size >= UNITS[unit] and size % UNITS[unit] == 0:
            return f"{size // UNITS[unit]} {unit}"
    return f"{size} B"


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "redis_py": redis.__version__,
    }


# ---------------------------------------------------------------------------------------
# One configuration
# ---------------------------------------------------------------------------------------
def spawn(role: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen(
        [sys.executable, PROCS, role, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb")
    )


def wait_files(paths: list[Path], procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a process exited early with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError("processes not ready")
        time.sleep(0.02)


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_PORT_TAKEN = ("EADDRINUSE", "address already in use")  # the peer's rendezvous port, taken since it was picked


def run_processes(
    url: str, common: list[str], workers: int, repeats: int, timeout: float, flush: bool = True
) -> tuple[dict[str, Any], list[dict[str, Any]]] | str:
    """One trainer and ``workers`` worker processes on a flushed Redis (``flush=False``: the
    caller flushed it): their JSON documents, or the error (with the tails of their logs) as a string.
    A run whose rendezvous port another process took between its choice and its bind runs again once."""
    result = _run_processes(url, common, workers, repeats, timeout, flush)
    if isinstance(result, str) and any(sign in result for sign in _PORT_TAKEN):
        print(f"port taken ({result[-200:]!r}); running the configuration again", file=sys.stderr, flush=True)
        result = _run_processes(url, common, workers, repeats, timeout, flush)
    return result


def _run_processes(
    url: str, common: list[str], workers: int, repeats: int, timeout: float, flush: bool
) -> tuple[dict[str, Any], list[dict[str, Any]]] | str:
    if flush:
        client = redis.Redis.from_url(url)
        client.flushall()
        client.close()
    port = free_port()
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="rw-bench-") as tmp, \
            tempfile.TemporaryDirectory(prefix="rw-bench-cache-", dir=shm) as cache:
        d = Path(tmp)
        common = [*common, "--url", url, "--workers", str(workers), "--tcp-port", str(port),
                  "--namespace", "bench", "--cache-dir", cache, "--signals", tmp]
        procs = []
        try:
            for rank in range(1, workers + 1):
                out = ["--rank", str(rank), "--out", str(d / f"w{rank}.json")]
                procs.append(spawn("worker", [*common, *out], d / f"w{rank}.log"))
            # The trainer starts (imports torch, builds its model) alongside the workers and
            # pushes only once every worker is ready and the "go" file exists.
            trainer_args = ["--repeats", str(repeats), "--out", str(d / "t.json"), "--go", str(d / "go")]
            trainer = spawn("trainer", [*common, *trainer_args], d / "t.log")
            procs.append(trainer)
            wait_files([d / f"w{r}.json.ready" for r in range(1, workers + 1)], procs, timeout)
            (d / "go").write_text("1")
            trainer.wait(timeout)
        except Exception as exc:
            logs = "".join(p.read_text(errors="replace")[-800:] for p in d.glob("*.log"))
            return f"{exc}; logs: {logs[-1500:]}"
        finally:
            for proc in procs:
                stop(proc)
        if not (d / "t.json").exists():
            return "trainer wrote nothing: " + (d / "t.log").read_text(errors="replace")[-1500:]
        trainer_doc = json.loads((d / "t.json").read_text())
        worker_docs = [json.loads(p.read_text()) for p in sorted(d.glob("w*.json"))]
    return trainer_doc, worker_docs


def run_config(
    url: str, system: str, size: int, workers: int, repeats: int, timeout: float, chunk_size: int = CHUNK
) -> dict[str, Any]:
    """One row of the size sweep: one trainer and ``workers`` worker processes."""
    common = ["--system", system, "--size", str(size), "--chunk-size", str(chunk_size)]
    docs = run_processes(url, common, workers, repeats, timeout)
    if isinstance(docs, str):
        return {"system": system, "size": size, "workers": workers, "error": docs}
    return summarize(system, size, workers, *docs)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(
    system: str, size: int, workers: int, trainer: dict[str, Any], worker_docs: list[dict[str, Any]]
) -> dict[str, Any]:
    pushes = trainer["pushes"]
    nbytes = trainer["model_bytes"]
    first_apply, last_apply = [], []
    verified = len(worker_docs) == workers and bool(pushes)
    for push in pushes:
        times = [a["t"] for w in worker_docs for a in w["applies"] if a["marker"] == push["marker"]]
        if len(times) != workers:
            verified = False
        if times:
            first_apply.append(min(times) - push["t0"])
            last_apply.append(max(times) - push["t0"])
    total = median([p["total"] for p in pushes])
    worker_growth = [w["rss_peak"] - w["rss_baseline"] for w in worker_docs]
    return {
        "system": system,
        "size": size,
        "model_bytes": nbytes,
        "workers": workers,
        "repeats": len(pushes),
        "push_s": total,
        "push_s_all": [p["total"] for p in pushes],
        "mb_per_s": nbytes / 1e6 / total if total else None,
        "stall_s": median([p["stall"] for p in pushes]),
        "first_apply_s": median(first_apply),
        "first_apply_s_all": first_apply,
        "last_apply_s": median(last_apply),
        "last_apply_s_all": last_apply,
        "redis_out_per_push": median(trainer.get("redis_out") or []),
        "trainer_rss_growth": trainer["rss_peak"] - trainer["rss_baseline"],
        "worker_rss_growth": max(worker_growth) if worker_growth else None,
        "verified": verified,
        "error": trainer.get("error"),
        "phases_s": {name: median([p["phases"][name] for p in pushes if name in p.get("phases", {})])
                     for name in sorted({n for p in pushes for n in p.get("phases", {})})},
    }


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------
def fmt(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if value is None else f"{value * scale:.{digits}g}"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| size | workers | system | s/push (median) | MB/s | trainer stall s | first apply s "
        "| Redis out MB/push | trainer RSS +MB | worker RSS +MB |"
    )
    lines = [head, "|" + "---|" * 10]
    mb = 1 / 1e6
    for r in rows:
        if r.get("error") and r.get("push_s") is None:
            reason = r["error"].split(";")[0][:90]
            lines.append(f"| {size_label(r['size'])} | {r['workers']} | {r['system']} | failed: {reason} |||||||")
            continue
        lines.append(
            f"| {size_label(r['size'])} | {r['workers']} | {r['system']} | {fmt(r['push_s'])} "
            f"| {fmt(r['mb_per_s'], 1, 4)} "
            f"| {fmt(r['stall_s'])} | {fmt(r['first_apply_s'])} | {fmt(r['redis_out_per_push'], mb, 4)} "
            f"| {fmt(r['trainer_rss_growth'], mb, 4)} | {fmt(r['worker_rss_growth'], mb, 4)} |"
            + ("" if r["verified"] else " (unverified)")
        )
    return "\n".join(lines)


def pivot(rows: list[dict[str, Any]]) -> str:
    """Compact table: one line per (size, workers), one column per system, median s/push;
    async pushes as "stall / until applied"."""
    systems = list(dict.fromkeys(r["system"] for r in rows))
    lines = ["| size | workers | " + " | ".join(systems) + " |", "|---|---|" + "---|" * len(systems)]
    for size in sorted({r["size"] for r in rows}):
        for n in sorted({r["workers"] for r in rows}):
            cells = []
            for system in systems:
                r = find(rows, system, size, n)
                if r is None:
                    failed = [x for x in rows if (x["system"], x["size"], x["workers"]) == (system, size, n)]
                    cells.append("failed" if failed else "")
                elif system == "rw-async":
                    cells.append(f"{fmt(r['stall_s'], 1, 2)} / {fmt(r['push_s'], 1, 3)}")
                else:
                    cells.append(fmt(r["push_s"], 1, 3))
            lines.append(f"| {size_label(size)} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def find(rows: list[dict[str, Any]], system: str, size: int, workers: int) -> dict[str, Any] | None:
    for r in rows:
        if (r["system"], r["size"], r["workers"]) == (system, size, workers) and r.get("push_s") is not None:
            return r
    return None


def targets(rows: list[dict[str, Any]], chunk: int = CHUNK) -> list[dict[str, Any]]:
    """The issue's targets, as ratios of medians measured in this run (skipped if not measured);
    ``chunk``: the run's chunk size (the trainer's memory target is one chunk plus the header)."""
    out = []
    mb100, mb1 = 100 << 20, 1 << 20

    def ratio(name: str, a: dict | None, ka: str, b: dict | None, kb: str, limit: float) -> None:
        if a is None or b is None or not a.get(ka) or not b.get(kb):
            return
        value = a[ka] / b[kb]
        out.append({"target": name, "ratio": round(value, 3), "limit": limit, "met": value <= limit})

    ratio("sync push 100 MB, 2 workers / raw floor", find(rows, "rw-sync", mb100, 2), "push_s",
          find(rows, "raw", mb100, 2), "push_s", 1.15)
    for n in (1, 2, 4):
        ratio(f"async stall 100 MB, {n} workers / torchrl sync push", find(rows, "rw-async", mb100, n), "stall_s",
              find(rows, "torchrl", mb100, n), "push_s", 0.5)
    ratio("sync push 1 MB, 4 workers / torchrl", find(rows, "rw-sync", mb1, 4), "push_s",
          find(rows, "torchrl", mb1, 4), "push_s", 1.5)
    ratio("shm push 100 MB, 4 workers / torchrl", find(rows, "rw-shm", mb100, 4), "push_s",
          find(rows, "torchrl", mb100, 4), "push_s", float("inf"))
    ratio("shm push 100 MB, 4 workers / plain rw-sync", find(rows, "rw-shm", mb100, 4), "push_s",
          find(rows, "rw-sync", mb100, 4), "push_s", float("inf"))
    for r in rows:  # all workers run on this one host: with the host cache, Redis sends a version once
        if r["system"] == "rw-shm" and r.get("redis_out_per_push"):
            out.append({"target": f"Redis egress per host and push / model bytes, rw-shm {size_label(r['size'])} "
                                  f"x{r['workers']}", "ratio": round(r["redis_out_per_push"] / r["model_bytes"], 3),
                        "limit": float("inf"), "met": True})
    for r in rows:
        if r["system"] in RW_SYSTEMS and r.get("push_s") is not None:
            where = f"{r['system']} {size_label(r['size'])} x{r['workers']}"
            limit = chunk + HEADER
            out.append({"target": f"trainer RSS growth, {where} / (chunk + header)",
                        "ratio": round(r["trainer_rss_growth"] / limit, 3), "limit": 1.0,
                        "met": r["trainer_rss_growth"] <= limit, "note": RSS_NOTES.get(r["system"])})
            limit = r["model_bytes"] + chunk
            out.append({"target": f"worker RSS growth, {where} / (model + chunk)",
                        "ratio": round(r["worker_rss_growth"] / limit, 3), "limit": 1.0,
                        "met": r["worker_rss_growth"] <= limit})
    return out


def report(doc: dict[str, Any]) -> str:
    """The machine, the compact table, the full table and the targets, as Markdown.

    Targets are computed again from the rows, so an older results file is judged by today's targets."""
    m = doc["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM; {m['os']}; Python {m['python']}, "
        f"torch {m['torch']}, redis-py {m['redis_py']}, Redis {m.get('redis_server')}; "
        f"chunk {size_label(doc['args']['chunk_size']).replace('B', 'iB')}; run took {doc['seconds']:.0f} s.",
        "",
    ]
    if doc["rows"]:
        lines += [
            "Median seconds per push (until every worker runs the new weights; "
            "rw-async: trainer stall / until applied):",
            "",
            pivot(doc["rows"]),
            "",
            table(doc["rows"]),
            "",
        ]
        if any(r.get("last_apply_s_all") for r in doc["rows"]):
            lines += [apply_table(doc["rows"]), ""]
    workload_rows = doc.get("workload_rows") or []
    if workload_rows:
        lines += [workload_table(workload_rows), ""]
    neighbour_rows = doc.get("neighbour_rows") or []
    if neighbour_rows:
        nice = doc["args"].get("server_nice")
        lines += ["Good neighbour (SLOWLOG of every command, counted from 1 ms; another client PINGs every ms"
                  + (f"; the server ran at nice {nice}" if nice is not None else "") + "):", "",
                  neighbour_table(neighbour_rows), ""]
    for t in targets(doc["rows"], doc["args"]["chunk_size"]) + workload_targets(workload_rows) + \
            neighbour_targets(neighbour_rows):
        lines.append(target_line(t))
    return "\n".join(lines)


def target_line(t: dict[str, Any]) -> str:
    verdict = "measured (no target)" if t["limit"] == float("inf") else (
        f"limit {t['limit']}: {'met' if t['met'] else 'NOT met'}")
    note = f"; {t['note']}" if t.get("note") and not t["met"] else ""
    return f"- {t['target']}: {t['ratio']} ({verdict}{note})"


# ---------------------------------------------------------------------------------------
# Good neighbour (issue 14): what a push costs the other clients of the same Redis
# ---------------------------------------------------------------------------------------
SLOWLOG_US = 1000  # SLOWLOG threshold of the measure: 1 ms
SLOWLOG_LIMIT_MS = 2.0  # the target: no command of the library holds Redis longer
# Commands the bench itself sends (flush, egress counters, this measure); the rest are the library's.
BENCH_COMMANDS = {"flushall", "info", "config", "slowlog", "ping"}
PING_INTERVAL = 0.001  # the other client pings once a millisecond
SLOWLOG_MAX_LEN = 200_000  # entries kept: every command of 1 GB pushes in 1 MiB chunks (~40 MB of Redis memory)


class Pinger:
    """Another client of the Redis: PINGs on its own connection every ``PING_INTERVAL`` from a
    thread, recording (wall time, seconds the reply took)."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=30)
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-pinger", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.time()
            start = time.perf_counter()
            self.client.ping()
            self.samples.append((t, time.perf_counter() - start))
            self._stop.wait(PING_INTERVAL)

    def __enter__(self) -> Pinger:
        self.client.ping()  # connected before the first timed sample
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.client.close()


def ping_stats(latencies: list[float]) -> dict[str, Any]:
    """p50, p99 and max of PING latencies, in milliseconds."""
    if not latencies:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3, 3)

    return {"count": len(ordered), "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": round(ordered[-1] * 1e3, 3)}


def library_slowlog(entries: list[dict[str, Any]], slow_us: int = SLOWLOG_US) -> dict[str, Any]:
    """The library's commands in a SLOWLOG taken with threshold 0: how many took ``slow_us`` or
    more and the slowest, overall and per command name (``EVALSHA`` is a script: its whole run is
    one entry), with each command's p50/p99 (durations are wall time: a server thread preempted by
    another process mid-command counts that time too)."""
    durations: dict[str, list[float]] = {}
    for entry in entries:
        command = entry["command"]
        first = (command.decode(errors="replace") if isinstance(command, bytes) else command).split(" ", 1)[0]
        name = (first or "?").lower()
        if name not in BENCH_COMMANDS:
            durations.setdefault(name.upper(), []).append(entry["duration"])
    by_command = {}
    for name, values in durations.items():
        values.sort()
        by_command[name] = {"n": len(values), "count": sum(v >= slow_us for v in values),
                            "p50_ms": round(values[len(values) // 2] / 1e3, 3),
                            "p99_ms": round(values[min(len(values) - 1, int(0.99 * len(values)))] / 1e3, 3),
                            "max_ms": round(values[-1] / 1e3, 3)}
    return {"count": sum(c["count"] for c in by_command.values()), "n": sum(c["n"] for c in by_command.values()),
            "max_ms": max((c["max_ms"] for c in by_command.values() if c["count"]), default=0.0),
            "commands": by_command}


def run_neighbour(
    url: str, size: int, workers: int, repeats: int, timeout: float, chunk_size: int, idle_s: float = 2.0
) -> dict[str, Any]:
    """One ``rw-sync`` configuration with the SLOWLOG at 1 ms and another client pinging: the
    library's slow commands over the whole run (the warm-up push included, the flush before it
    not) and the PING latencies while a timed push ran, against ``idle_s`` of idle Redis first."""
    client = redis.Redis.from_url(url)
    saved = client.config_get("slowlog-*")
    ident = {"system": "rw-sync", "size": size, "workers": workers, "chunk_size": chunk_size}
    try:  # every command is logged; those of SLOWLOG_US and more are the measure's count
        client.config_set("slowlog-log-slower-than", 0)
        client.config_set("slowlog-max-len", SLOWLOG_MAX_LEN)
        client.flushall()
        with Pinger(url) as idle:
            time.sleep(idle_s)
        client.slowlog_reset()
        common = ["--system", "rw-sync", "--size", str(size), "--chunk-size", str(chunk_size)]
        with Pinger(url) as busy:
            docs = run_processes(url, common, workers, repeats, timeout, flush=False)
        entries = client.slowlog_get(SLOWLOG_MAX_LEN)
    finally:
        for name, value in saved.items():
            client.config_set(name, value)
        client.close()
    if isinstance(docs, str):
        return {**ident, "error": docs}
    row = summarize("rw-sync", size, workers, *docs)
    windows = [(p["t0"], p["t0"] + p["total"]) for p in docs[0]["pushes"]]
    during = [dt for t, dt in busy.samples if any(a <= t <= b for a, b in windows)]
    idle_pings = ping_stats([dt for _, dt in idle.samples])
    return {**row, **ident, "slowlog": library_slowlog(entries), "ping_idle": idle_pings,
            "ping_push": ping_stats(during), "server": server_label(url)}


def server_label(url: str) -> str:
    """``redis 7.0.15, io-threads 1`` (or valkey's name and version): the server a row ran on."""
    client = redis.Redis.from_url(url)
    try:
        info = client.info("server")
        threads = client.config_get("io-threads").get("io-threads", "?")
    finally:
        client.close()
    name = "valkey" if "valkey_version" in info else "redis"
    return f"{name} {info.get('valkey_version') or info.get('redis_version')}, io-threads {threads}"


def neighbour_table(rows: list[dict[str, Any]]) -> str:
    """One line per neighbour configuration: push time against what the other clients saw."""
    head = ("| server | size | workers | chunk | s/push (median) | library commands >= 1 ms (of all) "
            "| slowest ms | GET ms p50 / p99 / max | DEL ms p50 / p99 / max | other commands >= 1 ms "
            "| PING ms idle p50 / p99 / max | PING ms during push p50 / p99 / max |")
    lines = [head, "|" + "---|" * 12]

    def three(p: dict[str, Any] | None, keys: tuple[str, ...] = ("p50_ms", "p99_ms", "max_ms")) -> str:
        return " / ".join(fmt(p[k], 1, 3) for k in keys) if p else "-"

    for r in rows:
        where = f"| {r.get('server', '?')} | {size_label(r['size'])} | {r['workers']} | {size_label(r['chunk_size'])} |"
        if r.get("push_s") is None:
            lines.append(f"{where} failed: {(r.get('error') or '?').split(';')[0][:90]} ||||||||")
            continue
        slow, commands = r["slowlog"], r["slowlog"]["commands"]
        others = ", ".join(f"{name} {c['count']}x, max {c['max_ms']:g}" for name, c in
                           sorted(commands.items(), key=lambda kv: -kv[1]["max_ms"])
                           if c["count"] and name not in ("GET", "DEL")) or "-"
        lines.append(f"{where} {fmt(r['push_s'])} | {slow['count']} ({slow['n']}) | {slow['max_ms']:g} "
                     f"| {three(commands.get('GET'))} | {three(commands.get('DEL'))} | {others} "
                     f"| {three(r['ping_idle'])} | {three(r['ping_push'])} |"
                     + ("" if r["verified"] else " (unverified)"))
    return "\n".join(lines)


def neighbour_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 14: no command of the library over 2 ms, as the slowest one / 2 ms, per configuration."""
    out = []
    for r in rows:
        if r.get("push_s") is None:
            continue
        slowest = r["slowlog"]["max_ms"]
        out.append({"target": f"neighbour {r.get('server', '?')}, {size_label(r['size'])} x{r['workers']}, chunk "
                              f"{size_label(r['chunk_size'])}: slowest library command / {SLOWLOG_LIMIT_MS:g} ms",
                    "ratio": round(slowest / SLOWLOG_LIMIT_MS, 3), "limit": 1.0, "met": slowest <= SLOWLOG_LIMIT_MS})
    return out


def apply_table(rows: list[dict[str, Any]]) -> str:
    """Per push: seconds from the push's start until the first and until the last worker applied it."""
    lines = ["| size | workers | system | first apply s, per push | last apply s, per push |", "|---|---|---|---|---|"]
    for r in rows:
        if r.get("last_apply_s_all"):
            first = ", ".join(fmt(t) for t in r["first_apply_s_all"])
            last = ", ".join(fmt(t) for t in r["last_apply_s_all"])
            lines.append(f"| {size_label(r['size'])} | {r['workers']} | {r['system']} | {first} | {last} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Training workloads (issue 11): see scripts/bench_train.py
# ---------------------------------------------------------------------------------------
def run_workload(
    url: str, workload: str, lr: float, system: str, workers: int, repeats: int, timeout: float, flags: list[str]
) -> dict[str, Any]:
    """One row: a trainer training ``workload`` at ``lr`` and pushing to ``workers`` workers."""
    ident = {"workload": workload, "lr": lr, "system": system, "workers": workers, "host_cache": "--host-cache" in flags}
    common = ["--system", system, "--workload", workload, "--lr", repr(lr), *flags]
    docs = run_processes(url, common, workers, repeats, timeout)
    if isinstance(docs, str):
        return {**ident, "error": docs}
    return summarize_workload(ident, *docs)


def workload_plan(args: argparse.Namespace, workloads: list[str], neighbour: list[int]) -> tuple[list[str], list[bool]]:
    """The workloads to run and the host-cache modes to run them in. The default run (no sizes,
    workloads or neighbour measure asked for) is the size sweep, then the seed's own user: the
    ``classic`` RL policy trained between pushes to 1, 2 and 4 workers, without and with the host cache."""
    if args.sizes is None and not workloads and not neighbour:
        return ["classic"], [True] if args.host_cache else [False, True]
    return workloads, [bool(args.host_cache)]


def workload_runs(workload: Workload, lrs: str | None) -> list[tuple[float, tuple[int, ...]]]:
    """(learning rate, default worker counts) to run: the workload's own, or ``--lrs`` (finetune)."""
    if not lrs or workload.name != "finetune":
        return list(workload.runs)
    own = dict(workload.runs)
    return [(float(x), own.get(float(x), (1, 2, 4))) for x in lrs.split(",")]


def summarize_workload(
    ident: dict[str, Any], trainer: dict[str, Any], worker_docs: list[dict[str, Any]]
) -> dict[str, Any]:
    """Medians over the timed pushes (the first push, a warm-up and a keyframe, is left out).

    Verified: every worker's digest after every push, the warm-up included, equals the
    trainer's digest of its wire-dtype weights for that push."""
    pushes = trainer["pushes"]
    timed = pushes[1:]
    proofs = [{p["index"]: p for p in w["proofs"]} for w in worker_docs]
    verified = len(worker_docs) == ident["workers"] and bool(timed) and all(
        w.get(p["index"], {}).get("digest") == p["digest"] for p in pushes for w in proofs)
    slowest_apply, workers_cpu = [], []
    for p in timed:
        seconds = [w[p["index"]].get("apply_s") for w in proofs if p["index"] in w]
        if seconds and None not in seconds:
            slowest_apply.append(max(seconds))
        cpu = [w[p["index"]].get("cpu_s") for w in proofs if p["index"] in w]
        if len(cpu) == ident["workers"] and None not in cpu:
            workers_cpu.append(sum(cpu))

    def med(key: str) -> float | None:
        return median([p[key] for p in timed if p.get(key) is not None])

    worker_growth = [w["rss_peak"] - w["rss_baseline"] for w in worker_docs]
    return {
        **ident,
        "params": trainer["params"],
        "trainable": trainer["trainable"],
        "wire_bytes": trainer["wire_bytes"],
        "repeats": len(timed),
        "changed": med("changed"),
        "bytes_in": med("bytes_in"),
        "bytes_out": med("bytes_out"),
        "first_bytes_in": pushes[0]["bytes_in"] if pushes else None,
        "encode_s": med("encode_s"),
        "push_s": med("push_s"),
        "push_s_all": [p["push_s"] for p in timed],
        "apply_s": median(slowest_apply),
        "train_s": med("train_s"),
        "trainer_cpu_s": med("trainer_cpu_s"),
        "workers_cpu_s": median(workers_cpu),
        "redis_cpu_s": med("redis_cpu_s"),
        "trainer_rss_growth": trainer["rss_peak"] - trainer["rss_baseline"],
        "worker_rss_growth": max(worker_growth) if worker_growth else None,
        "verified": verified,
        "error": trainer.get("error"),
        "phases_s": {name: median([p["phases"][name] for p in pushes if name in p.get("phases", {})])
                     for name in sorted({n for p in pushes for n in p.get("phases", {})})},
    }


def workload_label(r: dict[str, Any]) -> str:
    return f"{r['workload']} | {r['lr']:g}"


def workload_table(rows: list[dict[str, Any]]) -> str:
    """One line per (workload, lr, workers, system): medians per push after the first.

    Runs that measured CPU (trainer, all workers together, Redis: seconds per push) get a column
    for it; earlier runs' JSON files have no such figures, and their tables keep their columns."""
    cpu = any("trainer_cpu_s" in r for r in rows)
    head = (
        "| workload | lr | workers | system | changed elements % | written MB/push | written / dense wire "
        "| Redis out MB/push | encode s | push s | worker apply s |"
        + (" CPU s: trainer / workers / Redis |" if cpu else "") + " worker RSS +MB | bit-exact |"
    )
    columns = 14 if cpu else 13
    lines = [head, "|" + "---|" * columns]
    mb = 1 / 1e6
    for r in rows:
        system = f"{r['system']} (host cache)" if r.get("host_cache") and r["system"] != "torchrl" else r["system"]
        where = f"| {workload_label(r)} | {r['workers']} | {system} |"
        if r.get("push_s") is None:
            reason = (r.get("error") or "no push measured").split(";")[0][:90]
            lines.append(f"{where} failed: {reason} " + "|" * (columns - 4))
            continue
        ratio = r["bytes_in"] / r["wire_bytes"] if r.get("bytes_in") is not None else None
        cpu_cell = (f" {fmt(r.get('trainer_cpu_s'), digits=2)} / {fmt(r.get('workers_cpu_s'), digits=2)} / "
                    f"{fmt(r.get('redis_cpu_s'), digits=2)} |") if cpu else ""  # fmt: skip
        lines.append(
            f"{where} {fmt(r.get('changed'), 100, 3)} | {fmt(r.get('bytes_in'), mb, 4)} | {fmt(ratio, 1, 3)} "
            f"| {fmt(r.get('bytes_out'), mb, 4)} | {fmt(r.get('encode_s'))} | {fmt(r['push_s'])} "
            f"| {fmt(r.get('apply_s'))} |{cpu_cell} {fmt(r.get('worker_rss_growth'), mb, 4)} "
            f"| {'yes' if r['verified'] else 'NO'} |"
        )
    return "\n".join(lines)


def workload_summary(*runs: list[dict[str, Any]]) -> str:
    """The README's summary: per run (one JSON file's workload rows) and (workload, lr, workers, host
    cache), the median push seconds of the dense and delta pushes and of TorchRL's in that run, and
    their ratios to TorchRL's."""
    head = "| workload | lr | workers | host cache | dense push s | delta push s | TorchRL push s | dense / TorchRL | delta / TorchRL |"
    lines = [head, "|" + "---|" * 9]
    for rows in runs:
        measured = [r for r in rows if r.get("push_s") is not None]
        groups = dict.fromkeys((r["workload"], r["lr"], r["workers"], bool(r.get("host_cache")))
                               for r in measured if r["system"] != "torchrl")  # fmt: skip
        for workload, lr, workers, cache in groups:
            def push(system: str) -> float | None:
                return next((r["push_s"] for r in measured if (r["workload"], r["lr"], r["workers"], r["system"])
                             == (workload, lr, workers, system)
                             and (system == "torchrl" or bool(r.get("host_cache")) == cache)), None)  # fmt: skip

            dense, delta, peer = push("rw-dense"), push("rw-delta"), push("torchrl")
            ratio = (lambda ours: f"{ours / peer:.2f}x" if ours is not None and peer else "-")
            lines.append(f"| {workload} | {lr:g} | {workers} | {'yes' if cache else 'no'} | {fmt(dense)} | "
                         f"{fmt(delta)} | {fmt(peer)} | {ratio(dense)} | {ratio(delta)} |")  # fmt: skip
    return "\n".join(lines)


def find_workload(rows: list[dict[str, Any]], workload: str, lr: float, system: str, workers: int) -> dict | None:
    for r in rows:
        if (r["workload"], r["lr"], r["system"], r["workers"]) == (workload, lr, system, workers) \
                and r.get("push_s") is not None:
            return r
    return None


def workload_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 11's targets, as ratios of medians measured in this run (skipped if not measured)."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float, limit: float) -> None:
        out.append({"target": name, "ratio": round(value, 4), "limit": limit, "met": value <= limit})

    counts = sorted({r["workers"] for r in rows})
    for workload, lr, system, limit in (("finetune", 1e-6, "rw-delta", 0.05), ("finetune", 1e-5, "rw-delta", 0.25),
                                        ("frozen", 1e-6, "rw-dense", 0.55)):
        for n in counts:
            r = find_workload(rows, workload, lr, system, n)
            if r is not None and r.get("bytes_in") is not None:
                add(f"{workload} lr {lr:g} {system} x{n}: bytes written per version / dense wire size",
                    r["bytes_in"] / r["wire_bytes"], limit)
    delta, peer = find_workload(rows, "finetune", 1e-6, "rw-delta", 4), find_workload(rows, "finetune", 1e-6,
                                                                                       "torchrl", 4)
    if delta is not None and peer is not None:
        add("finetune lr 1e-06, 4 workers, sync: rw-delta push / torchrl push", delta["push_s"] / peer["push_s"], 0.2)
    for n in counts:
        delta, dense = (find_workload(rows, "classic", 3e-4, s, n) for s in ("rw-delta", "rw-dense"))
        if delta is not None and dense is not None:
            add(f"classic x{n}: rw-delta push / rw-dense push", delta["push_s"] / dense["push_s"], 1.05)
    ran = [r for r in rows if r.get("push_s") is not None]
    if ran:
        add(f"rows where a worker did not hold the trainer's wire bytes after a push ({len(ran)} rows ran)",
            sum(not r["verified"] for r in ran), 0)
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r["workers"] for r in rows})
    fig, axes = plt.subplots(1, len(counts), figsize=(4.2 * len(counts), 3.6), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], counts, strict=True):
        for system in dict.fromkeys(r["system"] for r in rows):
            points = sorted((r["model_bytes"] / 1e6, r["push_s"]) for r in rows
                            if r["system"] == system and r["workers"] == n and r.get("push_s"))
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=system)
            stalls = sorted((r["model_bytes"] / 1e6, r["stall_s"]) for r in rows
                            if r["system"] == system == "rw-async" and r["workers"] == n and r.get("stall_s"))
            if stalls:
                ax.plot(*zip(*stalls, strict=True), marker="x", linestyle="--", label="rw-async (trainer stall)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{n} worker{'s' if n > 1 else ''}")
        ax.set_xlabel("model size (MB)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("seconds per push (median)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run_cluster_measure(args: argparse.Namespace) -> int:
    """``--cluster``: the issue-15 measure, in its own script (its own cluster and servers)."""
    from scripts import bench_cluster

    size = args.sizes.split(",")[0] if args.sizes else "1GB"
    return bench_cluster.main(["--size", size, "--repeats", str(args.repeats_large)]
                              + (["--out", str(args.out)] if args.out else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", help="comma-separated model sizes (default 1MB,100MB,1GB; none with --workloads)")
    parser.add_argument("--workloads", default="", help=f"training workloads, from {', '.join(WORKLOADS)}")
    parser.add_argument("--lrs", help="finetune: comma-separated learning rates (default 1e-6,1e-5)")
    parser.add_argument("--workers", help="comma-separated worker counts (default 1,2,4,8; neighbour: 1; "
                        "workloads: their own)")
    parser.add_argument("--systems", help=f"from {', '.join(SYSTEMS)} (the sweep) and {', '.join(TRAIN_SYSTEMS)} "
                        "(workloads); default: every sweep system and each workload's own peers")
    parser.add_argument("--repeats", type=int, default=5, help="timed pushes per configuration")
    parser.add_argument("--repeats-large", type=int, default=3, help="timed pushes for sizes of 512 MB and more")
    parser.add_argument("--repeats-train", type=int, default=3, help="timed pushes per workload configuration")
    parser.add_argument("--neighbour", default="", help="comma-separated model sizes for the good-neighbour "
                        "measure (rw-sync with SLOWLOG and another client's PINGs; e.g. 1GB)")
    parser.add_argument("--chunk-sizes", help="neighbour: comma-separated chunk sizes (default: the library's)")
    parser.add_argument("--chunk-size", type=parse_size, default=CHUNK, help="chunk size of the sweep's pushes")
    parser.add_argument("--url", help="an existing Redis to use (it is FLUSHED); default: a private server")
    parser.add_argument("--server-bin", help="the private server's binary (default: redis-server, else valkey's)")
    parser.add_argument("--server-nice", type=int, help="the private server's nice value (e.g. -10: on a busy "
                        "machine, the SLOWLOG then measures the commands more than the scheduler)")
    parser.add_argument("--server-args", default="", help="extra arguments of the private server, e.g. "
                        "'--io-threads 2 --io-threads-do-reads yes'")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one configuration may take")
    parser.add_argument("--out", type=Path, help="results JSON (default docs/bench/results.json; "
                        "docs/bench/workloads.json for a run of workloads only, "
                        "docs/bench/neighbour.json for a run of the neighbour measure only)")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "bench" / "push_seconds.png")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--report", type=Path, help="only re-render the tables and plot of an earlier JSON file")
    add_arguments(parser)
    parser.add_argument("--keyspace", action="store_true",
                        help="a shared Redis: pushes and scrapes beside 0, 1M and 10M unrelated keys "
                             "(scripts/bench_keyspace.py)")
    parser.add_argument("--keys", default="0,1000000,10000000", help="--keyspace: unrelated key counts")
    parser.add_argument("--chunks", nargs="?", const="1000,4000,16000,64000,70000",
                        help="only the big-model measure (scripts/bench_chunks.py): delta pushes at these chunk "
                        "counts of 4 KiB chunks (default 1000,4000,16000,64000,70000) and a 520 MB model")
    parser.add_argument("--cluster", action="store_true",
                        help="only the Redis Cluster measure (scripts/bench_cluster.py, 1 GB; --sizes picks another)")
    parser.add_argument("--vllm", action="store_true",
                        help="a vLLM engine's pause per update against vLLM's reload (scripts/bench_vllm.py, run "
                             "with .venv-vllm's python: scripts/install_vllm.sh first)")
    args = parser.parse_args(argv)
    if args.vllm:
        python = REPO / ".venv-vllm" / "bin" / "python"
        if not python.exists():
            parser.error("--vllm needs the vLLM venv: run scripts/install_vllm.sh first")
        return subprocess.call([str(python), str(REPO / "scripts" / "bench_vllm.py")])
    if args.keyspace:
        from scripts import bench_keyspace

        out = args.out or REPO / "docs" / "bench" / "keyspace.json"
        keys = [int(k) for k in args.keys.split(",") if k.strip()]
        return bench_keyspace.run(keys, args.repeats if args.repeats != 5 else 30, args.timeout, out, args.server_bin)
    if args.chunks:
        from scripts import bench_chunks

        return bench_chunks.main(["--chunks", args.chunks] + (["--out", str(args.out)] if args.out else []))
    if args.cluster:
        return run_cluster_measure(args)
    if args.report:
        doc = json.loads(args.report.read_text())
        if not args.no_plot and doc["rows"]:
            plot(doc["rows"], args.plot)
        print(report(doc))
        return 0

    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if set(workloads) - set(WORKLOADS):
        parser.error(f"unknown workloads {sorted(set(workloads) - set(WORKLOADS))}; choose from {list(WORKLOADS)}")
    neighbour = [parse_size(s) for s in args.neighbour.split(",") if s.strip()]
    workloads, cache_modes = workload_plan(args, workloads, neighbour)
    chunk_sizes = [parse_size(s) for s in (args.chunk_sizes or size_label(CHUNK)).split(",") if s.strip()]
    sizes = [parse_size(s) for s in (args.sizes if args.sizes is not None else
                                     "" if workloads or neighbour else "1MB,100MB,1GB").split(",") if s.strip()]
    counts = [int(n) for n in (args.workers or "1,2,4,8").split(",")]
    chosen = None if args.systems is None else [s.strip() for s in args.systems.split(",")]
    if chosen is not None and set(chosen) - set(SYSTEMS) - set(TRAIN_SYSTEMS):
        parser.error(f"unknown systems {sorted(set(chosen) - set(SYSTEMS) - set(TRAIN_SYSTEMS))}; "
                     f"choose from {SYSTEMS + TRAIN_SYSTEMS}")
    systems = list(DEFAULT_SYSTEMS) if chosen is None else [s for s in chosen if s in SYSTEMS]
    default_out = "results.json" if sizes or not (workloads or neighbour) else \
        "workloads.json" if workloads else "neighbour.json"
    out = args.out or REPO / "docs" / "bench" / default_out

    server = None
    url = args.url
    if url is None:
        server = LocalRedisServer(args.server_args.split(), binary=args.server_bin).start()
        url = server.url
        if args.server_nice is not None and server.pid is not None:
            os.setpriority(os.PRIO_PROCESS, server.pid, args.server_nice)
    rows: list[dict[str, Any]] = []
    workload_rows: list[dict[str, Any]] = []
    neighbour_rows: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for size in sizes:
            for n in counts:
                for system in systems:
                    repeats = args.repeats_large if size >= LARGE else args.repeats
                    t = time.monotonic()
                    row = run_config(url, system, size, n, repeats, args.timeout, args.chunk_size)
                    rows.append(row)
                    print(f"{size_label(size):>7} x{n} {system:<9} "
                          f"{fmt(row.get('push_s'))} s/push  ({time.monotonic() - t:.0f}s)"
                          + (f"  ERROR {row['error'][:200]}" if row.get("error") else ""), file=sys.stderr, flush=True)
        for name, host_cache in ((name, cache) for cache in cache_modes for name in workloads):
            flags = model_flags(argparse.Namespace(**{**vars(args), "host_cache": host_cache}))
            for lr, default_counts in workload_runs(WORKLOADS[name], args.lrs):
                peers = [s for s in (chosen or WORKLOADS[name].systems) if s in TRAIN_SYSTEMS
                         and not (s == "torchrl" and host_cache and False in cache_modes)]  # run once: no host cache
                for n in counts if args.workers else default_counts:
                    for system in peers:
                        t = time.monotonic()
                        row = run_workload(url, name, lr, system, n, args.repeats_train, args.timeout, flags)
                        workload_rows.append(row)
                        status = row.get("error") or ""
                        print(f"{name} lr {lr:g} x{n} {system:<8}{' (host cache)' if host_cache else ''} "
                              f"{fmt(row.get('push_s'))} s/push  "
                              f"({time.monotonic() - t:.0f}s) {status[:200]}", file=sys.stderr, flush=True)
        for size in neighbour:
            for chunk_size in chunk_sizes:
                for n in counts if args.workers else [1]:
                    t = time.monotonic()
                    repeats = args.repeats_large if size >= LARGE else args.repeats
                    row = run_neighbour(url, size, n, repeats, args.timeout, chunk_size)
                    neighbour_rows.append(row)
                    slow = row.get("slowlog") or {}
                    print(f"neighbour {size_label(size):>7} x{n} chunk {size_label(chunk_size)} "
                          f"{fmt(row.get('push_s'))} s/push, {slow.get('count')} slow, max {slow.get('max_ms')} ms "
                          f"({time.monotonic() - t:.0f}s) {(row.get('error') or '')[:200]}",
                          file=sys.stderr, flush=True)
        server_version = redis.Redis.from_url(url).info("server").get("redis_version")
    finally:
        if server is not None:
            server.close()
    doc = {
        "machine": {**machine(), "redis_server": server_version},
        "args": {"sizes": sizes, "workers": counts, "systems": systems, "repeats": args.repeats,
                 "repeats_large": args.repeats_large, "chunk_size": args.chunk_size, "workloads": workloads,
                 "neighbour": neighbour, "chunk_sizes": chunk_sizes, "server_args": args.server_args,
                 "server_nice": args.server_nice,
                 "repeats_train": args.repeats_train, "model": {name: getattr(args, name) for name in MODEL_FLAGS}},
        "seconds": round(time.monotonic() - started, 1),
        "rows": rows,
        "workload_rows": workload_rows,
        "neighbour_rows": neighbour_rows,
        "targets": targets(rows, args.chunk_size) + workload_targets(workload_rows) + neighbour_targets(neighbour_rows),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    if not args.no_plot and rows:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, args.plot)
    print(report(doc))
    ran = [r for r in rows + workload_rows + neighbour_rows if not r.get("error")]
    return 0 if all(r.get("verified") for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
