"""A worker process for the integration tests: a receiver on a test model, run until SIGTERM.

Each applied version is appended to ``--out`` as a JSON line with the digest of
the weights, so the test can compare them with the trainer's.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time

import redis

import redis_weights.backend.bulkread as bulkread_module
import redis_weights.protocol.staging as staging_module
import redis_weights.worker.receiver as receiver_module
from redis_weights import ReceiveTimeoutError, RedisStore, RedisWeightReceiver
from redis_weights.observe.reports import ApplyReport
from tests.models import make_model, state_digest


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--out", required=True)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--heartbeat-ttl", type=float, default=10.0)
    parser.add_argument("--apply-delay", type=float, default=0.0, help="sleep inside each apply (fault tests)")
    parser.add_argument("--fetch-delay", type=float, default=0.0,
                        help="sleep before each round of chunk reads (a slow network, without a big model)")
    parser.add_argument("--foreground", action="store_true", help="apply from this thread with wait(), no start()")
    parser.add_argument("--host-cache", default=None, help="share versions through this directory (host_cache=DIR)")
    parser.add_argument("--stage-stall", type=float, default=None,
                        help="seconds a stager waits for a new chunk of a plan (staging.STALL_SECONDS)")
    parser.add_argument("--read-from-replicas", action="store_true", help="read chunks from replicas (Sentinel)")
    args = parser.parse_args()

    real_staged = staging_module._chunk_staged

    def log_staged(version: int, index: int) -> None:  # lets overlap tests see what was staged
        with open(args.out, "a") as f:
            f.write(json.dumps({"staged": version, "index": index}) + "\n")
        real_staged(version, index)

    staging_module._chunk_staged = log_staged
    real_stage = staging_module.stage

    def logged_stage(store, plan, *a, **kw):  # type: ignore[no-untyped-def]
        staged = real_stage(store, plan, *a, **kw)
        with open(args.out, "a") as f:  # the stager let go of the plan
            f.write(json.dumps({"stage_ended": plan.version, "bytes": staged}) + "\n")
        return staged

    staging_module.stage = logged_stage
    if args.stage_stall is not None:
        staging_module.STALL_SECONDS = args.stage_stall

    if args.fetch_delay:
        real_send_round = bulkread_module._send_round

        def slow_send_round(*a, **kw):  # type: ignore[no-untyped-def]
            with open(args.out, "a") as f:
                f.write(json.dumps({"fetching": True}) + "\n")
            time.sleep(args.fetch_delay)
            return real_send_round(*a, **kw)

        bulkread_module._send_round = slow_send_round

    if args.apply_delay:
        real_apply = receiver_module.copy_tensors

        def slow_apply(*a, **kw):  # type: ignore[no-untyped-def]
            with open(args.out, "a") as f:  # lets a fault test kill the worker mid-apply
                f.write(json.dumps({"applying": True}) + "\n")
            time.sleep(args.apply_delay)
            return real_apply(*a, **kw)

        receiver_module.copy_tensors = slow_apply

    model = make_model(args.model, seed=None)
    store = RedisStore.from_url(args.url, args.namespace)
    receiver = RedisWeightReceiver(
        store, args.rank, model, poll_interval=args.poll_interval, heartbeat_ttl=args.heartbeat_ttl,
        host_cache=args.host_cache or False, read_from_replicas=args.read_from_replicas,
    )

    def record(version: int, report: ApplyReport) -> None:
        with open(args.out, "a") as f:
            f.write(json.dumps({"version": version, "digest": state_digest(model), "fetched": report.fetched_bytes,
                                "staged_bytes": receiver.staged_bytes}) + "\n")

    receiver.register_post_hook(record)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if not args.foreground:
        receiver.start()
    with open(args.out, "a") as f:
        f.write(json.dumps({"ready": True}) + "\n")
    while not stop.is_set():
        if not args.foreground:
            stop.wait()
            continue
        try:
            receiver.wait(timeout=0.5)
        except (ReceiveTimeoutError, redis.exceptions.RedisError):
            pass  # nothing new (or Redis trouble): wait again, as a user's own loop would
    receiver.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
