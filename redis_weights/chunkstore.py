"""The content-addressed object store of one namespace: chunks and patches keyed by their id.

An object is a plain Redis string ``rw:<ns>:c:{<id>}`` (``keys.py``), where the id is
the xxh3-128 digest of its bytes. Objects carry no TTL: nothing points at an object
but manifests and the pending records of pushes, and the mark-and-sweep GC
(``versions.py``) deletes the ones nobody points at. Every call here is
cluster-friendly (single-key commands, pipelined), and writing, reading and
deleting go in bounded rounds so that no single call holds Redis for long.

With ``replicas`` (a worker's ``read_from_replicas``), objects are read from a
replica first and only those the replica lacks (it lags behind its primary), or
cannot serve (down, loading, ``MASTERDOWN``), are read again from the primary:
objects are immutable, so a replica's copy is either the right bytes or absent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import redis

from .bulkread import ROUND_BYTES, read_values_into  # ROUND_BYTES: bytes per pipeline round trip, both ways
from .deployment import Deployment
from .keys import Keys
from .manifest import Buffer

log = logging.getLogger(__name__)

_EXISTS_ROUND = 1000  # keys per EXISTS round trip
DELETE_BATCH = 16  # DELs per round trip: with 8 MiB chunks, ~128 MiB freed per step (~10 ms of Redis)


class ChunkStore:
    """Objects of one namespace (see the module docstring)."""

    def __init__(self, client: redis.Redis, keyspace: Keys, deployment: Deployment,
                 replicas: Deployment | None = None) -> None:  # fmt: skip
        self.client = client
        self.keyspace = keyspace
        self.deployment = deployment  # per-node connections for bulk reads
        self.replicas = replicas  # read objects here first (None: from the primary only)
        self.replica_reads = 0  # objects read from a replica
        self.primary_rereads = 0  # objects a replica lacked (or could not serve), read from the primary
        self._replica_failure: str | None = None  # the last cause a replica could not serve, warned once

    def missing(self, ids: Iterable[str]) -> set[str]:
        """The ids among ``ids`` that Redis does not hold (pipelined EXISTS, one key per command)."""
        unique = list(dict.fromkeys(ids))
        absent: set[str] = set()
        for start in range(0, len(unique), _EXISTS_ROUND):
            batch = unique[start : start + _EXISTS_ROUND]
            pipe = self.client.pipeline(transaction=False)
            for chunk_id in batch:
                pipe.exists(self.keyspace.chunk(chunk_id))
            absent.update(i for i, found in zip(batch, pipe.execute(), strict=True) if not found)
        return absent

    def write(self, objects: Iterable[tuple[str, Buffer, bool]]) -> int:
        """SET every ``(id, bytes, reused)``, pipelined in ~64 MiB rounds; returns the bytes sent.

        Values are sent from the caller's memory when the pipeline executes, so a round
        is sent right after a ``reused`` buffer, before its owner overwrites it.
        """
        pipe = self.client.pipeline(transaction=False)
        queued = sent = 0
        for chunk_id, data, reused in objects:
            pipe.set(self.keyspace.chunk(chunk_id), data)
            queued += len(data)
            sent += len(data)
            if reused or queued >= ROUND_BYTES:
                pipe.execute()
                queued = 0
        pipe.execute()
        return sent

    def read(self, ids: Sequence[str], sizes: Sequence[int]) -> Iterator[list[bytes | None]]:
        """The values of ``ids`` (None: absent), in rounds of ~64 MiB of expected ``sizes``."""
        start = 0
        while start < len(ids):
            end, queued = start, 0
            while end < len(ids) and (end == start or queued + sizes[end] <= ROUND_BYTES):
                queued += sizes[end]
                end += 1
            batch = ids[start:end]
            values: list[bytes | None] = [None] * len(batch)
            replicas = self.replicas
            if replicas is not None:
                values = self._from_replica(lambda: self._get(replicas.client, batch), len(batch))
            absent = [i for i, v in enumerate(values) if v is None]
            if absent:
                for i, value in zip(absent, self._get(self.client, [batch[i] for i in absent]), strict=True):
                    values[i] = value
            if self.replicas is not None:
                self._count(len(batch), len(absent))
            yield values
            start = end

    def _get(self, client: redis.Redis, ids: Sequence[str]) -> list[bytes | None]:
        pipe = client.pipeline(transaction=False)
        for chunk_id in ids:
            pipe.get(self.keyspace.chunk(chunk_id))
        return pipe.execute()

    def read_into(self, ids: Sequence[str], sizes: Sequence[int], target: memoryview) -> list[Buffer | None]:
        """Objects read straight into consecutive places of ``target`` (see ``bulkread``)."""
        keys = [self.keyspace.chunk(i) for i in ids]
        if self.replicas is None:
            return read_values_into(self.deployment, keys, sizes, target, ROUND_BYTES)
        replicas = self.replicas
        got = self._from_replica(lambda: read_values_into(replicas, keys, sizes, target, ROUND_BYTES), len(keys))
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        absent = [i for i, value in enumerate(got) if not isinstance(value, memoryview)]  # lacking, or another size
        for first, last in _runs(absent):  # each run of consecutive objects: one pipelined read from the primary
            place = target[offsets[first] : offsets[last + 1]]
            got[first : last + 1] = read_values_into(self.deployment, keys[first : last + 1], sizes[first : last + 1],
                                                     place, ROUND_BYTES)  # fmt: skip
        self._count(len(keys), len(absent))
        return got

    def _from_replica(self, read: Callable[[], list[Any]], count: int) -> list[Any]:
        """``read()`` from the replica, or ``count`` Nones (read from the primary) when it cannot serve."""
        try:
            values = read()
        except redis.exceptions.RedisError as exc:  # down, LOADING, MASTERDOWN, no replica at all
            cause = f"{type(exc).__name__}: {exc}"
            if cause != self._replica_failure:
                log.warning("reading chunks from a replica failed (%s); reading them from the primary", cause)
                self._replica_failure = cause
            return [None] * count
        self._replica_failure = None
        return values

    def _count(self, read: int, reread: int) -> None:
        self.replica_reads += read - reread
        self.primary_rereads += reread
        if reread:
            log.debug("%d of %d objects were not on the replica; read from the primary", reread, read)

    def discard_corrupt(self, chunk_id: str) -> None:
        """Best effort: delete an object whose bytes do not match its id, so that the next push,
        which uploads only what Redis lacks, replaces it (a user without DEL rights just logs)."""
        try:
            self.client.delete(self.keyspace.chunk(chunk_id))
        except redis.exceptions.RedisError as exc:
            log.warning("could not delete corrupted object %s: %s", chunk_id, exc)

    def scan(self) -> Iterator[str]:
        """The id of every object of the namespace (SCAN: other clients run between pages)."""
        for name in self.client.scan_iter(match=self.keyspace.chunk_pattern, count=1000):
            chunk_id = self.keyspace.chunk_id_of(name)
            if chunk_id is not None:
                yield chunk_id

    def delete(self, ids: Sequence[str]) -> int:
        """DEL the objects, ``DELETE_BATCH`` keys per call, each call its own round trip
        (plain DEL: no MULTI, no script, so it works while Redis is over maxmemory)."""
        deleted = 0
        for start in range(0, len(ids), DELETE_BATCH):
            pipe = self.client.pipeline(transaction=False)  # one key per DEL: chunks lie in many slots
            for chunk_id in ids[start : start + DELETE_BATCH]:
                pipe.delete(self.keyspace.chunk(chunk_id))
            deleted += sum(int(n) for n in pipe.execute())
        return deleted


def _runs(indices: Sequence[int]) -> Iterator[tuple[int, int]]:
    """``(first, last)`` of each run of consecutive numbers in sorted ``indices``."""
    start = 0
    while start < len(indices):
        end = start
        while end + 1 < len(indices) and indices[end + 1] == indices[end] + 1:
            end += 1
        yield indices[start], indices[end]
        start = end + 1
