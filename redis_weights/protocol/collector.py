"""Garbage collection off the push's hot path: one GC at a time, on a thread of the trainer's.

A push that leaves more versions than its retention starts a GC here after its commit
and returns (a sync push waits for its acks meanwhile); the GC runs while the trainer
trains. The next push first waits for it to finish (``wait``), so a GC never races a
push of the same trainer: no lease wait, no refused commit, and the GC of a big
keyframe (tens of thousands of chunks, freed 16 keys per round trip) never adds to a
push's time unless pushes come faster than the GC frees. The trainer's ``flush`` and
``close`` wait for it too. A failure is housekeeping: logged, never raised.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from ..errors import RedisWeightsError
from .versions import GcReport, VersionRegistry

log = logging.getLogger(__name__)


class GarbageCollector:
    """Runs ``VersionRegistry.collect`` on a daemon thread, one at a time (see the module docstring)."""

    def __init__(self, registry: VersionRegistry, name: str = "redis-weights-gc") -> None:
        self.registry = registry
        self._name = name
        self._thread: threading.Thread | None = None
        self._done: list[GcReport] = []  # finished and not yet reported
        self._lock = threading.Lock()

    def start(self, keep: int, *, full: bool = False) -> None:
        """Collect in the background (after waiting for a GC still running)."""
        self.wait()
        thread = threading.Thread(target=self._run, args=(keep, full), name=self._name, daemon=True)
        self._thread = thread
        thread.start()

    def _run(self, keep: int, full: bool) -> None:
        try:
            report = self.registry.collect(keep, full=full)
        except (redis.exceptions.RedisError, RedisWeightsError) as exc:  # housekeeping never fails a push
            log.warning("namespace %r: garbage collection failed: %s", self.registry.keyspace.namespace, exc)
            return
        with self._lock:
            self._done.append(report)

    def wait(self, timeout: float | None = None) -> float:
        """Wait for the GC running now, if any; the seconds waited. A GC still running after
        ``timeout`` is left running (its thread is a daemon)."""
        thread = self._thread
        if thread is None:
            return 0.0
        started = time.perf_counter()
        thread.join(timeout)
        if not thread.is_alive():
            self._thread = None
        return time.perf_counter() - started

    def reports(self) -> list[GcReport]:
        """The GCs finished since the last call (what the next push report tells)."""
        with self._lock:
            done, self._done = self._done, []
        return done

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
