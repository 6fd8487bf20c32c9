"""The TorchRL integration with real TorchRL collectors against a real Redis server.

The policy's action equals its one weight, so a batch shows which weights produced
it: after the trainer changes the weight and pushes, the batches every worker
collects next must carry the new value (and the version it came with).
"""

from __future__ import annotations

import importlib.util
import pickle
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("torchrl")

from tensordict.nn import TensorDictModule  # noqa: E402
from torchrl.collectors import Collector, MultiAsyncCollector, MultiSyncCollector  # noqa: E402
from torchrl.collectors import WeightUpdaterBase as TorchRLWeightUpdaterBase  # noqa: E402
from torchrl.weight_update import WeightSyncScheme  # noqa: E402

import redis_weights.integrations.torchrl.updater as legacy_module  # noqa: E402
from redis_weights import (  # noqa: E402
    ConfigurationError,
    PushError,
    ReceiveTimeoutError,
    RedisStore,
    RedisWeightUpdater,
)
from redis_weights.integrations.torchrl import (  # noqa: E402
    CollectorWeightReceiver,
    RedisCollectorWeightUpdater,
    RedisWeightSyncScheme,
)
from redis_weights.tools.admin import drop_namespace  # noqa: E402
from tests.procs import Worker, stop_all  # noqa: E402
from tests.torchrl_env import action_values, make_env, make_policy, set_value  # noqa: E402

pytestmark = pytest.mark.server


def _versions(batch) -> list[int]:
    return sorted(set(batch["next", "policy_version"].flatten().tolist()))


def _local_collector(policy, **kwargs) -> Collector:
    return Collector(
        make_env(), policy, frames_per_batch=10, total_frames=-1, track_policy_version=True,
        auto_register_policy_transforms=False, **kwargs,
    )  # fmt: skip


# -- the legacy updater ----------------------------------------------------------------
def test_import_does_not_warn_and_updater_is_a_torchrl_weight_updater() -> None:
    # Execute the module afresh (not from the import cache) and record every warning.
    spec = importlib.util.spec_from_file_location("redis_weights.integrations.torchrl._probe", legacy_module.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec.loader.exec_module(module)
    assert [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)] == []
    assert issubclass(module.RedisCollectorWeightUpdater, TorchRLWeightUpdaterBase)
    assert issubclass(RedisCollectorWeightUpdater, TorchRLWeightUpdaterBase)
    assert issubclass(RedisWeightSyncScheme, WeightSyncScheme)


def test_collector_update_policy_weights_pushes_and_bumps_the_version(real_store: RedisStore) -> None:
    trainer_policy = make_policy(1.0)
    updater = RedisCollectorWeightUpdater(real_store, trainer_policy, num_workers=1, sync=True, timeout=20)
    trainer = _local_collector(trainer_policy, weight_updater=updater)
    worker = _local_collector(make_policy(0.0))
    receiver = CollectorWeightReceiver(RedisStore.from_url(real_store.url, real_store.namespace), 1, worker)
    try:
        assert updater.collector is trainer and updater.collectors == [trainer]
        before = trainer.policy_version
        receiver.start()
        trainer.update_policy_weights_()  # sync: returns once rank 1 has applied it
        assert trainer.policy_version == before + 1
        updater.increment_version()
        assert trainer.policy_version == before + 2
        assert receiver.version == updater.version
        batch = worker.next()
        assert action_values(batch) == [1.0] and _versions(batch) == [updater.version]

        set_value(trainer_policy, 3.0)
        trainer.update_policy_weights_(worker_ids=1)  # worker ids are 1-based ranks
        batch = worker.next()
        assert action_values(batch) == [3.0] and _versions(batch) == [updater.version]
        with pytest.raises(RuntimeError, match="1-based"):
            trainer.update_policy_weights_(worker_ids=[0])
    finally:
        receiver.close()
        worker.shutdown()
        trainer.shutdown()
        updater.close()


def test_receiver_applies_only_between_batches(real_store: RedisStore) -> None:
    """A version that arrives while a batch is being collected lands after that batch."""
    worker = _local_collector(make_policy(0.0))
    receiver = CollectorWeightReceiver(RedisStore.from_url(real_store.url, real_store.namespace), 1, worker)
    updater = RedisWeightUpdaterForTest(real_store)
    receiver.start()
    try:
        with receiver.receiver.lock:  # what a running batch holds
            updater.push(5.0)
            time.sleep(0.3)  # the receiver thread has the update by now, but must wait
            assert receiver.version == 0
            assert worker.policy.module.value.item() == 0.0
        updater.updater.wait(10)
        assert receiver.version == updater.updater.version
        assert action_values(worker.next()) == [5.0]
    finally:
        receiver.close()
        worker.shutdown()
        updater.updater.close()


