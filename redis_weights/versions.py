"""The version registry: write chunks, commit atomically, read, list, delete, retain.

A version becomes visible in one step: the commit script checks that every chunk
is there, makes the chunks permanent, writes the manifest, adds the version to the
sorted set, moves ``latest`` and marks the targeted ranks ``"pending"``, then
publishes the version number. Until then nothing points at the chunks, and they
carry an expiry, so chunks of a trainer that died mid-push vanish by themselves.

``latest`` never moves backwards: a commit of a version not above it is refused
(``StaleVersionError``), which is what stops a second, stale trainer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis

from . import ranks
from .bulkread import read_values_into
from .deployment import Deployment
from .errors import CodecError, StaleVersionError, VersionNotFoundError
from .keys import Keys
from .manifest import Buffer, Manifest
from .values import MAX_VERSION, parse_int, text

log = logging.getLogger(__name__)

DEFAULT_RETENTION = 3
DEFAULT_PENDING_TTL = 900.0  # seconds an uncommitted chunk survives
_PIPELINE_BYTES = 64 * 1024 * 1024  # bytes of chunk values per pipeline round trip

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

# KEYS: latest, versions, manifest, chunk_1..chunk_n, status_1..status_m
# ARGV: version, manifest json, n, m, updates channel, pending status
# Idempotent: a retried commit of the version that is already latest returns 0.
# The PUBLISH is only a hint (workers poll latest): refused, it must not fail a
# commit that has already happened.
_COMMIT = """
local v = tonumber(ARGV[1])
local n = tonumber(ARGV[3])
local m = tonumber(ARGV[4])
local latest = tonumber(redis.call('GET', KEYS[1]) or '0')
if latest == nil then
  return redis.error_reply('CORRUPT ' .. KEYS[1] .. ' is not a version number')
end
if latest == v and redis.call('EXISTS', KEYS[3]) == 1 then
  return 0
end
if latest >= v then
  return redis.error_reply('STALE ' .. latest)
end
for i = 1, n do
  if redis.call('EXISTS', KEYS[3 + i]) == 0 then
    return redis.error_reply('MISSING ' .. (i - 1))
  end
end
for i = 1, n do
  redis.call('PERSIST', KEYS[3 + i])
end
redis.call('SET', KEYS[3], ARGV[2])
redis.call('ZADD', KEYS[2], v, v)
redis.call('SET', KEYS[1], v)
for j = 1, m do
  redis.call('SET', KEYS[3 + n + j], ARGV[6])
end
redis.pcall('PUBLISH', ARGV[5], v)
return 1
"""

# KEYS: manifest, chunk_1..chunk_n. Drop the chunks of a version that was not
# committed (its upload failed); a version whose manifest exists is left alone.
_DISCARD = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
for i = 2, #KEYS do
  redis.call('DEL', KEYS[i])
end
return 1
"""


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


