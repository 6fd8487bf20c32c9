#!/usr/bin/env python
"""Benchmark: Redis Cluster against one standalone server, in one run (issue 15).

    python scripts/bench_cluster.py                     # 1 GB, 3 pushes each, failover (~3 min here)
    python scripts/bench_cluster.py --size 64MB --repeats 1 --no-failover
    python scripts/bench.py --cluster                   # the same, from the main benchmark script

Starts a private 3-master Redis Cluster (a replica each, ``cluster-node-timeout`` 2 s) and a
private standalone server on this machine, and measures with one model of ``--size`` bytes
(fp32 tensors of 4 MB, 8 MiB chunks, every chunk changed before every push):

- bytes of one version per cluster master (from the slot of every chunk's key), and their
  spread: (max - min) / mean; also the spread other chunk sizes would give the same model;
- push seconds (upload + commit, ``sync=False``): cluster against standalone (and a cluster
  of 3 masters without replicas: what replication costs), pushes taken in turns (the same
  weights pushed to each; retention 1, as a trainer runs), medians and their ratio;
- a fresh worker's fetch of the version from the cluster, without and with replica reads: the
  bytes the primaries and the replicas sent (``INFO stats total_net_output_bytes``), and the
  fetch seconds; the fetched weights are compared bit-exact with the trainer's;
- failover (unless ``--no-failover``): the master of a chunk is SIGKILLed in the middle of a
  push; how long after the kill the first push succeeds, and whether a worker then holds the
  trainer's weights bit-exact.

Results: ``docs/bench/cluster.json`` and a Markdown table on stdout (``--report FILE``
re-renders one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import redis_weights.protocol.chunkstore as chunkstore  # noqa: E402
from redis_weights import PushError, RedisStore, RedisWeightReceiver, RedisWeightUpdater  # noqa: E402
from redis_weights.format.codec import Encoder  # noqa: E402
from redis_weights.tools.admin import drop_namespace  # noqa: E402
from redis_weights.tools.server import LocalRedisCluster, LocalRedisServer  # noqa: E402

CHUNK = 8 << 20
TENSOR = 1 << 20  # float32 elements per tensor: 4 MB
SPREAD_CHUNKS = (1 << 20, 4 << 20, 8 << 20, 16 << 20)  # chunk sizes whose spread is reported
OUT = REPO / "docs" / "bench" / "cluster.json"
NODE_TIMEOUT_MS = 2000  # cluster-node-timeout of the measured cluster (Redis's default: 15000)
UNITS = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "B": 1}


def parse_size(text: str) -> int:
    for unit, factor in UNITS.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def model(size: int, seed: int | None) -> dict[str, torch.Tensor]:
    """``size`` bytes of float32 tensors of 4 MB (random, or zeros for a worker)."""
    generator = torch.Generator().manual_seed(seed or 0)
    count = max(1, size // (4 * TENSOR))
    return {f"layer{i:04d}": torch.randn(TENSOR, generator=generator) if seed is not None else torch.zeros(TENSOR)
            for i in range(count)}  # fmt: skip


def spread(per_master: dict[str, int]) -> float:
    """(max - min) / mean of the bytes per master."""
    values = list(per_master.values())
    return (max(values) - min(values)) / statistics.mean(values) if values and statistics.mean(values) else 0.0


def bytes_per_master(store: RedisStore, ids: list[str], sizes: list[int]) -> dict[str, int]:
    """Bytes of the chunks ``ids`` on each master, from the slot of each chunk's key (no SCAN needed)."""
    keys = [store.keyspace.chunk(i) for i in ids]
    out = {name: 0 for name, _ in store.deployment.masters()}
    for name, indices in store.deployment.group_by_node(keys).items():
        out[name] += sum(sizes[i] for i in indices)
    return out


def output_bytes(store: RedisStore) -> tuple[int, int]:
    """``(primaries, replicas)``: total_net_output_bytes summed over each kind of node."""
    masters = dict(store.deployment.masters())
    totals = [0, 0]
    for name, client in store.deployment.nodes():
        totals[name not in masters] += int(client.info("stats")["total_net_output_bytes"])
    return totals[0], totals[1]


def bump(weights: dict[str, torch.Tensor]) -> None:
    """Change every element: the next push uploads every chunk again."""
    with torch.no_grad():
        for t in weights.values():
            t.add_(1.0)


