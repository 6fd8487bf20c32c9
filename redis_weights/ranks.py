"""The rank protocol: what each worker rank writes (join, heartbeat, ack, claim) and how it is read.

One module owns it, as rq's ``worker_registration`` owns worker registration. Per
rank ``r`` Redis holds four keys (names from ``keys.py``):

- ``rank:<r>:status``: ``"pending"`` (set by the trainer's commit), ``"updated"``
  (set by the rank's ack), or ``"error: <reason>"`` (a version the rank refused);
- ``rank:<r>:version``: the version the rank has applied (0: none yet); its presence
  marks a rank that has joined;
- ``rank:<r>:alive``: the heartbeat, the wall time of the last beat, expiring after
  the rank's TTL;
- ``rank:<r>:acked``: the wall time of the rank's last ``"updated"`` ack (its ack
  latency is that minus the version's ``created``, both wall clocks).

Readers decide with one MGET of all four keys of every rank they care about: the
trainer's sync wait, ``RedisWeightUpdater.workers()`` and the operators' reports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis

from .errors import ConfigurationError
from .keys import Keys
from .values import parse_float, parse_int, text_or_none

log = logging.getLogger(__name__)

STATUS_PENDING = "pending"
STATUS_UPDATED = "updated"
ERROR_PREFIX = "error:"
_CLAIM_RETRY = 0.25  # seconds between claim attempts while every rank is held

# KEYS: status, version, latest, acked. ARGV: version, status text, acks channel, rank,
# updated value, wall time of the ack. The applied version (and the ack's time) is always
# recorded; the status only when no newer version has been committed meanwhile (else it
# stays "pending" for the trainer's sake).
# The PUBLISH is only a wake-up hint: refused (the user lost its channel rights), it
# must not fail the ack, whose SETs a script cannot take back anyway.
_ACK = """
local v = tonumber(ARGV[1])
local latest = tonumber(redis.call('GET', KEYS[3]) or '0')
if ARGV[2] == ARGV[5] then
  redis.call('SET', KEYS[2], v)
  redis.call('SET', KEYS[4], ARGV[6])
end
if v >= latest then
  redis.call('SET', KEYS[1], ARGV[2])
end
redis.pcall('PUBLISH', ARGV[3], ARGV[4] .. ':' .. v)
return latest
"""


def error_status(reason: str) -> str:
    """The status a rank writes when it refuses a version or loses its history."""
    return f"{ERROR_PREFIX} {reason}"


def is_error(status: str | None) -> bool:
    """Whether a status is an ``"error: ..."`` report."""
    return bool(status) and str(status).startswith(ERROR_PREFIX)


@dataclass(frozen=True)
class RankState:
    """One rank as Redis sees it.

    ``joined``: the rank has registered (its version key exists).
    ``alive``: its heartbeat key has not expired. ``heartbeat_age``: seconds since
    its last beat (None when there is none). ``acked_at``: wall time of its last
    ``"updated"`` ack (None before the first).
    """

    rank: int
    status: str | None
    version: int
    joined: bool
    alive: bool
    heartbeat_age: float | None
    acked_at: float | None = None

    @property
    def error(self) -> str | None:
        return self.status if is_error(self.status) else None

    @property
    def dead(self) -> bool:
        """Registered once, heartbeat now expired."""
        return self.joined and not self.alive

    def has_applied(self, version: int) -> bool:
        return self.status == STATUS_UPDATED and self.version >= version

    def lag(self, latest: int) -> int:
        """How many versions behind ``latest`` (version numbers may skip: an upper bound)."""
        return max(0, latest - self.version)


# ---------------------------------------------------------------------------------------
# Reads
# ---------------------------------------------------------------------------------------
def read_rank_states(client: redis.Redis, keyspace: Keys, ranks: Sequence[int]) -> list[RankState]:
    """Status, version, heartbeat and last ack time of ``ranks`` in one MGET."""
    if not ranks:
        return []
    names = []
    for r in ranks:
        names += [keyspace.rank_status(r), keyspace.rank_version(r), keyspace.rank_alive(r), keyspace.rank_acked(r)]
    values = client.mget(names)
    now = time.time()
    states = []
    for i, rank in enumerate(ranks):
        status, version, alive, acked = values[4 * i : 4 * i + 4]
        beat = parse_float(alive)
        age = max(0.0, now - beat) if beat is not None else None
        applied = parse_int(version) or 0
        states.append(RankState(rank, text_or_none(status), applied, version is not None, alive is not None, age,
                                parse_float(acked)))  # fmt: skip
    return states


def known_ranks(client: redis.Redis, keyspace: Keys) -> list[int]:
    """Every rank that ever joined the namespace (its version key exists), sorted."""
    found = set()
    for name in client.scan_iter(match=keyspace.rank_version_pattern, count=1000):
        rank = keyspace.rank_of(name)
        if rank is not None:
            found.add(rank)
    return sorted(found)


def status_keys(keyspace: Keys, ranks: Iterable[int]) -> list[str]:
    """The status keys a commit sets to ``STATUS_PENDING`` for ``ranks``."""
    return [keyspace.rank_status(r) for r in ranks]


# ---------------------------------------------------------------------------------------
# Writes (by the rank itself)
# ---------------------------------------------------------------------------------------
def _beat_value() -> str:
    return repr(time.time())


def register(client: redis.Redis, keyspace: Keys, rank: int, ttl: float) -> None:
    """Announce ``rank``: applied version 0 (it holds no pushed version yet) and a heartbeat."""
    pipe = client.pipeline(transaction=False)
    pipe.set(keyspace.rank_version(rank), 0)
    pipe.set(keyspace.rank_alive(rank), _beat_value(), px=int(ttl * 1000))
    pipe.execute()


def heartbeat(client: redis.Redis, keyspace: Keys, rank: int, version: int, ttl: float) -> bool:
    """Refresh ``rank``'s heartbeat for ``ttl`` seconds; True if its version key had to be re-created.

    In the same round trip the version key is re-created (as ``version``) if Redis
    lost it (restart without persistence, flush): the rank shows up as joined again.
    """
    pipe = client.pipeline(transaction=False)
    pipe.set(keyspace.rank_alive(rank), _beat_value(), px=int(ttl * 1000))
    pipe.set(keyspace.rank_version(rank), version, nx=True)
    _, recreated = pipe.execute()
    return bool(recreated)


def ack(client: redis.Redis, keyspace: Keys, rank: int, version: int, status: str) -> int:
    """Record ``status`` for ``version`` (the ack script), publish on ``acks``; returns ``latest``.

    ``STATUS_UPDATED`` also records ``version`` as applied, and the ack's wall time. The status is written only
    while no newer version is committed, so a late ack never hides a newer ``"pending"``.
    """
    script = client.register_script(_ACK)
    latest = script(
        keys=[keyspace.rank_status(rank), keyspace.rank_version(rank), keyspace.latest, keyspace.rank_acked(rank)],
        args=[version, status, keyspace.acks_channel, rank, STATUS_UPDATED, _beat_value()],
    )
    return int(latest)


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
            if client.set(keyspace.rank_alive(rank), _beat_value(), nx=True, px=int(ttl * 1000)):
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

