"""``RedisWeightTransferEngine``: vLLM's weight-transfer backend ``"redis"`` (the worker side).

One instance per vLLM worker process, made by vLLM when the engine runs with
``weight_transfer_config={"backend": "redis"}``. ``init_info`` is ``{"url", "namespace",
"rank", ...}`` plus the receiver's options by name (``host_cache``, ``poll_interval``...);
``update_info`` is ``{"version": N}`` or ``{"version": "latest"}``.

- **Init** connects as the rank (tensor-parallel worker ``i`` of the engine is rank
  ``rank + i``), loads the latest committed version if there is one (an engine that
  starts late serves the latest weights), and stages every later version in the
  background. With ``REDIS_WEIGHTS_VLLM_INIT`` (the init info as JSON) in its
  environment, an engine does this at start-up, before any trainer call.
- **An update** installs the requested version: its chunks are fetched (usually staged
  already), every one verified, and the header checked before the first ``load_weights``;
  then the decoder layers that changed are loaded, inside vLLM's layerwise reload
  (``initialize_layerwise_reload`` / ``finalize_layerwise_reload``, as its IPC and NCCL
  engines do), all of it within ``update_weights``: ``start_weight_update`` and
  ``finish_weight_update`` only check the session. The rank acks ``"updated"``.
- **A failed update** never leaves the engine serving a mix. A version that cannot be
  fetched, verified or that does not fit the checkpoint's names and shapes is refused
  before the model is touched. If vLLM's loader itself fails part-way, the engine
  loads the version it served before again, whole (from Redis; version 0, the
  checkpoint, through vLLM's own loader). Either way the update raises, the rank
  reads ``"error: version N: ..."`` and the engine serves the old version; if even the
  restore fails, every later update is refused until the engine is restarted.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
    layerwise_groups,
)

from ...backend.store import RedisStore
from ...errors import VersionNotFoundError
from ...protocol import ranks
from .checkpoint import checkpoint_spec
from .options import split_receive_options
from .receiver import EngineReceiver, LoadError

log = logging.getLogger(__name__)

INIT_ENV = "REDIS_WEIGHTS_VLLM_INIT"  # the init info as JSON: connect and load the latest at start-up
_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"  # warns for each layer a partial load skips


@dataclass
class RedisInitInfo(WeightTransferInitInfo):
    """Where the weights are: a store URL (any the library takes: Sentinel, Cluster), the
    namespace, this engine's first rank, and ``RedisWeightReceiver`` options by name."""

    url: str
    namespace: str = "policy"
    rank: int = 1
    receiver: dict[str, Any] = field(default_factory=dict)


@dataclass
class RedisUpdateInfo(WeightTransferUpdateInfo):
    """Which committed version to serve: a number or ``"latest"``."""

    version: int | str = "latest"

    def __post_init__(self) -> None:
        if self.version != "latest" and (isinstance(self.version, bool) or not isinstance(self.version, int)
                                         or self.version < 1):  # fmt: skip
            raise ValueError(f"version must be a positive int or 'latest', got {self.version!r}")


