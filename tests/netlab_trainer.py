"""A trainer process for the network-lab tests: pushes of seeded test models, one JSON line each.

Push ``i`` (from 0) pushes ``make_model(--model, seed=seeds[i])`` once the file ``<--go>.<i>``
exists: the trainer starts alongside its workers, and a test can change the network between
pushes. Sync pushes by default; ``--max-lag K`` makes them ``sync=False, max_lag=K`` (a push
returns while every rank runs a version at most K behind). ``--timeouts`` gives push ``i`` its
own ``timeout`` (the others keep ``--timeout``). Each push appends ``{"push": i, "version": N,
"digest": ..., "started": ..., "ended": ..., "ranks": {...}}`` to ``--out`` (``started``/``ended``:
``time.time()``; ``ranks``, with ``--max-lag`` only: each rank's applied version as the push
returned), or ``{"push": i, "error": <class name>, "message": ..., "dead": [...], "lagging":
[...], ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from redis_weights import RedisStore, RedisWeightUpdater
from redis_weights.errors import PushError
from tests.models import make_model, state_digest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--model", default="mb:8")
    parser.add_argument("--seeds", default="1", help="comma-separated: one push per seed")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--timeouts", default="", help="comma-separated per push (empty: --timeout)")
    parser.add_argument("--max-lag", type=int, default=None, help="sync=False with this max_lag")
    parser.add_argument("--go", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    timeouts = [float(t) if t else args.timeout for t in args.timeouts.split(",")] if args.timeouts else []

    def note(record: dict[str, object]) -> None:
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")

    model = make_model(args.model, seed=0)
    store = RedisStore.from_url(args.url, args.namespace)
    lagged = args.max_lag is not None
    with RedisWeightUpdater(store, model, num_workers=args.workers, sync=not lagged, max_lag=args.max_lag,
                            timeout=args.timeout) as updater:  # fmt: skip
        for index, seed in enumerate(int(s) for s in args.seeds.split(",")):
            while not os.path.exists(f"{args.go}.{index}"):
                time.sleep(0.02)
            updater.timeout = timeouts[index] if index < len(timeouts) else args.timeout
            model.load_state_dict(make_model(args.model, seed=seed).state_dict())
            note({"pushing": index})
            started = time.time()
            try:
                updater.update_weights()
            except PushError as exc:
                note({"push": index, "error": type(exc).__name__, "message": str(exc), "version": exc.version,
                      "dead": exc.dead, "lagging": exc.lagging, "started": started, "ended": time.time()})  # fmt: skip
            else:
                ended = time.time()
                ranks = {s.rank: s.version for s in updater.workers()} if lagged else {}
                note({"push": index, "version": updater.version, "digest": state_digest(model), "started": started,
                      "ended": ended, "ranks": ranks})  # fmt: skip


if __name__ == "__main__":
    main()
