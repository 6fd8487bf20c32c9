"""The rank protocol: what each worker rank writes (join, heartbeat, ack, claim) and how it is read.

One module owns it, as rq's ``worker_registration`` owns worker registration. Per
rank ``r`` Redis holds four keys (names from ``keys.py``):

- ``rank:<r>:status``: ``"pending"`` (set by the trainer's commit), ``"updated"``
  (set by the rank's ack), or ``"error: <reason>"`` (a version the rank refused);
- ``rank:<r>:version``: the version the rank has applied (0: none yet); its presence
  marks a rank that has joined;
- ``rank:<r>:alive``: the heartbeat: its value is the rank's heartbeat TTL in
  seconds, and it expires after that TTL unless the rank beats again (every
  ``TTL / BEATS_PER_TTL`` seconds, from a thread of its own);
- ``rank:<r>:acked``: the wall time of the rank's last ``"updated"`` ack (its ack
  latency is that minus the version's ``created``, both wall clocks).

Readers decide with one round trip: an MGET of all four keys of every rank they
care about, plus the remaining TTL (PTTL) of each heartbeat. A beat's age is its
TTL less what remains of it, both on the server's clock, so ages mean the same on
every host whatever their clocks say.

A key that expired is not proof of death: a server that stalls (``CLIENT PAUSE
WRITE`` during a failover, a long ``DEBUG SLEEP``, a fork on a loaded host) lets
every heartbeat expire while the ranks are healthy. ``DeathWatch`` declares a rank
dead only once its heartbeat has stayed missing while the server answered promptly
for longer than the rank needs to beat again (see its docstring).
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import redis

from ..backend.index import NamespaceIndex
from ..backend.keys import Keys
from ..backend.values import MAX_VERSION, parse_float, parse_int, text_or_none
from ..errors import ConfigurationError
from ..units import milliseconds

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_TTL = 10.0
MAX_HEARTBEAT_TTL = 86_400.0  # a heartbeat TTL read from Redis above a day is not believed
BEATS_PER_TTL = 3  # a rank beats this many times per heartbeat TTL
CONFIRM_SLACK = 1.0  # seconds a missing heartbeat is given beyond one beat interval before it means death
MIN_STALL = 0.1  # seconds: a probe slower than this (or than half a beat interval) means the server stalled
STATUS_PENDING = "pending"
STATUS_UPDATED = "updated"
ERROR_PREFIX = "error:"
_MGET_RANKS = 256  # ranks per MGET of their four keys: one MGET of 1024 short values holds Redis ~0.2 ms
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
if latest == nil then
  return redis.error_reply('CORRUPT latest is not a version number')
end
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

# KEYS: alive, version, ranks index. ARGV: TTL in ms, the heartbeat value, the applied version, rank.
# Refreshes the heartbeat (PEXPIRE when the value is already this rank's: PEXPIRE
# allocates nothing, so a Redis at maxmemory still takes the beat) and re-creates the
# version key (and its index entry) if Redis lost it; returns 1 when it had to.
_BEAT = """
if redis.call('GET', KEYS[1]) == ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SADD', KEYS[3], ARGV[4])
  redis.call('SET', KEYS[2], ARGV[3])
  return 1
end
return 0
"""


def as_integer(value: object) -> int | None:
    """``value`` as a plain ``int`` when it is an integer of any kind (``int``, ``numpy.int64``, a
    0-d integer tensor: anything with ``__index__``), None otherwise (a bool, a float, text...).
    Ranks reach keys, JSON and comparisons: one plain ``int`` everywhere."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # True is no rank 1 (numpy.bool_ too)
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def check_rank(rank: object) -> int:
    """``rank`` as a plain ``int`` if it is a 1-based integer rank, else a ``ConfigurationError``."""
    value = as_integer(rank)
    if value is None or value < 1:
        raise ConfigurationError(f"rank must be a 1-based integer, got {rank!r} ({type(rank).__name__})")
    return value


def check_worker_count(count: object) -> int:
    """``count`` as a plain ``int`` if it is a positive number of workers (ranks ``1..count``), else a
    ``ConfigurationError``."""
    value = as_integer(count)
    if value is None or value < 1:
        raise ConfigurationError(f"num_workers must be a positive integer, got {count!r} ({type(count).__name__})")
    return value