class VersionRegistry:
    """Versions of one namespace in Redis (see the module docstring for the protocol)."""

    def __init__(self, client: redis.Redis, keyspace: Keys) -> None:
        self.client = client
        self.keyspace = keyspace
        self._deployment = Deployment(client)  # the caller's client: never closed here
        self._allocate = client.register_script(_ALLOCATE)
        self._commit = client.register_script(_COMMIT)
        self._discard = client.register_script(_DISCARD)

    # -- writing ------------------------------------------------------------------------
    def allocate(self, floor: int = 0) -> int:
        """A fresh version number above ``floor`` and above ``latest``."""
        return self.allocate_after(floor)[0]

    def allocate_after(self, floor: int = 0) -> tuple[int, int]:
        """``(a fresh version above floor and latest, latest as it was)``, in one round trip."""
        k = self.keyspace
        version, latest = self._allocate(keys=[k.counter, k.latest], args=[floor, MAX_VERSION])
        return int(version), int(latest)

    def write_chunks(self, version: int, chunks: Sequence[Buffer], pending_ttl: float = DEFAULT_PENDING_TTL) -> None:
        """SET every chunk with an expiry (the commit removes it), pipelined in ~64 MiB rounds."""
        self.write_stream(version, ((chunk, False) for chunk in chunks), pending_ttl)

    def write_stream(
        self, version: int, chunks: Iterable[tuple[Buffer, bool]], pending_ttl: float = DEFAULT_PENDING_TTL
    ) -> int:
        """Like ``write_chunks`` for ``(chunk, reused)`` pairs (``Encoded.stream()``); returns the count.

        Values are sent from the caller's memory when the pipeline executes, so a round
        is sent right after a ``reused`` chunk, before its buffer is overwritten.
        """
        ttl_ms = max(1, int(pending_ttl * 1000))
        pipe = self.client.pipeline(transaction=False)
        queued = count = 0
        for chunk, reused in chunks:
            pipe.set(self.keyspace.chunk(version, count), chunk, px=ttl_ms)
            count += 1
            queued += len(chunk)
            if reused or queued >= _PIPELINE_BYTES:
                pipe.execute()
                queued = 0
        pipe.execute()
        return count

    def commit(self, manifest: Manifest, pending_ranks: Iterable[int] = ()) -> None:
        """Make ``manifest.version`` the latest, in one atomic step (see ``_COMMIT``)."""
        k, v = self.keyspace, manifest.version
        targets = list(pending_ranks)
        keys = [k.latest, k.versions, k.manifest(v), *k.chunks(v, manifest.num_chunks)]
        keys += ranks.status_keys(k, targets)
        try:
            self._commit(
                keys=keys,
                args=[v, manifest.to_json(), manifest.num_chunks, len(targets), k.updates_channel,
                      ranks.STATUS_PENDING],
            )
        except redis.exceptions.ResponseError as exc:
            text = str(exc)
            if text.startswith("STALE"):
                raise StaleVersionError(
                    f"version {v} refused: latest is already {text.split()[1]} "
                    "(is a second trainer pushing to this namespace?)"
                ) from exc
            if text.startswith("MISSING"):
                raise VersionNotFoundError(
                    f"version {v}: chunk {text.split()[1]} vanished before the commit "
                    "(upload slower than pending_ttl, or Redis restarted)"
                ) from exc
            raise

    def discard(self, version: int, num_chunks: int) -> bool:
        """Delete the chunks of an uncommitted ``version`` now rather than at their expiry
        (frees the memory of a failed upload at once); False if it was committed after all."""
        k = self.keyspace
        return bool(self._discard(keys=[k.manifest(version), *k.chunks(version, num_chunks)]))

    def rollback(
        self, version: int, pending_ranks: Iterable[int] = (), pending_ttl: float = DEFAULT_PENDING_TTL
    ) -> Manifest:
        """Commit the weights of an older ``version`` again, as a new version that workers apply.

        The chunks are copied server-side (COPY, no bytes through the client), with
        an expiry until the commit, like an upload. The manifest is the old one with
        a new number, a new ``created`` and a producer naming the rollback.
        """
        source = self.read_manifest(version)
        target = self.allocate()
        k, ttl_ms = self.keyspace, max(1, int(pending_ttl * 1000))
        pipe = self.client.pipeline(transaction=False)
        for index in range(source.num_chunks):
            pipe.copy(k.chunk(version, index), k.chunk(target, index), replace=True)
            pipe.pexpire(k.chunk(target, index), ttl_ms)
        copied = pipe.execute()[0::2]
        if not all(copied):
            raise VersionNotFoundError(f"version {version}: chunk {copied.index(False)} is gone (garbage-collected?)")
        manifest = dataclasses.replace(
            source, version=target, created=time.time(), producer=f"rollback of v{version} by {producer_id()}"
        )
        self.commit(manifest, pending_ranks)
        log.info("rolled back to version %d as version %d", version, target)
        return manifest

    # -- reading ------------------------------------------------------------------------
    def latest(self) -> int:
        """The newest committed version, 0 when there is none."""
        return _version(self.client.get(self.keyspace.latest), self.keyspace.latest)

    def exists(self, version: int) -> bool:
        """Whether the manifest of ``version`` is in Redis (committed and not deleted)."""
        return bool(self.client.exists(self.keyspace.manifest(version)))

    def read_manifest(self, version: int) -> Manifest:
        raw = self.client.get(self.keyspace.manifest(version))
        if raw is None:
            raise VersionNotFoundError(f"version {version} not found")
        return Manifest.from_json(raw)

    def read_chunks(self, manifest: Manifest) -> list[bytes | None]:
        """Every chunk of a version, pipelined; a missing one comes back as None."""
        pipe = self.client.pipeline(transaction=False)
        out: list[bytes | None] = []
        queued = 0
        for index, size in enumerate(manifest.chunk_sizes):
            pipe.get(self.keyspace.chunk(manifest.version, index))
            queued += size
            if queued >= _PIPELINE_BYTES:
                out.extend(pipe.execute())
                queued = 0
        out.extend(pipe.execute())
        return out

    def read_chunks_into(self, manifest: Manifest, target: memoryview) -> list[Buffer | None]:
        """Every chunk of a version, read straight into ``target`` (at least ``total_bytes``):
        per chunk a view of ``target``, None if missing, ``bytes`` if its size is wrong."""
        keys = self.keyspace.chunks(manifest.version, manifest.num_chunks)
        return read_values_into(self._deployment, keys, manifest.chunk_sizes, target, _PIPELINE_BYTES)

    def read(self, version: int | None = None) -> tuple[Manifest, list[bytes]]:
        """Manifest and verified chunks of a version (default: the latest)."""
        version = self.latest() if version is None else version
        if version <= 0:
            raise VersionNotFoundError("no version has been committed")
        manifest = self.read_manifest(version)
        chunks = self.read_chunks(manifest)
        for index, data in enumerate(chunks):
            if data is None:
                raise VersionNotFoundError(f"version {version}: chunk {index} is gone (garbage-collected?)")
            manifest.verify_chunk(index, data)
        return manifest, [c for c in chunks if c is not None]

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
        """Remove a version: first from the list, then its manifest and chunks."""
        k = self.keyspace
        try:
            count = self.read_manifest(version).num_chunks
            chunk_keys = k.chunks(version, count)
        except Exception:  # unreadable manifest: find the chunks by name
            chunk_keys = list(self.client.scan_iter(match=k.chunk_pattern(version), count=1000))
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(k.versions, version)
        pipe.delete(k.manifest(version), *chunk_keys)
        pipe.execute()

    def gc(self, keep: int = DEFAULT_RETENTION) -> list[int]:
        """Delete all but the newest ``keep`` versions (never ``latest``); the deleted ones."""
        if keep < 1:
            raise ValueError("keep must be at least 1")
        latest = self.latest()
        old = [v for v in self.list_versions()[:-keep] if v != latest]
        for version in old:
            self.delete(version)
        if old:
            log.debug("gc removed versions %s", old)
        return old
