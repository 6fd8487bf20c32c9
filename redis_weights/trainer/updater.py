"""``RedisWeightUpdater``: the trainer side. Encode -> upload what Redis lacks -> commit -> (sync) wait.

Chunks are content-addressed (``versions.py``): a chunk Redis already holds is not
uploaded again. With ``delta=True`` a changed chunk is stored as a patch against
the chunk the previous push committed (``delta.py``), when that is smaller.

The sync wait never sleep-polls: the updater stays subscribed to the ``acks``
channel for its lifetime (subscribed before the first commit, so no ack can be
missed), wakes on each ack and decides with one MGET of every targeted rank's
status, version and heartbeat. A rank counts as done only when its status reads
``"updated"`` *and* its version is at least the pushed one, so a slow worker's
late ack of an older version cannot end the wait early. A rank that reported an
error fails the push at once; so does a dead rank, as ``ranks.DeathWatch`` judges
it: its heartbeat missing for longer than it needs to beat again *while the server
answered promptly*, so a server that stalled (a failover's ``CLIENT PAUSE WRITE``, a
long ``DEBUG SLEEP``) or that the trainer itself could not reach for a while never
gets healthy ranks named dead. The wait rides out a lost connection until its
timeout.

``max_lag=K`` (with ``sync=False``) bounds the policy lag instead: the push returns
at once while every targeted rank runs a version at most K behind the one just
committed, and otherwise waits, like a sync push, until the laggards catch up
(``sync=True`` is ``max_lag=0``). Each push is timed by phase (``reports.py``): the
report goes to ``last_push``, to the post-hooks that ask for it and to the
Prometheus metrics (``metrics.py``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from ..backend.deployment import LOST
from ..backend.store import RedisStore, as_store
from ..backend.subscriptions import Subscription
from ..base import WeightUpdaterBase, WorkerIds
from ..errors import (
    BackgroundUploadError,
    PushError,
    PushTimeoutError,
    VersionNotFoundError,
)
from ..format.codec import Encoded, Encoder
from ..format.delta import DeltaPlanner
from ..format.manifest import Manifest
from ..observe.evictionwatch import EvictionWatch
from ..observe.health import ensure_server, explain_lost_connection
from ..observe.metrics import TrainerMetrics
from ..observe.reports import PhaseClock, PushReport, call_hook
from ..options import Option, PushOptions, from_kwargs
from ..protocol.collector import GarbageCollector
from ..protocol.push import EncodedPayload, Push, ReplicaGate, republish
from ..protocol.ranks import DeathWatch, RankState, check_worker_count, observe_rank_states, read_rank_states
from ..protocol.versions import VersionRegistry, producer_id
from ..threads import Threads
from .uploader import SLOTS, BackgroundUploader

log = logging.getLogger(__name__)

# What to do about the Redis errors a push most likely meets once Redis answers but refuses.
_HINTS: tuple[tuple[type[redis.exceptions.RedisError], str], ...] = (
    (redis.exceptions.OutOfMemoryError,
     "Redis is full (maxmemory, noeviction): this push already ran a GC of its leftovers; `redis-weights gc "
     "--keep 1` frees older versions (it works while Redis is full); else lower retention or raise maxmemory"),
    (redis.exceptions.NoPermissionError, "the Redis user lacks a right this push needs (ACL SETUSER)"),
    (redis.exceptions.ReadOnlyError, "this Redis is a read-only replica: connect to the primary"),
)
# Error replies redis-py has no class for, by the code that starts them.
_CODE_HINTS = (
    ("MISCONF", "Redis refuses writes because its last RDB save failed: fix its disk (space, permissions of "
                "'dir'), or CONFIG SET stop-writes-on-bgsave-error no"),
    ("CORRUPT", "a key of the namespace holds something else than what redis_weights wrote there: "
                "see `redis-weights versions` and `redis-weights workers`"),
)  # fmt: skip
_RECONNECT_PAUSE = 0.2  # seconds between tries while the sync wait cannot reach Redis
_LIVENESS_CHECK = 0.5  # seconds between MGETs when no ack arrives (heartbeats, lost acks)
_NOTICEABLE = 1e-4  # seconds: a wait for the previous GC shorter than this is not a phase
_POLL_WITHOUT_ACKS = 0.05  # seconds between MGETs while the acks subscription is lost or refused


@dataclass(frozen=True)
class _Held:
    """The last version this updater committed in the foreground, with the bytes behind it: valid
    until the next push encodes (into the same buffers)."""

    manifest: Manifest
    payload: EncodedPayload


@dataclass(frozen=True)
class _Upload:
    """One version to upload: its number, its encoded chunks, the ranks it marks pending, its clock."""

    version: int
    encoded: Encoded
    ranks: list[int]
    clock: PhaseClock = field(default_factory=PhaseClock)


class RedisWeightUpdater(WeightUpdaterBase):
    """Push policy weights to ``num_workers`` ranks through Redis.

    Args:
        store: the ``RedisStore`` (or a Redis URL, or a redis-py client).
        policy_weights: what ``update_weights()`` pushes: an ``nn.Module``, a
            TensorDict or a dict of tensors (read live at each push).
        num_workers: ranks are ``1..num_workers``.
        sync: wait for every targeted rank's ack (True) or return after the commit
            (False, see ``max_lag``).

    Keyword Args:
        options: a ``PushOptions`` (what each option does is documented there); or its
            fields as keyword arguments (``timeout=``, ``wire_dtype=``, ``delta=``...), not both.
            ``updater.options`` holds them; ``updater.timeout`` and the like read them.
    """

    def __init__(
        self,
        store: RedisStore | str | redis.Redis,
        policy_weights: Any = None,
        num_workers: int = 1,
        sync: bool = True,
        *,
        options: PushOptions | None = None,
        **kwargs: Any,
    ) -> None:
        num_workers = check_worker_count(num_workers)
        options = from_kwargs(PushOptions, options, kwargs, type(self).__name__)
        options.check_sync(sync)
        self._options = options
        self._sync = sync
        self.store = as_store(store)
        self.policy_weights = policy_weights
        self.num_workers = num_workers
        self._primary_lost = False  # the last push lost Redis: the next one first waits for a primary
        self.keyspace = self.store.keyspace
        self.registry = VersionRegistry(self.store.deployment, self.keyspace)
        self._replicas = ReplicaGate(self.registry, options.min_replicas, options.replica_timeout)
        self._collector = GarbageCollector(self.registry, name=f"redis-weights-gc-{self.keyspace.namespace}")
        self._indexed = False
        self._held: _Held | None = None  # the last foreground version and its bytes (``_repair``)
        self._threads = Threads(options.diff_threads, "redis-weights-encode")  # the casts and the diffs
        # A background push's snapshot stays on the caller's thread: on the threads it would queue
        # behind the previous upload's diff, and that push returns after a memcpy.
        casts = None if options.background else self._threads
        self._encoder = Encoder(options.chunk_size, options.wire_dtype, casts)
        self._uploader: BackgroundUploader[_Upload] | None = None
        self._slots = [self._encoder] + [Encoder(options.chunk_size, options.wire_dtype, casts)
                                         for _ in range(SLOTS - 1)]  # fmt: skip
        self._delta = (DeltaPlanner(options.keyframe_interval, options.keyframe_fraction, self._threads)
                       if options.delta else None)
        self._acks = Subscription(self.store.client, [self.keyspace.acks_channel], what="acks subscription",
                                  poll_every=_POLL_WITHOUT_ACKS)  # fmt: skip
        self._last_ranks: list[int] = []
        self._deaths = DeathWatch()
        self.version = 0
        self.last_push: PushReport | None = None  # the report of the last push (``reports.PushReport``)
        self._metrics = TrainerMetrics(self.keyspace.namespace)
        self._producer = producer_id()
        self._eviction = EvictionWatch(self.store.deployment)  # the policy re-checked while pushing
        if options.check_server:
            ensure_server(self.store.deployment, self.keyspace, chunk_size=options.chunk_size)

    # -- options: ``updater.timeout`` and the like read ``updater.options`` ------------------
    timeout = Option(settable=True)
    retention = Option(settable=True)
    pending_ttl = Option(settable=True)
    metadata = Option(settable=True)
    max_lag = Option(settable=True)
    overlap_min_bytes = Option(settable=True)
    min_replicas = Option(settable=True)
    replica_timeout = Option(settable=True)
    chunk_size = Option()
    check_server = Option()
    background = Option()
    wire_dtype = Option()
    delta = Option()
    keyframe_interval = Option()
    keyframe_fraction = Option()
    diff_threads = Option()

    @property
    def options(self) -> PushOptions:
        """This updater's options (``PushOptions``); assigning an option attribute replaces them."""
        return self._options

    def _set_options(self, options: PushOptions) -> None:
        options.check_sync(self._sync)
        self._options = options
        self._replicas.min_replicas, self._replicas.timeout = options.min_replicas, options.replica_timeout

    @property
    def sync(self) -> bool:
        """Whether a push waits for the acks of every targeted rank."""
        return self._sync

    @sync.setter
    def sync(self, sync: bool) -> None:
        self._options.check_sync(sync)
        self._sync = sync

    # -- WeightUpdaterBase --------------------------------------------------------------
    @classmethod
    def from_policy(cls, policy: Any) -> RedisWeightUpdater | None:
        """None: an updater needs a Redis URL and a worker count, which a policy does not carry."""
        return None

    def _get_server_weights(self) -> Any:
        return self.policy_weights

    def _sync_weights_with_worker(self, *, worker_id: list[int], server_weights: Any) -> None:
        ranks = worker_id  # validated once, by ``push_weights``
        clock = PhaseClock(self._metrics.phase)
        self._eviction.check()  # at most once a minute: says loudly when Redis may evict chunks now
        if self._primary_lost:  # e.g. a Sentinel failover: give the sentinels time to promote a replica
            self.store.deployment.wait_for_primary()
            self._primary_lost = False
        try:
            with self._counting_failures():
                try:
                    if self.background:
                        self._submit(server_weights, ranks, clock)
                    else:
                        self._publish(server_weights, ranks, clock)
                except redis.exceptions.RedisError as exc:  # subscribe or allocate; ``_upload`` raises a PushError
                    raise self._redis_failure(exc, None, "the new version was not committed") from exc
                bound = self.lag_bound
                if bound is not None and ranks:
                    with clock.phase("acks"):
                        self._await_ranks(ranks, bound)
        finally:  # a failed push blocked its caller too
            self._metrics.pushed(sum(clock.seconds.values()))
        written = 0 if self.background else clock.bytes  # a background upload is still running
        gcs = clock.gc or []
        self.last_push = PushReport(self.version, tuple(ranks), clock.total_bytes, written, dict(clock.seconds),
                                    self.sync, self.lag_bound, self.background,
                                    gc_versions=sum(len(g.versions) for g in gcs),
                                    gc_objects=sum(g.objects for g in gcs),
                                    gc_keys=sum(g.keys_read for g in gcs))  # fmt: skip

    @property
    def lag_bound(self) -> int | None:
        """How far behind a push lets the ranks run: 0 when ``sync``, else ``max_lag`` (None: no bound)."""
        return 0 if self.sync else self.max_lag

    def _call_post_hooks(self) -> None:
        """Run the post-hooks: ``hook()``, or ``hook(report=last_push)`` for a hook that declares ``report``."""
        for hook in self.post_hooks:
            call_hook(hook, report=self.last_push)

    @contextlib.contextmanager
    def _counting_failures(self) -> Iterator[None]:
        """Count a failed push in the metrics by kind (a background upload's failure was counted on its thread)."""
        try:
            yield
        except (PushError, BackgroundUploadError) as exc:
            if not isinstance(exc, BackgroundUploadError):
                self._metrics.failed(exc)
            raise

    def _redis_failure(
        self, exc: redis.exceptions.RedisError, version: int | None, what: str, *, uploading: bool = False
    ) -> PushError:
        """The one error a push raises for a Redis error: Redis stopped answering (refused, reset,
        timed out), or answered with an error (out of memory, no permission, read-only replica...).

        A connection cut while the chunks were being sent is most often a server limit
        below the chunk size (``proto-max-bulk-len``, ``client-query-buffer-limit``): when
        Redis still answers, the message names the limit instead of "unreachable"."""
        push = "push" if version is None else f"push of version {version}"
        where = self.store.deployment.describe()
        cut = uploading and isinstance(exc, redis.exceptions.ConnectionError)  # a timeout is a hung server: no limit
        cause = explain_lost_connection(self.store.client, reading=False, chunk_size=self.chunk_size) if cut else None
        if cause is not None:
            message = f"{push} failed: Redis at {where} cut the connection while the chunks were sent ({exc}): " \
                      f"{cause}; {what}"
        elif isinstance(exc, LOST):
            self._primary_lost = True
            message = f"{push} failed: Redis at {where} is unreachable ({exc}); {what}"
        else:
            hint = next((f"; {text}" for cls, text in _HINTS if isinstance(exc, cls)), "")
            hint = hint or next((f"; {text}" for code, text in _CODE_HINTS if str(exc).startswith(code)), "")
            error = f"{type(exc).__name__}: {str(exc).rstrip('.')}"
            message = f"{push} failed: Redis at {where} answered {error}; {what}{hint}"
        return PushError(message, version=self.version if version is None else version)

    # -- the push -----------------------------------------------------------------------
    def _publish(self, weights: Any, ranks: list[int], clock: PhaseClock) -> int:
        """Encode, upload and commit one version for ``ranks``; returns it."""
        self._held = None  # the encode below reuses the buffers behind it
        with clock.phase("encode"):
            encoded = self._encoder.encode(weights, metadata=self.metadata)
        clock.total_bytes = encoded.total_bytes
        if self.lag_bound is not None:
            self._acks.open()  # before the commit: no ack can slip past
        version = self._allocate()
        self._upload(_Upload(version, encoded, ranks, clock))
        self.version = version
        self._last_ranks = ranks
        return version

    def _allocate(self) -> int:
        """The next version; warns when someone else committed since this updater's last push."""
        if not self._indexed:  # a namespace written before the index is indexed once, before it grows
            self.registry.chunks.index.ensure()
            self._indexed = True
        version, latest = self.registry.allocate_after(floor=self.version)
        if self.version and latest > self.version:
            log.warning(
                "namespace %r: version %d was committed by another writer after this updater's version %d "
                "(a second trainer, or an operator's rollback/import); version %d supersedes it",
                self.keyspace.namespace, latest, self.version, version,
            )  # fmt: skip
        return version

    def _upload(self, job: _Upload) -> None:
        """Run the push's steps (``push.Push``: on the background thread if any) and book the result.

        A Redis error becomes a ``PushError`` naming the version. When the commit surely
        did not happen, a full GC runs at once: the chunks this push wrote are garbage now,
        and under ``maxmemory`` they hold memory the next push needs.
        """
        fields = {"created": time.time(), "producer": self._producer}
        payload = EncodedPayload(job.encoded, job.version, self._delta, fields)
        push = Push(self.registry, job.version, payload, job.ranks, clock=job.clock, pending_ttl=self.pending_ttl,
                    retention=self.retention, overlap_min_bytes=self.overlap_min_bytes,
                    replicas=self._replicas, collector=self._collector)  # fmt: skip
        waited = self._collector.wait()  # the previous push's GC: it never races this push
        if waited > _NOTICEABLE:
            job.clock.add("gc", waited)
        job.clock.gc = self._collector.reports()
        try:
            result = push.run()
        except LOST as exc:  # Redis is gone; the commit script may or may not have run
            self._forget_delta()
            what = "its commit could not be confirmed" if push.committing else "the new version was not committed"
            raise self._redis_failure(exc, job.version, what, uploading=not push.committing) from exc
        except VersionNotFoundError as exc:  # an object the delta chain relies on is gone
            self._forget_delta()
            raise PushError(f"push of version {job.version} failed: {exc}", version=job.version) from exc
        except redis.exceptions.RedisError as exc:  # an error reply: nothing committed, or a script failed part-way
            if self._committed(job.version):
                self._forget_delta()
                raise self._redis_failure(exc, job.version, "its commit failed part-way") from exc
            self._collect_garbage(job.version)
            raise self._redis_failure(exc, job.version, "the new version was not committed") from exc
        manifest = result.manifest
        if self._delta is not None:
            self._delta.committed(job.encoded, manifest)
        log.debug(
            "committed version %d: %d tensors, %d bytes in %d chunks, %d uploaded",
            job.version, len(manifest.tensors), manifest.total_bytes, manifest.num_chunks, manifest.uploaded_bytes,
        )  # fmt: skip
        job.clock.bytes = manifest.uploaded_bytes  # only what Redis lacked was written
        self._metrics.committed(job.version, manifest.uploaded_bytes)
        if not self.background:  # a background push's buffers go back to the uploader's pool
            self._held = _Held(manifest, payload)

    def _committed(self, version: int) -> bool:
        """Whether ``version``'s manifest is in Redis after an error reply (False if Redis cannot say)."""
        try:
            return self.registry.exists(version)
        except redis.exceptions.RedisError:
            return False

    def _forget_delta(self) -> None:
        if self._delta is not None:
            self._delta.reset()

    def _collect_garbage(self, version: int) -> None:
        """A full GC after a push that failed (its chunks are garbage now), on the collector's thread."""
        self._collector.start(self.retention, full=True)

    def _submit(self, weights: Any, ranks: list[int], clock: PhaseClock) -> None:
        """Background push: snapshot into a free staging buffer, queue the upload, return."""
        if self._uploader is None:
            self._uploader = BackgroundUploader(self._background_upload,
                                                name=f"redis-weights-upload-{self.keyspace.namespace}")  # fmt: skip
        self._uploader.raise_error()
        self._acks.open()  # before any commit: wait() cannot miss an ack
        version = self._allocate()

        def prepare(slot: int) -> _Upload:
            with clock.phase("encode"):
                encoded = self._slots[slot].encode(weights, snapshot=True, metadata=self.metadata)
            clock.total_bytes = encoded.total_bytes
            return _Upload(version, encoded, ranks, clock)

        superseded = self._uploader.superseded
        self._uploader.submit(prepare)
        self._metrics.superseded(self._uploader.superseded - superseded)
        self.version = version
        self._last_ranks = ranks

    def _background_upload(self, job: _Upload) -> None:
        """``_upload`` (retention included), on the upload thread; a failure is counted there, where it happens."""
        try:
            self._upload(job)
        except Exception as exc:
            self._metrics.failed(exc)
            raise

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the last push is committed (background mode: raise an upload error,
        ``BackgroundUploadError``, or ``PushTimeoutError`` if it is still uploading after ``timeout``),
        then for the garbage collection it started, if any (``collector.py``)."""
        timeout = self.timeout if timeout is None else timeout
        if self._uploader is not None:
            try:
                self._uploader.flush(timeout)
            except TimeoutError as exc:
                raise PushTimeoutError(f"push of version {self.version}: {exc}", version=self.version) from exc
        self._collector.wait(timeout)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the acks of the last push (for ``sync=False``; with ``background``, its commit first)."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        if self.version and self._last_ranks:
            with self._counting_failures():
                self._collect_acks(self.version, self._last_ranks, max(0.0, deadline - time.monotonic()))

    def workers(self, ranks: WorkerIds = None) -> list[RankState]:
        """Status, applied version and heartbeat of every (or the given) rank."""
        return read_rank_states(self.store.client, self.keyspace, self._normalize_worker_ids(ranks))

    # -- acks ---------------------------------------------------------------------------
    def _await_ranks(self, ranks: list[int], bound: int) -> None:
        """``_collect_acks`` of the push just committed; when ranks refused it because objects of it
        are gone from Redis (evicted, deleted) and this updater still holds them, ``_repair`` once
        and wait for the repaired version in the time left."""
        deadline = time.monotonic() + self.timeout
        try:
            self._collect_acks(self.version, ranks, self.timeout, max_lag=bound)
        except PushError as exc:
            if not self._repair(exc, ranks):
                raise
            self._collect_acks(self.version, ranks, max(0.0, deadline - time.monotonic()), max_lag=bound)

    def _repair(self, failure: PushError, ranks: list[int]) -> bool:
        """Upload again the objects of the held version that Redis lost, and commit its weights again
        as a new version (the ranks refused the old number for good); whether it did. Nothing is
        done unless ranks reported errors and objects of that version are really missing."""
        held = self._held
        if held is None or held.manifest.version != failure.version or not failure.errors:
            return False
        chunks = self.registry.chunks
        try:
            lost = chunks.missing(held.manifest.objects())
        except redis.exceptions.RedisError:
            return False
        if not lost:
            return False
        source = held.manifest.version
        log.warning("version %d: %d object(s) of it are gone from Redis (evicted? ranks %s refused it); uploading "
                    "them again and committing its weights again as a new version", source, len(lost),
                    sorted(failure.errors))  # fmt: skip
        version = self._allocate()
        try:
            manifest = republish(self.registry, held.manifest, version, ranks, reason="repair", by=self._producer,
                                 pending_ttl=self.pending_ttl,
                                 upload=lambda missing: held.payload.write(chunks, missing, held.payload.patches))
        except (VersionNotFoundError, redis.exceptions.RedisError) as exc:  # bytes it no longer holds
            log.error("version %d could not be repaired: %s", source, exc)
            return False
        self.version = manifest.version
        if self._delta is not None:
            self._delta.committed(held.payload.encoded, manifest)
        self._held = _Held(manifest, held.payload)
        self._metrics.committed(manifest.version, manifest.uploaded_bytes)
        return True

    def _collect_acks(self, version: int, ranks: list[int], timeout: float, *, max_lag: int = 0) -> None:
        """``_wait_for_acks``, with a Redis error raised as a ``PushError``."""
        try:
            self._wait_for_acks(version, ranks, timeout, max_lag)
        except redis.exceptions.RedisError as exc:
            raise self._redis_failure(exc, version, "while waiting for the acks") from exc

    def _wait_for_acks(self, version: int, ranks: list[int], timeout: float, max_lag: int = 0) -> None:
        """Until every rank acked ``version`` (``max_lag=0``) or runs at least ``version - max_lag``."""
        if version - max_lag <= 0:
            return  # nothing committed is that far behind
        deadline = time.monotonic() + timeout
        self._acks.open()  # before the first MGET, so an ack in between still wakes us
        self._deaths.start()
        unreachable = False
        while True:
            remaining = deadline - time.monotonic()
            try:
                states, seconds = observe_rank_states(self.store.client, self.keyspace, ranks)
            except LOST as exc:  # the trainer cannot reach Redis: a stall for every rank, not their death
                if remaining <= 0:
                    raise
                if not unreachable:
                    log.warning("push of version %d: Redis is unreachable while waiting for the acks (%s); "
                                "retrying for up to %.0fs", version, exc, remaining)  # fmt: skip
                unreachable = True
                self._deaths.stalled()
                time.sleep(min(remaining, _RECONNECT_PAUSE))
                continue
            remaining = deadline - time.monotonic()
            if max_lag:
                waiting = [s for s in states if s.version < version - max_lag]
            else:
                waiting = [s for s in states if not s.has_applied(version)]
            if not waiting:
                return
            errors = {s.rank: s.status for s in waiting if s.error}
            behind = {s.rank for s in waiting}
            dead = [r for r in self._deaths.dead(states, seconds) if r in behind]  # every state teaches a TTL
            if errors or dead or remaining <= 0:
                raise self._push_failure(version, waiting, errors, dead, timed_out=remaining <= 0, timeout=timeout,
                                         max_lag=max_lag)  # fmt: skip
            self._acks.messages(min(remaining, _LIVENESS_CHECK))  # a hint: the next MGET decides

    @staticmethod
    def _push_failure(
        version: int,
        waiting: list[RankState],
        errors: dict[int, str | None],
        dead: list[int],
        *,
        timed_out: bool,
        timeout: float,
        max_lag: int = 0,
    ) -> PushError:
        parts = []
        for s in waiting:
            if s.rank in errors:
                parts.append(f"rank {s.rank} reported: {s.status}")
            elif s.rank in dead:
                parts.append(f"rank {s.rank} is dead (heartbeat expired; last applied version {s.version})")
            elif s.dead:
                parts.append(f"rank {s.rank} lags (heartbeat missing since the server stalled, not yet long enough "
                             f"to call it dead; applied version {s.version})")
            elif not s.joined:
                parts.append(f"rank {s.rank} never joined")
            else:
                parts.append(f"rank {s.rank} lags (status {s.status!r}, applied version {s.version})")
        lagging = [s.rank for s in waiting if s.rank not in errors and s.rank not in dead]
        reason = f"no ack within {timeout:g}s" if timed_out and not (errors or dead) else "failed"
        if max_lag:
            reason += f" (ranks must run version {version - max_lag} or newer: max_lag={max_lag})"
        message = f"push of version {version} {reason}: " + "; ".join(parts)
        cls = PushTimeoutError if timed_out and not (errors or dead) else PushError
        clean_errors = {r: e for r, e in errors.items() if e}
        return cls(message, version=version, lagging=lagging, dead=dead, errors=clean_errors)

    # -- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        """Finish a background upload and a garbage collection, drop the acks subscription and close
        the store's connections."""
        if self._uploader is not None:
            self._uploader.close(self.timeout)
            try:
                self._uploader.raise_error()
            except BackgroundUploadError as exc:
                log.error("%s", exc)
        self._collector.wait(self.timeout)
        self._threads.close()  # the delta planner's too: the same threads
        self._acks.close()
        self.store.close()
        self._metrics.release()

    def __enter__(self) -> RedisWeightUpdater:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"RedisWeightUpdater(namespace={self.keyspace.namespace!r}, num_workers={self.num_workers}, "
            f"sync={self.sync}, version={self.version})"
        )

