"""What each rank reports: status, applied version, heartbeat. One MGET for all ranks.

Used by the trainer's sync wait (decide with one round trip), by
``RedisWeightUpdater.workers()`` and by the operators' ``workers`` command.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from .keys import Keys

STATUS_PENDING = "pending"
STATUS_UPDATED = "updated"
ERROR_PREFIX = "error:"


@dataclass(frozen=True)
class RankState:
    """One rank as Redis sees it.

    ``joined``: the rank has registered (its version key exists).
    ``alive``: its heartbeat key has not expired. ``heartbeat_age``: seconds since
    its last beat (None when there is none).
    """

    rank: int
    status: str | None
    version: int
    joined: bool
    alive: bool
    heartbeat_age: float | None

    @property
    def error(self) -> str | None:
        return self.status if self.status and self.status.startswith(ERROR_PREFIX) else None

    @property
    def dead(self) -> bool:
        """Registered once, heartbeat now expired."""
        return self.joined and not self.alive

    def has_applied(self, version: int) -> bool:
        return self.status == STATUS_UPDATED and self.version >= version

    def lag(self, latest: int) -> int:
        """How many versions behind ``latest`` (version numbers may skip: an upper bound)."""
        return max(0, latest - self.version)


def _text(value: bytes | str | None) -> str | None:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def read_rank_states(client: redis.Redis, keyspace: Keys, ranks: Sequence[int]) -> list[RankState]:
    """Status, version and heartbeat of ``ranks`` in one MGET."""
    if not ranks:
        return []
    names = []
    for r in ranks:
        names += [keyspace.rank_status(r), keyspace.rank_version(r), keyspace.rank_alive(r)]
    values = client.mget(names)
    now = time.time()
    states = []
    for i, rank in enumerate(ranks):
        status, version, alive = values[3 * i : 3 * i + 3]
        try:
            applied = int(version) if version is not None else 0
        except ValueError:
            applied = 0
        try:
            age = max(0.0, now - float(alive)) if alive is not None else None
        except ValueError:
            age = None
        states.append(RankState(rank, _text(status), applied, version is not None, alive is not None, age))
    return states