def test_receiver_sync_waits_past_an_older_version(real_store: RedisStore) -> None:
    """A worker told the trainer's first version does not start on an older one left in Redis."""
    trainer = RedisWeightUpdaterForTest(real_store)
    trainer.push(9.0)  # left over from an earlier run
    stale = trainer.updater.version
    worker = _local_collector(make_policy(0.0))
    receiver = CollectorWeightReceiver(RedisStore.from_url(real_store.url, real_store.namespace), 1, worker)
    pusher = threading.Timer(0.3, trainer.push, args=(1.0,))
    pusher.start()
    try:
        applied = receiver.sync(10, min_version=stale + 1)
        pusher.join()  # the pusher sets updater.version after its commit, which the receiver may beat
        assert applied == trainer.updater.version > stale
        assert action_values(worker.next()) == [1.0]
    finally:
        pusher.cancel()
        receiver.close()
        worker.shutdown()
        trainer.updater.close()


class RedisWeightUpdaterForTest:
    """Pushes a value-policy's weights asynchronously to rank 1."""

    def __init__(self, store: RedisStore) -> None:
        self.policy = make_policy(0.0)
        self.updater = RedisCollectorWeightUpdater(store, self.policy, num_workers=1, sync=False, timeout=20)

    def push(self, value: float) -> None:
        set_value(self.policy, value)
        self.updater.update_weights()


def test_multisync_collector_with_the_legacy_updater(real_store: RedisStore) -> None:
    """``MultiSyncCollector(weight_updater=...)``: a rank elsewhere gets the push through Redis.

    The collector's own CPU workers run the new weights too, but not through the
    updater: on CPU they share the policy's memory with the trainer (TorchRL's
    behaviour), so they see the change as soon as it is made. Workers of their own
    need ``weight_sync_schemes={"policy": RedisWeightSyncScheme(...)}``.
    """
    policy = make_policy(1.0)
    updater = RedisCollectorWeightUpdater(real_store, policy, num_workers=1, sync=True, timeout=20)
    remote = _local_collector(make_policy(0.0))
    receiver = CollectorWeightReceiver(RedisStore.from_url(real_store.url, real_store.namespace), 1, remote).start()
    collector = MultiSyncCollector([make_env], policy, frames_per_batch=10, total_frames=-1, weight_updater=updater)
    try:
        assert updater.collector is collector
        batches = iter(collector)
        assert action_values(next(batches)) == [1.0]
        set_value(policy, 2.0)
        collector.update_policy_weights_()  # rank 1 acked
        assert action_values(next(batches)) == [2.0]
        batch = remote.next()
        assert action_values(batch) == [2.0] and _versions(batch) == [updater.version]
    finally:
        collector.shutdown()
        receiver.close()
        remote.shutdown()
        updater.close()


def test_a_version_the_collector_cannot_forward_is_reported_not_acked(real_store: RedisStore) -> None:
    """A multi-process collector whose ``update_policy_weights_`` raises: the rank reports the
    error (the push fails, naming it) instead of acking a version its worker processes do not run.

    Here it raises for real: the receiver fills a policy shaped like the trainer's (a
    ``Linear``), which the collector's workers (a ``ValueNet``) have no place for.
    """
    def linear_policy() -> TensorDictModule:
        return TensorDictModule(nn.Linear(1, 1), in_keys=["observation"], out_keys=["action"])

    updater = RedisWeightUpdater(real_store, linear_policy(), num_workers=1, sync=False, timeout=20)
    collector = MultiSyncCollector([make_env], make_policy(1.0), frames_per_batch=10, total_frames=-1)
    receiver = CollectorWeightReceiver(RedisStore.from_url(real_store.url, real_store.namespace), 1, collector,
                                       policy=linear_policy(), background=False)  # fmt: skip
    try:
        batches = iter(collector)
        next(batches)
        updater.update_weights()
        next(batches)  # the guard applies version 1 before this batch, then forwards it: refused
        with pytest.raises(PushError, match="rank 1 reported: error: version 1: MultiSyncCollector did not take it"):
            updater.wait()
        (state,) = updater.workers(1)
        assert state.error == receiver.receiver.last_error and "KeyError" in state.error
        assert state.version == 0 and receiver.version == 1
    finally:
        collector.shutdown()
        receiver.close()
        updater.close()


