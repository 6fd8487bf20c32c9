"""vLLM engines as workers: the weight-transfer backend ``"redis"``.

Engine side (``engine.py``): every vLLM worker receives versions like any
``RedisWeightReceiver`` (deltas, host cache, verified installs, acks as its rank,
rollback, late start), loading only the decoder layers that changed. Trainer side
(``trainer.py``): push with ``RedisWeightUpdater``, then drive the engines through
any ``VLLMWeightSyncClient`` (in-process ``LLM``, HTTP, Ray). Installed with the
``vllm`` extra; vLLM loads ``register`` through the ``vllm.general_plugins`` entry
point. Importing this package does not import vLLM.
"""

from __future__ import annotations

from typing import Any

from .plugin import BACKEND, register

__all__ = ["BACKEND", "register", "OfflineLLMClient", "init_engines", "push_to_engines", "update_engines"]


def __getattr__(name: str) -> Any:
    """The trainer-side helpers, imported on first use (they import vLLM)."""
    if name in ("OfflineLLMClient", "init_engines", "push_to_engines", "update_engines"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
