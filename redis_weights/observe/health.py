"""Checks of a Redis server's settings against what redis_weights needs.

Each check returns a ``Finding``: a level (``ok``, ``warn`` or ``unsafe``), what
was seen and how to fix it. ``redis-weights doctor`` prints them; the updater and
receiver call ``ensure_server`` at start-up: one ``ConfigurationError`` for a server
that cannot be reached, refuses the credentials, can silently evict the chunks of a
live version, denies the namespace's rights, or has a limit that cuts every chunk
transfer (``proto-max-bulk-len``, ``client-query-buffer-limit`` for a trainer's
chunk size; ``client-output-buffer-limit`` for a worker's fetches). When a
connection is cut in the middle of a transfer, ``explain_lost_connection`` says
which of those limits is the likely cause, so errors name it.

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
from dataclasses import asdict, dataclass, replace
from typing import Any

import redis

from ..backend.bulkread import READ_ROUND_BYTES
from ..backend.deployment import LOST, Deployment, given_username
from ..backend.index import CorruptIndexError, NamespaceIndex
from ..backend.keys import Keys
from ..backend.subscriptions import Subscription
from ..backend.values import parse_int, text
from ..errors import ConfigurationError
from ..format.manifest import DEFAULT_CHUNK_SIZE
from ..units import human_bytes

log = logging.getLogger(__name__)

OK, WARN, UNSAFE = "ok", "warn", "unsafe"
LEVELS = (OK, WARN, UNSAFE)
MIN_VERSION = (6, 2, 0)  # COPY (rollback), GETDEL, ACL channel rules
RECOMMENDED_VERSION = (7, 0, 0)  # ACL DRYRUN, &channel permissions, multi-part AOF
MEMORY_HEADROOM = 0.9  # warn above 90 % of maxmemory
_CANNOT_READ = "cannot read"  # how a finding that could not see the setting begins
# io-threads advice, from docs/benchmarks.md ("Server settings: io-threads"): measured only on 2
# cores shared with the trainer and workers, where a 1 GB push to 2 workers with io-threads 2 took
# +7 % and +5 % (Redis 7.0), +21 % and -38 % (Valkey 8.1) in two runs: no consistent effect.
_IO_THREADS_MEASURED = ("on 2 cores shared with the trainer and workers it showed no consistent gain; "
                        "measure yours with scripts/bench.py --neighbour 1GB --server-args")
IO_THREADS_REDIS_TIP = ("on a Redis server with cores to spare (ones the trainer and workers do not use), "
                        "io-threads 4 and io-threads-do-reads yes in redis.conf (restart needed) take socket reads "
                        "and writes off the main thread; " + _IO_THREADS_MEASURED)
IO_THREADS_VALKEY_TIP = ("on a Valkey server with cores to spare (ones the trainer and workers do not use), "
                         "io-threads 4 in valkey.conf takes socket reads and writes off the main thread; "
                         + _IO_THREADS_MEASURED)
IO_THREADS_READS_TIP = ("io-threads-do-reads yes in redis.conf (restart needed) lets the I/O threads also read the "
                        "chunks a trainer writes")


class UnsafeServerError(ConfigurationError):
    """The server is configured so that it may lose or refuse committed weights."""


@dataclass(frozen=True)
class Finding:
    """One check's verdict: ``level`` is ``ok``, ``warn`` or ``unsafe``; ``fix`` says what to change."""

    check: str
    level: str
    what: str
    fix: str = ""
    node: str = ""  # ``host:port`` of the cluster node it is about ("" for a standalone server)

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")

    @property
    def unsafe(self) -> bool:
        return self.level == UNSAFE

    def to_dict(self) -> dict[str, str]:
        out = asdict(self)
        if not self.node:
            del out["node"]
        return out


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
    used = parse_int(info.get("used_memory"), minimum=0) if info else None
    if maxmemory and used is not None:
        if used > MEMORY_HEADROOM * maxmemory:
            return Finding("maxmemory-policy", WARN,
                           f"policy {policy}, {human_bytes(used)} used of {limit}: the next push may be refused (OOM)",
                           "raise maxmemory, or lower the retention (redis-weights gc --keep 1)")
    return Finding("maxmemory-policy", OK, f"policy {policy}, {limit}")


