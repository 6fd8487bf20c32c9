"""Checks of a Redis server's settings against what redis_weights needs.

Each check returns a ``Finding``: a level (``ok``, ``warn`` or ``unsafe``), what
was seen and how to fix it. ``redis-weights doctor`` prints them; the updater and
receiver call ``ensure_server`` at start-up: one ``ConfigurationError`` for a server
that cannot be reached, refuses the credentials, can silently evict the chunks of a
live version, or denies the namespace's rights.

Only read-only commands are sent (INFO, CONFIG GET, ACL WHOAMI/DRYRUN, a
SUBSCRIBE that is undone at once), plus a SET/GET/DEL of one short-lived probe
key when ACL DRYRUN is not allowed. A command the user may not run (managed
services often refuse CONFIG) makes its check a ``warn`` saying what could not be
verified, never an exception.

API::

    findings = check_server(client, Keys("policy"))
    if any(f.unsafe for f in findings): ...
    ensure_server(store.deployment, store.keyspace)   # raises ConfigurationError
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import redis

from .deployment import Deployment
from .errors import ConfigurationError
from .keys import Keys
from .manifest import DEFAULT_CHUNK_SIZE
from .subscriptions import Subscription
from .units import human_bytes
from .values import parse_int, text

log = logging.getLogger(__name__)

OK, WARN, UNSAFE = "ok", "warn", "unsafe"
LEVELS = (OK, WARN, UNSAFE)
MIN_VERSION = (6, 2, 0)  # COPY (rollback), GETDEL, ACL channel rules
RECOMMENDED_VERSION = (7, 0, 0)  # ACL DRYRUN, &channel permissions, multi-part AOF
MEMORY_HEADROOM = 0.9  # warn above 90 % of maxmemory


class UnsafeServerError(ConfigurationError):
    """The server is configured so that it may lose or refuse committed weights."""


@dataclass(frozen=True)
class Finding:
    """One check's verdict: ``level`` is ``ok``, ``warn`` or ``unsafe``; ``fix`` says what to change."""

    check: str
    level: str
    what: str
    fix: str = ""

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")

    @property
    def unsafe(self) -> bool:
        return self.level == UNSAFE

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# Reading the server's state (tolerant of ACLs and servers without CONFIG)
# ---------------------------------------------------------------------------------------
def _info(client: redis.Redis, section: str) -> dict[str, Any] | None:
    try:
        return {text(k): v for k, v in client.info(section).items()}
    except redis.exceptions.ResponseError as exc:
        log.debug("INFO %s refused: %s", section, exc)
        return None


def _config(client: redis.Redis, name: str) -> str | None:
    try:
        values = client.config_get(name)
    except redis.exceptions.ResponseError as exc:  # NOPERM, or CONFIG renamed away
        log.debug("CONFIG GET %s refused: %s", name, exc)
        return None
    for key, value in values.items():
        if text(key) == name:
            return text(value)
    return None


def _parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


# ---------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------
def check_version(client: redis.Redis) -> Finding:
    """Server software and version: 6.2 or newer is needed, 7 or newer recommended."""
    info = _info(client, "server")
    if info is None:
        return Finding("version", WARN, "INFO server is not allowed for this user; version unknown",
                       "grant +info to the user, or check the server version by hand (>= 7.0 recommended)")
    name = "valkey" if "valkey_version" in info else "redis"
    text = str(info.get("valkey_version") or info.get("redis_version") or "0")
    version = _parse_version(text)
    # Valkey 7.2+ keeps reporting redis_version 7.2.4 for compatibility: judge that one.
    compat = _parse_version(str(info.get("redis_version", text)))
    label = f"{name} {text}"
    if compat < MIN_VERSION and version < MIN_VERSION:
        return Finding("version", UNSAFE, f"{label} is older than 6.2 (no COPY, no ACL channel rules)",
                       "upgrade to Redis >= 7.0 or Valkey >= 7.2")
    if compat < RECOMMENDED_VERSION and version < RECOMMENDED_VERSION:
        return Finding("version", WARN, f"{label}: works, but 7.0+ is recommended (ACL DRYRUN, &channel rules)",
                       "upgrade to Redis >= 7.0 or Valkey >= 7.2")
    return Finding("version", OK, label)


