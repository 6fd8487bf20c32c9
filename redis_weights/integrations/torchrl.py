"""TorchRL adapters: Redis-backed weight sync for TorchRL collectors (needs the ``torchrl`` extra).

Three thin adapters over the core ``RedisWeightUpdater`` / ``RedisWeightReceiver``:

- ``RedisCollectorWeightUpdater``: a real ``torchrl.collectors.WeightUpdaterBase``,
  the drop-in replacement for ``DistributedWeightUpdater`` (``weight_updater=``).
- ``RedisWeightSyncScheme``: a ``torchrl.weight_update.WeightSyncScheme`` (TorchRL's
  forward path, ``weight_sync_schemes={"policy": ...}``) with sender and receiver sides,
  so collectors in other processes or on other machines receive weights through Redis.
- ``CollectorWeightReceiver``: the worker side for a collector you run yourself; it
  swaps weights only between batches (never in the middle of a rollout).

Worker ids are 1-based ranks everywhere. A multi-process collector's worker ``i``
(TorchRL's 0-based ``worker_idx``) is rank ``i + 1 + rank_offset``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import redis
from torch import nn

try:
    from torchrl.collectors import WeightUpdaterBase as _TorchRLWeightUpdaterBase
    from torchrl.weight_update import WeightSyncScheme
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("redis_weights.integrations.torchrl needs torchrl: pip install 'redis_weights[torchrl]'") from exc

from ..base import WorkerIds
from ..errors import ConfigurationError, ReceiveTimeoutError
from ..keys import DEFAULT_NAMESPACE
from ..receiver import DEFAULT_HEARTBEAT_TTL, DEFAULT_POLL_INTERVAL, RedisWeightReceiver
from ..store import RedisStore, as_store
from ..updater import DEFAULT_TIMEOUT, RedisWeightUpdater

log = logging.getLogger(__name__)

__all__ = ["CollectorWeightReceiver", "RedisCollectorWeightUpdater", "RedisWeightSyncScheme"]

_GUARD_MARK = "_redis_weights_guard"

# TorchRL warns (DeprecationWarning) for every subclass of its legacy base; this
# module's own subclass is deliberate, so it must not warn on import.
with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", message=r".*inherits from WeightUpdaterBase is deprecated", category=DeprecationWarning
    )

    class RedisCollectorWeightUpdater(RedisWeightUpdater, _TorchRLWeightUpdaterBase):
        """``RedisWeightUpdater`` as a ``torchrl.collectors.WeightUpdaterBase`` (legacy API).

        Drop-in for TorchRL's ``DistributedWeightUpdater``: pass it as
        ``Collector(..., weight_updater=updater)`` or ``MultiSyncCollector(...,
        weight_updater=updater)``; ``collector.update_policy_weights_()`` pushes
        ``policy_weights`` (or the weights given) to ranks ``1..num_workers`` through
        Redis. ``increment_version()`` bumps the registered collector's policy
        version. Same constructor as the core class. TorchRL deprecates this API in
        favour of weight-sync schemes: prefer ``RedisWeightSyncScheme`` in new code.
        """

        @property
        def collectors(self) -> list[Any] | None:
            """TorchRL's plural accessor: the one registered collector, as a list."""
            collector = self.collector
            return None if collector is None else [collector]


def _store_from(store: RedisStore | str, namespace: str, client_options: Mapping[str, Any]) -> RedisStore:
    if isinstance(store, str):
        return RedisStore.from_url(store, namespace, **client_options)
    return as_store(store, namespace)


def _materialize(model: Any) -> None:
    """Give a stateless (meta-device) module real CPU storage so weights can be copied into it."""
    if isinstance(model, nn.Module) and any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        model.to_empty(device="cpu")


def _set_policy_version(collector: Any, version: int) -> None:
    """Label the collector's batches with the Redis version (when it tracks policy versions)."""
    tracker = getattr(collector, "policy_version_tracker", None)
    if tracker is not None and version > 0:
        tracker.version = version


def _rollout_of(collector: Any) -> Callable[..., Any]:
    rollout = getattr(collector, "rollout", None)
    if not callable(rollout):
        raise ConfigurationError(
            f"{type(collector).__name__} has no rollout(): CollectorWeightReceiver guards a single-process "
            "Collector; give a multi-process collector weight_sync_schemes={'policy': RedisWeightSyncScheme(...)}"
        )
    return rollout