def measure_pushes(urls: dict[str, str], weights: dict[str, torch.Tensor], repeats: int) -> dict[str, Any]:
    """Push seconds on each deployment of ``urls`` (the same weights, in turns), and the spread of
    the last version over the masters of ``urls["cluster"]``."""
    stores = {k: RedisStore.from_url(url, "bench") for k, url in urls.items()}
    updaters = {k: RedisWeightUpdater(s, weights, 1, sync=False, chunk_size=CHUNK, retention=1)
                for k, s in stores.items()}  # fmt: skip
    seconds: dict[str, list[float]] = {k: [] for k in stores}
    try:
        for u in updaters.values():  # warm-up: connections, scripts, first allocations
            u.push_weights()
        for repeat in range(repeats):
            bump(weights)
            order = list(updaters.items())
            for k, u in order[repeat % len(order):] + order[: repeat % len(order)]:  # in turns: the same machine
                started = time.perf_counter()
                u.push_weights()
                seconds[k].append(time.perf_counter() - started)
        for k, store in stores.items():  # memory back before the fetches (retention=1: one version each)
            if k != "cluster":
                drop_namespace(store.client, store.keyspace)
        cluster = stores["cluster"]
        manifest = updaters["cluster"].registry.read_manifest(updaters["cluster"].version)
        per_master = bytes_per_master(cluster, [c.id for c in manifest.chunks], manifest.chunk_sizes)
        encoded = [Encoder(size).encode(weights) for size in SPREAD_CHUNKS]
        spreads = {str(size): round(spread(bytes_per_master(cluster, e.ids, e.chunk_sizes)), 4)
                   for size, e in zip(SPREAD_CHUNKS, encoded, strict=True)}  # fmt: skip
        medians = {k: statistics.median(v) for k, v in seconds.items()}
        return {
            "push_seconds": seconds,
            "push_median_s": {k: round(v, 4) for k, v in medians.items()},
            "push_ratio": {k: round(v / medians["standalone"], 3) for k, v in medians.items() if k != "standalone"},
            "total_bytes": manifest.total_bytes,
            "bytes_per_master": per_master,
            "spread": round(spread(per_master), 4),
            "spread_by_chunk_size": spreads,
        }
    finally:
        for u in updaters.values():
            u.close()


