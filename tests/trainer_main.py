"""A trainer process for the overlap tests: one push whose upload pauses where the test says.

The upload goes one object per pipeline round; after each object a JSON line
``{"written": i}`` is appended to ``--out``. After ``--block-after`` objects it writes
``{"blocked": true}`` and waits until the file ``--go`` exists (a test may kill it
there instead: a trainer that dies mid-upload, its plan announced). Then it commits
and writes ``{"pushed": version, "digest": ...}`` (or ``{"error": ...}``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from redis_weights import RedisStore, RedisWeightUpdater
from redis_weights.protocol.chunkstore import ChunkStore
from tests.models import make_model, state_digest


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--model", default="mb:2")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=256 * 1024)
    parser.add_argument("--block-after", type=int, default=-1, help="objects written before waiting for --go")
    parser.add_argument("--go", default="", help="the file whose existence lets the upload go on")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    def note(record: dict[str, object]) -> None:
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")

    real_write = ChunkStore.write

    def slow_write(self: ChunkStore, objects) -> int:  # type: ignore[no-untyped-def]
        sent = 0
        for index, item in enumerate(objects):
            if index == args.block_after:
                note({"blocked": True})
                while not os.path.exists(args.go):
                    time.sleep(0.01)
            sent += real_write(self, [item])
            note({"written": index})
        return sent

    ChunkStore.write = slow_write  # type: ignore[method-assign]
    model = make_model(args.model, seed=args.seed)
    store = RedisStore.from_url(args.url, args.namespace)
    updater = RedisWeightUpdater(store, model, num_workers=args.workers, sync=False, chunk_size=args.chunk_size,
                                 overlap_min_bytes=0)  # fmt: skip
    try:
        updater.update_weights()
    except Exception as exc:
        note({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    finally:
        updater.close()
    note({"pushed": updater.version, "digest": state_digest(model)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
