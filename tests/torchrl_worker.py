"""A collector worker process for the TorchRL tests: a ``Collector`` kept in step by a
``CollectorWeightReceiver``, collecting until SIGTERM.

Each batch is appended to ``--out`` as a JSON line: the distinct actions in it, the
policy version its frames carry, and the monotonic time its rollout started
(``time.monotonic`` is system-wide on Linux, so the test can compare it with the
moment a push was acknowledged).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)

from torchrl.collectors import Collector  # noqa: E402

from redis_weights.integrations.torchrl import CollectorWeightReceiver  # noqa: E402
from tests.torchrl_env import action_values, make_env, make_policy  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--poll-mode", action="store_true", help="check Redis at each batch, no thread")
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--pause", type=float, default=0.02, help="seconds between batches")
    args = parser.parse_args()

    from redis_weights import RedisStore

    starts: list[float] = []
    policy = make_policy(0.0)
    collector = Collector(
        make_env(),
        policy,
        frames_per_batch=args.frames,
        total_frames=-1,
        track_policy_version=True,
        auto_register_policy_transforms=False,
        pre_collect_hook=lambda: starts.append(time.monotonic()),
    )
    receiver = CollectorWeightReceiver(
        RedisStore.from_url(args.url, args.namespace), args.rank, collector,
        background=not args.poll_mode, poll_interval=0.2,
    )  # fmt: skip
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    receiver.start()
    with open(args.out, "a") as out:
        out.write(json.dumps({"ready": True}) + "\n")
        out.flush()
        for batch in collector:
            record = {
                "started": starts[-1],
                "values": action_values(batch),
                "versions": sorted(set(batch["next", "policy_version"].flatten().tolist())),
            }
            out.write(json.dumps(record) + "\n")
            out.flush()
            if stop.wait(args.pause):
                break
    receiver.close()
    collector.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
