"""The version registry: allocate, commit atomically, read, list, delete, retain, and mark-and-sweep GC.

A version is a manifest (``rw:{ns}:v:<N>:manifest``) over content-addressed chunks
and patches (``chunkstore.py``). The push that uses these steps, top to bottom, is
``push.py``; the primitives here are:

* ``begin``: add the push's token to the index of pushes, record the objects the new
  manifest may reference in a pending record (TTL ``pending_ttl``), then read the GC
  epoch (waiting while a GC holds its lease);
* ``commit``: one Lua script in the namespace's slot moves the staged manifest into
  place, adds the version to the sorted set, moves ``latest``, marks the targeted
  ranks ``"pending"``, drops the pending record and its token, publishes the version
  number and returns how many versions are committed (the push collects garbage only
  when that exceeds its retention).

The script cannot check that the chunks exist on a Cluster (they live in other
slots); instead it refuses (``GcRaceError``) when the GC epoch moved or a GC holds
its lease, because a GC that ran since ``begin`` may have deleted an object the push
found present.

GC (``collect``) takes the lease and bumps the epoch, deletes the manifests beyond
the retention (plain ZREM and DEL, one version at a time), marks every object a
retained manifest or a live pending record references, and sweeps the candidates
that are not marked: the objects of the versions it dropped (an *incremental* sweep:
its reads grow with the versions it drops, not with the namespace), or every object
of the namespace's index (a *full* sweep: when asked, when a push crashed, or when
the index holds more ids than the retained and dropped versions explain: leftovers
of a crash). Deleting goes in batches of ``DELETE_BATCH`` keys, each its own round
trip (no MULTI, no long script: a 1 GB version is never freed in one call, and
deleting works while Redis is over ``maxmemory``). When Redis is too full to take the
lease, the GC deletes without it and takes it as soon as its first deletions freed
memory, re-marking before it goes on. Nothing here SCANs (``index.py``).

``latest`` never moves backwards: a commit of a version not above it is refused
(``StaleVersionError``), which is what stops a second, stale trainer.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

from ..backend.deployment import Deployment
from ..backend.keys import Keys
from ..backend.values import MAX_VERSION, parse_int, text
from ..errors import CodecError, LegacyFormatError, RedisWeightsError, StaleVersionError, VersionNotFoundError
from ..format.manifest import MAX_MANIFEST_BYTES, Manifest, load_json
from ..units import milliseconds
from . import ranks
from .chunkstore import DELETE_BATCH, ChunkStore

log = logging.getLogger(__name__)

DEFAULT_RETENTION = 3
DEFAULT_PENDING_TTL = 900.0  # seconds a push's pending record protects its objects
GC_LEASE_TTL = 30.0  # seconds a GC's lease lives without renewal (a dead GC stops blocking commits)
_LEASE_WAIT = 0.02  # seconds between checks while a push waits for a GC to finish
_MANIFEST_ROUND = 100  # pending records per round trip while marking
_LEGACY_MAX_CHUNKS = 1 << 20  # chunk keys a format-1 manifest may name (deleted with it)
_MANIFEST_PIECE = 1024 * 1024  # bytes per GETRANGE of a manifest (2.2 MB: the manifest of a 100 GB model)

# KEYS: counter, latest. ARGV: floor (the caller's last version), the largest version.
# Returns {version, latest}. INCR, but never at or below max(floor, latest): a Redis
# that lost its data, or a second trainer, cannot make version numbers go backwards.
# A counter or latest that is no version number is refused (CORRUPT), not worked around.
_ALLOCATE = """
local function version(key)
  local value = redis.call('GET', key)
  local n = tonumber(value or '0')
  if n == nil or n < 0 or n ~= math.floor(n) or n >= tonumber(ARGV[2]) then
    return nil, redis.error_reply('CORRUPT ' .. key .. ' holds ' .. string.sub(tostring(value), 1, 40) ..
                                  ', not a version number')
  end
  return n
