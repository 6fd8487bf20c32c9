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
import time
from typing import IO, Any

import redis

from ...errors import ConfigurationError
from ...keys import Keys
from ...receiver import RedisWeightReceiver
from ...store import RedisStore, StoreTimeoutError
from ...updater import RedisWeightUpdater
from .model import demo_weights, digest, train_and_push

_HEARTBEAT_TTL = 5.0
_CLAIM_TTL = 15.0  # a claimed rank is held this long until the receiver's own heartbeat takes over
# A worker without --rank waits this long for a rank of 1..N to free up (a crashed worker's
# heartbeat or claim expires within its TTL) before it gives up.
CLAIM_WAIT = max(_CLAIM_TTL, _HEARTBEAT_TTL) + 5.0
_CLAIM_RETRY = 0.25  # seconds between claim attempts while every rank is held
ROLE_NAMESPACE = "demo"  # namespace of the trainer and worker roles unless one is given

log = logging.getLogger(__name__)


def claim_rank(client: redis.Redis, keyspace: Keys, ttl: float, workers: int, *, wait: float = 0.0) -> int:
    """The lowest rank of 1..``workers`` whose heartbeat is absent, taken atomically (SET NX) for ``ttl`` seconds.

    Lets identical replicas (``docker compose up --scale worker=N``) share out the
    ranks the trainer waits for without configuration. When every one is held, it
    retries for up to ``wait`` seconds rather than take a rank above ``workers``
    (which the trainer ignores): a replica restarted right after a crash finds its
    old rank's heartbeat still alive until the TTL runs out, then takes it over.
    """
    deadline = time.monotonic() + wait
    warned = False
    while True:
        for rank in range(1, workers + 1):
            if client.set(keyspace.rank_alive(rank), repr(time.time()), nx=True, px=int(ttl * 1000)):
                return rank
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConfigurationError(
                f"every rank of 1..{workers} has a live worker (waited {wait:g}s for one to free up): "
                f"run at most {workers} workers, or raise --workers / WORKERS on the trainer and the workers"
            )
        if not warned:
            log.warning("ranks 1..%d are all held; waiting up to %.0fs for one to free up", workers, left)
            warned = True
        time.sleep(min(_CLAIM_RETRY, left))


def run_worker(url: str, namespace: str, rank: int | None, size_mb: float, *, workers: int = 4,
               json_lines: bool = False, out: IO[str] | None = None) -> int:  # fmt: skip
    """One demo worker: keep a zero-initialised model in step until SIGTERM/SIGINT (or stdin EOF with ``json_lines``).

    Without ``rank`` it claims the lowest free rank of 1..``workers`` (see ``claim_rank``).

    ``json_lines``: the protocol of the local demo's children (``{"ready"}``, then
    ``{"version", "digest"}`` per applied version on stdout); else one readable
    line per applied version.
    """
    out = out or sys.stdout
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
                timeout: float, out: IO[str] | None = None) -> int:  # fmt: skip
    """A demo trainer on its own: push ``versions`` versions (0: forever) to ranks 1..workers, sync.

    A push that misses acks is reported and the next one goes on (workers may come
    and go); returns 1 if any push failed.
    """
    out = out or sys.stdout
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