@dataclass(frozen=True)
class _ChunkLimit:
    """A server limit on what a client sends in one command, which must admit one chunk's SET
    (Redis cuts the connection of a longer one)."""

    setting: str
    exceeded: bool  # the limit must exceed the chunk (the query buffer holds the command around the value)
    consequence: str
    config_fix: str


_BULK_LEN = _ChunkLimit("proto-max-bulk-len", False, "every push will be refused",
                        "CONFIG SET proto-max-bulk-len 512mb")  # fmt: skip
_QUERY_BUFFER = _ChunkLimit("client-query-buffer-limit", True, "Redis cuts the connection of every push",
                            "CONFIG SET client-query-buffer-limit 1gb")  # fmt: skip


def _check_chunk_limit(client: redis.Redis, limit_of: _ChunkLimit, chunk_size: int) -> Finding:
    """The one check behind ``check_bulk_len`` and ``check_query_buffer``."""
    name, size = limit_of.setting, human_bytes(chunk_size)
    limit = parse_int(_config(client, name), minimum=0)
    if limit is None:
        bound = "above" if limit_of.exceeded else "at least"
        return Finding(name, WARN, f"{_CANNOT_READ} {name} (CONFIG GET refused)",
                       f"make sure {name} is {bound} the chunk size ({size})")  # fmt: skip
    if limit < chunk_size or (limit_of.exceeded and limit == chunk_size):
        relation, most = ("does not exceed", "<") if limit_of.exceeded else ("is below", "<=")
        return Finding(name, UNSAFE, f"{name} {human_bytes(limit)} {relation} the chunk size {size}: "
                                     f"{limit_of.consequence}",
                       f"{limit_of.config_fix}, or use chunk_size {most} {limit}")  # fmt: skip
    return Finding(name, OK, f"{human_bytes(limit)} (chunks of {size} fit)")


