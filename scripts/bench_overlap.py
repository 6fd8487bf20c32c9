#!/usr/bin/env python
"""Overlap on and off, paired: the same trainer, workers and server, pushes alternated.

    python scripts/bench_overlap.py --size 100MB --workers 2 --repeats 7
    python scripts/bench_overlap.py --size 1GB --workers 4 --host-cache --repeats 3

``scripts/bench.py`` compares systems in separate configurations, one after the other;
on a shared machine the load changes between them more than the overlap changes a push.
Here two updaters share one model, one server and one set of worker processes, one with
``overlap_min_bytes`` at its default and one with ``None`` (no plan announced), and their
sync pushes alternate, so both see the same load. Per variant: the median seconds per
sync push (until every worker acked) and the median CPU seconds the Redis server spent
per push (``/proc/<pid>/stat``: the single thread every byte goes through), plus the
bytes the workers staged before the commits.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import redis  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from redis_weights import RedisStore, RedisWeightReceiver, RedisWeightUpdater  # noqa: E402
from redis_weights.protocol.staging import DEFAULT_OVERLAP_MIN_BYTES  # noqa: E402
from redis_weights.tools.server import LocalRedisServer  # noqa: E402

NAMESPACE = "bench-overlap"
LAYER = 1024 * 1024 * 4  # bytes of one 1024x1024 fp32 layer


def model(size: int, seed: int | None) -> nn.Module:
    """About ``size`` bytes of fp32 layers (zeros for a worker, random for the trainer)."""
    layers = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(max(1, size // LAYER))])
    with torch.no_grad():
        for p in layers.parameters():
            p.zero_() if seed is None else p.normal_(generator=torch.Generator().manual_seed(seed))
    return layers


def worker(url: str, rank: int, size: int, cache: str | bool, stop: Any, staged: Any) -> None:
    torch.set_num_threads(1)
    receiver = RedisWeightReceiver(RedisStore.from_url(url, NAMESPACE), rank, model(size, None), host_cache=cache)
    receiver.start()
    stop.wait()
    staged[rank] = receiver.staged_bytes
    receiver.close()


def redis_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="100MB", help="model size (100MB, 1GB...)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="timed pushes per variant")
    parser.add_argument("--host-cache", action="store_true", help="workers share each version through /dev/shm")
    args = parser.parse_args()
    size = parse_size(args.size)
    torch.set_num_threads(1)
    with LocalRedisServer() as server, tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        cache: str | bool = shm if args.host_cache else False
        context = mp.get_context("spawn")
        stop, staged = context.Event(), context.Manager().dict()
        procs = [context.Process(target=worker, args=(server.url, r, size, cache, stop, staged))
                 for r in range(1, args.workers + 1)]  # fmt: skip
        for p in procs:
            p.start()
        pid = int(redis.Redis.from_url(server.url).info("server")["process_id"])
        weights = model(size, seed=1)
        variants = {"overlap": DEFAULT_OVERLAP_MIN_BYTES, "sequential": None}
        updaters = {
            name: RedisWeightUpdater(RedisStore.from_url(server.url, NAMESPACE), weights, args.workers, sync=True,
                                     retention=1, timeout=600, overlap_min_bytes=threshold)  # fmt: skip
            for name, threshold in variants.items()
        }
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        try:
            updaters["sequential"].update_weights()  # warm-up: every worker joined and applied once
            for _ in range(args.repeats):
                for name, updater in updaters.items():
                    with torch.no_grad():
                        for p in weights.parameters():
                            p.add_(1.0)  # every element changes: every chunk is uploaded and fetched
                    updater.version = max(u.version for u in updaters.values())
                    before, started = redis_cpu(pid), time.perf_counter()
                    updater.update_weights()
                    seconds[name].append(time.perf_counter() - started)
                    cpu[name].append(redis_cpu(pid) - before)
        finally:
            stop.set()
            for p in procs:
                p.join(60)
            for updater in updaters.values():
                updater.close()
    cache_note = ", host_cache" if args.host_cache else ""
    print(f"{args.size}, {args.workers} workers{cache_note}, {args.repeats} pushes per variant, alternated")
    print("| variant | s/push (median) | Redis CPU s/push (median) | all pushes (s) |")
    print("|---|---|---|---|")
    for name in variants:
        runs = " ".join(f"{s:.3f}" for s in seconds[name])
        print(f"| {name} | {statistics.median(seconds[name]):.3f} | {statistics.median(cpu[name]):.3f} | {runs} |")
    ratio = statistics.median(seconds["overlap"]) / statistics.median(seconds["sequential"])
    print(f"overlap / sequential: {ratio:.2f}; staged before the commits: "
          f"{sum(staged.values()) / 1e6:.0f} MB over {args.repeats} overlapped pushes")  # fmt: skip


if __name__ == "__main__":
    main()
