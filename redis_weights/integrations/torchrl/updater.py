"""``RedisCollectorWeightUpdater``: the core updater as a TorchRL ``WeightUpdaterBase`` (legacy ``weight_updater=``)."""

from __future__ import annotations

import warnings
from typing import Any

from torchrl.collectors import WeightUpdaterBase as _TorchRLWeightUpdaterBase

from ...trainer.updater import RedisWeightUpdater

# TorchRL warns (DeprecationWarning) for every subclass of its legacy base; this
# subclass is deliberate, so importing it must not warn.
with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", message=r".*inherits from WeightUpdaterBase is deprecated", category=DeprecationWarning
    )

    class RedisCollectorWeightUpdater(RedisWeightUpdater, _TorchRLWeightUpdaterBase):
        """``RedisWeightUpdater`` as a ``torchrl.collectors.WeightUpdaterBase`` (legacy API).

        Drop-in for TorchRL's ``DistributedWeightUpdater``: pass it as
        ``Collector(..., weight_updater=updater)``; ``collector.update_policy_weights_()``
        pushes ``policy_weights`` (or the weights given) to ranks ``1..num_workers``
        through Redis, where ``CollectorWeightReceiver`` workers apply them.
        ``increment_version()`` bumps the registered collector's policy version. Same
        constructor as the core class. A multi-process collector's own worker processes
        are not reached this way: give it ``weight_sync_schemes={"policy":
        RedisWeightSyncScheme(...)}`` instead. TorchRL deprecates this API in favour of
        weight-sync schemes: prefer ``RedisWeightSyncScheme`` in new code.
        """

        @property
        def collectors(self) -> list[Any] | None:
            """TorchRL's plural accessor: the one registered collector, as a list."""
            collector = self.collector
            return None if collector is None else [collector]
