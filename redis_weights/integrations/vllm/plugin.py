"""Registration of the ``"redis"`` backend with vLLM's weight-transfer factories.

vLLM calls ``register`` through the ``vllm.general_plugins`` entry point in every
process it starts (front end, engine core, each worker), and a factory refuses a
name registered twice: so the second call in a process is a no-op. Both entries
are lazy (module paths): nothing of this package is imported until an engine uses it.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

BACKEND = "redis"
_MODULE = "redis_weights.integrations.vllm"


def register() -> None:
    """Register ``RedisWeightTransferEngine`` and ``RedisTrainerWeightTransferEngine`` as ``"redis"``, once."""
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory, WeightTransferTrainerFactory

    for factory, module, name in (
        (WeightTransferEngineFactory, f"{_MODULE}.engine", "RedisWeightTransferEngine"),
        (WeightTransferTrainerFactory, f"{_MODULE}.trainer", "RedisTrainerWeightTransferEngine"),
    ):
        if BACKEND in factory._registry:  # this process registered it already (the plugin runs once per import)
            continue
        factory.register_engine(BACKEND, module, name)
    log.debug("registered the %r weight transfer backend", BACKEND)
