"""``WeightUpdaterBase``: TorchRL's weight-updater API, without requiring torchrl.

Same methods and semantics as ``torchrl.collectors.WeightUpdaterBase`` (push,
post-hooks, collector registration, ``from_policy``), with three deliberate
differences: worker ids are 1-based ranks everywhere (an int or a list of ints);
registering a second collector is refused instead of making ``collector`` raise
later; and ``_sync_weights_with_worker`` is called once per push with the list
of targeted ranks, not once per worker, because one push is one version that
every rank reads (a per-worker loop would commit N versions).
"""

from __future__ import annotations

import abc
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from .errors import ConfigurationError
from .protocol.ranks import as_integer

WorkerIds = int | Sequence[int] | None


class WeightUpdaterBase(metaclass=abc.ABCMeta):
    """Base class of trainer-side weight updaters (see TorchRL's class of the same name).

    Subclasses implement ``_sync_weights_with_worker``; ``push_weights`` gets the
    weights (given, or ``_get_server_weights()``), maps them with
    ``_maybe_map_weights``, syncs the targeted workers, then runs the post-hooks.
    """

    num_workers: int = 0
    _collector_ref: weakref.ReferenceType[Any] | None = None
    _post_hooks: list[Callable[[], Any]] | None = None

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_policy(cls, policy: Any) -> WeightUpdaterBase | None:
        """An instance built from a policy alone, or None when that is not possible."""
        return None

    def init(self, *args: Any, **kwargs: Any) -> None:  # noqa: B027 (optional hook, as in TorchRL)
        """Late initialisation hook (called by collectors); no-op by default."""

    # -- collector --------------------------------------------------------------------
    def register_collector(self, collector: Any) -> None:
        """Attach the collector (held by weak reference); a second, different one is refused."""
        current = self.collector
        if current is not None and current is not collector:
            raise RuntimeError(
                f"{type(self).__name__} already has a collector ({type(current).__name__}); "
                "create one updater per collector"
            )
        self._collector_ref = weakref.ref(collector)

    @property
    def collector(self) -> Any | None:
        """The registered collector, or None if unset or garbage-collected."""
        return self._collector_ref() if self._collector_ref is not None else None

    def increment_version(self) -> None:
        """Increment the policy version of the registered collector, if it keeps one."""
        collector = self.collector
        if collector is not None and hasattr(collector, "increment_version"):
            collector.increment_version()

    # -- post hooks -------------------------------------------------------------------
    @property
    def post_hooks(self) -> list[Callable[[], Any]]:
        """Callables run, in order, after every push."""
        if self._post_hooks is None:
            self._post_hooks = []
        return self._post_hooks

    def register_post_hook(self, hook: Callable[[], Any]) -> None:
        if not callable(hook):
            raise TypeError(f"post hook must be callable, got {type(hook).__name__}")
        self.post_hooks.append(hook)

    def _call_post_hooks(self) -> None:
        for hook in self.post_hooks:
            hook()

    # -- pushing ----------------------------------------------------------------------
    def all_worker_ids(self) -> list[int]:
        """Every worker's rank: ``[1, ..., num_workers]``."""
        return list(range(1, self.num_workers + 1))

    def _normalize_worker_ids(self, worker_ids: WorkerIds) -> list[int]:
        """1-based ranks as a list; anything outside ``1..num_workers`` is a RuntimeError."""
        if worker_ids is None:
            return self.all_worker_ids()
        one = as_integer(worker_ids)  # a single rank: int, numpy.int64, 0-d integer tensor
        try:
            given = [worker_ids] if one is not None or isinstance(worker_ids, (str, bytes)) else list(worker_ids)
        except TypeError:  # neither a rank nor an iterable of ranks
            given = [worker_ids]
        ids = []
        for item in given:
            rank = as_integer(item)
            if rank is None:
                raise RuntimeError(f"worker ids are 1-based integer ranks, got {item!r} ({type(item).__name__})")
            ids.append(rank)
            if rank < 1:
                raise RuntimeError(f"worker rank must be >= 1 (ranks are 1-based), got {rank}")
            if rank > self.num_workers:
                raise RuntimeError(f"worker rank {rank} is above num_workers={self.num_workers}")
        return list(dict.fromkeys(ids))

    def push_weights(self, policy_or_weights: Any = None, worker_ids: WorkerIds = None) -> None:
        """Push weights (a module, TensorDict or dict; None: the server's) to the workers."""
        self._push_weights(policy_or_weights=policy_or_weights, worker_ids=worker_ids)
        self._call_post_hooks()

    __call__ = push_weights

    def update_weights(self, weights: Any = None, worker_ids: WorkerIds = None) -> None:
        """Push the current policy weights (or ``weights``) to all (or the given) workers."""
        self.push_weights(weights, worker_ids)

    def _push_weights(self, *, policy_or_weights: Any = None, worker_ids: WorkerIds = None) -> None:
        weights = self._get_server_weights() if policy_or_weights is None else policy_or_weights
        if weights is None:
            raise ConfigurationError("no weights to push: pass them, or give the updater policy_weights")
        weights = self._maybe_map_weights(weights)
        ranks = [r for r in self._normalize_worker_ids(worker_ids) if not self._skip_update(r)]
        self._sync_weights_with_worker(worker_id=ranks, server_weights=weights)

    def _skip_update(self, worker_id: int) -> bool:
        """Whether to leave a worker out of a push; never, by default."""
        return False

    @abc.abstractmethod
    def _sync_weights_with_worker(self, *, worker_id: list[int], server_weights: Any) -> None:
        """Send ``server_weights`` to the ranks ``worker_id``: validated and without repeats
        (``push_weights`` normalises them once), possibly empty."""

    def _get_server_weights(self) -> Any:
        """The weights to push when none are given; None by default."""
        return None

    def _maybe_map_weights(self, server_weights: Any) -> Any:
        """Transform weights before they are sent; identity by default."""
        return server_weights