class RedisWeightTransferEngine(WeightTransferEngine[RedisInitInfo, RedisUpdateInfo]):
    """vLLM worker side of the ``"redis"`` backend (see the module's docstring)."""

    init_info_cls = RedisInitInfo
    update_info_cls = RedisUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config: Any, vllm_config: Any, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.receiver: EngineReceiver | None = None
        self.broken: str | None = None  # set when a failed load could not be undone
        self._lock = threading.Lock()
        env = os.environ.get(INIT_ENV)
        if env:
            self.init_transfer_engine(self.parse_init_info(json.loads(env)))

    # -- vLLM's API ---------------------------------------------------------------------------
    def parse_init_info(self, init_dict: dict[str, Any]) -> RedisInitInfo:
        """``{"url", "namespace", "rank"}`` plus receiver options by name (or under ``"receiver"``)."""
        fields, options = split_receive_options(init_dict)
        try:
            return RedisInitInfo(**fields, receiver=options)
        except TypeError as exc:
            raise ValueError(f"Invalid init_info for {type(self).__name__}: {exc}") from exc

    def init_transfer_engine(self, init_info: RedisInitInfo) -> None:
        """Connect as the rank, serve the latest committed version, stage later ones."""
        self.shutdown()
        spec = checkpoint_spec(self.model_config)
        store = RedisStore.from_url(init_info.url, namespace=init_info.namespace)
        try:
            receiver = EngineReceiver(store, init_info.rank + _worker_index(), spec, layerwise_groups(list(spec)),
                                      self._load, **init_info.receiver)  # fmt: skip
        except BaseException:
            store.close()
            raise
        self.receiver = receiver
        latest = receiver.registry.latest()
        if latest:
            self._install(latest)
        receiver.start_staging()

    def start_weight_update(self) -> None:
        self._ready()

    def receive_weights(self, update_info: RedisUpdateInfo) -> None:
        receiver = self._ready()
        version = receiver.registry.latest() if update_info.version == "latest" else int(update_info.version)
        if not version:
            raise VersionNotFoundError(f"namespace {receiver.keyspace.namespace!r} holds no committed version")
        self._install(version)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.receive_weights(self.parse_update_info(update_info))  # CPU or GPU: the load has finished

    def finish_weight_update(self) -> None:
        self._ready()

    def shutdown(self) -> None:
        receiver, self.receiver = self.receiver, None
        if receiver is not None:
            receiver.close()

    # -- what the library adds --------------------------------------------------------------------
    @property
    def version(self) -> int:
        """The library's version this worker serves (0: the checkpoint it started from)."""
        return self.receiver.version if self.receiver is not None else 0

    def get_weight_version(self) -> int:
        return self.version

    # -- installing ----------------------------------------------------------------------------
    def _ready(self) -> EngineReceiver:
        if self.receiver is None:
            raise RuntimeError("the redis weight transfer engine is not initialized: call init_weight_transfer_engine")
        if self.broken:
            raise RuntimeError(f"this engine holds a mix of versions and must be restarted: {self.broken}")
        return self.receiver

    def _install(self, version: int) -> None:
        """Serve ``version``, or raise with the old version still served whole."""
        receiver = self._ready()
        with self._lock, receiver._poll_lock:
            if version == receiver.version and receiver.loaded:  # already served: ack it again
                receiver._report(version, ranks.STATUS_UPDATED)
                return
            previous = receiver.version
            try:
                applied = receiver._apply(version)
            except LoadError as exc:
                self._restore(receiver, version, previous, exc)
                raise
            except Exception as exc:  # Redis away, a version collected: nothing was loaded
                _report_failure(receiver, version, f"{type(exc).__name__}: {exc}")
                raise
            if applied is None:  # refused (corrupt, does not fit): reported as the rank's status
                raise RuntimeError(f"rank {receiver.rank}: {receiver.last_error}")

    def _restore(self, receiver: EngineReceiver, version: int, previous: int, exc: LoadError) -> None:
        """After a loader failure part-way: load ``previous`` again, whole, then report the failure."""
        log.error("rank %d: loading version %d failed part-way (%s); restoring version %d", receiver.rank, version,
                  exc, previous)  # fmt: skip
        try:
            if previous:
                if receiver._apply(previous) is None:
                    raise RuntimeError(receiver.last_error)
            else:
                self._reload_checkpoint()
        except Exception as restore_exc:
            self.broken = f"version {version}: {exc}; restoring version {previous} failed too: {restore_exc}"
            _report_failure(receiver, version, self.broken)
            return
        _report_failure(receiver, version, f"{exc}; version {previous} restored")

    def _reload_checkpoint(self) -> None:
        """Version 0 is the checkpoint the engine started from: vLLM's own loader reads it again."""
        from vllm.model_executor.model_loader.reload.inplace import reload_weights

        reload_weights(self.vllm_config, self.model, None, None, True)
        assert self.receiver is not None
        self.receiver.version = 0

    def _load(self, weights: list[tuple[str, torch.Tensor]], full: bool) -> None:
        """vLLM's layerwise reload around the model's own ``load_weights`` (required on CPU: its
        linear layers are repacked). Layers left out keep their tensors: vLLM warns for each
        unless the load is full, so a partial load quiets that warning."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        reload_log = logging.getLogger(_RELOAD_LOGGER)
        level = reload_log.level
        with torch.no_grad():
            initialize_layerwise_reload(self.model)
            try:
                self.model.load_weights(iter(weights))
            finally:
                if not full:
                    reload_log.setLevel(logging.ERROR)
                try:
                    finalize_layerwise_reload(self.model, self.model_config)
                finally:
                    reload_log.setLevel(level)


def _worker_index() -> int:
    """This worker's index in its engine (tensor/pipeline parallel): its rank is the engine's plus it."""
    from vllm.distributed import parallel_state

    try:
        return parallel_state.get_world_group().rank_in_group
    except (AssertionError, AttributeError):  # no group (a bare model in a test)
        return 0


def _report_failure(receiver: EngineReceiver, version: int, reason: str) -> None:
    """The rank's status becomes ``"error: version N: reason"`` (best effort: Redis may be what failed)."""
    try:
        receiver._fail(version, reason)
    except Exception as exc:
        log.warning("rank %d: could not report the failure of version %d (%s)", receiver.rank, version, exc)

