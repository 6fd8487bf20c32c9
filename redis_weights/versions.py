"""The version registry: commit atomically, read, list, delete, retain, and mark-and-sweep GC.

A version is a manifest (``rw:{ns}:v:<N>:manifest``) over content-addressed chunks
and patches (``chunkstore.py``). A push goes:

1. ``begin``: record the objects the new manifest will reference in a pending
   record (TTL ``pending_ttl``), then read the GC epoch (waiting while a GC holds
   its lease);
2. upload the objects Redis lacks (``ChunkStore.missing`` then ``write``);
3. ``commit``: one Lua script in the namespace's slot writes the manifest, adds the
   version to the sorted set, moves ``latest``, marks the targeted ranks
   ``"pending"``, drops the pending record and publishes the version number.

The script cannot check that the chunks exist (on a Cluster they live in other
slots); instead it refuses (``GcRaceError``) when the GC epoch moved or a GC holds
its lease, because a GC that ran since step 1 may have deleted an object the push
found present. The updater then repeats steps 1-3 (re-uploading what is missing).

GC (``gc``) takes the lease and bumps the epoch, deletes the manifests beyond the
retention (plain ZREM and DEL, one version at a time), marks every object
referenced by a retained manifest or a pending record, then sweeps the others
(SCAN, then DEL in batches of ``DELETE_BATCH`` keys, each its own round trip: no
MULTI, no long script, so a 1 GB version is never freed in one call and deleting
works while Redis is over ``maxmemory``), and bumps the epoch again. When Redis is
too full to take the lease, the GC deletes without it and takes it as soon as its
first deletions freed memory, re-marking before it goes on.

``latest`` never moves backwards: a commit of a version not above it is refused
(``StaleVersionError``), which is what stops a second, stale trainer.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import redis

from . import ranks
from .chunkstore import DELETE_BATCH, SCAN_COUNT, ChunkStore
from .deployment import Deployment
from .errors import CodecError, LegacyFormatError, RedisWeightsError, StaleVersionError, VersionNotFoundError
from .keys import Keys
from .manifest import MAX_MANIFEST_BYTES, Manifest
from .units import milliseconds
from .values import MAX_VERSION, parse_int, text

log = logging.getLogger(__name__)

DEFAULT_RETENTION = 3
DEFAULT_PENDING_TTL = 900.0  # seconds a push's pending record protects its objects
GC_LEASE_TTL = 30.0  # seconds a GC's lease lives without renewal (a dead GC stops blocking commits)
_LEASE_WAIT = 0.02  # seconds between checks while a push waits for a GC to finish
_MANIFEST_ROUND = 100  # pending records per round trip while marking
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

# KEYS: latest, versions, manifest, gc epoch, gc lease, pending record, staged manifest, status_1..status_m,
#       object_1..object_k
# ARGV: version, epoch seen by the push, m, updates channel, pending status, k
# The manifest was written beforehand to the staged key (a plain SET, with the push's
# TTL): the script only RENAMEs it, so its run does not grow with the manifest (an
# ARGV of 2 MB, the manifest of a 100 GB model, held Redis ~8 ms here).
# Idempotent: a retried commit of the version that is already latest returns 0.
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
  return 0
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
  absent = absent + 1 - redis.call('EXISTS', KEYS[7 + m + j])
end
if absent > 0 then
  return redis.error_reply('MISSING ' .. absent)
end
redis.call('RENAME', KEYS[7], KEYS[3])
redis.call('PERSIST', KEYS[3])
redis.call('ZADD', KEYS[2], v, v)
redis.call('SET', KEYS[1], v)
redis.call('DEL', KEYS[6])
for j = 1, m do
  redis.call('SET', KEYS[7 + j], ARGV[5])
end
redis.pcall('PUBLISH', ARGV[4], v)
return 1
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
        then return the GC epoch the commit must still see; waits while a GC holds its lease."""
        k = self.keyspace
        ttl_ms = milliseconds(pending_ttl)
        record = ",".join(sorted(set(objects)))
        deadline = time.monotonic() + 2 * GC_LEASE_TTL
        while True:
            pipe = self.client.pipeline(transaction=False)  # in order: the record is written before the read
            pipe.set(k.pending(token), record, px=ttl_ms)
            pipe.get(k.gc_epoch)
            pipe.exists(k.gc_lease)
            _, epoch, busy = pipe.execute()
            if not busy or time.monotonic() >= deadline:
                return (epoch or b"0").decode() if isinstance(epoch, bytes) else str(epoch or "0")
            time.sleep(_LEASE_WAIT)

    def end(self, token: str) -> None:
        """Drop a push's pending record and staged manifest (its push failed): its objects become
        garbage unless referenced."""
        self.client.delete(self.keyspace.pending(token), self.keyspace.staged_manifest(token))

    def commit(
        self, manifest: Manifest, pending_ranks: Iterable[int] = (), *, epoch: str, token: str,
        pending_ttl: float = DEFAULT_PENDING_TTL,
    ) -> None:
        """Make ``manifest.version`` the latest, in one atomic step (see ``_COMMIT``): the manifest
        is staged first with a plain SET (TTL ``pending_ttl``; nothing points at it yet), then the
        script moves it into place."""
        k, v = self.keyspace, manifest.version
        targets = list(pending_ranks)
        staged = k.staged_manifest(token)
        keys = [k.latest, k.versions, k.manifest(v), k.gc_epoch, k.gc_lease, k.pending(token), staged]
        keys += ranks.status_keys(k, targets)
        checked = sorted(manifest.objects()) if self.deployment.single_node else []  # else in other slots
        keys += [k.chunk(i) for i in checked]
        self.client.set(staged, manifest.to_json(), px=max(1, int(pending_ttl * 1000)))
        try:
            self._commit(keys=keys, args=[v, epoch, len(targets), k.updates_channel, ranks.STATUS_PENDING,
                                          len(checked)])  # fmt: skip
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

    def publish(
        self,
        manifest: Manifest,
        pending_ranks: Iterable[int] = (),
        *,
        upload: Callable[[set[str]], int] | None = None,
        pending_ttl: float = DEFAULT_PENDING_TTL,
        attempts: int = 5,
        committing: Callable[[], None] | None = None,
    ) -> int:
        """Commit ``manifest`` once every object it references is in Redis; returns the bytes uploaded.

        ``upload(missing_ids)`` writes the missing objects (None: nothing may be
        uploaded, so a missing one is a ``VersionNotFoundError``, as for a rollback
        whose chunks were deleted). A commit refused by a concurrent GC is retried.
        ``committing()`` is called before the commit script is sent (from then on a lost
        connection leaves it unknown whether the version was committed).
        """
        token = uuid.uuid4().hex
        objects = manifest.objects()
        uploaded = 0
        try:
            for attempt in range(attempts):
                epoch = self.begin(token, objects, pending_ttl)
                missing = self.chunks.missing(objects)
                if missing:
                    if upload is None:
                        raise VersionNotFoundError(
                            f"version {manifest.version}: {len(missing)} chunk(s) are gone from Redis "
                            "(garbage-collected?)"
                        )
                    uploaded += upload(missing)
                manifest.uploaded_bytes = uploaded
                if committing is not None:
                    committing()
                try:
                    self.commit(manifest, pending_ranks, epoch=epoch, token=token, pending_ttl=pending_ttl)
                    return uploaded
                except GcRaceError as exc:
                    if attempt == attempts - 1:
                        raise
                    log.info("%s", exc)
            raise AssertionError("unreachable")
        except BaseException:
            try:
                self.end(token)
            except redis.exceptions.RedisError as exc:
                log.debug("could not drop pending record %s: %s (it expires)", token, exc)
            raise

    def rollback(
        self, version: int, pending_ranks: Iterable[int] = (), pending_ttl: float = DEFAULT_PENDING_TTL
    ) -> Manifest:
        """Commit the weights of an older ``version`` again, as a new version that workers apply.

        Its chunks are already in Redis (content-addressed): nothing is uploaded or
        copied. The manifest is the old one with a new number, a new ``created`` and a
        producer naming the rollback.
        """
        source = self.read_manifest(version)
        manifest = source.renumbered(
            self.allocate(), created=time.time(), producer=f"rollback of v{version} by {producer_id()}"
        )
        self.publish(manifest, pending_ranks, pending_ttl=pending_ttl)
        log.info("rolled back to version %d as version %d", version, manifest.version)
        return manifest

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

    def list_versions(self) -> list[int]:
        """Committed versions, oldest first."""
        members: list[bytes] = self.client.zrange(self.keyspace.versions, 0, -1)  # type: ignore[assignment]
        versions = [parse_int(v, minimum=1, maximum=MAX_VERSION) for v in members]
        if None in versions:  # never deleted by GC either: it is not a version this library wrote
            log.warning("%s holds members that are no version numbers (ignored): %s", self.keyspace.versions,
                        [text(m)[:40] for m, v in zip(members, versions, strict=True) if v is None][:5])  # fmt: skip
        return [v for v in versions if v is not None]

    # -- deleting -----------------------------------------------------------------------
    def delete(self, version: int) -> None:
        """Remove a version from the list and its manifest (two small commands, no MULTI: they
        work while Redis is full). Its objects go at the next sweep unless another version needs them.
        Chunks of the old per-version layout, if any, are deleted with it."""
        k = self.keyspace
        self.client.zrem(k.versions, version)
        self.client.delete(k.manifest(version))
        legacy = list(self.client.scan_iter(match=k.legacy_chunks_pattern(version), count=SCAN_COUNT))
        for start in range(0, len(legacy), DELETE_BATCH):
            self.client.delete(*legacy[start : start + DELETE_BATCH])

    def gc(self, keep: int = DEFAULT_RETENTION) -> list[int]:
        """Delete all but the newest ``keep`` versions (never ``latest``), then sweep every object
        no retained version and no pending push references; returns the deleted versions."""
        if keep < 1:
            raise ValueError("keep must be at least 1")
        token = uuid.uuid4().hex
        held = self._take_lease(token)
        if held is None:
            log.info("namespace %r: another GC holds the lease; skipping", self.keyspace.namespace)
            return []
        try:
            latest = self.latest()
            old = [v for v in self.list_versions()[:-keep] if v != latest]
            for version in old:
                self.delete(version)
            held = self._sweep(token, held)
        finally:
            self._give_back(token, held)
        if old:
            log.debug("gc removed versions %s", old)
        return old

    def _take_lease(self, token: str) -> bool | None:
        """True: this GC holds the lease (and bumped the epoch); False: Redis is too full to take it
        (go on without it); None: another GC holds it."""
        k = self.keyspace
        try:
            if not self.client.set(k.gc_lease, token, nx=True, px=milliseconds(GC_LEASE_TTL)):
                return None
            self.client.incr(k.gc_epoch)
            return True
        except redis.exceptions.ResponseError as exc:
            if not _oom(exc):
                raise
            log.warning("namespace %r: Redis is full; collecting garbage without the GC lease until memory is freed",
                        self.keyspace.namespace)  # fmt: skip
            return False

    def _give_back(self, token: str, held: bool) -> None:
        k = self.keyspace
        try:
            self.client.incr(k.gc_epoch)  # a push that checked during this GC must check again
        except redis.exceptions.ResponseError as exc:
            if not _oom(exc):
                raise
        if held:
            self._release(keys=[k.gc_lease], args=[token])

    def _marked(self) -> set[str] | None:
        """Every object a retained version or a pending push references; None when a retained
        manifest cannot be read (then nothing may be swept: its objects are unknown)."""
        k = self.keyspace
        marked: set[str] = set()
        for version in self.list_versions():  # retained versions: few; each read in bounded pieces
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
        records = list(self.client.scan_iter(match=k.pending_pattern, count=SCAN_COUNT))
        for start in range(0, len(records), _MANIFEST_ROUND):
            for raw in self._get_each(records[start : start + _MANIFEST_ROUND]):
                if raw:
                    marked.update(raw.decode().split(","))
        return marked

    def _get_each(self, names: list[Any]) -> list[Any]:
        """GET of every name in one round trip, one command each (an MGET of many big values is
        one command that copies them all and holds Redis meanwhile)."""
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.get(name)
        return pipe.execute()

    def _sweep(self, token: str, held: bool) -> bool:
        """Delete unreferenced objects in small steps (see the module docstring); whether
        this GC holds the lease at the end."""
        marked = self._marked()
        if marked is None:
            return held
        garbage = [i for i in self.chunks.scan() if i not in marked]
        position = 0
        while position < len(garbage):
            batch = garbage[position : position + DELETE_BATCH]
            position += len(batch)
            self.chunks.delete(batch)
            if not held:  # memory was freed: take the lease now, and mark again under it
                taken = self._take_lease(token)
                if taken is None:  # another GC took it: it sweeps from here
                    return False
                held = taken
                if held:
                    marked = self._marked()
                    if marked is None:
                        return held
                    garbage = garbage[:position] + [i for i in garbage[position:] if i not in marked]
            elif not self._renew(keys=[self.keyspace.gc_lease], args=[token, milliseconds(GC_LEASE_TTL)]):
                log.warning("namespace %r: the GC lease expired mid-sweep; stopping", self.keyspace.namespace)
                return False
        return held
