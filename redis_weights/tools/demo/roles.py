"""The demo's two sides on their own, against a given server (the Docker Compose services).

``run_worker`` keeps a zero-initialised model in step (and is the in-process demo's
child process, with ``json_lines``); ``run_trainer`` pushes versions to ranks
1..N. A worker without ``--rank`` claims the lowest free rank of 1..N
(``claim_rank``), so identical replicas need no configuration.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from typing import IO, Any

from ...backend.store import RedisStore, StoreTimeoutError
from ...observe import metrics
from ...protocol.ranks import claim_rank
from ...trainer.updater import RedisWeightUpdater
from ...worker.receiver import RedisWeightReceiver
from .model import demo_weights, digest, train_and_push

_HEARTBEAT_TTL = 5.0
_CLAIM_TTL = 15.0  # a claimed rank is held this long until the receiver's own heartbeat takes over
# A worker without --rank waits this long for a rank of 1..N to free up (a crashed worker's
# heartbeat or claim expires within its TTL) before it gives up.
CLAIM_WAIT = max(_CLAIM_TTL, _HEARTBEAT_TTL) + 5.0
ROLE_NAMESPACE = "demo"  # namespace of the trainer and worker roles unless one is given

log = logging.getLogger(__name__)


def run_worker(url: str, namespace: str, rank: int | None, size_mb: float, *, workers: int = 4,
               json_lines: bool = False, out: IO[str] | None = None,
               metrics_port: int | None = None) -> int:  # fmt: skip
    """One demo worker: keep a zero-initialised model in step until SIGTERM/SIGINT (or stdin EOF with ``json_lines``).

    Without ``rank`` it claims the lowest free rank of 1..``workers`` (see ``claim_rank``).

    ``json_lines``: the protocol of the local demo's children (``{"ready"}``, then
    ``{"version", "digest"}`` per applied version on stdout); else one readable
    line per applied version. ``metrics_port``: serve the worker's Prometheus metrics there.
    """
    out = out or sys.stdout
    if metrics_port is not None:
        metrics.serve(metrics_port)
    weights = demo_weights(size_mb, seed=None)  # slow first imports happen here, not while a claimed rank is held
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    out_lock = threading.Lock()

    def say(doc: dict[str, Any], text: str) -> None:
        with out_lock:
            out.write((json.dumps(doc) if json_lines else text) + "\n")
            out.flush()

    if json_lines:  # the parent closes our stdin (or dies): time to go
        threading.Thread(target=_stop_on_eof, args=(stop,), daemon=True).start()
    store = RedisStore.from_url(url, namespace)
    if rank is None:
        rank = claim_rank(store.client, store.keyspace, _CLAIM_TTL, workers, wait=CLAIM_WAIT)
    receiver = RedisWeightReceiver(store, rank, weights, poll_interval=0.5, heartbeat_ttl=_HEARTBEAT_TTL)

    def applied(version: int) -> None:
        d = digest(weights)
        say({"version": version, "digest": d}, f"rank {rank}: applied version {version} (digest {d})")

    receiver.register_post_hook(applied)
    with receiver:  # starts the background thread; closes the store on exit
        say({"ready": True, "rank": rank}, f"rank {rank}: ready on namespace {namespace!r}")
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


def _stop_on_eof(stop: threading.Event) -> None:
    sys.stdin.read()
    stop.set()

def run_trainer(url: str, namespace: str, workers: int, size_mb: float, versions: int, interval: float,
                timeout: float, out: IO[str] | None = None, metrics_port: int | None = None) -> int:  # fmt: skip
    """A demo trainer on its own: push ``versions`` versions (0: forever) to ranks 1..workers, sync.

    A push that misses acks is reported and the next one goes on (workers may come
    and go); returns 1 if any push failed. ``metrics_port``: serve the trainer's
    Prometheus metrics there.
    """
    out = out or sys.stdout
    if metrics_port is not None:
        metrics.serve(metrics_port)
    weights = demo_weights(size_mb, seed=1)
    failures = 0
    with RedisWeightUpdater(RedisStore.from_url(url, namespace), weights, num_workers=workers, sync=True,
                            timeout=timeout) as updater:  # fmt: skip
        keys = updater.keyspace
        joined = [keys.relative(keys.rank_version(r)) for r in updater.all_worker_ids()]
        out.write(f"waiting up to {timeout:g}s for ranks 1..{workers} to join namespace {namespace!r}\n")
        out.flush()
        try:
            updater.store.wait(joined, timeout=timeout)
        except StoreTimeoutError as exc:
            out.write(f"pushing anyway: {exc}\n")
        for push in train_and_push(updater, weights, versions, interval):
            if push.error is None:
                out.write(push.describe(workers) + "\n")
            else:
                failures += 1
                out.write(f"push failed: {push.error}\n")
            out.flush()
    return 1 if failures else 0
