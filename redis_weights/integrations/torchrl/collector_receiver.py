"""``CollectorWeightReceiver``: the worker side for a TorchRL collector; versions land between batches."""

from __future__ import annotations

import functools
import logging
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import redis

from ...backend.store import RedisStore
from ...errors import ApplyError, ConfigurationError
from ._collectors import is_multi_process, is_single_process, set_policy_version
from .options import RedisSyncOptions

log = logging.getLogger(__name__)

_GUARD_MARK = "_redis_weights_guard"


def _check_guardable(collector: Any) -> None:
    if not (is_single_process(collector) or is_multi_process(collector)):
        raise ConfigurationError(
            f"{type(collector).__name__} is not a TorchRL collector (no rollout(), no iterator() and "
            "update_policy_weights_()): CollectorWeightReceiver cannot keep its weights between batches"
        )


class CollectorWeightReceiver:
    """Worker side for a TorchRL collector: apply new versions from Redis only between batches.

    Wraps a core ``RedisWeightReceiver`` on the collector's policy and guards the
    collector with the receiver's lock, so a version is applied either before a
    batch starts or after it ends, never in the middle:

    - a ``Collector`` (single process): its ``rollout()`` is guarded; each batch of
      one built with ``track_policy_version=True`` is labelled with the Redis
      version its weights came from;
    - a ``MultiSyncCollector`` / ``MultiAsyncCollector`` (e.g. the inner collector
      of a ``DistributedCollector`` node): each step of its ``iterator()`` is
      guarded, and every applied version is forwarded to its own worker processes
      with ``collector.update_policy_weights_(policy)`` before the rank acks (if that
      raises, the rank reports ``"error: version N: ..."`` instead of ``"updated"``).

    Args:
        store: a ``RedisStore``, a Redis URL or a redis-py client.
        rank: this worker's 1-based rank.
        collector: the collector to guard (or ``attach()`` it later).

    Keyword Args:
        policy: the module whose weights to update; default ``collector.policy``.
        options: a ``RedisSyncOptions`` (its worker side is used: ``background``,
            ``connect_timeout`` and ``receive``, the core receiver's ``ReceiveOptions``).
        **overrides: any option by its name (``RedisSyncOptions.of``), e.g. ``background=False``.

    ``background=True`` (default): a thread fetches and applies as soon as the
    current batch ends, also while the collector idles; heartbeats have their own
    thread, so a batch may take longer than ``heartbeat_ttl``. ``background=False``:
    Redis is checked at the start of each batch instead (no thread; a sync push is
    then acked at the worker's next batch).
    """

    def __init__(
        self,
        store: RedisStore | str | redis.Redis,
        rank: int,
        collector: Any = None,
        *,
        policy: Any = None,
        options: RedisSyncOptions | None = None,
        **overrides: Any,
    ) -> None:
        self.options = RedisSyncOptions.of(options, **overrides)
        if collector is not None:
            _check_guardable(collector)  # refuse what cannot be guarded before registering the rank
        if policy is None:
            if collector is None:
                raise ConfigurationError("CollectorWeightReceiver needs a collector or a policy")
            policy = collector.policy
        self.receiver = self.options.receiver(store, rank, policy)
        self.background = self.options.background
        self._collector_ref: weakref.ReferenceType[Any] | None = None
        if collector is not None:
            try:
                self.attach(collector)
            except BaseException:
                self.receiver.close()
                raise

    @property
    def rank(self) -> int:
        return self.receiver.rank

    @property
    def version(self) -> int:
        """The version the policy holds (0: none applied yet)."""
        return self.receiver.version

    @property
    def collector(self) -> Any | None:
        return self._collector_ref() if self._collector_ref is not None else None

    def set_policy(self, policy: Any) -> None:
        """Write future versions into ``policy`` (e.g. the collector's device copy)."""
        with self.receiver.lock:
            self.receiver.policy = policy

    def attach(self, collector: Any) -> None:
        """Guard ``collector`` so versions are applied only between its batches."""
        current = self.collector
        if current is not None and current is not collector:
            raise ConfigurationError("a CollectorWeightReceiver guards one collector; create one per collector")
        _check_guardable(collector)
        self._collector_ref = weakref.ref(collector)
        if is_single_process(collector):
            if getattr(collector.rollout, _GUARD_MARK, None) is not self:
                collector.rollout = self._guard_rollout(collector.rollout, collector)
            return
        if getattr(collector.iterator, _GUARD_MARK, None) is not self:
            collector.iterator = self._guard_iterator(collector.iterator)
            self.receiver.register_post_hook(self._forward)

    def _guard_rollout(self, rollout: Callable[..., Any], collector: Any) -> Callable[..., Any]:
        receiver = self.receiver
        collector_ref = weakref.ref(collector)

        @functools.wraps(rollout)
        def guarded_rollout(*args: Any, **kwargs: Any) -> Any:
            with receiver.lock:  # the receiver thread applies under this lock: not during a batch
                if not self.background:
                    self._poll_quietly()
                owner = collector_ref()
                if owner is not None:
                    set_policy_version(owner, receiver.version)
                return rollout(*args, **kwargs)

        setattr(guarded_rollout, _GUARD_MARK, self)
        return guarded_rollout

    def _guard_iterator(self, iterator: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        receiver = self.receiver

        @functools.wraps(iterator)
        def guarded_iterator(*args: Any, **kwargs: Any) -> Iterator[Any]:
            batches = iterator(*args, **kwargs)
            while True:
                with receiver.lock:  # one batch of the worker processes, then versions may land
                    if not self.background:
                        self._poll_quietly()
                    try:
                        batch = next(batches)
                    except StopIteration:
                        return
                yield batch

        setattr(guarded_iterator, _GUARD_MARK, self)
        return guarded_iterator

    def _forward(self, version: int) -> None:
        """Post-apply hook of a multi-process collector: hand the new weights to its workers
        (between batches), so the rank acks only once they run them.

        If the collector refuses them, the rank reports ``"error: version N: ..."``
        (``ApplyError``) rather than claim a version its workers do not run.
        """
        collector = self.collector
        if collector is None:
            return
        with self.receiver.lock:
            try:
                collector.update_policy_weights_(self.receiver.policy)
            except Exception as exc:
                raise ApplyError(f"{type(collector).__name__} did not take it for its worker processes "
                                 f"({type(exc).__name__}: {exc})") from exc  # fmt: skip
        log.debug("rank %d: version %d forwarded to %s's workers", self.rank, version, type(collector).__name__)

    def _poll_quietly(self) -> None:
        try:
            self.receiver.poll()
        except redis.exceptions.RedisError as exc:  # keep collecting with the weights we have
            log.warning("rank %d: could not check for new weights (%s); keeping version %d",
                        self.rank, exc, self.receiver.version)  # fmt: skip

    def sync(self, timeout: float | None = None, *, min_version: int = 1) -> int:
        """Apply the newest version now, waiting up to ``timeout`` (default: the options'
        ``first_version_timeout``) until it is at least ``min_version``."""
        timeout = self.options.first_version_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self.receiver.poll()
        while self.receiver.version < min_version:
            self.receiver.wait(max(0.0, deadline - time.monotonic()))
        return self.receiver.version

    def wait(self, timeout: float | None = None) -> int:
        """Block until a newer version is applied; return it (``ReceiveTimeoutError`` otherwise)."""
        return self.receiver.wait(timeout)

    def start(self) -> CollectorWeightReceiver:
        """Start the background thread (when ``background``); returns self."""
        if self.background:
            self.receiver.start()
        return self

    def stop(self) -> None:
        self.receiver.stop()

    def close(self) -> None:
        """Stop, and close the receiver's Redis connections."""
        self.receiver.close()

    def __enter__(self) -> CollectorWeightReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CollectorWeightReceiver(rank={self.rank}, version={self.version}, background={self.background})"
