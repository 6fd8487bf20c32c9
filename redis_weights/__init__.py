"""redis_weights: keep the policy weights of many workers in step with a trainer through Redis.

Trainer::

    store = RedisStore.from_url("redis://localhost:6379/0", namespace="policy")
    updater = RedisWeightUpdater(store, policy, num_workers=4, sync=True)
    updater.update_weights()

Worker (rank 1..4)::

    receiver = RedisWeightReceiver(RedisStore.from_url(url), rank, policy).start()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backend.keys import Keys
    from .backend.store import RedisStore
    from .base import WeightUpdaterBase
    from .errors import (
        ApplyError,
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
    from .format.manifest import Manifest
    from .options import PushOptions, ReceiveOptions
    from .protocol.ranks import RankState
    from .protocol.versions import VersionRegistry
    from .trainer.updater import RedisWeightUpdater
    from .worker.receiver import RedisWeightReceiver

# Where each public name lives. Imported on first use (PEP 562): the operator CLI and
# admin scripts need no torch, and importing torch costs a second or more.
_EXPORTS = {
    "ApplyError": "errors",
    "BackgroundUploadError": "errors",
    "CodecError": "errors",
    "ConfigurationError": "errors",
    "IntegrityError": "errors",
    "PushError": "errors",
    "PushTimeoutError": "errors",
    "ReceiveTimeoutError": "errors",
    "RedisWeightsError": "errors",
    "StaleVersionError": "errors",
    "VersionNotFoundError": "errors",
    "WeightMismatchError": "errors",
    "Keys": "backend.keys",
    "Manifest": "format.manifest",
    "PushOptions": "options",
    "ReceiveOptions": "options",
    "RankState": "protocol.ranks",
    "RedisStore": "backend.store",
    "RedisWeightReceiver": "worker.receiver",
    "RedisWeightUpdater": "trainer.updater",
    "VersionRegistry": "protocol.versions",
    "WeightUpdaterBase": "base",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__version__ = "0.1.0"

__all__ = [
    "ApplyError",
    "BackgroundUploadError",
    "CodecError",
    "ConfigurationError",
    "IntegrityError",
    "Keys",
    "Manifest",
    "PushError",
    "PushOptions",
    "PushTimeoutError",
    "RankState",
    "ReceiveOptions",
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
