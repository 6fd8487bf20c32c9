"""redis_weights: keep the policy weights of many workers in step with a trainer through Redis.

Trainer::

    store = RedisStore.from_url("redis://localhost:6379/0", namespace="policy")
    updater = RedisWeightUpdater(store, policy, num_workers=4, sync=True)
    updater.update_weights()

Worker (rank 1..4)::

    receiver = RedisWeightReceiver(RedisStore.from_url(url), rank, policy).start()
"""

from .base import WeightUpdaterBase
from .codec import Manifest
from .errors import (
    BackgroundUploadError,
    CodecError,
    ConfigurationError,
    IntegrityError,
    PushError,
    PushTimeoutError,
    ReceiveTimeoutError,
    RedisWeightsError,
    StaleVersionError,
    VersionNotFoundError,
    WeightMismatchError,
)
from .fleet import RankState
from .keys import Keys
from .receiver import RedisWeightReceiver
from .store import RedisStore
from .updater import RedisWeightUpdater
from .versions import VersionRegistry

__version__ = "0.1.0"

__all__ = [
    "BackgroundUploadError",
    "CodecError",
    "ConfigurationError",
    "IntegrityError",
    "Keys",
    "Manifest",
    "PushError",
    "PushTimeoutError",
    "RankState",
    "ReceiveTimeoutError",
    "RedisStore",
    "RedisWeightReceiver",
    "RedisWeightUpdater",
    "RedisWeightsError",
    "StaleVersionError",
    "VersionNotFoundError",
    "VersionRegistry",
    "WeightMismatchError",
    "WeightUpdaterBase",
    "__version__",
]
