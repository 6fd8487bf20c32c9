"""TorchRL adapters: Redis-backed weight sync for TorchRL collectors (needs the ``torchrl`` extra).

Thin layers over the core ``RedisWeightUpdater`` / ``RedisWeightReceiver``, one job per module:

- ``scheme``: ``RedisWeightSyncScheme``, a ``torchrl.weight_update.WeightSyncScheme``
  (TorchRL's forward path, ``weight_sync_schemes={"policy": ...}``), registered as
  TorchRL's weight-sync backend ``"redis"``.
- ``updater``: ``RedisCollectorWeightUpdater``, a real ``torchrl.collectors.WeightUpdaterBase``
  (the legacy ``weight_updater=``, drop-in for ``DistributedWeightUpdater``).
- ``collector_receiver``: ``CollectorWeightReceiver``, the worker side for a collector you run
  yourself; it swaps weights only between batches.
- ``options``: ``RedisSyncOptions``, the options of both sides: the core's ``PushOptions`` and ``ReceiveOptions``.

Worker ids are 1-based ranks everywhere.
"""

from __future__ import annotations

try:
    import torchrl.collectors  # noqa: F401
    from torchrl.weight_update.weight_sync_schemes import register_weight_sync_backend
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("redis_weights.integrations.torchrl needs torchrl: pip install 'redis_weights[torchrl]'") from exc

from .collector_receiver import CollectorWeightReceiver
from .options import RedisSyncOptions
from .scheme import RedisWeightSyncScheme
from .updater import RedisCollectorWeightUpdater

register_weight_sync_backend("redis")(RedisWeightSyncScheme)

__all__ = ["CollectorWeightReceiver", "RedisCollectorWeightUpdater", "RedisSyncOptions", "RedisWeightSyncScheme"]
