"""The trainer's re-check of the eviction policy while it runs.

The start check (``health.ensure_server``) refuses a server that may evict keys, but a
``CONFIG SET maxmemory-policy allkeys-lru`` later, or a failover to a node configured
otherwise, goes unnoticed: Redis then silently evicts chunks of committed versions and
late joiners cannot read them. ``EvictionWatch.check`` runs ``health.check_eviction`` on
every node at most once per ``RECHECK_SECONDS`` (from the push path: a few INFO calls a
minute) and says so loudly, once per change: an error when a node may evict, a warning
when none may any more. It never fails a push: the chunks a push needs are checked and
uploaded again by the push itself (``push.py``: only what Redis lacks is written).
"""

from __future__ import annotations

import logging
import time

from ..backend.deployment import LOST, Deployment
from .health import check_eviction

log = logging.getLogger(__name__)

RECHECK_SECONDS = 60.0  # at most one check of every node per this many seconds


class EvictionWatch:
    """Re-check the eviction settings of every node of ``deployment``; ``unsafe`` is what the
    last check found (None: nothing that may evict)."""

    def __init__(self, deployment: Deployment) -> None:
        self._deployment = deployment
        self._due = time.monotonic() + RECHECK_SECONDS  # the start check has just run
        self.unsafe: str | None = None

    def check(self) -> str | None:
        """Check now if ``RECHECK_SECONDS`` have passed since the last check; what may evict, or None."""
        now = time.monotonic()
        if now < self._due:
            return self.unsafe
        self._due = now + RECHECK_SECONDS
        found = []
        try:
            nodes = self._deployment.nodes()
        except LOST as exc:
            log.debug("eviction re-check skipped: %s", exc)
            return self.unsafe
        for name, client in nodes:
            try:
                finding = check_eviction(client)
            except (*LOST, OSError) as exc:  # the push itself reports a Redis that is gone
                log.debug("eviction re-check of %s skipped: %s", name, exc)
                continue
            if finding.unsafe:
                found.append(f"{name}: {finding.what}; fix: {finding.fix}")
        unsafe = "; ".join(found) or None
        if unsafe and unsafe != self.unsafe:
            log.error("Redis may now evict weight chunks of committed versions (workers that join or fall behind "
                      "cannot read them): %s", unsafe)  # fmt: skip
        elif unsafe is None and self.unsafe:
            log.warning("Redis no longer evicts weight chunks (was: %s)", self.unsafe)
        self.unsafe = unsafe
        return unsafe
