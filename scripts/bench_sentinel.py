"""What ``WAIT`` before the commit costs: pushes with ``min_replicas=0`` (no WAIT) and with the default
(WAIT for the replicas the primary reports online), alternating, in one run, on a Sentinel-managed
service (``LocalSentinelSet``: a primary, one replica, one sentinel on loopback).

Every push changes every chunk (a full upload), so the replica has the whole version to
take in. Prints the median push time of each, their ratio, and the median ``replicas``
phase of the pushes with WAIT (``PushReport.seconds["replicas"]``).

    python scripts/bench_sentinel.py [--sizes 1,64] [--repeats 11]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import torch

from redis_weights import RedisStore, RedisWeightUpdater
from redis_weights.tools.server import LocalSentinelSet


def weights(megabytes: float) -> dict[str, torch.Tensor]:
    """About ``megabytes`` MB of float32 tensors of at most 4 MB each."""
    floats = int(megabytes * 1e6 / 4)
    per = 1 << 20
    return {f"w{i}": torch.randn(min(per, floats - start)) for i, start in enumerate(range(0, floats, per))}


def measure(megabytes: float, repeats: int) -> None:
    with LocalSentinelSet(replicas=1, sentinels=1) as service:
        state = weights(megabytes)
        updaters = {  # a namespace each, on the same primary and replica
            name: RedisWeightUpdater(RedisStore.from_url(service.url, f"bench-{uuid.uuid4().hex[:8]}"), state, 1,
                                     sync=False, min_replicas=replicas, retention=2)
            for name, replicas in (("no WAIT (min_replicas=0)", 0), ("WAIT (default)", None))
        }  # fmt: skip
        seconds: dict[str, list[float]] = {name: [] for name in updaters}
        waited = []
        for _ in range(repeats):
            for name, updater in updaters.items():
                for tensor in state.values():
                    tensor.add_(1.0)  # every chunk changes
                started = time.perf_counter()
                updater.update_weights()
                seconds[name].append(time.perf_counter() - started)
                if updater.min_replicas is None and updater.last_push is not None:
                    waited.append(updater.last_push.seconds["replicas"])
        medians = {name: statistics.median(values) for name, values in seconds.items()}
        for name, value in medians.items():
            print(f"{megabytes:g} MB: {name}: median {value * 1000:.1f} ms over {repeats} pushes")
        without, with_wait = medians.values()
        print(f"{megabytes:g} MB: ratio WAIT / no WAIT {with_wait / without:.2f}; "
              f"median replicas phase {statistics.median(waited) * 1000:.1f} ms")  # fmt: skip
        for updater in updaters.values():
            updater.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,64", help="model sizes in MB, comma-separated")
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    for size in args.sizes.split(","):
        measure(float(size), args.repeats)


if __name__ == "__main__":
    main()
