"""What a namespace owns, recorded in its own slot: no hot path, admin command or scrape SCANs.

A shared Redis holds millions of keys that are not ours; SCANning them costs O(keyspace)
for every call. Instead the namespace keeps four sets beside its control keys (in the
``{ns}`` slot, ``keys.py``), kept exact by the calls that already run:

* ``index:objects``: the ids of the chunks and patches (``ChunkStore`` adds an id
  *before* it writes the object and removes it *after* it deleted it);
* ``index:pushes``: the tokens of pushes in flight (``VersionRegistry.begin`` adds one
  before it writes the push's pending record; the commit script or ``end`` removes it);
* ``index:ranks``: the ranks that ever joined (added with the rank's version key);
* ``index:names``: the names written through ``RedisStore``'s mapping.

**Superset, never a miss.** Because an id enters the index before its key can exist
and leaves it only after its key is gone, a crash between any two steps leaves the
index naming something that is gone (a chunk, an expired pending record), never
missing something that exists. Readers treat an entry as a candidate and check the
key itself: GC deletes only what no retained version or pending push references,
a push uploads whatever ``EXISTS`` says is absent, whatever the index says. The one
interleaving that could hide an object (a GC deleting an id while a push re-adds and
re-writes it) is followed by the push's ``GcRaceError`` retry, which re-adds every
object of the push.

**Existing namespaces.** A namespace written before the index has objects the index
does not list: they are merely never collected (a leak, not a loss), until
``reindex`` (``redis-weights reindex``, or the trainer's first start on such a
namespace) SCANs the namespace's own patterns once, resumably, and records them.
That is the one place the library SCANs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import redis

from ..errors import CodecError
from .keys import Keys
from .values import text

log = logging.getLogger(__name__)

SSCAN_COUNT = 1000  # members per SSCAN step (a step over a 1000-member page: ~0.1 ms of Redis)
ADD_BATCH = 4096  # members per SADD / SREM command
REINDEX_COUNT = 1000  # keys a reindex SCAN step visits
_OBJECT_ID = re.compile(rb"[0-9a-f]{32}")
_RANK = re.compile(rb"[1-9][0-9]{0,17}")
_TOKEN = re.compile(rb"[A-Za-z0-9_.\-]{1,64}")  # a push token (the library's are 32 hex digits)
_NAME_LIMIT = 1024  # bytes: a longer member of the names index is not a name this library wrote


class CorruptIndexError(CodecError):
    """A key of the index holds something this library never writes there (wrong type, a hostile member)."""


@dataclass(frozen=True)
class ReindexReport:
    """What a ``reindex`` found: objects, ranks and pending pushes added, keys visited, finished or not."""

    objects: int
    ranks: int
    pushes: int
    names: int
    steps: int  # SCAN steps (each visits about ``REINDEX_COUNT`` keys of the server)
    complete: bool


class NamespaceIndex:
    """The index of one namespace (see the module docstring). Every member read is validated."""

    def __init__(self, client: redis.Redis, keyspace: Keys) -> None:
        self.client = client  # never closed here
        self.keyspace = keyspace

    # -- reading --------------------------------------------------------------------------
    def _members(self, key: str) -> Iterator[bytes]:
        """Every member of the set ``key`` in SSCAN pages (other clients run between pages)."""
        try:
            for member in self.client.sscan_iter(key, count=SSCAN_COUNT):
                yield member if isinstance(member, bytes) else str(member).encode()
        except redis.exceptions.ResponseError as exc:
            if "WRONGTYPE" in str(exc):
                raise CorruptIndexError(
                    f"{key} is a {text(self.client.type(key))}, not the set redis_weights keeps there "
                    "(written by hand or by another program?): delete it and run `redis-weights reindex`"
                ) from exc
            raise

    def _validated(self, key: str, pattern: re.Pattern[bytes], what: str) -> Iterator[str]:
        for member in self._members(key):
            if not pattern.fullmatch(member):
                raise CorruptIndexError(
                    f"{key} holds {member[:40]!r}{'...' if len(member) > 40 else ''}, not {what} "
                    "(written by hand or by another program?): SREM it, or delete the key and run "
                    "`redis-weights reindex`; nothing was deleted"
                )
            yield member.decode()

    def objects(self) -> set[str]:
        """Every object id the index lists (a superset of the objects in Redis)."""
        return set(self._validated(self.keyspace.objects_index, _OBJECT_ID, "a 32-hex-digit object id"))

    def pushes(self) -> list[str]:
        """The tokens of pushes the index lists as in flight (their record may have expired)."""
        return list(self._validated(self.keyspace.pushes_index, _TOKEN, "a push token"))

    def ranks(self) -> list[int]:
        """Every rank that ever joined, sorted."""
        return sorted(int(r) for r in self._validated(self.keyspace.ranks_index, _RANK, "a rank number"))

    def names(self) -> list[str]:
        """The relative names the store's mapping wrote (each still to be checked for existence)."""
        out = []
        for member in self._members(self.keyspace.names_index):
            if len(member) > _NAME_LIMIT:
                raise CorruptIndexError(f"{self.keyspace.names_index} holds a member of {len(member)} bytes, "
                                        "not a key name this library wrote")  # fmt: skip
            out.append(member.decode(errors="replace"))
        return out

    def complete(self) -> bool:
        """Whether every object and rank of the namespace is known to be indexed."""
        return self.client.hget(self.keyspace.index_state, "complete") in (b"1", "1")

    def size(self) -> dict[str, int]:
        """Members per set, one round trip (for ``doctor``)."""
        k = self.keyspace
        pipe = self.client.pipeline(transaction=False)
        for key in (k.objects_index, k.pushes_index, k.ranks_index, k.names_index):
            pipe.scard(key)
        objects, pushes, ranks, names = pipe.execute()
        return {"objects": int(objects), "pushes": int(pushes), "ranks": int(ranks), "names": int(names)}

    # -- writing --------------------------------------------------------------------------
    def add_objects(self, ids: Iterable[str], pipe: redis.client.Pipeline | None = None) -> None:
        """Record object ids (before their objects are written)."""
        self._change(self.keyspace.objects_index, list(ids), "sadd", pipe)

    def remove_objects(self, ids: Iterable[str]) -> None:
        """Forget object ids (after their objects are deleted)."""
        self._change(self.keyspace.objects_index, list(ids), "srem", None)

    def _change(self, key: str, members: list[str], command: str, pipe: redis.client.Pipeline | None) -> None:
        if not members:
            return
        own = pipe is None
        target = self.client.pipeline(transaction=False) if pipe is None else pipe
        for start in range(0, len(members), ADD_BATCH):
            getattr(target, command)(key, *members[start : start + ADD_BATCH])
        if own:
            target.execute()

    def mark_complete(self) -> None:
        """Record that the namespace is fully indexed (a new namespace is, from its first key on)."""
        self.client.hset(self.keyspace.index_state, mapping={"complete": 1, "cursor": 0})

    # -- existing namespaces ---------------------------------------------------------------
    def reindex(self, *, max_steps: int | None = None) -> ReindexReport:
        """Record every object, rank and pending push of the namespace that the index lacks,
        by SCANning the namespace's own patterns (the one SCAN in the library).

        Resumable: the SCAN cursor is saved in ``index:state`` after every step, so an
        interrupted run (or one stopped by ``max_keys`` keys visited) continues where
        it stopped (``max_steps``: pause after that many SCAN steps). Only ids and ranks read
        from key names this library builds are added.
        """
        k = self.keyspace
        state = self.client.hgetall(k.index_state) or {}
        cursor = int(text(state.get(b"cursor", state.get("cursor", b"0"))) or 0)
        phase = text(state.get(b"phase", state.get("phase", b"objects"))) or "objects"
        found = {"objects": 0, "ranks": 0, "pushes": 0, "names": 0}
        steps = 0
        for current in ("objects", "control"):
            if current == "control" and phase == "objects":
                phase, cursor = "control", 0
            if current != phase:
                continue
            pattern = k.chunk_pattern if phase == "objects" else k.pattern
            while True:
                cursor, names = self._scan_step(cursor, pattern)
                steps += 1
                self._record(names, found)
                self.client.hset(k.index_state, mapping={"cursor": cursor, "phase": phase})
                if cursor == 0:
                    break
                if max_steps is not None and steps >= max_steps:
                    log.info("namespace %r: reindex paused after %d SCAN steps (resumes at the next run)",
                             k.namespace, steps)  # fmt: skip
                    return ReindexReport(**found, steps=steps, complete=False)
        self.client.hset(k.index_state, mapping={"complete": 1, "cursor": 0, "phase": "objects"})
        return ReindexReport(**found, steps=steps, complete=True)

    def _scan_step(self, cursor: int, pattern: str) -> tuple[int, list[bytes]]:
        """One SCAN step over every master (a cluster client's ``scan`` visits them all: the
        cursor is then per node, so a cluster runs the whole scan in one go)."""
        if hasattr(self.client, "get_primaries"):  # RedisCluster: no resumable global cursor
            return 0, list(self.client.scan_iter(match=pattern, count=REINDEX_COUNT))
        cursor, names = self.client.scan(cursor=cursor, match=pattern, count=REINDEX_COUNT)
        return int(cursor), list(names)

    def _record(self, names: list[bytes], found: dict[str, int]) -> None:
        k = self.keyspace
        objects, ranks, pushes, names_ = [], [], [], []
        pending_prefix = k.full("pending:")
        for name in names:
            chunk_id = k.chunk_id_of(name)
            if chunk_id is not None:
                objects.append(chunk_id)
                continue
            full = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
            if not full.startswith(k.prefix):
                continue
            rank = k.rank_of(full)
            if rank is not None:
                ranks.append(str(rank))
            elif full.startswith(pending_prefix) and _TOKEN.fullmatch(full[len(pending_prefix) :].encode()):
                pushes.append(full[len(pending_prefix) :])
            elif not k.is_library_name(k.relative(full)):
                names_.append(k.relative(full))  # a key the user set through the store
        pipe = self.client.pipeline(transaction=False)
        self._change(k.objects_index, objects, "sadd", pipe)
        self._change(k.ranks_index, ranks, "sadd", pipe)
        self._change(k.pushes_index, pushes, "sadd", pipe)
        self._change(k.names_index, names_, "sadd", pipe)
        pipe.execute()
        found["objects"] += len(objects)
        found["ranks"] += len(ranks)
        found["pushes"] += len(pushes)
        found["names"] += len(names_)

    def ensure(self) -> ReindexReport | None:
        """Index a namespace written before the index, once (the trainer calls this at start):
        a namespace without a committed version or counter is new and complete as it is."""
        if self.complete():
            return None
        k = self.keyspace
        pipe = self.client.pipeline(transaction=False)
        pipe.exists(k.counter)
        pipe.exists(k.latest)
        if not any(pipe.execute()):
            self.mark_complete()
            return None
        log.warning("namespace %r was written before its index: indexing it once (a SCAN of its keys)",
                    k.namespace)  # fmt: skip
        report = self.reindex()
        log.info("namespace %r indexed: %d objects, %d ranks, %d pending pushes (%d SCAN steps)",
                 k.namespace, report.objects, report.ranks, report.pushes, report.steps)  # fmt: skip
        return report

    # -- checking -----------------------------------------------------------------------
    def verify(self, *, deep: bool = False) -> IndexCheck:
        """How the index compares with the namespace: with ``deep``, a SCAN of the namespace's
        own patterns counts the objects and ranks the index misses (it must miss none) and the
        ids it lists that are gone (harmless: a crash between a delete and its SREM)."""
        objects = self.objects()
        ranks = set(self.ranks())
        if not deep:
            return IndexCheck(self.complete(), len(objects), len(ranks))
        found_objects: set[str] = set()
        found_ranks: set[int] = set()
        k = self.keyspace
        for pattern in (k.chunk_pattern, k.pattern):
            for name in self.client.scan_iter(match=pattern, count=REINDEX_COUNT):
                chunk_id = k.chunk_id_of(name)
                if chunk_id is not None:
                    found_objects.add(chunk_id)
                elif pattern == k.pattern and (rank := k.rank_of(name)) is not None:
                    found_ranks.add(rank)
        return IndexCheck(self.complete(), len(objects), len(ranks), deep=True,
                          unindexed_objects=len(found_objects - objects), unindexed_ranks=len(found_ranks - ranks),
                          gone_objects=len(objects - found_objects))  # fmt: skip


@dataclass(frozen=True)
class IndexCheck:
    """``NamespaceIndex.verify``'s answer: members, and with ``deep`` what a SCAN found it lacks."""

    complete: bool
    objects: int
    ranks: int
    deep: bool = False
    unindexed_objects: int = 0
    unindexed_ranks: int = 0
    gone_objects: int = 0

    @property
    def agrees(self) -> bool:
        """No object or rank exists that the index misses (ids of gone objects are harmless)."""
        return self.complete and not (self.unindexed_objects or self.unindexed_ranks)