# -- collectors in worker processes, kept in step by CollectorWeightReceiver ----------------
class CollectorWorker(Worker):
    """A ``tests/torchrl_worker.py`` process (the rest as ``tests.procs.Worker``)."""

    module = "tests.torchrl_worker"

    def batches(self) -> list[dict]:
        return [r for r in self.records() if "values" in r]


@contextmanager
def collector_workers(tmp_path: Path, url: str, namespace: str, modes: dict[int, list[str]]) -> Iterator[dict]:
    started: dict[int, CollectorWorker] = {}
    try:
        for rank, extra in modes.items():
            args = ["--url", url, "--namespace", namespace, "--rank", str(rank), *extra]
            started[rank] = CollectorWorker(tmp_path / f"collector{rank}.jsonl", args)
        for w in started.values():
            w.wait_ready(90)
        yield started
    finally:
        stop_all(w.proc for w in started.values())


def _batches_started_after(worker: CollectorWorker, moment: float, count: int, timeout: float = 20) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        later = [b for b in worker.batches() if b["started"] > moment]
        if len(later) >= count:
            return later
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} batches after the push: {worker.log()}")
        time.sleep(0.05)


def test_collectors_in_other_processes_use_new_weights_from_the_next_batch(
    tmp_path: Path, redis_url: str, namespace: str, real_store: RedisStore
) -> None:
    """Sync pushes (``collector.update_policy_weights_()``) and async ones (then ``wait()``)."""
    trainer_policy = make_policy(0.0)
    sync_updater = RedisCollectorWeightUpdater(real_store, trainer_policy, num_workers=2, sync=True, timeout=30)
    async_updater = RedisCollectorWeightUpdater(
        RedisStore.from_url(redis_url, namespace), trainer_policy, num_workers=2, sync=False, timeout=30
    )
    trainer = _local_collector(trainer_policy, weight_updater=sync_updater)
    value_of = {0: 0.0}  # version -> the weight it carries

    def push(value: float, sync: bool) -> int:
        set_value(trainer_policy, value)
        if sync:
            trainer.update_policy_weights_()  # returns once ranks 1 and 2 acked
            return sync_updater.version
        async_updater.update_weights()  # returns after the commit
        async_updater.wait(30)
        return async_updater.version

    # rank 1 applies from a background thread, rank 2 checks Redis at each batch.
    with collector_workers(tmp_path, redis_url, namespace, {1: [], 2: ["--poll-mode"]}) as workers:
        try:
            for value, sync in ((1.0, True), (2.0, False), (3.0, True), (4.0, False)):
                version = push(value, sync)
                acked = time.monotonic()
                value_of[version] = value
                for worker in workers.values():
                    for batch in _batches_started_after(worker, acked, 2):
                        assert batch["values"] == [value], batch
                        assert batch["versions"] == [version], batch
            assert [s.version for s in sync_updater.workers()] == [version] * 2
        finally:
            trainer.shutdown()
            sync_updater.close()
            async_updater.close()
        for worker in workers.values():
            for batch in worker.batches():  # never a batch of mixed weights, never a wrong label
                assert len(batch["values"]) == 1 and len(batch["versions"]) == 1, batch
                assert batch["values"] == [value_of[batch["versions"][0]]], batch


# -- the weight-sync scheme ------------------------------------------------------------
def test_scheme_between_collectors_and_standalone_receiver(redis_url: str, namespace: str) -> None:
    _scheme_round_trip(redis_url, namespace)


def test_scheme_on_a_redis_cluster(redis_cluster, namespace: str) -> None:
    """The same, with the URL of one node of a Redis Cluster (pickled to the workers as it is)."""
    _scheme_round_trip(redis_cluster.url, namespace)


