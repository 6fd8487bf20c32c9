#!/usr/bin/env python
"""Benchmark: this project against its peers, side by side in one run, same machine, same model.

    python scripts/bench.py                                  # the full run (~15 min on 2 cores)
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
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import redis  # noqa: E402

from redis_weights.tools.server import LocalRedisServer, free_port  # noqa: E402
from scripts.bench_procs import CHUNK, RW_SYSTEMS, SYSTEMS  # noqa: E402

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


def run_config(url: str, system: str, size: int, workers: int, repeats: int, timeout: float) -> dict[str, Any]:
    """One trainer and ``workers`` worker processes; the measured row."""
    client = redis.Redis.from_url(url)
    client.flushall()
    client.close()
    port = free_port()
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="rw-bench-") as tmp, \
            tempfile.TemporaryDirectory(prefix="rw-bench-cache-", dir=shm) as cache:
        d = Path(tmp)
        common = ["--system", system, "--size", str(size), "--url", url, "--workers", str(workers)]
        common += ["--tcp-port", str(port), "--namespace", "bench", "--cache-dir", cache]
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
            return {"system": system, "size": size, "workers": workers, "error": f"{exc}; logs: {logs[-1500:]}"}
        finally:
            for proc in procs:
                stop(proc)
        if not (d / "t.json").exists():
            return {"system": system, "size": size, "workers": workers,
                    "error": "trainer wrote nothing: " + (d / "t.log").read_text(errors="replace")[-1500:]}
        trainer_doc = json.loads((d / "t.json").read_text())
        worker_docs = [json.loads(p.read_text()) for p in sorted(d.glob("w*.json"))]
    return summarize(system, size, workers, trainer_doc, worker_docs)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(
    system: str, size: int, workers: int, trainer: dict[str, Any], worker_docs: list[dict[str, Any]]
) -> dict[str, Any]:
    pushes = trainer["pushes"]
    nbytes = trainer["model_bytes"]
    first_apply = []
    verified = len(worker_docs) == workers and bool(pushes)
    for push in pushes:
        times = [a["t"] for w in worker_docs for a in w["applies"] if a["marker"] == push["marker"]]
        if len(times) != workers:
            verified = False
        if times:
            first_apply.append(min(times) - push["t0"])
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
        "redis_out_per_push": median(trainer.get("redis_out") or []),
        "trainer_rss_growth": trainer["rss_peak"] - trainer["rss_baseline"],
        "worker_rss_growth": max(worker_growth) if worker_growth else None,
        "verified": verified,
        "error": trainer.get("error"),
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


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, as ratios of medians measured in this run (skipped if not measured)."""
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
    for r in rows:
        if r["system"] in RW_SYSTEMS and r.get("push_s") is not None:
            where = f"{r['system']} {size_label(r['size'])} x{r['workers']}"
            limit = CHUNK + HEADER
            out.append({"target": f"trainer RSS growth, {where} / (chunk + header)",
                        "ratio": round(r["trainer_rss_growth"] / limit, 3), "limit": 1.0,
                        "met": r["trainer_rss_growth"] <= limit, "note": RSS_NOTES.get(r["system"])})
            limit = r["model_bytes"] + CHUNK
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
        f"chunk {doc['args']['chunk_size'] >> 20} MiB; run took {doc['seconds']:.0f} s.",
        "",
        "Median seconds per push (until every worker runs the new weights; rw-async: trainer stall / until applied):",
        "",
        pivot(doc["rows"]),
        "",
        table(doc["rows"]),
        "",
    ]
    for t in targets(doc["rows"]):
        verdict = "measured (no target)" if t["limit"] == float("inf") else (
            f"limit {t['limit']}: {'met' if t['met'] else 'NOT met'}")
        note = f"; {t['note']}" if t.get("note") and not t["met"] else ""
        lines.append(f"- {t['target']}: {t['ratio']} ({verdict}{note})")
    return "\n".join(lines)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1MB,100MB,1GB", help="comma-separated model sizes")
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help=f"from {', '.join(SYSTEMS)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed pushes per configuration")
    parser.add_argument("--repeats-large", type=int, default=3, help="timed pushes for sizes of 512 MB and more")
    parser.add_argument("--url", help="an existing Redis to use (it is FLUSHED); default: a private server")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one configuration may take")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench" / "results.json")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "bench" / "push_seconds.png")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--report", type=Path, help="only re-render the tables and plot of an earlier JSON file")
    args = parser.parse_args(argv)
    if args.report:
        doc = json.loads(args.report.read_text())
        if not args.no_plot:
            plot(doc["rows"], args.plot)
        print(report(doc))
        return 0

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    counts = [int(n) for n in args.workers.split(",")]
    systems = [s.strip() for s in args.systems.split(",")]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")

    server = None
    url = args.url
    if url is None:
        server = LocalRedisServer().start()
        url = server.url
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for size in sizes:
            for n in counts:
                for system in systems:
                    repeats = args.repeats_large if size >= LARGE else args.repeats
                    t = time.monotonic()
                    row = run_config(url, system, size, n, repeats, args.timeout)
                    rows.append(row)
                    print(f"{size_label(size):>7} x{n} {system:<9} "
                          f"{fmt(row.get('push_s'))} s/push  ({time.monotonic() - t:.0f}s)"
                          + (f"  ERROR {row['error'][:200]}" if row.get("error") else ""), file=sys.stderr, flush=True)
        server_version = redis.Redis.from_url(url).info("server").get("redis_version")
    finally:
        if server is not None:
            server.close()
    doc = {
        "machine": {**machine(), "redis_server": server_version},
        "args": {"sizes": sizes, "workers": counts, "systems": systems, "repeats": args.repeats,
                 "repeats_large": args.repeats_large, "chunk_size": CHUNK},
        "seconds": round(time.monotonic() - started, 1),
        "rows": rows,
        "targets": targets(rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    if not args.no_plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, args.plot)
    print(report(doc))
    return 0 if all(r.get("verified") for r in rows if not r.get("error")) else 1


if __name__ == "__main__":
    sys.exit(main())