end
local counter, err = version(KEYS[1])
if err then return err end
local latest, err2 = version(KEYS[2])
if err2 then return err2 end
local n = redis.call('INCR', KEYS[1])
local floor = math.max(tonumber(ARGV[1]), latest)
if n <= floor then
  n = floor + 1
  redis.call('SET', KEYS[1], n)
end
return {n, latest}
"""

# KEYS: latest, versions, manifest, gc epoch, gc lease, pending record, staged manifest, pushes index,
#       ranks index, status_1..status_m, object_1..object_k
# ARGV: version, epoch seen by the push, m, updates channel, pending status, k, push token, rank_1..rank_m
# (the targeted ranks enter the ranks index with their status key: the index names every rank key)
# Returns {1, committed versions, other pushes in flight} for a commit, {0, ...} for a retry of
# one that is already latest (idempotent). The manifest was written beforehand to the staged
# key (a plain SET, with the push's TTL): the script only RENAMEs it, so its run does not
# grow with the manifest (an ARGV of 2 MB, the manifest of a 100 GB model, held Redis ~8 ms).
# The objects (k > 0 where one node holds every key: standalone, Sentinel) must all be
# there: a client that reconnected to a promoted replica mid-push may have sent part
# of the chunks to the old primary only (MISSING: the push checks and uploads again).
# The PUBLISH is only a hint (workers poll latest): refused, it must not fail a
# commit that has already happened.
_COMMIT = """
local v = tonumber(ARGV[1])
local m = tonumber(ARGV[3])
local latest = tonumber(redis.call('GET', KEYS[1]) or '0')
if latest == nil then
  return redis.error_reply('CORRUPT ' .. KEYS[1] .. ' is not a version number')
end
if latest == v and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('DEL', KEYS[6], KEYS[7])
  redis.call('SREM', KEYS[8], ARGV[7])
  return {0, redis.call('ZCARD', KEYS[2]), redis.call('SCARD', KEYS[8])}
end
if latest >= v then
  return redis.error_reply('STALE ' .. latest)
end
if (redis.call('GET', KEYS[4]) or '0') ~= ARGV[2] or redis.call('EXISTS', KEYS[5]) == 1 then
  return redis.error_reply('GCRACE')
end
if redis.call('EXISTS', KEYS[7]) == 0 then
  return redis.error_reply('NOSTAGED')
end
local absent = 0
for j = 1, tonumber(ARGV[6] or '0') do
  absent = absent + 1 - redis.call('EXISTS', KEYS[9 + m + j])
end
if absent > 0 then
  return redis.error_reply('MISSING ' .. absent)
end
redis.call('RENAME', KEYS[7], KEYS[3])
redis.call('PERSIST', KEYS[3])
redis.call('ZADD', KEYS[2], v, v)
redis.call('SET', KEYS[1], v)
redis.call('DEL', KEYS[6])
redis.call('SREM', KEYS[8], ARGV[7])
for j = 1, m do
  redis.call('SADD', KEYS[9], ARGV[7 + j])
  redis.call('SET', KEYS[9 + j], ARGV[5])
end
redis.pcall('PUBLISH', ARGV[4], v)
return {1, redis.call('ZCARD', KEYS[2]), redis.call('SCARD', KEYS[8])}
"""

# KEYS: lease. ARGV: token, ttl ms. Renew the lease if this GC still holds it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lease. ARGV: token. Release the lease if this GC still holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class GcRaceError(RedisWeightsError):
    """A commit refused because a GC ran (or runs) since the push checked its objects: check again."""


class ObjectsMissingError(GcRaceError):
    """A commit refused because objects the push found or uploaded are not on the node that
    commits (a failover to a replica that had not received them): check and upload again."""


@dataclass(frozen=True)
class Commit:
    """What a commit did: whether it committed (False: a retry found it committed already), how
    many versions are committed now (the push collects garbage when beyond its retention), and
    how many other pushes the index lists as in flight (one may have crashed)."""

    committed: bool
    versions: int
    pushes: int = 0


@dataclass(frozen=True)
class GcReport:
    """What one GC did: the versions it deleted, the objects it deleted, whether it swept the
    whole index (``full``) or only the dropped versions' objects, and the keys it read."""

    versions: tuple[int, ...] = ()
    objects: int = 0
    full: bool = False
    keys_read: int = 0
    skipped: bool = False  # another GC held the lease