def _scheme_round_trip(redis_url: str, namespace: str) -> None:
    trainer_policy = make_policy(1.0)
    sender = RedisWeightSyncScheme(
        redis_url, namespace=namespace, num_workers=1, timeout=20, retention=2
    )
    trainer = _local_collector(trainer_policy, weight_sync_schemes={"policy": sender})
    # A collector elsewhere: it waits for the trainer's initial weights when it connects.
    worker = _local_collector(
        make_policy(0.0),
        weight_recv_schemes={"policy": RedisWeightSyncScheme(redis_url, namespace=namespace, rank=1)},
    )
    try:
        assert sender.version >= 1
        batch = worker.next()
        assert action_values(batch) == [1.0] and _versions(batch) == [sender.version]
        set_value(trainer_policy, 4.0)
        trainer.update_policy_weights_(worker_ids=[1])  # sync: rank 1 acked
        batch = worker.next()
        assert action_values(batch) == [4.0] and _versions(batch) == [sender.version]
        assert [s.status for s in sender.updater.workers()] == ["updated"]
        assert sender.updater.retention == 2
        # Worker processes get the scheme pickled: config and the first version to wait for.
        clone = pickle.loads(pickle.dumps(sender))
        assert (clone.url, clone.namespace, clone.updater, clone._start_version) == (redis_url, namespace, None, 1)
    finally:
        worker.shutdown()
        trainer.shutdown()
        sender.shutdown()


def test_receiving_scheme_refuses_a_policy_that_does_not_fit(redis_url: str, namespace: str) -> None:
    sender = RedisWeightSyncScheme(redis_url, namespace=namespace, num_workers=1, timeout=5)
    trainer = _local_collector(make_policy(1.0), weight_sync_schemes={"policy": sender})
    other = TensorDictModule(nn.Linear(1, 1), in_keys=["observation"], out_keys=["action"])
    try:
        with pytest.raises(ReceiveTimeoutError, match="module.bias. is missing"):
            _local_collector(
                other,
                weight_recv_schemes={
                    "policy": RedisWeightSyncScheme(redis_url, namespace=namespace, rank=1, timeout=1)
                },
            )
        state = sender.updater.workers()[0]  # what the trainer sees: the refusal, with its reason
        assert state.error is not None and "module.bias" in state.error
    finally:
        trainer.shutdown()
        sender.shutdown()


def test_configuration_errors_are_clear(real_store: RedisStore) -> None:
    with pytest.raises(ConfigurationError, match="num_workers"):
        _local_collector(make_policy(), weight_sync_schemes={"policy": RedisWeightSyncScheme(real_store.url)})
    with pytest.raises(ConfigurationError, match="not a TorchRL collector"):
        CollectorWeightReceiver(real_store, 1, object(), policy=make_policy())
    no_url = RedisWeightSyncScheme(RedisStore(real_store.client, real_store.namespace, owns_client=False))
    with pytest.raises(ConfigurationError, match="URL"):
        pickle.dumps(no_url)
    clone = pickle.loads(pickle.dumps(RedisWeightSyncScheme(real_store.url, namespace="x", num_workers=3)))
    assert (clone.url, clone.namespace, clone.num_workers, clone.updater) == (real_store.url, "x", 3, None)


def _two_worker_collector(cls: type, policy, scheme: RedisWeightSyncScheme):
    """A TorchRL multi-process collector: two worker processes, receiving through ``scheme``."""
    return cls(
        [make_env] * 2, policy, frames_per_batch=10, total_frames=-1,
        weight_sync_schemes={"policy": scheme}, track_policy_version=True,
    )  # fmt: skip


def test_multiasync_collector_async_scheme(redis_url: str, namespace: str) -> None:
    policy = make_policy(1.0)
    scheme = RedisWeightSyncScheme(redis_url, namespace=namespace, sync=False, timeout=30)
    collector = _two_worker_collector(MultiAsyncCollector, policy, scheme)
    value_of = {scheme.version: 1.0}
    try:
        batches = iter(collector)
        seen = [next(batches)]
        set_value(policy, 2.0)
        collector.update_policy_weights_()  # returns at once
        value_of[scheme.version] = 2.0
        scheme.wait(30)  # both ranks applied it
        deadline = time.monotonic() + 20
        while [_versions(b) for b in seen[-4:]] != [[scheme.version]] * 4:
            assert time.monotonic() < deadline, [_versions(b) for b in seen]
            seen.append(next(batches))
    finally:
        collector.shutdown()
        scheme.shutdown()
    for batch in seen:  # each batch made by one set of weights, labelled with its version
        assert len(_versions(batch)) == 1 and action_values(batch) == [value_of[_versions(batch)[0]]]


