"""``RedisWeightSyncScheme``: a TorchRL ``WeightSyncScheme`` whose transport is Redis.

Sender side (the trainer's collector): a core ``RedisWeightUpdater`` for ranks
``1..num_workers``. Receiver side (every worker process TorchRL starts, or a
collector elsewhere): a ``CollectorWeightReceiver`` on the worker's policy. The
scheme pickles to its URL, namespace and options, never a connection.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from torchrl.weight_update import WeightSyncScheme

from ...backend.keys import validate_namespace
from ...backend.store import RedisStore
from ...base import WorkerIds
from ...errors import ConfigurationError, ReceiveTimeoutError
from ...protocol.ranks import as_integer, check_rank, check_worker_count
from ...trainer.updater import RedisWeightUpdater
from ._collectors import collector_num_workers, materialize, set_policy_version, worker_index_base
from .collector_receiver import CollectorWeightReceiver
from .options import RedisSyncOptions

log = logging.getLogger(__name__)

_NOT_IN_NAMESPACE = re.compile(r"[^A-Za-z0-9_.\-]")


def namespace_for(model_id: str) -> str:
    """The default namespace of a scheme syncing ``model_id``: the id, made a valid namespace
    (``"policy"`` stays ``"policy"``; ``"env.transform[0]"`` becomes ``"env.transform_0_"``)."""
    return validate_namespace(_NOT_IN_NAMESPACE.sub("_", model_id)[:128] or "policy")


def _per_worker(weights: Any) -> bool:
    """TorchRL's per-worker form ``{worker_idx: weights}``."""
    return type(weights) is dict and len(weights) > 0 and all(isinstance(k, int) for k in weights)


