#!/usr/bin/env python
"""A shared, busy Redis: the same pushes and scrapes beside millions of unrelated keys.

    python scripts/bench.py --keyspace                       # 0, 1M and 10M unrelated keys
    python scripts/bench.py --keyspace --keys 0,1000000 --repeats 10

One private ``redis-server`` started with ``--enable-debug-command yes``; for each key
count it is flushed and filled with ``DEBUG POPULATE`` (keys ``other:<n>``: another
application's), then the sweep's own processes (``scripts/bench_procs.py``) push
1 MB to 1 worker and 100 MB to 2 workers, and the exporter's scrape of the namespace
is timed in-process. ``INFO commandstats`` before and after each configuration gives
the SCAN calls and the commands per push (one discarded warm-up configuration runs
first, so that the empty server's row is no cold start). The 1 MB push to 4 workers is also run
against TorchRL's gloo updater on the empty server (its cost does not depend on
Redis). Medians, and ratios against the empty server, in the same run. Results:
docs/bench/keyspace.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import redis

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from redis_weights.backend.store import RedisStore  # noqa: E402
from redis_weights.tools.admin import Admin, drop_namespace  # noqa: E402
from redis_weights.tools.server import LocalRedisServer  # noqa: E402

NAMESPACE = "bench"  # the namespace bench_procs pushes to
DEFAULT_KEYS = (0, 1_000_000, 10_000_000)
PUSHES = (("rw-sync", 1 << 20, 1), ("rw-sync", 100 << 20, 2))  # (system, size, workers)
PEER = ("torchrl", 1 << 20, 4)  # and rw-sync 1 MB x4 on the empty server
SCRAPES = 200  # a scrape is ~1 ms: many, for a stable median
POPULATE_STEP = 1_000_000


def commandstats(client: redis.Redis) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in client.info("commandstats").items()}


def populate(url: str, keys: int) -> float:
    """Flush, then fill the server with ``keys`` unrelated keys; the seconds it took."""
    started = time.perf_counter()
    slow = redis.Redis.from_url(url, socket_timeout=None)  # 10M keys take seconds
    slow.flushall()
    for start in range(0, keys, POPULATE_STEP):  # DEBUG POPULATE blocks the server: in steps
        slow.execute_command("DEBUG", "POPULATE", min(POPULATE_STEP, keys - start), f"other{start}")
    assert slow.dbsize() == keys
    slow.close()
    return time.perf_counter() - started


def scrape_seconds(url: str, repeats: int = SCRAPES) -> float:
    """Median seconds of the exporter's scrape of the namespace (the collector's whole work)."""
    from redis_weights.tools.exporter import FleetCollector

    with Admin(RedisStore.from_url(url, NAMESPACE)) as admin:
        collector = FleetCollector(admin, cache_seconds=0)  # every scrape reads Redis
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            families = list(collector.collect())
            times.append(time.perf_counter() - started)
            assert families
    return statistics.median(times)


def run_push(url: str, system: str, size: int, workers: int, repeats: int, timeout: float) -> dict[str, Any]:
    """One configuration on the populated server (not flushed): the sweep's row, plus the SCAN calls
    and commands per push from ``INFO commandstats``, and the scrape after the pushes."""
    from scripts.bench import run_processes, summarize

    client = redis.Redis.from_url(url)
    drop_namespace(client, RedisStore(client, NAMESPACE, owns_client=False).keyspace)
    before = commandstats(client)
    docs = run_processes(url, ["--system", system, "--size", str(size), "--chunk-size", str(2 << 20)], workers,
                         repeats, timeout, flush=False)  # fmt: skip
    after = commandstats(client)
    keys = client.dbsize()
    client.close()
    if isinstance(docs, str):
        return {"system": system, "size": size, "workers": workers, "error": docs}
    row = summarize(system, size, workers, *docs)
    pushes = max(1, repeats + 1)  # the warm-up push and the timed ones
    delta = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    row.update(scan_per_push=delta.get("scan", 0) / pushes, commands_per_push=sum(delta.values()) / pushes,
               dbsize=keys)  # fmt: skip
    if system.startswith("rw"):
        row["scrape_s"] = scrape_seconds(url)
    return row


def run(keys_list: list[int], repeats: int, timeout: float, out: Path, server_bin: str | None = None) -> int:
    rows: list[dict[str, Any]] = []
    server = LocalRedisServer(["--enable-debug-command", "yes"], binary=server_bin).start()
    try:
        client = redis.Redis.from_url(server.url)
        run_push(server.url, "rw-sync", 1 << 20, 1, 5, timeout)  # warm-up (discarded): a cold first row is no baseline
        for keys in keys_list:
            filled = populate(server.url, keys)
            print(f"{keys:,} unrelated keys ({filled:.1f}s to populate)", file=sys.stderr, flush=True)
            configs = list(PUSHES) + ([("rw-sync", PEER[1], PEER[2]), PEER] if keys == 0 else [])
            for system, size, workers in configs:
                row = run_push(server.url, system, size, workers, repeats if size < 50 << 20 else 5, timeout)
                row["unrelated_keys"] = keys
                rows.append(row)
                print(f"  {system} {size >> 20} MB x{workers}: {row.get('push_s')} s/push, "
                      f"scan/push {row.get('scan_per_push')}, scrape {row.get('scrape_s')} "
                      f"{(row.get('error') or '')[:300]}", file=sys.stderr, flush=True)  # fmt: skip
        version = client.info("server").get("redis_version")
        client.close()
    finally:
        server.close()
    doc = {"redis_server": version, "keys": keys_list, "repeats": repeats, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(table(rows))
    return 0 if all(r.get("verified") for r in rows if not r.get("error")) and not any(r.get("error") for r in rows) \
        else 1  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per configuration and key count, push and scrape medians and their ratio to the empty server."""
    empty = {(r["system"], r["size"], r["workers"]): r for r in rows if r["unrelated_keys"] == 0}
    lines = ["| unrelated keys | push | workers | push (median) | vs empty | scrape | vs empty | SCAN / push "
             "| commands / push |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['unrelated_keys']:,} | {r['system']} {r['size'] >> 20} MB | {r['workers']} | "
                         f"error: {r['error'][:80]} | | | | | |")  # fmt: skip
            continue
        base = empty.get((r["system"], r["size"], r["workers"]), {})
        ratio = r["push_s"] / base["push_s"] if base.get("push_s") else None
        scrape = r.get("scrape_s")
        scrape_ratio = scrape / base["scrape_s"] if scrape and base.get("scrape_s") else None
        lines.append(
            f"| {r['unrelated_keys']:,} | {r['system']} {r['size'] >> 20} MB | {r['workers']} | "
            f"{r['push_s'] * 1000:.1f} ms | {_ratio(ratio)} | "
            + (f"{scrape * 1000:.2f} ms | {_ratio(scrape_ratio)}" if scrape else " | ")
            + f" | {r['scan_per_push']:.0f} | {r['commands_per_push']:.0f} |"
        )
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else ""