# -- configuration: one options object, namespaces, ranks ---------------------------------------
def test_options_hold_the_core_options_and_take_every_one_by_name() -> None:
    import dataclasses

    from redis_weights import PushOptions, ReceiveOptions
    from redis_weights.integrations.torchrl import RedisSyncOptions

    options = RedisSyncOptions()
    assert (options.push, options.receive) == (PushOptions(), ReceiveOptions())
    assert options.first_version_timeout == options.push.timeout
    assert RedisSyncOptions.of(connect_timeout=2.0).first_version_timeout == 2.0
    for cls, side in ((PushOptions, "push"), (ReceiveOptions, "receive")):  # every core option, by its name
        for f in dataclasses.fields(cls):
            if f.name != "check_server":
                assert getattr(RedisSyncOptions.of(**{f.name: getattr(getattr(options, side), f.name)}), side) \
                    == getattr(options, side), f.name
    flat = RedisSyncOptions.of(sync=False, wire_dtype=torch.bfloat16, delta=True, keyframe_interval=5,
                               keyframe_fraction=0.25, overlap_min_bytes=None, poll_interval=0.5,
                               check_server=False, upload_in_background=True, background=False)  # fmt: skip
    assert flat.push == PushOptions(wire_dtype=torch.bfloat16, delta=True, keyframe_interval=5, keyframe_fraction=0.25,
                                    overlap_min_bytes=None, check_server=False, background=True)  # fmt: skip
    assert flat.receive == ReceiveOptions(poll_interval=0.5, check_server=False)
    assert (flat.sync, flat.background) == (False, False), "background names the worker's thread here"
    assert RedisSyncOptions.of(push=PushOptions(retention=5), timeout=7.0).push == PushOptions(retention=5, timeout=7.0)
    with pytest.raises(ConfigurationError, match="unknown option.*'timout'"):
        RedisSyncOptions.of(timout=3)
    with pytest.raises(ConfigurationError, match="unknown option"):
        RedisWeightSyncScheme("redis://127.0.0.1:1/0", updater_options={"retention": 2})
    with pytest.raises(ConfigurationError, match="background=True needs sync=False"):
        RedisSyncOptions.of(upload_in_background=True)
    with pytest.raises(ConfigurationError, match="keyframe_interval must be within"):
        RedisWeightSyncScheme("redis://127.0.0.1:1/0", delta=True, keyframe_interval=0)
    scheme = RedisWeightSyncScheme("redis://127.0.0.1:1/0", options=RedisSyncOptions(PushOptions(retention=5)),
                                   sync=False, wire_dtype=torch.float16)  # fmt: skip
    assert (scheme.options.push.retention, scheme.options.push.wire_dtype, scheme.sync) == (5, torch.float16, False)


