"""The trainer side of the ``"redis"`` backend: push with the updater, then drive the engines.

``push_to_engines`` is the plain helper: ``RedisWeightUpdater`` pushes (deltas, wire
dtype, overlap, background upload: whatever it was built with), the engines staged
the version while they generated, then each engine's ``start_weight_update`` /
``update_weights({"version": N})`` / ``finish_weight_update(str(N))`` runs through
any ``VLLMWeightSyncClient`` (``OfflineLLMClient`` for an in-process ``vllm.LLM``,
vLLM's ``HTTPVLLMWeightSyncClient`` or ``RayVLLMWeightSyncClient``), all engines at
once; then the updater waits for every targeted rank's ack (plain workers included).

``RedisTrainerWeightTransferEngine`` is the same behind vLLM's trainer-side API
(``WeightTransferTrainerFactory.trainer_init(RedisTrainerInitInfo(...), client=...,
source=ModuleSource(model))``, then ``send_weights()``).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    VLLMWeightSyncClient,
    WeightSource,
)

from ...backend.store import RedisStore
from ...errors import ConfigurationError
from ...trainer.updater import RedisWeightUpdater


class OfflineLLMClient:
    """``VLLMWeightSyncClient`` over an in-process ``vllm.LLM`` (its methods take request dicts)."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)


def _each(clients: Sequence[VLLMWeightSyncClient], call: Any) -> None:
    """``call(client, index)`` for every client, concurrently when there are several; the first error raised."""
    if len(clients) == 1:
        call(clients[0], 0)
        return
    with ThreadPoolExecutor(max_workers=len(clients)) as pool:
        for future in [pool.submit(call, client, i) for i, client in enumerate(clients)]:
            future.result()


def init_engines(clients: Sequence[VLLMWeightSyncClient], url: str, namespace: str = "policy", *,
                 first_rank: int = 1, **receive_options: Any) -> list[int]:  # fmt: skip
    """Connect engine ``i`` as rank ``first_rank + i`` (each loads the latest version); returns the ranks."""
    ranks = [first_rank + i for i in range(len(clients))]
    _each(clients, lambda c, i: c.init_weight_transfer_engine(
        {"url": url, "namespace": namespace, "rank": ranks[i], **receive_options}))  # fmt: skip
    return ranks


def update_engines(clients: Sequence[VLLMWeightSyncClient], version: int | str = "latest") -> None:
    """Make every engine serve ``version`` (start, update, finish; the engines at once)."""

    def update(client: VLLMWeightSyncClient, _: int) -> None:
        client.start_weight_update()
        client.update_weights({"version": version})  # a failure ends the session (vLLM), the old version served
        client.finish_weight_update(str(version) if version != "latest" else None)

    _each(clients, update)


def push_to_engines(updater: RedisWeightUpdater, clients: Sequence[VLLMWeightSyncClient], weights: Any = None,
                    *, worker_ids: Any = None) -> int:  # fmt: skip
    """Push ``weights`` (default: the updater's policy), update the engines, wait for every ack; returns the version.

    The updater must be built with ``sync=False``: a sync push would wait for acks the
    engines send only once this helper drives them.
    """
    if updater.sync:
        raise ConfigurationError("push_to_engines needs RedisWeightUpdater(..., sync=False): the engines ack "
                                 "when driven after the push, and the helper waits for their acks itself")  # fmt: skip
    updater.update_weights(weights, worker_ids)
    updater.flush()
    update_engines(clients, updater.version)
    updater.wait()
    return updater.version


@dataclass
class RedisTrainerInitInfo(TrainerInitInfo):
    """Trainer side of ``"redis"``: the store, the engines' first rank and count, and options by name
    for ``RedisWeightUpdater`` (``updater``) and the engines' receivers (``receiver``)."""

    backend: ClassVar[str] = "redis"
    url: str = ""
    namespace: str = "policy"
    first_rank: int = 1
    num_engines: int = 1
    updater: dict[str, Any] = field(default_factory=dict)
    receiver: dict[str, Any] = field(default_factory=dict)


class RedisTrainerWeightTransferEngine(TrainerWeightTransferEngine[RedisTrainerInitInfo]):
    """vLLM's trainer-side engine for ``"redis"``: ``send_weights()`` is ``push_to_engines`` of the source.

    The client drives one engine, or several at once (Ray's fans out): with
    ``num_engines > 1`` through one client, give each engine its rank in its
    ``REDIS_WEIGHTS_VLLM_INIT`` instead, and this sends only the updates.
    """

    init_info_cls = RedisTrainerInitInfo

    def __init__(self, *, client: VLLMWeightSyncClient, source: WeightSource | None = None,
                 is_sender: bool = True) -> None:  # fmt: skip
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.updater: RedisWeightUpdater | None = None
        self.ranks: list[int] = []

    @classmethod
    def trainer_init(cls, init_info: RedisTrainerInitInfo, *, client: VLLMWeightSyncClient,
                     source: WeightSource | None = None) -> Self:  # fmt: skip
        if not init_info.url:
            raise ConfigurationError("RedisTrainerInitInfo needs the store's url")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender)
        if not engine.is_sender:
            return engine
        options = {**init_info.updater, "sync": False}
        store = RedisStore.from_url(init_info.url, namespace=init_info.namespace)
        ranks = list(range(init_info.first_rank, init_info.first_rank + init_info.num_engines))
        weights = dict(source) if source is not None else {}
        try:
            engine.updater = RedisWeightUpdater(store, weights, max(ranks), **options)
        except BaseException:
            store.close()
            raise
        engine.ranks = ranks
        if init_info.num_engines == 1:
            init_engines([client], init_info.url, init_info.namespace, first_rank=init_info.first_rank,
                         **init_info.receiver)  # fmt: skip
        return engine

    def send_weights(self, weights: Any = None) -> int | None:
        """Push the source's weights (or ``weights``) and update the engines; the version, or None off the sender."""
        if not self.is_sender:
            if self.source is not None:
                for _ in self.source:  # the other ranks still take part in the source's collectives
                    pass
            return None
        assert self.updater is not None
        if weights is None and self.source is not None:
            weights = dict(self.source)
        return push_to_engines(self.updater, [self.client], weights, worker_ids=self.ranks)

    def shutdown(self) -> None:
        if self.updater is not None:
            self.updater.close()
            self.updater = None