def parse_ack(message: str) -> tuple[int, int] | None:
    """``(rank, version)`` of a message on the ``acks`` channel (``"<rank>:<version>"``, written by the
    ack script); None for anything else."""
    rank_text, _, version_text = message.partition(":")
    rank = parse_int(rank_text, minimum=1, maximum=MAX_VERSION)
    version = parse_int(version_text, minimum=0, maximum=MAX_VERSION)
    return None if rank is None or version is None else (rank, version)


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
    its last beat on the server's clock (None when there is none, or when the key
    holds something else than a heartbeat). ``heartbeat_ttl``: the TTL the rank
    beats with (None when unknown). ``dead`` is what one read shows; a sync push
    asks ``DeathWatch``, which is not fooled by a server that stalled.
    ``acked_at``: wall time of its last ``"updated"`` ack (None before the first).
    """

    rank: int
    status: str | None
    version: int
    joined: bool
    alive: bool
    heartbeat_age: float | None
    acked_at: float | None = None
    heartbeat_ttl: float | None = None

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
    """Status, version, heartbeat and last ack time of ``ranks`` in one round trip."""
    return _read(client, keyspace, ranks, probe=False)


def observe_rank_states(client: redis.Redis, keyspace: Keys, ranks: Sequence[int]) -> tuple[list[RankState], float]:
    """``read_rank_states`` behind a write probe, and the seconds the round trip took.

    The probe (PEXPIRE of a key that does not exist: a write that allocates nothing
    and changes nothing) waits wherever the ranks' heartbeats wait: a ``CLIENT PAUSE
    WRITE`` lets reads through but holds writes, so only a write probe sees such a
    stall. The round trip's duration tells ``DeathWatch`` whether the server stalled.
    """
    started = time.monotonic()
    states = _read(client, keyspace, ranks, probe=True)
    return states, time.monotonic() - started


def _read(client: redis.Redis, keyspace: Keys, ranks: Sequence[int], *, probe: bool) -> list[RankState]:
    if not ranks:
        return []
    names = []
    for r in ranks:
        names += [keyspace.rank_status(r), keyspace.rank_version(r), keyspace.rank_alive(r), keyspace.rank_acked(r)]
    pipe = client.pipeline(transaction=False)
    if probe:
        pipe.pexpire(keyspace.stall_probe, 1)
    rounds = range(0, len(names), 4 * _MGET_RANKS)
    for start in rounds:  # one command per round: each holds Redis for a bounded time
        # not pipe.mget: a cluster pipeline refuses that name (the names share one slot)
        pipe.execute_command("MGET", *names[start : start + 4 * _MGET_RANKS])
    for r in ranks:
        pipe.pttl(keyspace.rank_alive(r))
    replies = pipe.execute(raise_on_error=False)
    if probe:  # refused (a user without PEXPIRE): the read still counts, only a paused write goes unseen
        if isinstance(replies[0], redis.exceptions.ResponseError):
            log.debug("stall probe refused: %s", replies[0])
        replies = replies[1:]
    failed = next((r for r in replies if isinstance(r, Exception)), None)
    if failed is not None:
        raise failed
    values = [v for reply in replies[: len(rounds)] for v in reply]
    remaining = replies[len(rounds) :]
    states = []
    for i, rank in enumerate(ranks):
        status, version, alive, acked = values[4 * i : 4 * i + 4]
        ttl, age = _heartbeat(alive, remaining[i])
        applied = parse_int(version, minimum=0, maximum=MAX_VERSION) or 0
        states.append(RankState(rank, text_or_none(status), applied, version is not None, alive is not None, age,
                                parse_float(acked, minimum=0.0), ttl))  # fmt: skip
    return states


def _heartbeat(value: object, pttl: object) -> tuple[float | None, float | None]:
    """``(ttl, age)`` of a heartbeat from its value and its PTTL; None for what does not add up
    (a value that is no TTL, a key without expiry, more time left than the TTL)."""
    ttl = parse_float(value, minimum=0.001, maximum=MAX_HEARTBEAT_TTL)
    left = parse_int(pttl, minimum=0)
    if ttl is None or left is None or left > ttl * 1000 + 1:
        return ttl, None
    return ttl, max(0.0, ttl - left / 1000)


def known_ranks(client: redis.Redis, keyspace: Keys) -> list[int]:
    """Every rank that ever joined the namespace (its version key exists), sorted: the ranks of
    the namespace's index (``index.py``; also those a push targeted), never a SCAN of the keyspace."""
    indexed = NamespaceIndex(client, keyspace).ranks()
    found = []
    for start in range(0, len(indexed), _MGET_RANKS):
        batch = indexed[start : start + _MGET_RANKS]
        pipe = client.pipeline(transaction=False)
        for rank in batch:
            pipe.exists(keyspace.rank_version(rank))
        found += [rank for rank, joined in zip(batch, pipe.execute(), strict=True) if joined]
    return found