def test_a_scheme_push_with_deltas_moves_the_bytes_of_the_core_updaters(redis_url: str, namespace: str,
                                                                        real_store: RedisStore) -> None:  # fmt: skip
    """``wire_dtype`` and ``delta`` reach the scheme's updater: on real AdamW steps each of its pushes
    writes exactly what a core updater with the same options writes, a few percent of the model."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1))
    policy = TensorDictModule(net, in_keys=["observation"], out_keys=["action"])
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5)
    options = {"wire_dtype": torch.bfloat16, "delta": True, "chunk_size": 16384}
    sender = RedisWeightSyncScheme(redis_url, namespace=namespace, num_workers=1, sync=False, **options)
    trainer = _local_collector(policy, weight_sync_schemes={"policy": sender})
    core = RedisWeightUpdater(RedisStore.from_url(redis_url, f"{namespace}-core"), policy, 1, sync=False, **options)
    try:
        core.update_weights()  # the keyframe, as the scheme's first version
        for _ in range(3):
            loss = net(torch.randn(32, 1)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            trainer.update_policy_weights_(policy)
            core.update_weights()
            scheme_push, core_push = sender.updater.last_push, core.last_push
            assert scheme_push is not None and core_push is not None
            assert scheme_push.written_bytes == core_push.written_bytes, "the scheme moves the updater's bytes"
            assert 0 < scheme_push.written_bytes < scheme_push.total_bytes / 4, "patches, not whole chunks"
            assert scheme_push.total_bytes < 0.6 * sum(p.numel() * 4 for p in net.parameters()), "sent as bf16"
        manifest = sender.updater.registry.read_manifest(sender.updater.version)
        assert not manifest.is_keyframe and manifest.version == core.version
    finally:
        trainer.shutdown()
        drop_namespace(core.store.client, core.store.keyspace)
        core.close()


def test_scheme_refuses_a_namespace_that_contradicts_its_store(real_store: RedisStore) -> None:
    with pytest.raises(ConfigurationError, match="contradicts the store's namespace"):
        RedisWeightSyncScheme(real_store, namespace="other")
    same = RedisWeightSyncScheme(real_store, namespace=real_store.namespace)
    assert RedisWeightSyncScheme(real_store).namespace == same.namespace == real_store.namespace
    clone = pickle.loads(pickle.dumps(same))  # receivers rebuild the store from URL and namespace
    assert (clone.url, clone.namespace) == (real_store.url, real_store.namespace)


def test_default_namespace_comes_from_the_model_id(real_store: RedisStore) -> None:
    from redis_weights.integrations.torchrl.scheme import namespace_for

    assert namespace_for("policy") == "policy" and namespace_for("env.transform[0]") == "env.transform_0_"
    value = RedisWeightSyncScheme(real_store.url, num_workers=1, sync=False)
    assert value.namespace is None
    value.init_on_sender(model_id=f"value{real_store.namespace}", weights={"w": __import__("torch").ones(1)})
    try:
        assert value.namespace == f"value{real_store.namespace}" and value.version == 1
        assert pickle.loads(pickle.dumps(value)).namespace == value.namespace
    finally:
        value.updater.registry.client.delete(*value.updater.registry.client.keys(f"rw:{{{value.namespace}}}:*"))
        value.shutdown()


def test_ranks_from_torchrl_worker_indices(real_store: RedisStore) -> None:
    """Multi-process workers pass a 0-based index; DistributedCollector nodes their 1-based torch rank."""
    import torch
    from torchrl.collectors.distributed import DistributedCollector

    weights = {"w": torch.ones(1)}
    for context, worker_idx in ((None, 0), (object.__new__(DistributedCollector), 1)):
        sender = RedisWeightSyncScheme(real_store.url, namespace=real_store.namespace, num_workers=2, sync=False)
        sender.init_on_sender(model_id="policy", context=context, weights=weights)
        try:
            receiver = pickle.loads(pickle.dumps(sender))
            receiver.init_on_receiver(model_id="policy", worker_idx=worker_idx, model=torch.nn.Linear(1, 1))
            assert receiver.rank == 1, (type(context).__name__, receiver.rank)
            offset = pickle.loads(pickle.dumps(sender))
            offset.rank_offset = 2
            offset.init_on_receiver(model_id="policy", worker_idx=worker_idx, model=torch.nn.Linear(1, 1))
            assert offset.rank == 3
        finally:
            sender.shutdown()


def test_worker_count_from_devices_or_params_map(real_store: RedisStore) -> None:
    """TorchRL's ``init_on_sender(model=..., devices=[d] * n)`` and ``params_map=`` overloads."""
    from tensordict import TensorDict

    for kwargs in ({"model": make_policy(1.0), "devices": ["cpu"] * 2},
                   {"params_map": dict.fromkeys(range(3), TensorDict.from_module(make_policy(1.0)))}):  # fmt: skip
        scheme = RedisWeightSyncScheme(real_store.url, namespace=real_store.namespace, sync=False)
        scheme.init_on_sender(model_id="policy", **kwargs)
        try:
            assert scheme.num_workers == len(kwargs.get("devices") or kwargs["params_map"])
            assert scheme.updater.all_worker_ids() == list(range(1, scheme.num_workers + 1))
        finally:
            scheme.shutdown()
    distinct = {i: TensorDict.from_module(make_policy(float(i))) for i in range(2)}
    with pytest.raises(ConfigurationError, match="different weights per worker"):
        RedisWeightSyncScheme(real_store.url, namespace=real_store.namespace).init_on_sender(params_map=distinct)


def test_the_scheme_and_the_legacy_updater_take_max_lag(redis_url: str, namespace: str,
                                                        real_store: RedisStore) -> None:  # fmt: skip
    """``max_lag`` reaches the core updater (``test_lag.py`` tests it with slow workers), and survives pickling."""
    legacy = RedisCollectorWeightUpdater(real_store, make_policy(1.0), 2, sync=False, max_lag=1)
    assert legacy.lag_bound == 1
    legacy.close()
    sender = RedisWeightSyncScheme(redis_url, namespace=namespace, num_workers=1, sync=False, max_lag=3)
    trainer = _local_collector(make_policy(1.0), weight_sync_schemes={"policy": sender})
    try:
        assert sender.updater.max_lag == 3 and sender.updater.lag_bound == 3
        assert pickle.loads(pickle.dumps(sender)).options.push.max_lag == 3
        trainer.update_policy_weights_()  # nothing within reach of a bound of 3 yet: returns at once
        assert sender.updater.last_push.max_lag == 3
    finally:
        trainer.shutdown()
        sender.shutdown()