class RedisWeightSyncScheme(WeightSyncScheme):
    """A TorchRL weight-sync scheme that moves weights through Redis.

    Use it as ``weight_sync_schemes={"policy": scheme}`` on the trainer's collector
    (``Collector``, ``MultiSyncCollector``, ``MultiAsyncCollector``,
    ``DistributedCollector``): the sender side pushes with a core
    ``RedisWeightUpdater``; each worker becomes a receiver with a 1-based rank:
    worker ``i`` of a multi-process collector (TorchRL's 0-based ``worker_idx``) is
    rank ``i + 1 + rank_offset``; node ``k`` of a ``DistributedCollector`` (TorchRL
    passes its ``torch.distributed`` rank, already 1-based) is rank ``k + rank_offset``.
    A collector on another machine receives with ``Collector(...,
    weight_recv_schemes={"policy": RedisWeightSyncScheme(url, rank=r)})``.
    Also ``WeightSyncScheme.from_backend("redis", store=url, ...)``.

    Args:
        store: a Redis URL (picklable: needed for multi-process collectors) or a
            ``RedisStore`` (same process only, unless it was made by ``from_url``).

    Keyword Args:
        namespace: the Redis namespace; default: the store's (a ``RedisStore``), else
            derived from the model id (``"policy"`` for the policy), so several schemes
            of one collector (``{"policy": ..., "value": ...}``) never collide. A
            namespace that contradicts the given ``RedisStore``'s is refused.
        num_workers: ranks a push targets (``1..num_workers``); default: from
            ``init_on_sender`` (``num_workers``, ``devices``, ``params_map``) or the
            collector. Required with a single-process ``Collector``.
        rank: a standalone receiver's 1-based rank (instead of one from ``worker_idx``).
        rank_offset: added to every rank derived from ``worker_idx`` (several
            collectors sharing one namespace).
        options: a ``RedisSyncOptions``; ``**overrides``: any option by its name, of
            ``RedisSyncOptions`` (``sync``, ``connect_timeout``, ``background``,
            ``client_options``), of ``PushOptions`` (``timeout``, ``retention``,
            ``wire_dtype``, ``delta``...) or of ``ReceiveOptions`` (``poll_interval``...).
    """

    def __init__(
        self,
        store: RedisStore | str,
        *,
        namespace: str | None = None,
        num_workers: int | None = None,
        rank: int | None = None,
        rank_offset: int = 0,
        options: RedisSyncOptions | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__(strategy="tensordict")
        if isinstance(store, RedisStore):
            if namespace is not None and namespace != store.namespace:
                raise ConfigurationError(
                    f"namespace={namespace!r} contradicts the store's namespace {store.namespace!r}: the sender "
                    "would push on one and the receivers (rebuilt from the URL) listen on the other; pass one"
                )
            self._store: RedisStore | None = store
            self.url = store.url
            namespace = store.namespace
        elif isinstance(store, str):
            self._store = None
            self.url = store
        else:
            raise ConfigurationError(f"store must be a Redis URL or a RedisStore, got {type(store).__name__}")
        self._namespace = None if namespace is None else validate_namespace(namespace)
        rank = None if rank is None else check_rank(rank)  # a plain int from here on (numpy.int64 too)
        num_workers = None if num_workers is None else check_worker_count(num_workers)
        self.options = RedisSyncOptions.of(options, **overrides)
        self.num_workers = num_workers
        self.rank = rank
        self.rank_offset = rank_offset
        self._updater: RedisWeightUpdater | None = None
        self._receiver: CollectorWeightReceiver | None = None
        # Set by the sender and pickled into its receivers: what TorchRL's worker_idx counts
        # from, and the version they must start from (0: the sender had no weights to publish).
        # None on a scheme that no sender initialised (a standalone receiver).
        self._index_base = 0
        self._start_version: int | None = None

    # -- configuration ------------------------------------------------------------------
    @property
    def namespace(self) -> str | None:
        """The Redis namespace (None until a model id is known, when it is derived from it)."""
        return self._namespace

    @property
    def sync(self) -> bool:
        return self.options.sync

    @property
    def timeout(self) -> float:
        return self.options.push.timeout

    def _use_model_id(self, model_id: str | None) -> str:
        model_id = model_id or "policy"
        self.model_id = model_id
        if self._namespace is None:
            self._namespace = namespace_for(model_id)
        return model_id

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
            if self._namespace is None:
                raise RuntimeError("RedisWeightSyncScheme: no namespace yet (init_on_sender/receiver sets it)")
            self._store = RedisStore.from_url(self.url, self._namespace, **self.options.client_options)  # type: ignore[arg-type]
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
            materialize(value)
            receiver.set_policy(value)

    def _bind(self, model_id: str | None, context: Any, model: Any) -> None:
        self._use_model_id(model_id)
        if context is not None:
            self.context = context
        if model is not None:
            self.model = model

    # -- sender -------------------------------------------------------------------------
    def _init_on_sender_impl(
        self,
        *,
        model_id: str | None = None,
        context: Any = None,
        model: Any = None,
        weights: Any = None,
        num_workers: int | None = None,
        devices: Any = None,
        params_map: Mapping[int, Any] | None = None,
        **_: Any,  # e.g. ``ctx`` (the multiprocessing context), ``device_map_fn``: Redis needs neither
    ) -> None:
        self._bind(model_id, context, model)
        if params_map:
            distinct = {id(w) for w in params_map.values()}
            if len(distinct) > 1:
                raise ConfigurationError(
                    "RedisWeightSyncScheme: params_map with different weights per worker is not supported (all "
                    "ranks of a namespace follow one version); use one scheme, with its own namespace, per policy"
                )
            weights = next(iter(params_map.values())) if weights is None else weights
        if weights is not None:
            self.weights = weights
        count = (
            self.num_workers
            or num_workers
            or (len(devices) if devices is not None else None)
            or (len(params_map) if params_map else None)
            or collector_num_workers(context)
        )
        if not isinstance(count, int) or count < 1:
            raise ConfigurationError(
                "RedisWeightSyncScheme needs the number of workers: pass num_workers= to the scheme "
                "(or devices= / params_map= to init_on_sender)"
            )
        self.num_workers = count
        self._index_base = worker_index_base(context)
        self._updater = self.options.updater(self._redis_store(), count)
        # Publish the initial weights now, before a collector pickles the scheme into its
        # workers: they then start from this version, never from an older one left in Redis.
        self._start_version = self._publish_initial(weights)

    def _source(self, weights: Any, context: Any) -> Any:
        """What to push: the given weights (module, TensorDict, dict, model name) or the model's."""
        if _per_worker(weights):
            raise ConfigurationError(
                "RedisWeightSyncScheme: per-worker weights ({worker_idx: weights}) are not supported: every rank "
                "of a namespace follows the same versions. Push one set of weights (worker_ids= picks the ranks "
                "a sync push waits for), or give each group of workers its own collector and scheme (namespace)"
            )
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
            log.debug("no %s weights to publish yet: workers start with their own", self.model_id)
            return 0
        self._sender().push_weights(source, worker_ids=[])  # no rank has to ack this one
        return self._sender().version

    def _setup_connection_and_weights_on_sender_impl(self, *, worker_idx: int | None = None,
                                                     weights: Any = None) -> None:  # fmt: skip
        """Publish weights given to ``connect()``, or the initial ones if ``init_on_sender`` had none."""
        if weights is not None or not self._start_version:
            self._start_version = self._publish_initial(weights) or self._start_version

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
            index, offset = as_integer(worker_idx), as_integer(self.rank_offset)
            if index is None or offset is None:
                raise ConfigurationError(f"worker_idx={worker_idx!r} and rank_offset={self.rank_offset!r} must be "
                                         "integers")  # fmt: skip
            rank = index + (1 - self._index_base) + offset
            if rank < 1:
                raise ConfigurationError(
                    f"worker_idx={worker_idx} with rank_offset={self.rank_offset} gives rank {rank}; ranks are 1-based"
                )
        self.rank = rank
        self._worker_idx = worker_idx

    def _setup_connection_and_weights_on_receiver_impl(self, *, worker_idx: int | None = None) -> None:
        """Start from the sender's first version (waiting up to ``connect_timeout``), then follow Redis.

        A scheme no sender initialised (a standalone receiver) waits for any first
        version; one whose sender had no weights (``policy_factory`` only) does not wait.
        """
        model = self.model
        if model is None:
            raise ConfigurationError(f"RedisWeightSyncScheme: no model {self.model_id!r} to receive into")
        materialize(model)
        receiver = CollectorWeightReceiver(self._redis_store(), self.rank, policy=model, options=self.options)  # type: ignore[arg-type]
        try:
            start = 1 if self._start_version is None else self._start_version
            if start:
                receiver.sync(self.options.first_version_timeout, min_version=start)
            if self.context is not None:
                receiver.attach(self.context)
            receiver.start()
        except BaseException:
            receiver.close()  # no thread, no connection left behind by a failed connect
            raise
        self._receiver = receiver

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
        set_policy_version(self.context, applied)
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