def check_eviction(client: redis.Redis) -> Finding:
    """``maxmemory`` and its policy: an ``allkeys-*`` policy can evict chunks of a live version."""
    info = _info(client, "memory")
    if info and "maxmemory_policy" in info:
        policy: str | None = text(info["maxmemory_policy"])
    else:
        policy = _config(client, "maxmemory-policy")
    raw_max = info.get("maxmemory") if info else _config(client, "maxmemory")
    if policy is None:
        return Finding("maxmemory-policy", WARN, "cannot read the eviction policy (INFO and CONFIG refused)",
                       "make sure maxmemory-policy is noeviction (or volatile-*) on this server")
    maxmemory = parse_int(raw_max, minimum=0) or 0
    limit = f"maxmemory {human_bytes(maxmemory)}" if maxmemory else "no maxmemory limit"
    if policy.startswith("allkeys-"):
        if maxmemory == 0:
            return Finding("maxmemory-policy", WARN,
                           f"policy {policy} with {limit}: harmless now, but setting maxmemory would let "
                           "Redis evict weight chunks",
                           "CONFIG SET maxmemory-policy noeviction (and in redis.conf)")
        return Finding("maxmemory-policy", UNSAFE,
                       f"policy {policy} with {limit}: Redis may silently evict chunks of a live version",
                       "CONFIG SET maxmemory-policy noeviction (and in redis.conf), or keep weights "
                       "on an instance of their own")
    if maxmemory and info and "used_memory" in info:
        used = int(info["used_memory"])
        if used > MEMORY_HEADROOM * maxmemory:
            return Finding("maxmemory-policy", WARN,
                           f"policy {policy}, {human_bytes(used)} used of {limit}: the next push may be refused (OOM)",
                           "raise maxmemory, or lower the retention (redis-weights gc --keep 1)")
    return Finding("maxmemory-policy", OK, f"policy {policy}, {limit}")


