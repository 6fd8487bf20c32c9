"""The content-addressed object store of one namespace: chunks and patches keyed by their id.

An object is a plain Redis string ``rw:<ns>:c:{<id>}`` (``keys.py``), where the id is
the xxh3-128 digest of its bytes. Objects carry no TTL: nothing points at an object
but manifests and the pending records of pushes, and the mark-and-sweep GC
(``versions.py``) deletes the ones nobody points at. This is the one owner of "what
Redis holds": it keeps the namespace's object index (``index.py``) a superset of the
objects, adding an id before the object is written and removing it after the object
is deleted. Every call here is
cluster-friendly (single-key commands, pipelined: on a Redis Cluster redis-py's
pipeline sends each command to its key's master), and writing, reading and
deleting go in bounded rounds so that no single call holds Redis for long.
Bulk writes and reads go to every master at once (``Deployment.group_by_node``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence

import redis

from ..backend.bulkread import READ_ROUND_BYTES, ROUND_BYTES, read_values_into  # bytes per pipelined round trip
from ..backend.deployment import Deployment, run_per_node
from ..backend.index import NamespaceIndex
from ..backend.keys import Keys
from ..format.manifest import Buffer

log = logging.getLogger(__name__)

_EXISTS_ROUND = 1000  # keys per EXISTS round trip
_SCRIPT_ROUND = 4096  # keys per existence script (~1 ms of Redis)
# KEYS: objects. Returns the (1-based) positions of the keys that do not exist.
_ABSENT = """
local absent = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then
    absent[#absent + 1] = i
  end
end
return absent
"""
DELETE_BATCH = 16  # DELs per round trip: one DEL frees one chunk (2 MiB by default: ~0.005 ms of Redis 7)


class ChunkStore:
    """Objects of one namespace (see the module docstring)."""

    def __init__(self, client: redis.Redis, keyspace: Keys, deployment: Deployment) -> None:
        self.client = client
        self.keyspace = keyspace
        self.deployment = deployment  # per-node connections for bulk reads
        self.index = NamespaceIndex(client, keyspace)
        self._absent = client.register_script(_ABSENT)

    def missing(self, ids: Iterable[str]) -> set[str]:
        """The ids among ``ids`` that Redis does not hold. One node: a script per ``_SCRIPT_ROUND``
        keys that returns the absent ones (a 70,000-chunk model's check: ~0.1 s instead of ~2 s of
        per-command pipelining, each call holding Redis ~1 ms); a cluster (keys in many slots, which
        one script cannot name): pipelined EXISTS, one key per command, on every master."""
        unique = list(dict.fromkeys(ids))
        absent: set[str] = set()
        if self.deployment.single_node:
            for start in range(0, len(unique), _SCRIPT_ROUND):
                batch = unique[start : start + _SCRIPT_ROUND]
                found = self._absent(keys=[self.keyspace.chunk(i) for i in batch])
                absent.update(batch[int(j) - 1] for j in found)
            return absent
        for start in range(0, len(unique), _EXISTS_ROUND):
            batch = unique[start : start + _EXISTS_ROUND]
            pipe = self.client.pipeline(transaction=False)
            for chunk_id in batch:
                pipe.exists(self.keyspace.chunk(chunk_id))
            absent.update(i for i, found in zip(batch, pipe.execute(), strict=True) if not found)
        return absent

    def write(self, objects: Iterable[tuple[str, Buffer, bool]]) -> int:
        """SET every ``(id, bytes, reused)``, pipelined in ~64 MiB rounds; returns the bytes sent.

        Values are sent from the caller's memory when the round is sent, so a round
        is sent right after a ``reused`` buffer, before its owner overwrites it. On a
        cluster each round goes to every master at once (a pipeline per master, in
        parallel threads).
        """
        batch: list[tuple[str, Buffer]] = []
        ids: list[str] = []
        queued = sent = 0
        for chunk_id, data, reused in objects:
            batch.append((self.keyspace.chunk(chunk_id), data))
            ids.append(chunk_id)
            queued += len(data)
            sent += len(data)
            if reused or queued >= ROUND_BYTES:
                self._send_round(ids, batch)
                batch, ids, queued = [], [], 0
        self._send_round(ids, batch)
        return sent

    def _send_round(self, ids: list[str], batch: Sequence[tuple[str, Buffer]]) -> None:
        """Index the round's ids, then SET its objects. One node: the SADD leads the same
        pipeline (ordered on one connection, no extra round trip); a cluster: it goes first."""
        if not batch:
            return
        single = self.deployment.single_node

        def send(indices: list[int]) -> None:
            pipe = self.client.pipeline(transaction=False)
            if single:
                self.index.add_objects(ids, pipe)
            for i in indices:
                pipe.set(*batch[i])
            pipe.execute()

        if not single:
            self.index.add_objects(ids)
        run_per_node(self.deployment.group_by_node([key for key, _ in batch]), send)

    def read(self, ids: Sequence[str], sizes: Sequence[int]) -> Iterator[list[bytes | None]]:
        """The values of ``ids`` (None: absent), in rounds of ~8 MiB of expected ``sizes``."""
        start = 0
        while start < len(ids):
            end, queued = start, 0
            while end < len(ids) and (end == start or queued + sizes[end] <= READ_ROUND_BYTES):
                queued += sizes[end]
                end += 1
            pipe = self.client.pipeline(transaction=False)
            for chunk_id in ids[start:end]:
                pipe.get(self.keyspace.chunk(chunk_id))
            yield pipe.execute()
            start = end

    def read_into(self, ids: Sequence[str], sizes: Sequence[int], target: memoryview) -> list[Buffer | None]:
        """Objects read straight into consecutive places of ``target`` (see ``bulkread``)."""
        keys = [self.keyspace.chunk(i) for i in ids]
        return read_values_into(self.deployment, keys, sizes, target, READ_ROUND_BYTES)

    def discard_corrupt(self, chunk_id: str) -> None:
        """Best effort: delete an object whose bytes do not match its id, so that the next push,
        which uploads only what Redis lacks, replaces it (a user without DEL rights just logs).
        Its id stays in the index (a superset): the next push's EXISTS is the truth."""
        try:
            self.client.delete(self.keyspace.chunk(chunk_id))
        except redis.exceptions.RedisError as exc:
            log.warning("could not delete corrupted object %s: %s", chunk_id, exc)

    def indexed(self) -> set[str]:
        """Every object id the namespace's index lists (a superset of its objects; no SCAN)."""
        return self.index.objects()

    def delete(self, ids: Sequence[str]) -> int:
        """DEL the objects, ``DELETE_BATCH`` keys per call, each call its own round trip
        (plain DEL: no MULTI, no script, so it works while Redis is over maxmemory), then
        drop them from the index (after: a crash in between leaves the index a superset)."""
        deleted = 0
        single = self.deployment.single_node
        for start in range(0, len(ids), DELETE_BATCH):
            batch = ids[start : start + DELETE_BATCH]
            pipe = self.client.pipeline(transaction=False)  # one key per DEL: chunks lie in many slots
            for chunk_id in batch:
                pipe.delete(self.keyspace.chunk(chunk_id))
            if single:  # one connection, in order: the SREM follows the DELs in the same round trip
                pipe.srem(self.keyspace.objects_index, *batch)
            deleted += sum(int(n) for n in pipe.execute()[: len(batch)])
            if not single:
                self.index.remove_objects(batch)
        return deleted
