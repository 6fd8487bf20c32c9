"""``RedisWeightReceiver``: the worker side. Wake, fetch, verify, apply in place, ack, heartbeat.

Pub/sub is only a wake-up hint (it is at-most-once: a reconnect or a full output
buffer drops messages). The truth is the ``latest`` key, read on every wake-up and
at least every ``poll_interval`` seconds, so a worker that missed messages or
joined late catches up by itself.

A version is applied only when every key, shape and dtype fits the policy (checked
before anything is fetched) and all of its chunks are in the receive buffer, each
verified against its id: chunks the buffer already holds are not downloaded again,
patched chunks are rebuilt in place from the previous ones (``assemble.py``). Then
every tensor is copied into the live tensors (same objects, same ``data_ptr``):
a worker whose weights were modified in place holds the version's bytes again. Any failure leaves the old weights whole and sets the rank's
status to ``"error: <reason>"``; so does a fetch that keeps failing (``failures.py``),
whose attempts are spaced out meanwhile.

The heartbeat has a thread of its own from construction to ``close()``, whether the
versions are applied by ``start()``'s thread or by the caller's ``poll()``/``wait()``:
a rank is alive as long as its process is, however long a fetch or an apply takes.

Each apply is timed (fetch, apply: ``reports.ApplyReport`` in ``last_apply``, to the
post-hooks that declare ``report``, and to the Prometheus metrics); ``lag`` is how
many versions this rank is behind ``latest`` as of its last check.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import redis

from ..backend.deployment import LOST
from ..backend.store import RedisStore, as_store
from ..backend.subscriptions import Subscription
from ..errors import (
    ApplyError,
    CodecError,
    ReceiveTimeoutError,
    RedisWeightsError,
    VersionNotFoundError,
    WeightMismatchError,
)
from ..format.codec import check_compatible, check_header, copy_tensors, flatten_weights
from ..format.manifest import Buffer, Manifest, manifest_limit
from ..observe.health import ensure_server, explain_lost_connection
from ..observe.metrics import WorkerMetrics
from ..observe.reports import ApplyReport, PhaseClock, call_hook
from ..options import Option, ReceiveOptions, from_kwargs
from ..protocol import ranks, staging
from ..protocol.assemble import MissingObjectError
from ..protocol.versions import VersionRegistry
from .failures import Repeats
from .fetcher import Fetcher
from .hostcache import DEFAULT_DIRECTORY, HostCache

log = logging.getLogger(__name__)

_WAKE_SLICE = 0.2  # the background loop checks for stop() this often
_FETCH_ATTEMPTS = 3  # a version garbage-collected mid-read: retry from latest

class RedisWeightReceiver:
    """Keep ``policy`` (an ``nn.Module``, TensorDict or dict of tensors) at the latest version.

    Args:
        store: the ``RedisStore`` (or a Redis URL, or a redis-py client).
        rank: this worker's 1-based rank.
        policy: the live weights to update in place.

    Keyword Args:
        options: a ``ReceiveOptions`` (what each option does is documented there); or its
            fields as keyword arguments (``poll_interval=``, ``host_cache=``...), not both.
            ``receiver.options`` holds them; ``receiver.poll_interval`` and the like read them.

    Chunks are read straight into one receive buffer of the model's size, kept from
    version to version (or into the shared file), verified, then copied in place;
    every tensor is copied (a memory copy, small beside the fetch), so an applied version
    is the version's bytes even where the worker's weights were modified in place.
    Use ``poll()`` from your own loop, ``wait()`` to block, or ``start()`` for a
    background thread (hold ``receiver.lock`` around code that must not see an
    update half-applied, e.g. one forward pass).

    The receiver fills the tensors it found in the policy at construction, or at the
    last ``receiver.policy = ...`` assignment (reading them from the policy at every
    version would walk every tensor each time). Tensors updated in place stay valid
    (``load_state_dict``, ``copy_``, ``param.data = ...``); after replacing tensor
    objects of the policy (a new ``nn.Parameter``, ``load_state_dict(assign=True)``,
    ``to_empty``, or ``module.to()`` with a new device or dtype, which replaces the
    buffers), assign ``receiver.policy = module`` again.
    """

    def __init__(
        self,
        store: RedisStore | str | redis.Redis,
        rank: int,
        policy: Any,
        *,
        options: ReceiveOptions | None = None,
        **kwargs: Any,
    ) -> None:
        rank = ranks.check_rank(rank)
        self.options = options = from_kwargs(ReceiveOptions, options, kwargs, type(self).__name__)
        self.policy = policy  # fails now, not at the first update, on a policy we cannot fill
        self.store = as_store(store)
        self.rank = rank
        self.keyspace = self.store.keyspace
        # replica reads for this receiver alone: a view of the store's deployment (same client, not owned)
        deployment = self.store.deployment.with_replica_reads() if options.read_from_replicas else self.store.deployment
        self.registry = VersionRegistry(deployment, self.keyspace)
        self.host_cache = self._host_cache(options.host_cache)
        self._fetcher = Fetcher(self.registry.chunks, self.host_cache, options.apply_threads)  # the receive buffer or
        # the host's file
        self.staged_bytes = 0  # of which read before their version's commit (``staging.py``)
        self._plan_hint = 0  # the newest version announced on the updates channel, not yet staged
        self._plan_staged = 0  # the newest plan staged: each version is staged once (a repeated hint costs nothing)
        self.version = 0
        self.latest_seen = 0  # ``latest`` as of the last check of Redis
        self.last_apply: ApplyReport | None = None
        self._metrics = WorkerMetrics(self.keyspace.namespace)
        self.last_error: str | None = None
        self.lock = threading.RLock()
        self.post_hooks: list[Callable[..., Any]] = []
        self._poll_lock = threading.Lock()
        self._applied = threading.Condition()
        self._failed_version = 0
        self._unsent: tuple[int, str] | None = None  # a report Redis did not confirm; poll() resends it
        self._lost_reported = False
        self._history_lost = False  # Redis lost this rank's keys: version numbers may repeat
        self._updates = Subscription(self.store.client, [self.keyspace.updates_channel],
                                     what=f"rank {rank}: updates subscription",
                                     poll_every=options.poll_interval)  # fmt: skip
        self._repeats = Repeats()  # a version whose fetch keeps failing: backoff, then an error status
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._beating = threading.Event()  # set: the heartbeat thread stops
        if options.check_server:
            ensure_server(self.store.deployment, self.keyspace)
        ranks.register(self.store.client, self.keyspace, rank, options.heartbeat_ttl)
        self._beater = threading.Thread(
            target=_beat_until_closed,
            args=(weakref.ref(self), self._beating, ranks.beat_interval(options.heartbeat_ttl)),
            name=f"redis-weights-beat-{rank}", daemon=True,
        )  # fmt: skip
        self._beater.start()

    # -- options: ``receiver.poll_interval`` and the like read ``receiver.options`` ------------
    allow_cast = Option(settable=True)
    poll_interval = Option()
    heartbeat_ttl = Option()
    read_from_replicas = Option()
    apply_threads = Option()

    def _set_options(self, options: ReceiveOptions) -> None:
        self.options = options

    # -- the policy ---------------------------------------------------------------------
    @property
    def policy(self) -> Any:
        """The weights this receiver updates in place; assigning it (the same object again after
        replacing its tensors) makes the receiver find its tensors again."""
        return self._policy

    @policy.setter
    def policy(self, policy: Any) -> None:
        targets = flatten_weights(policy)  # a CodecError for a policy it cannot fill: nothing changes
        # what a manifest for this policy can be at most: a bigger one is refused before it is downloaded
        self._max_manifest = manifest_limit(8 * sum(t.numel() for t in targets.values()), len(targets))
        self._targets = targets  # the live tensors of ``policy``, by name: what every version is copied into
        self._policy = policy

    # -- liveness -----------------------------------------------------------------------
    def heartbeat(self) -> None:
        """Refresh this rank's liveness key (value: wall time of the beat; expires after the TTL).

        In the same round trip, re-create the rank's version key if Redis lost it
        (restart without persistence, flush): the rank shows up as joined again, and
        this worker knows version numbers may now repeat (a restarted trainer counts
        from 1 again), so its next poll applies ``latest`` even if the number matches.
        """
        recreated = ranks.heartbeat(self.store.client, self.keyspace, self.rank, self.version, self.heartbeat_ttl)
        if recreated and self.version > 0 and not self._history_lost:
            log.warning("rank %d: Redis lost this rank's keys; the next version is applied whatever its number",
                        self.rank)  # fmt: skip
            self._history_lost = True

    def _report(self, version: int, status: str) -> None:
        """Record ``status`` for ``version`` (``ranks.ack``). Kept until Redis confirms it:
        a report lost to a Redis blip is sent again by the next ``poll()``, else the
        rank would stay ``"pending"`` and the trainer's sync push would time out."""
        self._unsent = (version, status)
        ranks.ack(self.store.client, self.keyspace, self.rank, version, status)
        self._unsent = None

    def register_post_hook(self, hook: Callable[..., Any]) -> None:
        """Call ``hook(version)`` after each version is applied and before it is acked;
        ``hook(version, report=ApplyReport)`` for a hook that declares ``report``.

        A hook that raises ``ApplyError`` turns the ack into the rank's ``"error: ..."``
        status (the version is in the policy but does not run where it must); any other
        exception is logged and the rank acks as usual.
        """
        self.post_hooks.append(hook)

    def _run_post_hooks(self, version: int, report: ApplyReport) -> str | None:
        """Call the post-hooks in order; the message of the first ``ApplyError`` (the hooks after
        it are not called), else None."""
        for hook in self.post_hooks:
            try:
                call_hook(hook, version, report=report)
            except ApplyError as exc:
                return str(exc)
            except Exception:
                log.exception("rank %d: post hook %r failed after version %d", self.rank, hook, version)
        return None

    @property
    def lag(self) -> int:
        """Versions this rank is behind ``latest`` as of its last check (numbers may skip: an upper bound)."""
        return max(0, self.latest_seen - self.version)

    # -- applying -----------------------------------------------------------------------
    def poll(self) -> int | None:
        """Apply the latest version if it differs from the applied one; return it, else None.

        Does not block on notifications. Redis errors propagate; bad versions do
        not (they become this rank's ``"error: ..."`` status and ``last_error``).
        A version whose fetch fails again and again is tried with a growing pause in
        between (None meanwhile), and from the third failure in a row its cause is
        the rank's ``"error: ..."`` status. With nothing new to apply, a status report
        that Redis did not confirm (a lost ack) is sent again.
        """
        with self._poll_lock:
            self.heartbeat()
            gone: VersionNotFoundError | None = None
            for _ in range(_FETCH_ATTEMPTS):
                latest = self.registry.latest()
                self._saw_latest(latest)
                if latest == 0:
                    self._report_lost()
                elif latest not in (self.version, self._failed_version) or self._history_lost:
                    if not self._repeats.due(latest):
                        return None  # it failed lately: the backoff decides when to try again
                    try:
                        applied = self._apply(latest)
                    except VersionNotFoundError as exc:
                        log.info("rank %d: version %d vanished while reading (%s); retrying", self.rank, latest, exc)
                        gone = exc
                        continue
                    except Exception as exc:
                        self._fetch_failed(latest, exc)
                        raise
                    self._repeats.clear()
                    return applied
                if self._plan_hint > max(latest, self.version):  # announced, not committed: stage it meanwhile
                    hinted, self._plan_hint = self._plan_hint, 0
                    self._stage(hinted)
                    continue  # committed meanwhile? then apply it now
                if self._unsent is not None:  # nothing newer to apply, whose report would supersede it
                    self._report(*self._unsent)
                return None
            if gone is not None:  # latest kept pointing at a version that is not there
                self._fetch_failed(latest, VersionNotFoundError(
                    f"latest points at version {latest}, which is not in Redis ({gone}; deleted by hand, e.g. "
                    "`redis-weights delete --force`?)"))  # fmt: skip
            return None

    def _fetch_failed(self, version: int, exc: BaseException) -> None:
        """Count a failed attempt at ``version``; from ``failures.REPORT_AFTER`` in a row, its cause
        becomes the rank's ``"error: ..."`` status (best effort: Redis may be what fails)."""
        count = self._repeats.failed(version)
        cause = self._cause(exc)
        log.warning("rank %d: version %d failed (%d in a row, next try in %.1fs): %s",
                    self.rank, version, count, self._repeats.delay, cause)  # fmt: skip
        if not self._repeats.to_report(cause):
            return
        self.last_error = ranks.error_status(
            f"version {version}: {cause} (failed {count} times in a row; retrying with a backoff)"
        )
        try:
            self._report(version, self.last_error)
        except redis.exceptions.RedisError as report_exc:  # kept in _unsent: the next poll sends it
            log.debug("rank %d: could not report the failure (%s)", self.rank, report_exc)

    def _cause(self, exc: BaseException) -> str:
        """What to tell the trainer about ``exc``: its text, and what the server's settings say
        about a connection Redis cut in the middle of a fetch."""
        text = str(exc) if isinstance(exc, (redis.exceptions.RedisError, RuntimeError)) else f"{type(exc).__name__}: {exc}"
        text = text.removeprefix(f"version {self._repeats.subject}: ")
        if isinstance(exc, redis.exceptions.ConnectionError):  # cut, not timed out: maybe a server limit
            hint = explain_lost_connection(self.store.client, reading=True)
            if hint:
                text += f"; {hint}"
        return text

    def _saw_latest(self, latest: int) -> None:
        self.latest_seen = latest
        self._metrics.lag(self.lag)

    def _apply(self, version: int) -> int | None:
        started = time.perf_counter()
        clock = PhaseClock(self._metrics.phase)
        try:
            manifest = self.registry.read_manifest(version, max_bytes=self._max_manifest)
        except CodecError as exc:  # not JSON, lies about the layout, too big, or another version's manifest
            self._fail(version, str(exc))
            return None
        targets = self._targets
        try:  # before allocating or fetching anything: a version that cannot fit costs one GET
            check_compatible(manifest, targets, allow_cast=self.allow_cast)
        except WeightMismatchError as exc:
            self._fail(version, str(exc))
            return None
        fetched = self._fetcher.fetched_bytes
        fetch_started = time.perf_counter()
        try:
            with self._fetcher.fetch(manifest) as chunks:  # the chunks are read, patched (or mapped) on entry
                clock.add("fetch", time.perf_counter() - fetch_started)
                check_header(chunks, manifest)
                with self.lock, clock.phase("apply"):  # holders of the lock see weights and version agree
                    self._install(chunks, manifest, targets)
                    previous, self.version = self.version, version
        except MissingObjectError as exc:
            if not self.registry.exists(version):  # garbage-collected meanwhile: retry from latest
                raise VersionNotFoundError(str(exc)) from exc
            # the manifest is still there, so the object is really missing (evicted, deleted by hand)
            self._fail(version, f"{exc} (evicted?)")
            return None
        except (CodecError, WeightMismatchError) as exc:  # corrupted, truncated, or does not fit the policy
            self._fail(version, str(exc))
            return None
        self.last_error = None
        self._lost_reported = self._history_lost = False
        fetched = self._fetcher.fetched_bytes - fetched
        report = ApplyReport(version, previous, manifest.total_bytes, fetched, dict(clock.seconds),
                             max(0, self.latest_seen - version))  # fmt: skip
        self.last_apply = report
        self._metrics.applied(version, report.fetched_bytes)
        self._metrics.lag(self.lag)
        refusal = self._run_post_hooks(version, report)  # before the ack: an ack means the hooks have run too
        if refusal is None:
            self._report(version, ranks.STATUS_UPDATED)
        else:
            self._fail(version, refusal, applied=True)
        log.debug(
            "rank %d: applied version %d (was %d), %d bytes in %.1f ms",
            self.rank, version, previous, manifest.total_bytes, (time.perf_counter() - started) * 1000,
        )  # fmt: skip
        with self._applied:
            self._applied.notify_all()
        return version

    def _install(self, chunks: list[Buffer], manifest: Manifest, targets: dict[str, Any]) -> None:
        """Put a verified version into the policy: every tensor copied in place (weights damaged in
        place are restored too). The one step a receiver that installs elsewhere overrides (the vLLM
        engine's, ``integrations/vllm``); a ``CodecError`` or ``WeightMismatchError`` refuses the version."""
        copy_tensors(chunks, manifest, targets, threads=self._fetcher.threads)

    def _host_cache(self, option: bool | str | os.PathLike[str]) -> HostCache | None:
        if option is False or option is None:
            return None
        base = DEFAULT_DIRECTORY if option is True else option
        return HostCache.scoped(base, self.store.deployment.scope(), self.keyspace.namespace)

    # -- overlap --------------------------------------------------------------------------
    def _stage(self, hinted: int) -> None:
        """Stage the announced version's chunks while the trainer writes them (``staging.py``):
        into the receive buffer, or into the host's shared file. Nothing is applied here; a plan
        that does not fit the policy is left to the commit, which reports it."""
        try:
            plan = staging.read_plan(self.store.client, self.keyspace, self._max_manifest)
        except redis.exceptions.ResponseError as exc:  # e.g. NOPERM: overlap is an optimisation, never a failure
            log.warning("rank %d: cannot read the plan of version %d (%s); fetching after its commit",
                        self.rank, hinted, exc)  # fmt: skip
            return
        if plan is None or plan.version <= max(self.version, self.latest_seen, self._plan_staged):
            return
        self._plan_staged = plan.version
        try:
            check_compatible(plan, self._targets, allow_cast=self.allow_cast)
        except WeightMismatchError:
            return
        started = time.perf_counter()
        current = self._plan_current(plan.version, self.latest_seen)
        staged = self._fetcher.stage(plan, current, committed=lambda: self.registry.latest() == plan.version)
        self.staged_bytes += staged
        log.debug("rank %d: staged %d bytes of version %d before its commit in %.1f ms",
                  self.rank, staged, plan.version, (time.perf_counter() - started) * 1000)  # fmt: skip

    def _plan_current(self, version: int, since: int) -> staging.Current:
        """Whether the plan of ``version`` is still worth staging: no version committed since ``latest``
        was ``since`` (a commit is applied at once), still the announced plan, and the receiver not stopping."""

        def current() -> bool:
            return not self._stop.is_set() and staging.still_planned(self.store.client, self.keyspace, version, since)

        return current

    def _fail(self, version: int, reason: str, *, applied: bool = False) -> None:
        """Report ``version`` as refused (``"error: version N: <reason>"``, also ``last_error``); it is
        not fetched again. ``applied``: it is in the policy, but a post-hook raised ``ApplyError``."""
        if applied:
            log.error("rank %d: version %d is applied, but a post hook refused it: %s", self.rank, version, reason)
        else:
            self._metrics.refused()
            log.error("rank %d: refusing version %d, keeping version %d: %s", self.rank, version, self.version, reason)
        self._failed_version = version
        self._history_lost = False  # refused once, like any version: not re-fetched at every poll
        # some causes name the version already: name it once
        reason = reason.removeprefix(f"version {version}: ").replace(f"manifest of version {version}: ", "manifest: ", 1)
        self.last_error = ranks.error_status(f"version {version}: {reason}")
        self._report(version, self.last_error)

    def _report_lost(self) -> None:
        if self.version > 0 and not self._lost_reported:
            self._lost_reported = True
            self.last_error = ranks.error_status(
                f"Redis holds no committed version (data lost or flushed?); keeping version {self.version}"
            )
            log.warning("rank %d: %s", self.rank, self.last_error)
            self._report(0, self.last_error)  # sets the status only while latest is still 0

    # -- blocking -----------------------------------------------------------------------
    def wait(self, timeout: float | None = None, *, min_version: int | None = None) -> int:
        """Block until a version other than the current one (or one >= ``min_version``) is applied.

        Returns the applied version; raises ``ReceiveTimeoutError`` after ``timeout`` seconds.
        """
        start = self.version

        def done() -> bool:
            return self.version != start if min_version is None else self.version >= min_version

        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            if self._thread is not None:  # the background thread applies; just wait for it
                with self._applied:
                    self._applied.wait_for(done, self._slice(deadline, self.poll_interval))
            elif self.poll() is None and not done():
                self._next_update(self._slice(deadline, self.poll_interval))
            if not done() and deadline is not None and time.monotonic() >= deadline:
                raise ReceiveTimeoutError(
                    f"rank {self.rank}: no new version within {timeout:g}s "
                    f"(applied {self.version}, latest {self.registry.latest()})"
                    + (f"; last error: {self.last_error}" if self.last_error else "")
                )
        return self.version

    @staticmethod
    def _slice(deadline: float | None, cap: float) -> float:
        return cap if deadline is None else max(0.0, min(cap, deadline - time.monotonic()))

    def _next_update(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for an ``updates`` message; True if one came. A plan's hint
        (``plan:<N>``) is remembered: the next ``poll()`` stages that version."""
        messages = self._updates.messages(timeout)
        for _, data in messages:
            hinted = staging.hinted_version(data)
            if hinted is not None:
                self._plan_hint = max(self._plan_hint, hinted)
        return bool(messages)

    # -- background thread ----------------------------------------------------------------
    def start(self) -> RedisWeightReceiver:
        """Apply new versions from a daemon thread until ``stop()``."""
        if self._thread is not None:
            return self
        self._stop.clear()
        self._updates.open()
        self._thread = threading.Thread(target=self._run, name=f"redis-weights-rank-{self.rank}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        last_poll = 0.0
        backoff = 0.1
        wake = True
        while not self._stop.is_set():
            try:
                if wake or time.monotonic() - last_poll >= self.poll_interval:
                    last_poll = time.monotonic()
                    self.poll()
                backoff = 0.1
            except (redis.exceptions.RedisError, RedisWeightsError, *LOST) as exc:  # a corrupt latest, a failover
                log.warning("rank %d: %s (%s); retrying in %.1fs", self.rank, type(exc).__name__, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.poll_interval)
            except Exception:  # never let the thread die silently
                log.exception("rank %d: unexpected error in the receiver thread", self.rank)
                self._stop.wait(self.poll_interval)
            wake = self._next_update(_WAKE_SLICE)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the background thread (if any) and wait for it. The heartbeat goes on until ``close()``."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout)

    def close(self) -> None:
        """Stop, end the heartbeat, drop the subscription and close the store's connections."""
        self.stop()
        self._beating.set()
        if self._beater.is_alive() and self._beater is not threading.current_thread():
            self._beater.join(5.0)
        self._updates.close()
        self._fetcher.close()
        if self.registry.deployment is not self.store.deployment:
            self.registry.deployment.close()  # the replica-reads view: its own replica connections
        self.store.close()
        self._metrics.release()

    def __enter__(self) -> RedisWeightReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisWeightReceiver(namespace={self.keyspace.namespace!r}, rank={self.rank}, version={self.version})"


def _beat_until_closed(ref: weakref.ref[RedisWeightReceiver], stop: threading.Event, interval: float) -> None:
    """The heartbeat thread: beat every ``interval`` seconds until ``stop`` is set or the receiver is gone.

    It holds the receiver only weakly, so a receiver dropped without ``close()`` stops
    beating once it is garbage-collected. A beat that fails is retried at the next
    interval; a failure is logged as a warning once per distinct cause (a rank whose
    beats are refused looks dead to the trainer), not at every beat.
    """
    reported = None
    while not stop.wait(interval):
        receiver = ref()
        if receiver is None:
            return
        try:
            receiver.heartbeat()
            reported = None
        except Exception as exc:  # never let the thread die: the next beat may work
            cause = f"{type(exc).__name__}: {exc}"
            if cause != reported:
                log.warning("rank %d: heartbeat failed (%s); retrying every %.2gs", receiver.rank, cause, interval)
                reported = cause
        del receiver