def check_bulk_len(client: redis.Redis, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Finding:
    """``proto-max-bulk-len`` must admit one chunk."""
    raw = _config(client, "proto-max-bulk-len")
    if raw is None or not raw.isdigit():
        return Finding("proto-max-bulk-len", WARN, "cannot read proto-max-bulk-len (CONFIG GET refused)",
                       f"make sure proto-max-bulk-len is at least the chunk size ({human_bytes(chunk_size)})")
    limit = int(raw)
    if limit < chunk_size:
        return Finding("proto-max-bulk-len", UNSAFE,
                       f"proto-max-bulk-len {human_bytes(limit)} is below the chunk size {human_bytes(chunk_size)}: "
                       "every push will be refused",
                       f"CONFIG SET proto-max-bulk-len 512mb, or use chunk_size <= {limit}")
    return Finding("proto-max-bulk-len", OK, f"{human_bytes(limit)} (chunks of {human_bytes(chunk_size)} fit)")


def check_persistence(client: redis.Redis) -> Finding:
    """RDB/AOF: without persistence a restart loses every version; a failing save stops writes."""
    info = _info(client, "persistence")
    if info is None:
        return Finding("persistence", WARN, "INFO persistence is not allowed for this user",
                       "check by hand that the last RDB/AOF write succeeded")
    if str(info.get("rdb_last_bgsave_status", "ok")) != "ok":
        stop = _config(client, "stop-writes-on-bgsave-error")
        level = UNSAFE if stop in (None, "yes") else WARN
        return Finding("persistence", level, "the last RDB save failed: Redis refuses writes until one succeeds",
                       "fix the disk (space, permissions of 'dir'), then BGSAVE")
    if int(info.get("aof_enabled", 0)) and str(info.get("aof_last_write_status", "ok")) != "ok":
        return Finding("persistence", UNSAFE, "the last AOF write failed: Redis refuses writes",
                       "fix the disk (space, permissions of 'dir')")
    aof = bool(int(info.get("aof_enabled", 0)))
    save = _config(client, "save")
    rdb = bool(save and save.strip())
    if not aof and not rdb and save is not None:
        return Finding("persistence", WARN,
                       "no RDB snapshots and no AOF: a restart loses every version (workers keep their "
                       "weights; the trainer's next push restores one)",
                       "CONFIG SET appendonly yes (or save '3600 1') if versions must survive a restart")
    parts = (["AOF"] if aof else []) + ([f"RDB save '{save}'"] if rdb else [])
    return Finding("persistence", OK, ", ".join(parts) if parts else "persistence settings not readable")


# Commands whose rights the library needs, key/channel arguments in place. ``worker``: every
# process needs them (fetch, ack, heartbeat, wake-ups); the rest only trainers and admin tools
# (allocate, commit, retention, rollback).
_WORKER, _TRAINER = "worker", "trainer"


def _needed_commands(keyspace: Keys) -> list[tuple[str, list[str], str]]:
    chunk = keyspace.chunk("0" * 32)
    return [
        ("GET", [keyspace.latest], _WORKER),
        ("GET", [chunk], _WORKER),
        ("MGET", [keyspace.rank_status(1), keyspace.rank_version(1)], _WORKER),
        ("SET", [keyspace.rank_alive(1), "x"], _WORKER),
        ("EVALSHA", ["0" * 40, "1", keyspace.latest], _WORKER),
        ("SCRIPT", ["LOAD", "return 1"], _WORKER),
        ("SUBSCRIBE", [keyspace.updates_channel, keyspace.acks_channel], _WORKER),
        ("PUBLISH", [keyspace.acks_channel, "0"], _WORKER),
        ("SET", [chunk, "x"], _TRAINER),
        ("PUBLISH", [keyspace.updates_channel, "0"], _TRAINER),
        ("ZRANGE", [keyspace.versions, "0", "-1"], _TRAINER),
        ("ZREM", [keyspace.versions, "1"], _TRAINER),
        ("EXISTS", [chunk], _TRAINER),
        ("DEL", [chunk], _TRAINER),
        ("SCAN", ["0", "MATCH", keyspace.chunk_pattern], _TRAINER),
    ]


def check_acl(client: redis.Redis, keyspace: Keys) -> Finding:
    """Rights of the connected user on the namespace's keys, scripts and channels.

    Missing a right every process needs is ``unsafe``; missing only what trainers
    and admin tools need (a worker-only user) is a ``warn``.
    """
    try:
        user = text(client.execute_command("ACL", "WHOAMI"))
    except redis.exceptions.ResponseError:
        user = "default"
    denied: dict[str, list[str]] = {_WORKER: [], _TRAINER: []}
    try:
        for name, args, role in _needed_commands(keyspace):
            reply = text(client.execute_command("ACL", "DRYRUN", user, name, *args))
            if reply != "OK":
                denied[role].append(f"{name}: {reply}")
    except redis.exceptions.ResponseError as exc:  # no right to ACL DRYRUN (or Redis < 7): probe
        log.debug("ACL DRYRUN refused (%s); probing instead", exc)
        denied = {_WORKER: _probe_rights(client, keyspace), _TRAINER: []}
    ns = keyspace.namespace
    patterns = " ".join(f"~{p}" for p in keyspace.acl_key_patterns)
    rights = "+@read +@write +@scripting +@pubsub +@connection +info"
    fix = f"ACL SETUSER {user} {patterns} &{keyspace.acl_pattern} {rights}"
    if denied[_WORKER]:
        return Finding("acl", UNSAFE, f"user {user!r} lacks rights: " + "; ".join(denied[_WORKER] + denied[_TRAINER]),
                       fix)  # fmt: skip
    if denied[_TRAINER]:
        return Finding("acl", WARN, f"user {user!r} can run a worker but not a trainer or admin tool: "
                                    + "; ".join(denied[_TRAINER]), fix)  # fmt: skip
    return Finding("acl", OK, f"user {user!r} may read, write, run scripts and use the channels of namespace {ns!r}")


def _probe_rights(client: redis.Redis, keyspace: Keys) -> list[str]:
    """Try the commands for real on a probe key that expires by itself, and SUBSCRIBE for a moment."""
    probe = keyspace.probe
    denied: list[str] = []
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("SET", lambda: client.set(probe, b"1", px=10_000)),
        ("GET", lambda: client.get(probe)),
        ("EVAL", lambda: client.eval("return redis.call('GET', KEYS[1])", 1, probe)),
        ("DEL", lambda: client.delete(probe)),
    ]
    for name, step in steps:
        try:
            step()
        except redis.exceptions.ResponseError as exc:
            denied.append(f"{name}: {exc}")
    subscription = Subscription(client, [keyspace.updates_channel, keyspace.acks_channel],
                                what="rights probe", poll_every=1.0)  # fmt: skip
    try:
        refusal = subscription.confirm(timeout=1.0)
    finally:
        subscription.close()
    if refusal is not None:
        denied.append(f"SUBSCRIBE: {refusal}")
    return denied


