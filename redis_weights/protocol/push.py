"""One push, as one object whose steps read top to bottom.

``Push.run`` commits one version (its number allocated by the caller, which must know
it before the upload: a background push returns it at once):

1. **begin**: a pending record of every object the version may reference, and the GC
   epoch its commit must still see (``VersionRegistry.begin``);
2. **find missing**: one pipelined ``EXISTS`` of those objects, the push's only check
   of what Redis holds (``ChunkStore.missing``);
3. **plan**: the manifest, with patches for changed chunks when the payload has deltas
   (``DeltaPlanner.plan``, from the absent set: a chain through a lost object is cut); the
   objects a plan names beyond the candidates (a keyframe made because a pack was lost) are
   recorded and checked too;
4. **upload**: index, then write, every object Redis lacks (the plan is announced
   first when the upload is big enough for workers to overlap, ``staging.announce``);
5. **replicate**: ``WAIT`` for the replicas (``ReplicaGate``);
6. **commit**: the atomic script; a GC that ran since step 1 makes it refuse
   (``GcRaceError``), and the push goes back to step 1: the one place a race is retried;
7. **collect**: garbage collection, only when the commit left more versions than the
   retention (a push that drops no version does no GC work); incremental, its reads
   proportional to the versions it drops (``VersionRegistry.collect``); on the trainer's
   collector thread (``collector.py``), which the next push waits for.

Waiting for the acks (step 8) belongs to the updater, which holds the acks
subscription. Each step is timed as a phase of the caller's ``PhaseClock``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import redis

from ..errors import PushError, RedisWeightsError, VersionNotFoundError
from ..format.manifest import Buffer, Manifest
from ..observe.reports import PhaseClock
from .chunkstore import ChunkStore
from .staging import announce
from .versions import DEFAULT_PENDING_TTL, Commit, GcRaceError, GcReport, VersionRegistry, producer_id

if TYPE_CHECKING:  # torch: the admin tools roll back without importing it
    from ..format.codec import Encoded
    from ..format.delta import DeltaPlanner
    from .collector import GarbageCollector

log = logging.getLogger(__name__)

ATTEMPTS = 5  # commits refused by a concurrent GC before the push gives up

ObjectBytes = tuple[str, Buffer, bool]  # (id, bytes, reused): see ``ChunkStore.write``


class Payload(Protocol):
    """What a push commits: the objects to check, the manifest planned from what Redis lacks,
    and the writing of the objects Redis lacks (the bytes sent)."""

    def candidates(self) -> set[str]: ...

    def plan(self, absent: set[str]) -> tuple[Manifest, Mapping[str, bytes]]: ...

    def write(self, store: ChunkStore, missing: set[str], patches: Mapping[str, bytes]) -> int: ...


@dataclass
class EncodedPayload:
    """A version the trainer encoded: its chunks, and patches when ``planner`` (deltas) is set."""

    encoded: Encoded
    version: int
    planner: DeltaPlanner | None
    fields: dict[str, Any]
    patches: Mapping[str, bytes] = field(default_factory=dict)  # the last plan's: a repair may need them

    def candidates(self) -> set[str]:
        return self.planner.candidates(self.encoded) if self.planner is not None else set(self.encoded.ids)

    def plan(self, absent: set[str]) -> tuple[Manifest, Mapping[str, bytes]]:
        if self.planner is not None:
            manifest, self.patches = self.planner.plan(self.encoded, self.version, absent, **self.fields)
            return manifest, self.patches
        return self.encoded.manifest(self.version, keyframe=self.version, **self.fields), {}

    def write(self, store: ChunkStore, missing: set[str], patches: Mapping[str, bytes]) -> int:
        return store.write(self._objects(missing, patches))

    def _objects(self, missing: set[str], patches: Mapping[str, bytes]) -> Iterator[ObjectBytes]:
        """The missing chunks (each once, from the encoded stream) and patches; a missing object
        that neither holds (an earlier version's patch, lost) is a ``VersionNotFoundError``."""
        sent = set()
        for index, chunk_id in enumerate(self.encoded.ids):
            if chunk_id in missing and chunk_id not in sent:
                sent.add(chunk_id)
                yield (chunk_id, *self.encoded.chunk(index))
        for patch_id, data in patches.items():
            if patch_id in missing and patch_id not in sent:
                sent.add(patch_id)
                yield patch_id, data, False
        unknown = missing - sent
        if unknown:
            raise VersionNotFoundError(f"{len(unknown)} object(s) an earlier version's patch chain needs are "
                                       "gone from Redis")  # fmt: skip


@dataclass
class ManifestPayload:
    """A manifest whose objects Redis should already hold (a rollback, an import of retained
    weights); ``upload(missing)`` may write the missing ones (None: a missing one is an error)."""

    manifest: Manifest
    upload: Callable[[set[str]], int] | None = None

    def candidates(self) -> set[str]:
        return self.manifest.objects()

    def plan(self, absent: set[str]) -> tuple[Manifest, Mapping[str, bytes]]:
        return self.manifest, {}

    def write(self, store: ChunkStore, missing: set[str], patches: Mapping[str, bytes]) -> int:
        if self.upload is None:
            raise VersionNotFoundError(f"version {self.manifest.version}: {len(missing)} chunk(s) are gone from "
                                       "Redis (garbage-collected?)")  # fmt: skip
        return self.upload(missing)


class ReplicaGate:
    """``WAIT`` before each commit until ``min_replicas`` replicas of every master hold what the
    push wrote: a ``PushError`` when a required count is missed, a warning (when the shortfall
    changes) when a best-effort one is."""

    def __init__(self, registry: VersionRegistry, min_replicas: int | None, timeout: float) -> None:
        self.registry = registry
        self.min_replicas = min_replicas
        self.timeout = timeout
        self._short: tuple[tuple[str, int, int], ...] = ()  # the last shortfall warned about

    def wait(self, version: int) -> None:
        if self.min_replicas == 0:
            return
        deployment, keyspace = self.registry.deployment, self.registry.keyspace
        results = deployment.wait_for_replicas(keyspace, self.min_replicas, self.timeout)
        short = tuple((r.master, r.acknowledged, r.wanted) for r in results if r.short)
        if short and self.min_replicas is not None:
            said = "; ".join(f"{m}: {a} of {w}" for m, a, w in short)
            raise PushError(f"push of version {version} failed: fewer replicas than min_replicas={self.min_replicas} "
                            f"hold its chunks after {self.timeout:g}s ({said} acknowledged); "
                            "the new version was not committed", version=version)  # fmt: skip
        if short != self._short:
            if short:
                said = ", ".join(f"{a} of {w} ({m})" for m, a, w in short)
                log.warning("version %d: only %s of the replicas acknowledged its chunks within %gs; committed anyway "
                            "(min_replicas=None is best effort; a failover to a lagging replica may lose it)",
                            version, said, self.timeout)  # fmt: skip
            else:
                log.info("version %d: every replica acknowledged its chunks again", version)
            self._short = short


@dataclass(frozen=True)
class PushResult:
    """A committed push: its manifest, the bytes it uploaded, the commit, and the GC it ran."""

    manifest: Manifest
    uploaded: int
    commit: Commit
    gc: GcReport | None


class Push:
    """One version, from its pending record to its garbage collection (see the module docstring).

    ``committing`` is set once the commit script has been sent: from then on a lost
    connection leaves it unknown whether the version was committed.
    """

    def __init__(
        self,
        registry: VersionRegistry,
        version: int,
        payload: Payload,
        ranks: Iterable[int] = (),
        *,
        clock: PhaseClock | None = None,
        pending_ttl: float = DEFAULT_PENDING_TTL,
        retention: int | None = None,
        overlap_min_bytes: int | None = None,
        replicas: ReplicaGate | None = None,
        collector: GarbageCollector | None = None,
    ) -> None:
        self.registry = registry
        self.version = version
        self.payload = payload
        self.ranks = list(ranks)
        self.clock = clock or PhaseClock()
        self.pending_ttl = pending_ttl
        self.retention = retention
        self.overlap_min_bytes = overlap_min_bytes
        self.replicas = replicas
        self.collector = collector
        self.committing = False
        self.token = uuid.uuid4().hex

    def run(self) -> PushResult:
        """Steps 1-7; on any failure the pending record is dropped (its objects become garbage)."""
        uploaded = 0
        started = time.perf_counter()
        candidates = self.payload.candidates()
        try:
            for attempt in range(ATTEMPTS):
                epoch = self.begin(candidates)
                absent = self.find_missing(candidates)
                manifest, patches = self.plan(absent)
                needed = manifest.objects()  # one pass over the chunks, for both steps below
                absent |= self.find_unplanned(needed, candidates, patches)
                uploaded += self.upload(manifest, needed, patches, absent, retried=attempt > 0)
                manifest.uploaded_bytes = uploaded
                self.clock.add("upload", time.perf_counter() - started)
                self.replicate()
                try:
                    with self.clock.phase("commit"):
                        commit = self.commit(manifest, epoch)
                    break
                except GcRaceError as exc:
                    if attempt == ATTEMPTS - 1:
                        raise
                    log.info("%s", exc)
                    started = time.perf_counter()
        except BaseException:
            self._end()
            raise
        return PushResult(manifest, uploaded, commit, self.collect(commit))

    # -- the steps ------------------------------------------------------------------------
    def begin(self, candidates: set[str]) -> str:
        """1. The pending record of every candidate object, and the GC epoch."""
        return self.registry.begin(self.token, candidates, self.pending_ttl)

    def find_missing(self, candidates: set[str]) -> set[str]:
        """2. Which candidates Redis lacks: one pipelined EXISTS pass."""
        return self.registry.chunks.missing(candidates)

    def plan(self, absent: set[str]) -> tuple[Manifest, Mapping[str, bytes]]:
        """3. The manifest (and new patches); the patches join the pending record (the candidates,
        recorded by ``begin``, name every other object the manifest can reference)."""
        manifest, patches = self.payload.plan(absent)
        if patches:
            self.registry.protect(self.token, patches, self.pending_ttl)  # the record names the rest
        return manifest, patches

    def find_unplanned(self, needed: set[str], candidates: set[str], patches: Mapping[str, bytes]) -> set[str]:
        """3b. Which objects of ``needed`` (the plan's, ``Manifest.objects``) that are neither candidates
        nor new patches Redis lacks, once they are in the pending record. Only a plan that left the
        candidates' path has any: a delta version that became a keyframe (a pack of its chain was
        lost) names as chunks the ids that the previous version held only inside that pack."""
        rest = needed - candidates - patches.keys()
        if not rest:
            return set()
        self.registry.protect(self.token, rest, self.pending_ttl)
        return self.find_missing(rest)

    def upload(
        self, manifest: Manifest, needed: set[str], patches: Mapping[str, bytes], absent: set[str], *, retried: bool
    ) -> int:
        """4. Write the objects of ``needed`` (the manifest's, ``Manifest.objects``) that Redis lacks
        (index first: ``ChunkStore.write``); the bytes sent. After a GC race every object is indexed
        again: that GC may have dropped the id of an object this push wrote meanwhile (``index.py``)."""
        missing = (absent & needed) | (set(patches) & needed)
        if retried:
            self.registry.chunks.index.add_objects(needed)
        if not missing:
            return 0
        if self.overlap_min_bytes is not None:
            sizes = dict(zip(manifest.ids, manifest.chunk_sizes, strict=True))
            size = sum(sizes.get(i, 0) for i in missing) + sum(len(d) for i, d in patches.items() if i in missing)
            if size >= self.overlap_min_bytes:
                announce(self.registry.client, self.registry.keyspace, manifest)
        return self.payload.write(self.registry.chunks, missing, patches)

    def replicate(self) -> None:
        """5. ``WAIT`` for the replicas (timed as its own phase)."""
        if self.replicas is not None:
            with self.clock.phase("replicas"):
                self.replicas.wait(self.version)

    def commit(self, manifest: Manifest, epoch: str) -> Commit:
        """6. The atomic commit script."""
        self.committing = True
        return self.registry.commit(manifest, self.ranks, epoch=epoch, token=self.token, pending_ttl=self.pending_ttl)

    def collect(self, commit: Commit) -> GcReport | None:
        """7. GC when the commit left more versions than the retention, or when another push the
        index lists lost its pending record (a crash: its objects are garbage); else nothing. With
        a ``collector`` it runs on the collector's thread (the report comes later, ``None`` here);
        without, here. Housekeeping never fails a push."""
        if self.retention is None:
            return None
        try:
            if not (commit.versions > self.retention or (commit.pushes and self.registry.crashed_pushes())):
                return None
            if self.collector is not None:
                self.collector.start(self.retention)
                return None
            started = time.perf_counter()
            report = self.registry.collect(self.retention)
            self.clock.add("gc", time.perf_counter() - started)
            return report
        except (redis.exceptions.RedisError, RedisWeightsError) as exc:  # Redis refused, or a corrupt index
            log.warning("garbage collection after version %d failed: %s", self.version, exc)
            return None

    # -- failure --------------------------------------------------------------------------
    def _end(self) -> None:
        try:
            self.registry.end(self.token)
        except redis.exceptions.RedisError as exc:
            log.debug("could not drop pending record %s: %s (it expires)", self.token, exc)


def publish(
    registry: VersionRegistry,
    manifest: Manifest,
    ranks: Iterable[int] = (),
    *,
    upload: Callable[[set[str]], int] | None = None,
    pending_ttl: float = DEFAULT_PENDING_TTL,
) -> int:
    """Commit a ready ``manifest`` once every object it references is in Redis; the bytes
    ``upload(missing)`` wrote (None: nothing may be uploaded, a missing object is a
    ``VersionNotFoundError``, as for a rollback whose chunks were deleted)."""
    push = Push(registry, manifest.version, ManifestPayload(manifest, upload), ranks, pending_ttl=pending_ttl)
    return push.run().uploaded


def republish(
    registry: VersionRegistry,
    source: Manifest,
    version: int,
    ranks: Iterable[int] = (),
    *,
    reason: str,
    by: str,
    upload: Callable[[set[str]], int] | None = None,
    pending_ttl: float = DEFAULT_PENDING_TTL,
) -> Manifest:
    """Commit the weights of ``source`` again as ``version`` (allocated by the caller): the same
    manifest with a new number, a new ``created`` and the producer ``"{reason} of v{source} by {by}"``
    (a rollback, the updater's repair). Published as by ``publish`` (``upload``: the same rule); the
    manifest committed, its ``uploaded_bytes`` what ``upload`` wrote."""
    manifest = source.renumbered(version, created=time.time(), producer=f"{reason} of v{source.version} by {by}")
    manifest.uploaded_bytes = publish(registry, manifest, ranks, upload=upload, pending_ttl=pending_ttl)
    return manifest


def rollback(
    registry: VersionRegistry, version: int, ranks: Iterable[int] = (), pending_ttl: float = DEFAULT_PENDING_TTL
) -> Manifest:
    """Commit the weights of an older ``version`` again, as a new version that workers apply.

    Its chunks are already in Redis (content-addressed): nothing is uploaded or copied.
    The manifest is the old one with a new number, a new ``created`` and a producer
    naming the rollback (``republish``)."""
    source = registry.read_manifest(version)
    manifest = republish(registry, source, registry.allocate(), ranks, reason="rollback", by=producer_id(),
                         pending_ttl=pending_ttl)  # fmt: skip
    log.info("rolled back to version %d as version %d", version, manifest.version)
    return manifest