def producer_id() -> str:
    """``host:pid`` of this process, recorded in every manifest it commits."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _version(value: Any, key: str) -> int:
    """A version number read from ``key`` (0 when the key is missing); ``CodecError`` for anything else."""
    if value is None:
        return 0
    number = parse_int(value, minimum=0, maximum=MAX_VERSION)
    if number is None:
        raise CodecError(f"{key} holds {text(value)[:40]!r}, not a version number (written by hand?): "
                         "set it to the newest committed version, see `redis-weights versions`")  # fmt: skip
    return number


def _oom(exc: redis.exceptions.RedisError) -> bool:
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or "OOM" in str(exc)


class VersionRegistry:
    """Versions of one namespace in Redis (see the module docstring for the protocol)."""

    def __init__(self, deployment: Deployment, keyspace: Keys) -> None:
        self.deployment = deployment  # the store's: its client is never closed here
        self.client = client = deployment.client
        self.keyspace = keyspace
        self.chunks = ChunkStore(client, keyspace, deployment)
        self._allocate = client.register_script(_ALLOCATE)
        self._commit = client.register_script(_COMMIT)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    # -- writing ------------------------------------------------------------------------
    def allocate(self, floor: int = 0) -> int:
        """A fresh version number above ``floor`` and above ``latest``."""
        return self.allocate_after(floor)[0]

    def allocate_after(self, floor: int = 0) -> tuple[int, int]:
        """``(a fresh version above floor and latest, latest as it was)``, in one round trip."""
        k = self.keyspace
        version, latest = self._allocate(keys=[k.counter, k.latest], args=[floor, MAX_VERSION])
        return int(version), int(latest)

    def begin(self, token: str, objects: Iterable[str], pending_ttl: float = DEFAULT_PENDING_TTL) -> str:
        """Record the objects a push relies on (GC spares them until the commit or ``pending_ttl``),
        then return the GC epoch the commit must still see; waits while a GC holds its lease.
        The token enters the index of pushes before its record exists (``index.py``)."""
        k = self.keyspace
        ttl_ms = milliseconds(pending_ttl)
        record = ",".join(sorted(set(objects)))
        deadline = time.monotonic() + 2 * GC_LEASE_TTL
        while True:
            pipe = self.client.pipeline(transaction=False)  # in order: the record is written before the read
            pipe.sadd(k.pushes_index, token)
            pipe.set(k.pending(token), record, px=ttl_ms)
            pipe.get(k.gc_epoch)
            pipe.exists(k.gc_lease)
            _, _, epoch, busy = pipe.execute()
            if not busy or time.monotonic() >= deadline:
                return (epoch or b"0").decode() if isinstance(epoch, bytes) else str(epoch or "0")
            time.sleep(_LEASE_WAIT)

    def protect(self, token: str, objects: Iterable[str], pending_ttl: float = DEFAULT_PENDING_TTL) -> None:
        """Add objects to a push's pending record (the patches its plan made): APPEND, so the record of
        a big model is not written again; the TTL is set again too (an APPEND to an expired record
        creates it, and it must still expire)."""
        key = self.keyspace.pending(token)
        pipe = self.client.pipeline(transaction=False)  # one key, one slot
        pipe.append(key, "".join(f",{o}" for o in sorted(set(objects))))
        pipe.pexpire(key, milliseconds(pending_ttl))
        pipe.execute()

    def end(self, token: str) -> None:
        """Drop a push's pending record, staged manifest and token (its push failed): its objects
        become garbage unless referenced."""
        k = self.keyspace
        pipe = self.client.pipeline(transaction=False)  # one key per DEL: a cluster pipeline takes no other
        pipe.delete(k.pending(token))
        pipe.delete(k.staged_manifest(token))
        pipe.srem(k.pushes_index, token)
        pipe.execute()

    def commit(
        self, manifest: Manifest, pending_ranks: Iterable[int] = (), *, epoch: str, token: str,
        pending_ttl: float = DEFAULT_PENDING_TTL,
    ) -> Commit:
        """Make ``manifest.version`` the latest, in one atomic step (see ``_COMMIT``): the manifest
        is staged first with a plain SET (TTL ``pending_ttl``; nothing points at it yet), then the
        script moves it into place."""
        k, v = self.keyspace, manifest.version
        targets = list(pending_ranks)
        staged = k.staged_manifest(token)
        keys = [k.latest, k.versions, k.manifest(v), k.gc_epoch, k.gc_lease, k.pending(token), staged, k.pushes_index,
                k.ranks_index]
        keys += ranks.status_keys(k, targets)
        checked = sorted(manifest.objects()) if self.deployment.single_node else []  # else in other slots
        keys += [k.chunk(i) for i in checked]
        self.client.set(staged, manifest.to_json(), px=max(1, int(pending_ttl * 1000)))
        try:
            done, count, pushes = self._commit(keys=keys, args=[v, epoch, len(targets), k.updates_channel,
                                                        ranks.STATUS_PENDING, len(checked), token, *targets])  # fmt: skip
        except redis.exceptions.ResponseError as exc:
            text = str(exc)
            if text.startswith("STALE"):
                raise StaleVersionError(
                    f"version {v} refused: latest is already {text.split()[1]} "
                    "(is a second trainer pushing to this namespace?)"
                ) from exc
            if text.startswith("GCRACE"):
                raise GcRaceError(f"version {v}: a garbage collection ran during the push; checking again") from exc
            if text.startswith("MISSING"):
                raise ObjectsMissingError(
                    f"version {v}: {text.split()[1]} object(s) the push relies on are not on the server that "
                    "commits (a failover to a replica that had not received them?); checking again"
                ) from exc
            raise
        return Commit(bool(done), int(count), int(pushes))

    # -- reading ------------------------------------------------------------------------
    def latest(self) -> int:
        """The newest committed version, 0 when there is none."""
        return _version(self.client.get(self.keyspace.latest), self.keyspace.latest)

    def exists(self, version: int) -> bool:
        """Whether the manifest of ``version`` is in Redis (committed and not deleted)."""
        return bool(self.client.exists(self.keyspace.manifest(version)))

    def read_manifest(self, version: int, *, max_bytes: int | None = None) -> Manifest:
        """The validated manifest stored under ``version``; one stored larger than ``max_bytes``
        (default ``MAX_MANIFEST_BYTES``) is refused without downloading it (``STRLEN`` first).

        Read in ``GETRANGE`` pieces of ``_MANIFEST_PIECE`` bytes (one round trip for the usual
        manifest): Redis copies a reply while it runs the command, so one piece holds it ~0.1 ms."""
        limit = MAX_MANIFEST_BYTES if max_bytes is None else min(max_bytes, MAX_MANIFEST_BYTES)
        key = self.keyspace.manifest(version)
        pipe = self.client.pipeline(transaction=False)
        pipe.strlen(key)
        pipe.getrange(key, 0, min(limit, _MANIFEST_PIECE) - 1)
        length, raw = pipe.execute()
        if not length:
            raise VersionNotFoundError(f"version {version} not found")
        if length > limit:
            raise CodecError(f"manifest of {length} bytes, more than the limit of {limit} (hostile or corrupted?)")
        if length > len(raw):
            pipe = self.client.pipeline(transaction=False)
            for start in range(len(raw), length, _MANIFEST_PIECE):
                pipe.getrange(key, start, min(length, start + _MANIFEST_PIECE) - 1)
            raw = b"".join([raw, *pipe.execute()])
            if len(raw) != length:  # deleted (or replaced by hand) between the pieces
                raise VersionNotFoundError(f"version {version} was deleted while its manifest was read")
        return Manifest.from_json(raw, version)

    def _committed(self) -> tuple[int, list[int]]:
        """``(latest, committed versions oldest first)`` in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.keyspace.latest)
        pipe.zrange(self.keyspace.versions, 0, -1)
        latest, members = pipe.execute()
        return _version(latest, self.keyspace.latest), self._parse_versions(members)

    def list_versions(self) -> list[int]:
        """Committed versions, oldest first."""
        return self._parse_versions(self.client.zrange(self.keyspace.versions, 0, -1))

    def _parse_versions(self, members: list[bytes]) -> list[int]:
        versions = [parse_int(v, minimum=1, maximum=MAX_VERSION) for v in members]
        if None in versions:  # never deleted by GC either: it is not a version this library wrote
            log.warning("%s holds members that are no version numbers (ignored): %s", self.keyspace.versions,
                        [text(m)[:40] for m, v in zip(members, versions, strict=True) if v is None][:5])  # fmt: skip
        return [v for v in versions if v is not None]

    # -- deleting -----------------------------------------------------------------------
    def delete(self, version: int) -> set[str] | None:
        """Remove a version from the list and its manifest (small commands, no MULTI: they work
        while Redis is full); returns the objects it referenced (None: unknown, its manifest could
        not be read). Its objects go at the next sweep unless another version needs them. Chunks
        of the old per-version layout are deleted with it (named by its manifest, never SCANned)."""
        k = self.keyspace
        objects: set[str] | None = None
        legacy = 0
        try:
            objects = self.read_manifest(version).objects()
        except VersionNotFoundError:
            objects = set()
        except LegacyFormatError:
            legacy, objects = self._legacy_chunk_count(version), set()
        except CodecError as exc:
            log.warning("namespace %r: version %d has an unreadable manifest (%s); deleting it, then a full sweep",
                        k.namespace, version, exc)  # fmt: skip
        pipe = self.client.pipeline(transaction=False)  # one round trip, no MULTI (works while Redis is full)
        pipe.zrem(k.versions, version)
        pipe.delete(k.manifest(version))
        pipe.execute()
        names = [k.legacy_chunk(version, i) for i in range(legacy)]
        for start in range(0, len(names), DELETE_BATCH):
            self.client.delete(*names[start : start + DELETE_BATCH])
        return objects

    def _legacy_chunk_count(self, version: int) -> int:
        """How many per-version chunk keys a format-1 manifest names (its ``chunk_sizes``)."""
        raw = self.client.get(self.keyspace.manifest(version))
        try:
            doc = load_json(raw or b"{}", "manifest")
        except CodecError:
            return 0
        sizes = doc.get("chunk_sizes") if isinstance(doc, dict) else None
        return min(len(sizes), _LEGACY_MAX_CHUNKS) if isinstance(sizes, list) else 0

    def gc(self, keep: int = DEFAULT_RETENTION) -> list[int]:
        """Delete all but the newest ``keep`` versions (never ``latest``), then sweep every object
        of the namespace that no retained version and no pending push references (a full
        sweep); returns the deleted versions."""
        return list(self.collect(keep, full=True).versions)

    def collect(self, keep: int = DEFAULT_RETENTION, *, full: bool = False) -> GcReport:
        """Delete all but the newest ``keep`` versions (never ``latest``) and sweep the objects
        nothing references any more: those of the dropped versions, or (``full``, or when the
        index shows leftovers) every object the index lists. See the module docstring."""
        if keep < 1:
            raise ValueError("keep must be at least 1")
        token = uuid.uuid4().hex
        held = self._take_lease(token)
        if held is None:
            log.info("namespace %r: another GC holds the lease; skipping", self.keyspace.namespace)
            return GcReport(skipped=True)
        old: list[int] = []
        try:
            latest, versions = self._committed()
            old = [v for v in versions[:-keep] if v != latest]
            candidates: set[str] = set()
            for version in old:
                objects = self.delete(version)
                if objects is None:
                    full = True
                else:
                    candidates |= objects
            held, report = self._sweep(token, held, candidates, full=full)
        finally:
            self._give_back(token, held)
        if old:
            log.debug("gc removed versions %s", old)
        return GcReport(tuple(old), report.objects, report.full, report.keys_read + 2 * len(old) + 2)

    def _take_lease(self, token: str) -> bool | None:
        """True: this GC holds the lease (and bumped the epoch); False: Redis is too full to take it
        (go on without it); None: another GC holds it."""
        k = self.keyspace
        pipe = self.client.pipeline(transaction=False)  # one round trip; a failed SET NX bumps the epoch
        pipe.set(k.gc_lease, token, nx=True, px=milliseconds(GC_LEASE_TTL))  # too: harmless (a lease is
        pipe.incr(k.gc_epoch)  # held, so every commit is refused meanwhile anyway)
        taken, bumped = pipe.execute(raise_on_error=False)
        for result in (taken, bumped):
            if isinstance(result, redis.exceptions.ResponseError) and not _oom(result):
                raise result
        if isinstance(taken, redis.exceptions.ResponseError) or isinstance(bumped, redis.exceptions.ResponseError):
            log.warning("namespace %r: Redis is full; collecting garbage without the GC lease until memory is freed",
                        self.keyspace.namespace)  # fmt: skip
            if not isinstance(taken, redis.exceptions.ResponseError) and taken:
                self._release(keys=[k.gc_lease], args=[token])  # taken, but the epoch could not be bumped
            return False
        return True if taken else None

    def _give_back(self, token: str, held: bool) -> None:
        """Bump the epoch (a push that checked during this GC must check again), then release the
        lease if held: one round trip (the release script is loaded by the first GC's fallback)."""
        k = self.keyspace
        pipe = self.client.pipeline(transaction=False)
        pipe.incr(k.gc_epoch)
        if held and self.deployment.single_node:  # a cluster pipeline refuses EVALSHA: a call of its own
            pipe.evalsha(self._release.sha, 1, k.gc_lease, token)
        results = pipe.execute(raise_on_error=False)
        if held and not self.deployment.single_node:
            results.append(self._release(keys=[k.gc_lease], args=[token]))
        if isinstance(results[0], redis.exceptions.ResponseError) and not _oom(results[0]):
            raise results[0]
        if held and isinstance(results[1], redis.exceptions.ResponseError):
            if not isinstance(results[1], redis.exceptions.NoScriptError):
                raise results[1]
            self._release(keys=[k.gc_lease], args=[token])  # loads the script, then runs it

    def _marked(self) -> tuple[set[str], bool, int] | None:
        """``(every object a retained version or a live pending push references, whether a push
        crashed (its record is gone but its token stayed: its objects are unknown), keys read)``;
        None when a retained manifest cannot be read (then nothing may be swept)."""
        k = self.keyspace
        marked: set[str] = set()
        versions = self.list_versions()
        for version in versions:  # retained versions: few; each read in bounded pieces
            try:
                marked |= self.read_manifest(version).objects()
            except VersionNotFoundError:
                continue  # deleted meanwhile
            except LegacyFormatError:
                continue  # old layout: its chunks are per-version keys, deleted with it
            except CodecError as exc:
                log.warning("namespace %r: version %d has an unreadable manifest (%s); not sweeping",
                            k.namespace, version, exc)  # fmt: skip
                return None
        tokens = self.chunks.index.pushes()
        crashed = []
        for start in range(0, len(tokens), _MANIFEST_ROUND):
            batch = tokens[start : start + _MANIFEST_ROUND]
            for token, raw in zip(batch, self._get_each([k.pending(t) for t in batch]), strict=True):
                if raw:
                    marked.update(raw.decode().split(","))
                else:
                    crashed.append(token)
        if crashed:  # expired or never written: the push is gone (a crash); its token goes too
            self.client.srem(k.pushes_index, *crashed)
            log.info("namespace %r: %d push(es) ended without a commit; sweeping the whole index",
                     k.namespace, len(crashed))  # fmt: skip
        return marked, bool(crashed), len(versions) + len(tokens) + 2

    def crashed_pushes(self) -> bool:
        """Whether a push the index lists has lost its pending record (it crashed: its objects
        are garbage that only a GC over the whole index finds). One SMEMBERS, one EXISTS each."""
        tokens = self.chunks.index.pushes()
        pipe = self.client.pipeline(transaction=False)
        for token in tokens:
            pipe.exists(self.keyspace.pending(token))
        return not all(pipe.execute()) if tokens else False

    def _get_each(self, names: list[Any]) -> list[Any]:
        """GET of every name in one round trip, one command each (an MGET of many big values is
        one command that copies them all and holds Redis meanwhile)."""
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.get(name)
        return pipe.execute()

    def _garbage(self, candidates: set[str], full: bool) -> tuple[list[str], bool, int] | None:
        """``(unreferenced objects among the candidates, or among the whole index, full, keys read)``;
        None when marking is impossible. A sweep goes full when asked, when a push crashed, or
        when the index lists more ids than the marked and candidate objects explain (leftovers)."""
        result = self._marked()
        if result is None:
            return None
        marked, crashed, read = result
        full = full or crashed
        if not full:
            full = self.client.scard(self.keyspace.objects_index) > len(marked | candidates)
            read += 1
        if full:
            candidates = self.chunks.indexed()
            read += 1
        return sorted(candidates - marked), full, read

    def _sweep(self, token: str, held: bool, candidates: set[str], *, full: bool) -> tuple[bool, GcReport]:
        """Delete unreferenced objects in small steps (see the module docstring): whether this GC
        holds the lease at the end, and what it did."""
        found = self._garbage(candidates, full)
        if found is None:
            return held, GcReport()
        garbage, full, read = found
        position = deleted = 0
        renewed = time.monotonic()
        while position < len(garbage):
            batch = garbage[position : position + DELETE_BATCH]
            position += len(batch)
            deleted += self.chunks.delete(batch)
            if not held:  # memory was freed: take the lease now, and mark again under it
                taken = self._take_lease(token)
                if taken is None:  # another GC took it: it sweeps from here
                    return False, GcReport(objects=deleted, full=full, keys_read=read)
                held = taken
                if held:
                    again = self._garbage(set(garbage[position:]), full)
                    if again is None:
                        return held, GcReport(objects=deleted, full=full, keys_read=read)
                    rest, full, more = again
                    done = set(garbage[:position])
                    garbage = garbage[:position] + [i for i in rest if i not in done]
                    read += more
            elif position < len(garbage) and time.monotonic() - renewed > GC_LEASE_TTL / 3:
                renewed = time.monotonic()  # a long sweep keeps its lease; a short one needs no renewal
                if not self._renew(keys=[self.keyspace.gc_lease], args=[token, milliseconds(GC_LEASE_TTL)]):
                    log.warning("namespace %r: the GC lease expired mid-sweep; stopping", self.keyspace.namespace)
                    return False, GcReport(objects=deleted, full=full, keys_read=read)
        return held, GcReport(objects=deleted, full=full, keys_read=read)