def check_server(
    client: redis.Redis, keyspace: Keys | None = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> list[Finding]:
    """Every check, in order: version, eviction, bulk length, persistence, ACL rights.

    Connection and authentication errors propagate (there is no server to judge).
    """
    keyspace = keyspace or Keys()
    return [
        check_version(client),
        check_eviction(client),
        check_bulk_len(client, chunk_size),
        check_persistence(client),
        check_acl(client, keyspace),
    ]


def worst(findings: Iterable[Finding]) -> str:
    """The most severe level among ``findings`` (``ok`` when there are none)."""
    return max((f.level for f in findings), key=LEVELS.index, default=OK)


def ensure_no_eviction(client: redis.Redis) -> None:
    """Raise ``UnsafeServerError`` when the server may evict committed weights.

    Meant for the updater and receiver at start-up. A server whose policy cannot be
    read (ACL, fakeredis) passes with a debug log: refusing it would lock out
    managed services that hide CONFIG and INFO.
    """
    finding = check_eviction(client)
    if finding.unsafe:
        raise UnsafeServerError(f"unsafe Redis server: {finding.what}; fix: {finding.fix}")
    if finding.level == WARN:
        log.debug("eviction check: %s", finding.what)


def ensure_reachable(deployment: Deployment, probe_key: str) -> None:
    """Fail at start, with one clear ``ConfigurationError``, when Redis cannot be used.

    Reads ``probe_key`` (a key the caller needs anyway): that proves the server
    answers, the credentials are accepted and the user may read the namespace.
    Bounded by the client's connect timeout and retries, never a hang.
    """
    where = deployment.describe()
    try:
        deployment.client.get(probe_key)
    except redis.exceptions.AuthenticationError as exc:
        raise ConfigurationError(f"Redis at {where} refused the credentials: {exc}") from exc
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise ConfigurationError(f"cannot reach Redis at {where}: {exc}") from exc
    except redis.exceptions.ResponseError as exc:  # NOAUTH, NOPERM, WRONGTYPE
        raise ConfigurationError(f"Redis at {where} refused to read {probe_key!r}: {exc}") from exc


def ensure_server(deployment: Deployment, keyspace: Keys) -> None:
    """Everything a trainer or worker checks at start: reachable, credentials accepted,
    no eviction policy that could drop committed chunks, and the ACL rights the
    namespace needs (keys, scripts, channels). One ``ConfigurationError`` otherwise."""
    ensure_reachable(deployment, keyspace.latest)
    ensure_no_eviction(deployment.client)
    acl = check_acl(deployment.client, keyspace)
    if acl.unsafe:
        raise UnsafeServerError(f"Redis at {deployment.describe()}: {acl.what}; fix: {acl.fix}")