def check_bulk_len(client: redis.Redis, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Finding:
    """``proto-max-bulk-len`` must admit one chunk (Redis cuts the connection of a longer SET)."""
    return _check_chunk_limit(client, _BULK_LEN, chunk_size)


def check_query_buffer(client: redis.Redis, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Finding:
    """``client-query-buffer-limit`` must admit one chunk's SET (Redis cuts the connection of a longer one)."""
    return _check_chunk_limit(client, _QUERY_BUFFER, chunk_size)


def output_buffer_limits(client: redis.Redis) -> tuple[int, int] | None:
    """``(hard, soft)`` bytes of ``client-output-buffer-limit`` for normal clients (0: no limit);
    None when it cannot be read or does not parse."""
    raw = _config(client, "client-output-buffer-limit")
    words = (raw or "").split()
    for i in range(0, len(words) - 3, 4):
        if words[i] == "normal":
            hard, soft = (parse_int(w, minimum=0) for w in words[i + 1 : i + 3])
            return (hard, soft) if hard is not None and soft is not None else None
    return None


def check_output_buffer(client: redis.Redis, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Finding:
    """``client-output-buffer-limit`` for normal clients must let a worker's fetch through.

    Redis disconnects a client whose pending replies exceed the hard limit (or stay
    above the soft one): below one chunk every fetch is cut; below a fetch round
    (``bulkread.READ_ROUND_BYTES`` of pipelined replies) fetches of big models may be.
    """
    check, fix = "client-output-buffer-limit", "CONFIG SET client-output-buffer-limit 'normal 0 0 0' (Redis's default)"
    limits = output_buffer_limits(client)
    if limits is None:
        return Finding(check, WARN, f"{_CANNOT_READ} client-output-buffer-limit (CONFIG GET refused)",
                       "make sure the normal class has no limit ('normal 0 0 0', the default)")
    hard, soft = limits
    lowest = min((x for x in limits if x), default=0)
    if not lowest:
        return Finding(check, OK, "no limit for normal clients")
    what = f"client-output-buffer-limit for normal clients is {human_bytes(hard)} (hard), {human_bytes(soft)} (soft)"
    if lowest < chunk_size:
        return Finding(check, UNSAFE, f"{what}, below the chunk size {human_bytes(chunk_size)}: Redis cuts every "
                                      "worker's fetch", fix)  # fmt: skip
    if lowest < READ_ROUND_BYTES:
        return Finding(check, WARN, f"{what}, below the {human_bytes(READ_ROUND_BYTES)} of replies a worker's fetch "
                                    "may have in flight: fetches of big models may be cut", fix)  # fmt: skip
    return Finding(check, OK, what)


def check_persistence(client: redis.Redis) -> Finding:
    """RDB/AOF: without persistence a restart loses every version; a failing save stops writes."""
    info = _info(client, "persistence")
    if info is None:
        return Finding("persistence", WARN, "INFO persistence is not allowed for this user",
                       "check by hand that the last RDB/AOF write succeeded")
    if text(info.get("rdb_last_bgsave_status", "ok")) != "ok":
        stop = _config(client, "stop-writes-on-bgsave-error")
        level = UNSAFE if stop in (None, "yes") else WARN
        return Finding("persistence", level, "the last RDB save failed: Redis refuses writes until one succeeds",
                       "fix the disk (space, permissions of 'dir'), then BGSAVE")
    aof = bool(parse_int(info.get("aof_enabled", 0)))
    if aof and text(info.get("aof_last_write_status", "ok")) != "ok":
        return Finding("persistence", UNSAFE, "the last AOF write failed: Redis refuses writes",
                       "fix the disk (space, permissions of 'dir')")
    save = _config(client, "save")
    rdb = bool(save and save.strip())
    if not aof and not rdb and save is not None:
        return Finding("persistence", WARN,
                       "no RDB snapshots and no AOF: a restart loses every version (workers keep their "
                       "weights; the trainer's next push restores one)",
                       "CONFIG SET appendonly yes (or save '3600 1') if versions must survive a restart")
    parts = (["AOF"] if aof else []) + ([f"RDB save '{save}'"] if rdb else [])
    return Finding("persistence", OK, ", ".join(parts) if parts else "persistence settings not readable")


def check_io_threads(client: redis.Redis) -> Finding:
    """``io-threads``: advice, never a problem (the level is ``ok`` either way). With one I/O
    thread the main thread also copies every chunk to and from the sockets; more threads take
    that off it where the server has cores to spare (see docs/operations/doctor.md)."""
    threads = parse_int(_config(client, "io-threads"), minimum=1)
    if threads is None:
        return Finding("io-threads", OK, "cannot read io-threads (CONFIG refused); advice only")
    info = _info(client, "server") or {}
    valkey = "valkey_version" in info
    if threads > 1:
        reads = _config(client, "io-threads-do-reads")
        if not valkey and reads == "no":
            return Finding("io-threads", OK, f"io-threads {threads}, reads on the main thread",
                           IO_THREADS_READS_TIP)
        return Finding("io-threads", OK, f"io-threads {threads}")
    return Finding("io-threads", OK, "io-threads 1: the main thread does all socket I/O",
                   IO_THREADS_VALKEY_TIP if valkey else IO_THREADS_REDIS_TIP)


# Commands whose rights the library needs, key/channel arguments in place. ``worker``: every
# process needs them (fetch, ack, heartbeat, wake-ups); the rest only trainers and admin tools
# (allocate, commit, retention, rollback, the sync wait's reads).
WORKER, TRAINER = "worker", "trainer"


def _needed_commands(keyspace: Keys) -> list[tuple[str, list[str], str]]:
    chunk = keyspace.chunk("0" * 32)
    return [
        ("GET", [keyspace.latest], WORKER),
        ("GET", [chunk], WORKER),
        ("MGET", [keyspace.rank_status(1), keyspace.rank_version(1)], WORKER),
        ("SET", [keyspace.rank_alive(1), "x"], WORKER),
        ("SADD", [keyspace.ranks_index, "1"], WORKER),
        ("PEXPIRE", [keyspace.rank_alive(1), "1000"], WORKER),
        ("EXISTS", [keyspace.rank_version(1)], WORKER),
        ("EVALSHA", ["0" * 40, "1", keyspace.latest], WORKER),
        ("SCRIPT", ["LOAD", "return 1"], WORKER),
        ("SUBSCRIBE", [keyspace.updates_channel, keyspace.acks_channel], WORKER),
        ("PUBLISH", [keyspace.acks_channel, "0"], WORKER),
        ("HGET", [keyspace.plan, "version"], WORKER),
        ("HSTRLEN", [keyspace.plan, "manifest"], WORKER),
        ("GET", [keyspace.counter], WORKER),  # a plan above it is ignored (staging.read_plan)
        ("SET", [chunk, "x"], TRAINER),
        ("PUBLISH", [keyspace.updates_channel, "0"], TRAINER),
        ("HSET", [keyspace.plan, "version", "0"], TRAINER),
        ("ZRANGE", [keyspace.versions, "0", "-1"], TRAINER),
        ("ZREM", [keyspace.versions, "1"], TRAINER),
        ("EXISTS", [chunk], TRAINER),
        ("DEL", [chunk], TRAINER),
        ("SADD", [keyspace.objects_index, "0" * 32], TRAINER),
        ("SSCAN", [keyspace.objects_index, "0"], TRAINER),
        ("SREM", [keyspace.objects_index, "0" * 32], TRAINER),
        ("PTTL", [keyspace.rank_alive(1)], TRAINER),
        ("PEXPIRE", [keyspace.stall_probe, "1"], TRAINER),
    ]


def _user(client: redis.Redis) -> str:
    """The user this client is logged in as: ``ACL WHOAMI``, else the user name it was given
    (a user may lack the right to WHOAMI), else ``default`` (AUTH with a password alone)."""
    try:
        return text(client.execute_command("ACL", "WHOAMI"))
    except redis.exceptions.ResponseError:
        return given_username(client) or "default"


def check_acl(client: redis.Redis, keyspace: Keys, role: str = WORKER) -> Finding:
    """Rights of the connected user on the namespace's keys, scripts and channels.

    Missing a right every process needs is ``unsafe``; missing only what trainers
    and admin tools need is ``unsafe`` for ``role="trainer"`` (its retention and
    commits would fail) and a ``warn`` otherwise (a worker-only user is fine).
    """
    user = _user(client)
    denied: dict[str, list[str]] = {WORKER: [], TRAINER: []}
    try:
        for name, args, needed_by in _needed_commands(keyspace):
            reply = text(client.execute_command("ACL", "DRYRUN", user, name, *args))
            if reply != "OK":
                denied[needed_by].append(f"{name}: {reply}")
    except redis.exceptions.ResponseError as exc:  # no right to ACL DRYRUN (or Redis < 7): probe
        log.debug("ACL DRYRUN refused (%s); probing instead", exc)
        denied = _probe_rights(client, keyspace)
    ns = keyspace.namespace
    patterns = " ".join(f"~{p}" for p in keyspace.acl_key_patterns)
    rights = "+@read +@write +@scripting +@pubsub +@connection +info"
    fix = f"ACL SETUSER {user} {patterns} &{keyspace.acl_pattern} {rights}"
    if denied[WORKER] or (role == TRAINER and denied[TRAINER]):
        return Finding("acl", UNSAFE, f"user {user!r} lacks rights: " + "; ".join(denied[WORKER] + denied[TRAINER]),
                       fix)  # fmt: skip
    if denied[TRAINER]:
        return Finding("acl", WARN, f"user {user!r} can run a worker but not a trainer or admin tool: "
                                    + "; ".join(denied[TRAINER]), fix)  # fmt: skip
    return Finding("acl", OK, f"user {user!r} may read, write, run scripts and use the channels of namespace {ns!r}")


def _probe_rights(client: redis.Redis, keyspace: Keys) -> dict[str, list[str]]:
    """Try the commands for real, on keys where they change nothing (a probe key that expires
    by itself, a member the version set never holds), and SUBSCRIBE for a moment."""
    probe = keyspace.probe
    denied: dict[str, list[str]] = {WORKER: [], TRAINER: []}
    steps: list[tuple[str, str, Callable[[], Any]]] = [
        ("SET", WORKER, lambda: client.set(probe, b"1", px=10_000)),
        ("GET", WORKER, lambda: client.get(probe)),
        ("PEXPIRE", WORKER, lambda: client.pexpire(probe, 10_000)),
        ("EVAL", WORKER, lambda: client.eval("return redis.call('GET', KEYS[1])", 1, probe)),
        ("PTTL", TRAINER, lambda: client.pttl(probe)),
        ("ZREM", TRAINER, lambda: client.zrem(keyspace.versions, "doctor-probe")),
        ("DEL", TRAINER, lambda: client.delete(probe)),
    ]
    for name, needed_by, step in steps:
        try:
            step()
        except redis.exceptions.ResponseError as exc:
            if not str(exc).startswith(("MOVED", "ASK")):  # a cluster node checks ACLs before redirecting
                denied[needed_by].append(f"{name}: {exc}")
    subscription = Subscription(client, [keyspace.updates_channel, keyspace.acks_channel],
                                what="rights probe", poll_every=1.0)  # fmt: skip
    try:
        refusal = subscription.confirm(timeout=1.0)
    finally:
        subscription.close()
    if refusal is not None:
        denied[WORKER].append(f"SUBSCRIBE: {refusal}")
    return denied


def check_server(
    client: redis.Redis, keyspace: Keys | None = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> list[Finding]:
    """Every check, in order: version, eviction, the transfer limits, persistence, ACL rights,
    and io-threads (advice only).

    Connection and authentication errors propagate (there is no server to judge).
    """
    keyspace = keyspace or Keys()
    return [
        check_version(client),
        check_eviction(client),
        check_bulk_len(client, chunk_size),
        check_query_buffer(client, chunk_size),
        check_output_buffer(client, chunk_size),
        check_persistence(client),
        check_acl(client, keyspace),
        check_io_threads(client),
    ]


def check_deployment(
    deployment: Deployment, keyspace: Keys | None = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> list[Finding]:
    """``check_server`` on every node of the deployment (``doctor``): where one node holds every
    key (standalone, Sentinel) its findings as they are; where keys spread over nodes (a Redis
    Cluster), the cluster's state first, then every check of every master and replica the
    deployment names, each finding naming its node (ACLs and settings are per node)."""
    if deployment.single_node:
        return check_server(deployment.client, keyspace, chunk_size=chunk_size)
    findings = [check_cluster_state(deployment)]
    masters = dict(deployment.masters())
    for name, client in deployment.nodes():
        try:
            found = check_server(client, keyspace, chunk_size=chunk_size)
        except LOST as exc:  # a failed node the slot map still lists: a master's slots are not served
            found = [Finding("reachable", UNSAFE if name in masters else WARN, f"cannot reach the node: {exc}",
                             "restart it, or wait for its failover (CLUSTER NODES)")]  # fmt: skip
        findings += [replace(f, node=name) for f in found]
    return findings


def check_cluster_state(deployment: Deployment) -> Finding:
    """A cluster must serve every slot (``cluster_state:ok`` on every master); replicas are counted."""
    masters, nodes = deployment.masters(), deployment.nodes()
    bad = []
    for name, client in masters:
        try:
            state = text(client.execute_command("CLUSTER", "INFO")).partition("cluster_state:")[2].split()[:1]
        except redis.exceptions.RedisError as exc:
            bad.append(f"{name}: {exc}")
            continue
        if state != ["ok"]:
            bad.append(f"{name}: cluster_state {state[0] if state else '?'}")
    what = f"{len(masters)} masters, {len(nodes) - len(masters)} replicas"
    if bad:
        return Finding("cluster", UNSAFE, f"{what}; not every slot is served: " + "; ".join(bad),
                       "see CLUSTER INFO and CLUSTER NODES on the nodes named (a failed master without a replica?)")
    return Finding("cluster", OK, f"{what}; cluster_state ok")


def check_namespace(deployment: Deployment, keyspace: Keys, *, deep: bool = False) -> list[Finding]:
    """The server's key count (what the library's costs must not depend on) and whether the
    namespace's index (``index.py``) agrees with what the namespace holds (``deep``: a SCAN of
    the namespace's own patterns finds nothing the index misses)."""
    total = 0
    for _, client in deployment.masters():
        total += int(client.dbsize())
    findings = [Finding("keys", OK, f"{total:,} keys in the database (this namespace's costs do not grow with them)")]
    index = NamespaceIndex(deployment.client, keyspace)
    try:
        check = index.verify(deep=deep)
    except CorruptIndexError as exc:
        return [*findings, Finding("index", UNSAFE, str(exc), "delete the key named, then `redis-weights reindex`")]
    what = f"{check.objects:,} objects, {check.ranks} ranks indexed"
    if not check.complete:
        return [*findings, Finding("index", WARN, f"{what}; the namespace predates its index (its older objects are "
                                   "never collected)", "run `redis-weights reindex` (the trainer does it at its "
                                   "first push)")]  # fmt: skip
    if not deep:
        return [*findings, Finding("index", OK, what, "`doctor --deep` compares it with a SCAN of the namespace")]
    if not check.agrees:
        return [*findings, Finding("index", UNSAFE, f"{what}; a SCAN found {check.unindexed_objects} object(s) and "
                                   f"{check.unindexed_ranks} rank(s) it misses", "run `redis-weights reindex`")]
    gone = f"; {check.gone_objects} indexed id(s) name objects that are gone (swept at the next GC)" \
        if check.gone_objects else ""  # fmt: skip
    return [*findings, Finding("index", OK, f"{what}; a SCAN of the namespace agrees{gone}")]


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
    except LOST as exc:
        raise ConfigurationError(f"cannot reach Redis at {where}: {exc}") from exc
    except redis.exceptions.ResponseError as exc:  # NOAUTH, NOPERM, WRONGTYPE
        raise ConfigurationError(f"Redis at {where} refused to read {probe_key!r}: {exc}") from exc


def ensure_server(deployment: Deployment, keyspace: Keys, *, chunk_size: int | None = None) -> None:
    """Everything a trainer or worker checks at start: reachable, credentials accepted,
    no eviction policy that could drop committed chunks, no transfer limit that cuts
    every chunk, and the ACL rights the namespace needs (keys, scripts, channels).

    ``chunk_size``: a trainer's (it is checked against the limits on what a client
    sends, and the trainer's rights are required too); None for a worker (the limit
    on what Redis sends is checked against the default chunk size). One
    ``ConfigurationError`` otherwise; a setting that cannot be read passes.
    """
    ensure_reachable(deployment, keyspace.latest)
    role = WORKER if chunk_size is None else TRAINER
    for name, client in deployment.nodes():  # a cluster's every node: settings and ACLs are per node
        try:
            ensure_no_eviction(client)
            if role == TRAINER:
                limits = [check_bulk_len(client, chunk_size), check_query_buffer(client, chunk_size)]
            else:
                limits = [check_output_buffer(client, DEFAULT_CHUNK_SIZE)]
            findings = [*limits, check_acl(client, keyspace, role)]
        except LOST as exc:  # a cluster node that failed (its failover is under way): the others serve
            log.warning("Redis at %s cannot be reached (%s); not checked", name, exc)
            continue
        for finding in findings:
            if finding.unsafe:
                raise UnsafeServerError(f"Redis at {name}: {finding.what}; fix: {finding.fix}")


def explain_lost_connection(client: redis.Redis, *, reading: bool, chunk_size: int = DEFAULT_CHUNK_SIZE) -> str | None:
    """Why Redis may have cut a connection in the middle of a chunk transfer: the server
    limit that is too small for it (``what; fix: ...``), or None when none is (or none
    can be read: Redis may be gone). ``reading``: a worker's fetch, else a trainer's upload."""
    checks = [check_output_buffer] if reading else [check_bulk_len, check_query_buffer]
    try:
        findings = [check(client, chunk_size) for check in checks]
    except redis.exceptions.RedisError:
        return None
    causes = [f"{f.what}; fix: {f.fix}" for f in findings if f.level != OK and not f.what.startswith(_CANNOT_READ)]
    return "; ".join(causes) or None