def status_keys(keyspace: Keys, ranks: Iterable[int]) -> list[str]:
    """The status keys a commit sets to ``STATUS_PENDING`` for ``ranks``."""
    return [keyspace.rank_status(r) for r in ranks]


# ---------------------------------------------------------------------------------------
# Writes (by the rank itself)
# ---------------------------------------------------------------------------------------
def _beat_value(ttl: float) -> str:
    return repr(float(ttl))


def beat_interval(ttl: float) -> float:
    """Seconds between two beats of a rank whose heartbeat lives ``ttl`` seconds."""
    return ttl / BEATS_PER_TTL


def register(client: redis.Redis, keyspace: Keys, rank: int, ttl: float) -> None:
    """Announce ``rank``: applied version 0 (it holds no pushed version yet) and a heartbeat."""
    pipe = client.pipeline(transaction=False)
    pipe.sadd(keyspace.ranks_index, rank)  # before the version key (the index is a superset)
    pipe.set(keyspace.rank_version(rank), 0)
    pipe.set(keyspace.rank_alive(rank), _beat_value(ttl), px=milliseconds(ttl))
    pipe.execute()


def heartbeat(client: redis.Redis, keyspace: Keys, rank: int, version: int, ttl: float) -> bool:
    """Refresh ``rank``'s heartbeat for ``ttl`` seconds; True if its version key had to be re-created.

    In the same round trip the version key is re-created (as ``version``) if Redis
    lost it (restart without persistence, flush): the rank shows up as joined again.
    """
    script = client.register_script(_BEAT)
    recreated = script(keys=[keyspace.rank_alive(rank), keyspace.rank_version(rank), keyspace.ranks_index],
                       args=[milliseconds(ttl), _beat_value(ttl), version, rank])  # fmt: skip
    return bool(recreated)


def ack(client: redis.Redis, keyspace: Keys, rank: int, version: int, status: str) -> int:
    """Record ``status`` for ``version`` (the ack script), publish on ``acks``; returns ``latest``.

    ``STATUS_UPDATED`` also records ``version`` as applied, and the ack's wall time. The status is written only
    while no newer version is committed, so a late ack never hides a newer ``"pending"``.
    """
    script = client.register_script(_ACK)
    latest = script(
        keys=[keyspace.rank_status(rank), keyspace.rank_version(rank), keyspace.latest, keyspace.rank_acked(rank)],
        args=[version, status, keyspace.acks_channel, rank, STATUS_UPDATED, repr(time.time())],
    )
    return int(latest)


class DeathWatch:
    """Which ranks are dead, judged over several reads so that a stalled server fools no one.

    A rank is dead when its heartbeat has stayed missing for one beat interval plus
    ``CONFIRM_SLACK`` seconds *while the server answered promptly*: a live rank beats
    within that time once the server takes writes again. A read whose write probe
    was slow (``observe_rank_states``), or that failed because the caller could not
    reach Redis, means the server stalled: every missing heartbeat starts its wait
    again from the end of the stall. The TTL of each rank is remembered from the
    reads that saw its heartbeat (ranks never seen get ``DEFAULT_HEARTBEAT_TTL``).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._ttls: dict[int, float] = {}
        self._missing_since: dict[int, float] = {}

    def start(self) -> None:
        """Forget what earlier waits saw missing (the TTLs are kept)."""
        self._missing_since.clear()

    def stalled(self) -> None:
        """The caller could not reach Redis: nothing missing so far may count against a rank."""
        now = self._clock()
        for rank in self._missing_since:
            self._missing_since[rank] = now

    def dead(self, states: Iterable[RankState], seconds: float) -> list[int]:
        """The ranks of ``states`` (read in ``seconds``) that are dead for sure."""
        now = self._clock()
        dead = []
        for s in states:
            if s.heartbeat_ttl is not None and s.alive:
                self._ttls[s.rank] = s.heartbeat_ttl
            if not s.dead:
                self._missing_since.pop(s.rank, None)
                continue
            interval = beat_interval(self._ttls.get(s.rank, DEFAULT_HEARTBEAT_TTL))
            if seconds > max(MIN_STALL, interval / 2):  # the server stalled: the wait starts again
                self._missing_since[s.rank] = now
            since = self._missing_since.setdefault(s.rank, now)
            if now - since >= interval + CONFIRM_SLACK:
                dead.append(s.rank)
        return dead

    def suspected(self) -> list[int]:
        """Ranks whose heartbeat is missing but not yet long enough to call them dead."""
        return sorted(self._missing_since)


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
            if client.set(keyspace.rank_alive(rank), _beat_value(ttl), nx=True, px=milliseconds(ttl)):
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