class CollectorWeightReceiver:
    """Worker side for a TorchRL collector: apply new versions from Redis only between batches.

    Wraps a core ``RedisWeightReceiver`` on the collector's policy and guards the
    collector's ``rollout()`` with the receiver's lock, so a version is applied
    either before a batch starts or after it ends, never in the middle. Each batch
    of a collector built with ``track_policy_version=True`` is labelled with the
    Redis version its weights came from.

    Args:
        store: a ``RedisStore``, a Redis URL or a redis-py client.
        rank: this worker's 1-based rank.
        collector: the collector to guard (or ``attach()`` it later).

    Keyword Args:
        policy: the module whose weights to update; default ``collector.policy``.
        background: fetch and apply from a background thread (the default; a
            version then lands as soon as the current batch ends, also while the
            worker is idle). ``False``: check Redis at the start of each batch instead
            (no thread; the ack of a sync push then waits for the next batch).
        poll_interval, heartbeat_ttl, allow_cast: as ``RedisWeightReceiver``.

    With ``background=True`` keep batches shorter than ``heartbeat_ttl``: the
    receiver thread waits for the batch to end before it applies and beats again.
    """

    def __init__(
        self,
        store: RedisStore | str | redis.Redis,
        rank: int,
        collector: Any = None,
        *,
        policy: Any = None,
        background: bool = True,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        heartbeat_ttl: float = DEFAULT_HEARTBEAT_TTL,
        allow_cast: bool = False,
    ) -> None:
        if collector is not None:
            _rollout_of(collector)  # refuse what cannot be guarded before registering the rank
        if policy is None:
            if collector is None:
                raise ConfigurationError("CollectorWeightReceiver needs a collector or a policy")
            policy = collector.policy
        self.receiver = RedisWeightReceiver(
            store, rank, policy, poll_interval=poll_interval, heartbeat_ttl=heartbeat_ttl, allow_cast=allow_cast
        )
        self.background = background
        self._collector_ref: weakref.ReferenceType[Any] | None = None
        if collector is not None:
            self.attach(collector)

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
        """Guard ``collector.rollout`` so versions are applied only between batches."""
        current = self.collector
        if current is not None and current is not collector:
            raise ConfigurationError("a CollectorWeightReceiver guards one collector; create one per collector")
        rollout = _rollout_of(collector)
        self._collector_ref = weakref.ref(collector)
        if getattr(rollout, _GUARD_MARK, None) is self:
            return
        collector.rollout = self._guard(rollout, collector)

    def _guard(self, rollout: Callable[..., Any], collector: Any) -> Callable[..., Any]:
        receiver = self.receiver
        collector_ref = weakref.ref(collector)

        @functools.wraps(rollout)
        def guarded_rollout(*args: Any, **kwargs: Any) -> Any:
            with receiver.lock:  # the receiver thread applies under this lock: not during a batch
                if not self.background:
                    self._poll_quietly()
                owner = collector_ref()
                if owner is not None:
                    _set_policy_version(owner, receiver.version)
                return rollout(*args, **kwargs)

        setattr(guarded_rollout, _GUARD_MARK, self)
        return guarded_rollout

    def _poll_quietly(self) -> None:
        try:
            self.receiver.poll()
        except redis.exceptions.RedisError as exc:  # keep collecting with the weights we have
            log.warning("rank %d: could not check for new weights (%s); keeping version %d",
                        self.rank, exc, self.receiver.version)  # fmt: skip

    def sync(self, timeout: float | None = DEFAULT_TIMEOUT, *, min_version: int = 1) -> int:
        """Apply the newest version now, waiting up to ``timeout`` until it is at least ``min_version``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.receiver.poll()
        while self.receiver.version < min_version:
            self.receiver.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
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


class RedisWeightSyncScheme(WeightSyncScheme):
    """A TorchRL weight-sync scheme that moves weights through Redis.

    Use it as ``weight_sync_schemes={"policy": scheme}`` on the trainer's collector
    (``Collector``, ``MultiSyncCollector``, ``MultiAsyncCollector``): the sender side
    pushes with a core ``RedisWeightUpdater``; each worker process of a
    multi-process collector becomes a receiver (a ``CollectorWeightReceiver``) with
    rank ``worker_idx + 1 + rank_offset``. A collector on another machine receives
    with ``Collector(..., weight_recv_schemes={"policy": RedisWeightSyncScheme(url,
    rank=r)})``. The scheme pickles to its URL and options, never a connection.

    Args:
        store: a Redis URL (picklable: needed for multi-process collectors) or a
            ``RedisStore`` (same process only, unless it was made by ``from_url``).

    Keyword Args:
        namespace: the Redis namespace (one per policy).
        num_workers: ranks a push targets (``1..num_workers``); default: the
            collector's ``num_workers``. Required with a single-process ``Collector``.
        rank: a standalone receiver's 1-based rank (instead of ``worker_idx + 1``).
        rank_offset: added to ``worker_idx + 1`` (several multi-process collectors
            sharing one namespace).
        sync: ``send()`` waits for every targeted rank's ack.
        max_lag: with ``sync=False``, ``send()`` returns while every targeted rank runs
            a version at most this many behind, else waits for the laggards (as
            ``RedisWeightUpdater``'s ``max_lag``); None: no bound.
        timeout: seconds a sync send waits for acks, and a receiver waits for its
            first version at connect time.
        background, poll_interval, heartbeat_ttl, allow_cast: receiver options, as
            ``CollectorWeightReceiver``.
        client_options: extra ``redis.Redis`` options (TLS, ...) used with a URL.
        updater_options: extra ``RedisWeightUpdater`` options for the sender
            (``chunk_size``, ``retention``, ``metadata``, ...).
    """

    def __init__(
        self,
        store: RedisStore | str,
        *,
        namespace: str | None = None,
        num_workers: int | None = None,
        rank: int | None = None,
        rank_offset: int = 0,
        sync: bool = True,
        max_lag: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        background: bool = True,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        heartbeat_ttl: float = DEFAULT_HEARTBEAT_TTL,
        allow_cast: bool = False,
        client_options: Mapping[str, Any] | None = None,
        updater_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(strategy="tensordict")
        if isinstance(store, RedisStore):
            self._store: RedisStore | None = store
            self.url = store.url
            self.namespace = namespace or store.namespace
        elif isinstance(store, str):
            self._store = None
            self.url = store
            self.namespace = namespace or DEFAULT_NAMESPACE
        else:
            raise ConfigurationError(f"store must be a Redis URL or a RedisStore, got {type(store).__name__}")
        if rank is not None and (not isinstance(rank, int) or rank < 1):
            raise ConfigurationError(f"rank must be a 1-based integer, got {rank!r}")
        self.num_workers = num_workers
        self.rank = rank
        self.rank_offset = rank_offset
        self.sync = sync
        self.max_lag = max_lag
        self.timeout = timeout
        self.background = background
        self.poll_interval = poll_interval
        self.heartbeat_ttl = heartbeat_ttl
        self.allow_cast = allow_cast
        self.client_options = dict(client_options or {})
        self.updater_options = dict(updater_options or {})
        self._updater: RedisWeightUpdater | None = None
        self._receiver: CollectorWeightReceiver | None = None
        self._initial_version = 0  # the sender's initial version; pickled, so receivers wait for it

    # -- pickling: configuration only ---------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        if self.url is None:
            raise ConfigurationError(
                "RedisWeightSyncScheme built from a RedisStore without a URL cannot go to another process; "
                "pass the Redis URL instead"
            )
        state = super().__getstate__()
        state.update(_store=None, _updater=None, _receiver=None)
        return state

    def _redis_store(self) -> RedisStore:
        if self._store is None:
            self._store = _store_from(self.url, self.namespace, self.client_options)  # type: ignore[arg-type]
        return self._store

    # -- context and model: keep the receiver pointed at the live policy ---------------
    @property  # type: ignore[override]
    def context(self) -> Any | None:
        return WeightSyncScheme.context.fget(self)  # type: ignore[attr-defined]

    @context.setter
    def context(self, value: Any) -> None:
        WeightSyncScheme.context.fset(self, value)  # type: ignore[attr-defined]
        receiver = getattr(self, "_receiver", None)
        if value is not None and receiver is not None:
            receiver.attach(value)

    @property  # type: ignore[override]
    def model(self) -> Any | None:
        return WeightSyncScheme.model.fget(self)  # type: ignore[attr-defined]

    @model.setter
    def model(self, value: Any) -> None:
        WeightSyncScheme.model.fset(self, value)  # type: ignore[attr-defined]
        receiver = getattr(self, "_receiver", None)
        if value is not None and receiver is not None:
            _materialize(value)
            receiver.set_policy(value)

    def _bind(self, model_id: str, context: Any, model: Any) -> None:
        self.model_id = model_id
        if context is not None:
            self.context = context
        if model is not None:
            self.model = model

    # -- sender -------------------------------------------------------------------------
    def _init_on_sender_impl(
        self,
        *,
        model_id: str = "policy",
        context: Any = None,
        model: Any = None,
        weights: Any = None,
        num_workers: int | None = None,
        **_: Any,  # e.g. ``ctx``, the multiprocessing context: Redis needs none
    ) -> None:
        self._bind(model_id, context, model)
        if weights is not None:
            self.weights = weights
        count = self.num_workers or num_workers or getattr(context, "num_workers", None)
        if not isinstance(count, int) or count < 1:
            raise ConfigurationError(
                "RedisWeightSyncScheme needs the number of workers: pass num_workers= to the scheme"
            )
        self.num_workers = count
        self._updater = RedisWeightUpdater(
            self._redis_store(), None, num_workers=count, sync=self.sync, max_lag=self.max_lag, timeout=self.timeout,
            **self.updater_options
        )
        # Publish the initial weights now, before a multi-process collector pickles the scheme
        # into its workers: they then wait for this version, never starting on an older one.
        self._initial_version = self._publish_initial(weights)

    def _source(self, weights: Any, context: Any) -> Any:
        """What to push: the given weights (module, TensorDict, dict, model name) or the model's."""
        if isinstance(weights, str):
            return self._model_of(context, weights)
        if weights is not None:
            return weights
        if getattr(self, "_weights", None) is not None:
            return self._weights
        if self._model_ref is not None and self._model_ref() is not None:
            return self._model_ref()
        return self._model_of(context, self.model_id or "policy")

    @staticmethod
    def _model_of(context: Any, model_id: str) -> Any:
        if context is None:
            return None
        get_model = getattr(context, "get_model", None)
        try:
            model = get_model(model_id) if callable(get_model) else getattr(context, model_id)
        except (AttributeError, KeyError, ValueError):
            model = None
        if model is None and model_id == "policy":
            model = getattr(context, "_fallback_policy", None)
        return model

    def prepare_weights(self, weights: Any, model_id: str, strategy: Any = None, context: Any = None) -> Any:
        """The object to encode: a module (its ``state_dict`` names), a TensorDict or a dict."""
        return self._source(weights, context)

    def _publish_initial(self, weights: Any = None) -> int:
        """Commit the initial weights as ``latest`` without waiting (workers are still starting); 0 if none."""
        source = self._source(weights, self.context)
        if source is None:
            log.debug("no %s weights to publish yet", self.model_id)
            return 0
        self._sender().push_weights(source, worker_ids=[])  # no rank has to ack this one
        return self._sender().version

    def _setup_connection_and_weights_on_sender_impl(self, *, worker_idx: int | None = None,
                                                     weights: Any = None) -> None:  # fmt: skip
        """Publish weights given to ``connect()``, or the initial ones if ``init_on_sender`` had none."""
        if weights is not None or not getattr(self, "_initial_version", 0):
            self._initial_version = self._publish_initial(weights) or getattr(self, "_initial_version", 0)

    def _sender(self) -> RedisWeightUpdater:
        if self._updater is None:
            raise RuntimeError("RedisWeightSyncScheme: init_on_sender() was not called")
        return self._updater

    def send(self, weights: Any = None, worker_ids: WorkerIds = None) -> None:
        """Push the weights (default: the model's) to all, or the given 1-based, ranks."""
        if not self.initialized_on_sender or not self.synchronized_on_sender:
            raise RuntimeError("RedisWeightSyncScheme: send() needs init_on_sender() and connect() first")
        source = self._source(weights, self.context)
        if source is None:
            raise ConfigurationError(f"no weights to send for {self.model_id!r}: pass weights or a model")
        self._sender().push_weights(source, worker_ids)

    def wait(self, timeout: float | None = None) -> None:
        """Sender: wait for the acks of the last send (for ``sync=False``)."""
        self._sender().wait(timeout)

    @property
    def version(self) -> int:
        """The last version sent (sender) or applied (receiver); 0 before any."""
        if self._updater is not None:
            return self._updater.version
        return self._receiver.version if self._receiver is not None else 0

    @property
    def updater(self) -> RedisWeightUpdater | None:
        """The core updater of the sender side (``workers()``, ``post_hooks``...)."""
        return self._updater

    @property
    def receiver(self) -> CollectorWeightReceiver | None:
        """The receiver side's ``CollectorWeightReceiver``."""
        return self._receiver

    # -- receiver -----------------------------------------------------------------------
    def _init_on_receiver_impl(
        self,
        *,
        model_id: str,
        context: Any = None,
        worker_idx: int | None = None,
        model: Any = None,
        rank: int | None = None,
        **_: Any,
    ) -> None:
        self._bind(model_id, context, model)
        rank = rank or self.rank
        if rank is None:
            if worker_idx is None and context is not None:
                worker_idx = getattr(context, "_worker_idx", None)
            if worker_idx is None:
                raise ConfigurationError(
                    "RedisWeightSyncScheme receiver needs its rank: RedisWeightSyncScheme(url, rank=r) (1-based)"
                )
            rank = worker_idx + 1 + self.rank_offset
        self.rank = rank
        self._worker_idx = worker_idx

    def _setup_connection_and_weights_on_receiver_impl(self, *, worker_idx: int | None = None) -> None:
        """Receive the newest version (waiting up to ``timeout`` for a first one), then follow Redis."""
        model = self.model
        if model is None:
            raise ConfigurationError(f"RedisWeightSyncScheme: no model {self.model_id!r} to receive into")
        _materialize(model)
        receiver = CollectorWeightReceiver(
            self._redis_store(), self.rank, policy=model, background=self.background,  # type: ignore[arg-type]
            poll_interval=self.poll_interval, heartbeat_ttl=self.heartbeat_ttl, allow_cast=self.allow_cast,
        )  # fmt: skip
        try:
            receiver.sync(self.timeout, min_version=max(1, getattr(self, "_initial_version", 0)))
        except BaseException:
            receiver.close()  # no thread, no connection left behind by a failed connect
            raise
        self._receiver = receiver
        if self.context is not None:
            receiver.attach(self.context)
        receiver.start()

    def receive(self, timeout: float | None = None) -> Any:
        """Apply the newest version now if there is one (waiting up to ``timeout``); its weights, or None."""
        if self._receiver is None:
            raise RuntimeError("RedisWeightSyncScheme: receive() needs init_on_receiver() and connect() first")
        applied = self._receiver.receiver.poll()
        if applied is None and timeout:
            try:
                applied = self._receiver.wait(timeout)
            except ReceiveTimeoutError:
                return None
        if applied is None:
            return None
        _set_policy_version(self.context, applied)
        return self._receiver.receiver.policy

    def shutdown(self) -> None:
        """Stop the receiver thread and close the Redis connections (safe to call twice)."""
        receiver, self._receiver = getattr(self, "_receiver", None), None
        updater, self._updater = getattr(self, "_updater", None), None
        if receiver is not None:
            receiver.close()
        if updater is not None:
            updater.close()
        if receiver is not None or updater is not None:
            self._store = None  # closed with them; a later init opens a new one
        super().shutdown()

    def create_transport(self, **kwargs: Any) -> Any:
        """Not used: Redis is the transport (the core updater and receiver)."""
        raise NotImplementedError("RedisWeightSyncScheme moves weights through Redis, not a TorchRL transport")

    def __repr__(self) -> str:
        side = "sender" if self._updater is not None else "receiver" if self._receiver is not None else "unset"
        return f"RedisWeightSyncScheme(namespace={self.namespace!r}, side={side}, version={self.version})"