def measure_fetches(cluster: LocalRedisCluster, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A fresh worker fetches the latest version, without then with replica reads."""
    cluster.wait_replicated()
    rows = {}
    for mode, query in (("primaries", ""), ("replica_reads", "?replica_reads=yes")):
        store = RedisStore.from_url(cluster.url + query, "bench")
        policy = {k: torch.zeros_like(v) for k, v in weights.items()}
        receiver = RedisWeightReceiver(store, 1, policy)
        try:
            before = output_bytes(store)
            started = time.perf_counter()
            receiver.poll()
            elapsed = time.perf_counter() - started
            after = output_bytes(store)
            exact = all(torch.equal(policy[k], weights[k]) for k in weights)
        finally:
            receiver.close()
            store.close()
        rows[mode] = {"primaries_out": after[0] - before[0], "replicas_out": after[1] - before[1],
                      "fetch_s": round(elapsed, 3), "bit_exact": exact}  # fmt: skip
    return rows


def measure_failover(cluster: LocalRedisCluster, weights: dict[str, torch.Tensor], deadline: float = 120.0
                     ) -> dict[str, Any]:  # fmt: skip
    """SIGKILL a chunk master (not the namespace's) in the middle of a push; time the recovery."""
    store = RedisStore.from_url(cluster.url, "bench")
    updater = RedisWeightUpdater(store, weights, 1, sync=False, chunk_size=CHUNK, retention=1)
    control = store.client.get_node_from_key(store.keyspace.latest).port
    victim = next(m for m in cluster.masters() if m.port != control and cluster.replica_of(m) is not None)
    killed: list[float] = []
    rounds: list[int] = []
    kill_at = 2 if sum(t.numel() * 4 for t in weights.values()) > chunkstore.ROUND_BYTES else 1
    real_send = updater.registry.chunks._send_round

    def send_round(batch):  # type: ignore[no-untyped-def]
        rounds.append(1)
        if len(rounds) == kill_at:  # the push has begun (and, at 1 GB, sent its first round)
            victim.kill()
            killed.append(time.monotonic())
        return real_send(batch)

    failures: list[str] = []
    try:
        updater.registry.chunks._send_round = send_round  # type: ignore[method-assign]
        bump(weights)
        try:
            updater.push_weights()
        except PushError as exc:
            failures.append(str(exc))
        updater.registry.chunks._send_round = real_send  # type: ignore[method-assign]
        while True:
            bump(weights)
            attempt = time.monotonic()
            try:
                updater.push_weights()
                break
            except PushError as exc:
                failures.append(str(exc))
                if time.monotonic() - killed[0] > deadline:
                    raise
                time.sleep(0.2)
        recovered = time.monotonic() - killed[0]
        alive = cluster.masters()[0]  # the URL's node may be the one killed: a worker names a live one
        worker_store = RedisStore.from_url(f"redis://{cluster.host}:{alive.port}", "bench")
        policy = {k: torch.zeros_like(v) for k, v in weights.items()}
        receiver = RedisWeightReceiver(worker_store, 1, policy)
        try:
            receiver.poll()
            exact = all(torch.equal(policy[k], weights[k]) for k in weights)
        finally:
            receiver.close()
            worker_store.close()
    finally:
        updater.close()
    return {"first_success_after_kill_s": round(recovered, 2),
            "its_push_began_after_kill_s": round(attempt - killed[0], 2), "failed_pushes": len(failures),
            "first_error": failures[0][:300] if failures else None, "worker_bit_exact": exact}  # fmt: skip


def report(doc: dict[str, Any]) -> str:
    """The Markdown tables of a run (docs/operations/cluster.md shows this function's output)."""
    p, f = doc["pushes"], doc["fetches"]
    mib = 1 << 20
    lines = [
        f"{doc['size_mb']:.0f} MB version, {doc['chunk_size'] >> 20} MiB chunks, 3 masters + 3 replicas and one "
        f"standalone server on one {doc['cpus']}-core machine (plus, for pushes only, 3 masters without "
        f"replicas), {doc['repeats']} pushes each (medians):",
        "",
        "| measure | value |",
        "|---|---|",
        "| bytes per master (MiB) | " + ", ".join(f"{v / mib:.0f}" for v in p["bytes_per_master"].values()) + " |",
        f"| spread of bytes per master, (max - min) / mean | {100 * p['spread']:.1f}% |",
        "| spread with 1 / 4 / 8 / 16 MiB chunks | "
        + " / ".join(f"{100 * v:.1f}%" for v in p["spread_by_chunk_size"].values()) + " |",
    ]
    for name, seconds in p["push_median_s"].items():
        ratio = "" if name == "standalone" else f" ({p['push_ratio'][name]:.2f}x standalone)"
        lines.append(f"| push, {name} (s) | {seconds:.3f}{ratio} |")
    for mode, label in (("primaries", "fetch from primaries"), ("replica_reads", "fetch with replica reads")):
        row = f[mode]
        lines.append(f"| {label}: primaries / replicas sent (MiB), seconds | {row['primaries_out'] / mib:.0f} / "
                     f"{row['replicas_out'] / mib:.0f}, {row['fetch_s']:.2f} s"
                     f"{'' if row['bit_exact'] else ' (NOT bit-exact)'} |")  # fmt: skip
    if doc.get("failover"):
        fo = doc["failover"]
        lines.append(f"| chunk master SIGKILLed mid-push ({doc.get('node_timeout_ms', NODE_TIMEOUT_MS) / 1000:g} s "
                     "cluster-node-timeout): first successful push after the kill | "
                     f"{fo['first_success_after_kill_s']:.1f} s ({fo['failed_pushes']} failed pushes; worker "
                     f"{'bit-exact' if fo['worker_bit_exact'] else 'NOT bit-exact'}) |")  # fmt: skip
    return "\n".join(lines)


def run(size: int, repeats: int, failover: bool, node_timeout_ms: int = NODE_TIMEOUT_MS) -> dict[str, Any]:
    import os

    weights = model(size, seed=1)
    with LocalRedisCluster(masters=3, replicas=1, node_timeout_ms=node_timeout_ms) as cluster, \
            LocalRedisCluster(masters=3, replicas=0) as bare, LocalRedisServer() as server:  # fmt: skip
        urls = {"standalone": server.url, "cluster": cluster.url, "cluster, no replicas": bare.url}
        pushes = measure_pushes(urls, weights, repeats)
        bare.close()  # its memory back before the fetches
        fetches = measure_fetches(cluster, weights)
        fail = measure_failover(cluster, weights) if failover else None
    return {"size_mb": size / 1e6, "chunk_size": CHUNK, "repeats": repeats, "cpus": os.cpu_count(),
            "node_timeout_ms": node_timeout_ms, "pushes": pushes, "fetches": fetches, "failover": fail}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1GB", help="model size (default 1GB)")
    parser.add_argument("--repeats", type=int, default=3, help="timed pushes per deployment")
    parser.add_argument("--no-failover", action="store_true", help="skip the master kill")
    parser.add_argument("--node-timeout-ms", type=int, default=NODE_TIMEOUT_MS,
                        help="the cluster's cluster-node-timeout (failure detection; Redis's default is 15000)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--report", type=Path, help="only re-render the table of an earlier JSON file")
    args = parser.parse_args(argv)
    if args.report:
        print(report(json.loads(args.report.read_text())))
        return 0
    doc = run(parse_size(args.size), args.repeats, not args.no_failover, args.node_timeout_ms)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(report(doc))
    exact = all(r["bit_exact"] for r in doc["fetches"].values())
    return 0 if exact and (doc["failover"] is None or doc["failover"]["worker_bit_exact"]) else 1


if __name__ == "__main__":
    sys.exit(main())
