"""What the adapters need to know about TorchRL collector objects (duck-typed, TorchRL 0.14)."""

from __future__ import annotations

import itertools
from typing import Any

from torch import nn


def materialize(model: Any) -> None:
    """Give a stateless (meta-device) module real CPU storage so weights can be copied into it.

    TorchRL's multi-process collectors send their workers a policy without storage
    when a weight-sync scheme is in charge of the weights.
    """
    if isinstance(model, nn.Module) and any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        model.to_empty(device="cpu")


def set_policy_version(collector: Any, version: int) -> None:
    """Label the collector's batches with the Redis version (when it tracks policy versions)."""
    tracker = getattr(collector, "policy_version_tracker", None)
    if tracker is not None and version > 0:
        tracker.version = version


def is_single_process(collector: Any) -> bool:
    """A ``Collector`` (it runs its own ``rollout()``), not a multi-process one."""
    return callable(getattr(collector, "rollout", None))


def is_multi_process(collector: Any) -> bool:
    """A collector with worker processes of its own (``MultiSyncCollector`` / ``MultiAsyncCollector``):
    it batches through ``iterator()`` and forwards weights with ``update_policy_weights_()``."""
    return (
        not is_single_process(collector)
        and callable(getattr(collector, "iterator", None))
        and callable(getattr(collector, "update_policy_weights_", None))
    )


def worker_index_base(context: Any) -> int:
    """What TorchRL passes as ``worker_idx`` to the receivers of this sender's collector.

    1 for ``DistributedCollector`` / ``DistributedSyncCollector``: their nodes pass
    ``torch.distributed.get_rank()``, already 1-based (rank 0 is the trainer).
    0 for everything else (multi-process collectors pass the worker's 0-based index).
    """
    if context is None:
        return 0
    try:
        from torchrl.collectors.distributed import DistributedCollector, DistributedSyncCollector
    except ImportError:  # pragma: no cover - torchrl without its distributed collectors
        return 0
    return 1 if isinstance(context, (DistributedCollector, DistributedSyncCollector)) else 0


def collector_num_workers(context: Any) -> int | None:
    """The number of workers a collector runs (None when it does not say)."""
    count = getattr(context, "num_workers", None)
    return count if isinstance(count, int) and not isinstance(count, bool) else None
