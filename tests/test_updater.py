"""RedisWeightUpdater on fakeredis: the TorchRL-compatible API, sync waits and their failures."""

from __future__ import annotations

import logging
import threading
import time
import weakref

import pytest
import redis
import torch
from torch import nn

from redis_weights import (
    ConfigurationError,
    PushError,
    PushTimeoutError,
    RedisStore,
    RedisWeightReceiver,
    RedisWeightUpdater,
    WeightUpdaterBase,
)
from tests.codec_support import read_version


@pytest.fixture
def policy():
    return nn.Linear(8, 4)


def _updater(fake_store, policy, n=2, sync=False, **kw):
    return RedisWeightUpdater(fake_store, policy, n, sync, **kw)


def test_is_a_weight_updater_with_one_based_worker_ids(fake_store, policy):
    updater = _updater(fake_store, policy, n=3)
    assert isinstance(updater, WeightUpdaterBase)
    assert updater.all_worker_ids() == [1, 2, 3]
    assert RedisWeightUpdater.from_policy(policy) is None
    updater.init()  # a no-op hook


@pytest.mark.parametrize("bad", [0, -1, 4, [1, 4], [0], True, "1"])
def test_ranks_outside_one_to_num_workers_raise_runtime_error(fake_store, policy, bad):
    with pytest.raises(RuntimeError, match="rank"):
        _updater(fake_store, policy, n=3).push_weights(worker_ids=bad)


def test_async_push_commits_and_marks_only_the_targeted_ranks_pending(fake_store, policy):
    updater = _updater(fake_store, policy, n=3)
    updater.push_weights(worker_ids=[1, 3])
    assert updater.version == 1
    assert fake_store["latest"] == "1"
    assert fake_store["rank:1:status"] == "pending" and "rank:2:status" not in fake_store
    updater.push_weights(worker_ids=2)
    assert updater.version == 2 and fake_store["rank:2:status"] == "pending"


def test_push_weights_accepts_module_tensordict_and_dict(fake_store, policy):
    from tensordict import TensorDict

    updater = _updater(fake_store, None, n=1)
    updater.push_weights(policy)
    updater.push_weights(TensorDict.from_module(policy))
    updater.push_weights({"weight": torch.zeros(4, 8), "bias": torch.zeros(4)})
    assert updater.version == 3
    with pytest.raises(ConfigurationError, match="no weights"):
        updater.update_weights()


def test_post_hooks_run_in_order_after_every_push(fake_store, policy):
    updater = _updater(fake_store, policy, n=1)
    calls = []
    updater.register_post_hook(lambda: calls.append(("a", updater.version)))
    updater.register_post_hook(lambda: calls.append(("b", updater.version)))
    updater.update_weights()
    updater(policy)
    assert calls == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert len(updater.post_hooks) == 2
    with pytest.raises(TypeError):
        updater.register_post_hook("not callable")  # type: ignore[arg-type]


class _Collector:
    def __init__(self) -> None:
        self.policy_version = 0

    def increment_version(self) -> None:
        self.policy_version += 1


def test_collector_registration_is_weak_single_and_reaches_its_version(fake_store, policy):
    updater = _updater(fake_store, policy, n=1)
    assert updater.collector is None
    updater.increment_version()  # no collector: nothing to do
    collector = _Collector()
    updater.register_collector(collector)
    updater.register_collector(collector)  # the same one again is fine
    assert updater.collector is collector
    with pytest.raises(RuntimeError, match="already has a collector"):
        updater.register_collector(_Collector())
    updater.increment_version()
    assert collector.policy_version == 1
    ref = weakref.ref(collector)
    del collector
    assert ref() is None and updater.collector is None


def test_retention_keeps_the_newest_versions(fake_store, policy):
    updater = _updater(fake_store, policy, n=1, retention=2)
    for _ in range(4):
        updater.update_weights()
    updater.flush()  # the last push's GC runs on the collector's thread
    assert updater.registry.list_versions() == [3, 4]


def test_sync_push_times_out_naming_the_lagging_ranks(fake_store, policy):
    updater = _updater(fake_store, policy, n=2, sync=True, timeout=0.3)
    fake_store["rank:2:version"] = "0"  # rank 2 joined (no heartbeat needed for "lags")
    fake_store.client.set(fake_store.keyspace.rank_alive(2), "1", px=60_000)
    with pytest.raises(PushTimeoutError) as info:
        updater.update_weights()
    err = info.value
    assert isinstance(err, RuntimeError) and isinstance(err, TimeoutError)
    assert err.lagging == [1, 2] and err.version == 1
    assert "rank 1 never joined" in str(err) and "rank 2 lags" in str(err)


def test_sync_push_fails_at_once_on_a_dead_rank(fake_store, policy):
    updater = _updater(fake_store, policy, n=1, sync=True, timeout=30)
    fake_store["rank:1:version"] = "3"  # joined once; no alive key: heartbeat expired
    started = time.monotonic()
    with pytest.raises(PushError, match="rank 1 is dead") as info:
        updater.update_weights()
    assert info.value.dead == [1] and time.monotonic() - started < 5


def test_sync_push_fails_with_the_error_the_rank_reported(fake_store, policy):
    receiver = RedisWeightReceiver(RedisStore(fake_store.client, fake_store.namespace), 1, nn.Linear(8, 5))
    updater = _updater(fake_store, policy, n=1, sync=True, timeout=30)
    done = threading.Event()

    def worker() -> None:  # polls, refuses the version, reports the error
        while not done.is_set():
            receiver.poll()
            done.wait(0.05)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        with pytest.raises(PushError, match=r"rank 1 reported: error: version 1: key 'weight': shape") as info:
            updater.update_weights()
    finally:
        done.set()
        thread.join(5)
    assert info.value.errors[1].startswith("error: version 1")
    assert isinstance(info.value, RuntimeError)


def test_a_late_ack_of_an_older_version_does_not_end_the_wait(fake_store, policy):
    """The race: the trainer reset the status for v2, then a slow worker acks v1."""
    updater = _updater(fake_store, policy, n=1, sync=False)
    worker_policy = nn.Linear(8, 4)
    receiver = RedisWeightReceiver(RedisStore(fake_store.client, fake_store.namespace), 1, worker_policy)
    updater.update_weights()
    assert receiver.poll() == 1
    updater.sync, updater.timeout = True, 20
    result: dict[str, object] = {}

    def push() -> None:
        try:
            updater.update_weights()
            result["done"] = time.monotonic()
        except Exception as exc:  # pragma: no cover - reported below
            result["error"] = exc

    thread = threading.Thread(target=push)
    thread.start()
    while fake_store.get("latest") != "2":
        time.sleep(0.01)
    # the slow worker's ack of version 1 lands after the commit of version 2 ...
    receiver._report(1, "updated")
    # ... and even a worker that bypasses the ack script and writes "updated" by hand
    fake_store["rank:1:status"] = "updated"
    time.sleep(0.8)
    assert thread.is_alive(), "the push returned on an ack of an older version"
    acked = time.monotonic()
    assert receiver.poll() == 2
    thread.join(10)
    assert "error" not in result and result["done"] >= acked
    assert torch.equal(worker_policy.weight, policy.weight)


def test_constructor_validates_its_arguments(fake_store, policy):
    for kwargs in ({"num_workers": 0}, {"num_workers": 1, "timeout": 0}, {"num_workers": 1, "retention": 0}):
        with pytest.raises(ConfigurationError):
            RedisWeightUpdater(fake_store, policy, **kwargs)
    with pytest.raises(ValueError):
        RedisWeightUpdater(fake_store, policy, 1, chunk_size=10)


def test_a_redis_error_while_waiting_for_acks_is_a_push_error(fake_store, policy, monkeypatch):
    """Not only lost connections: an error reply (here NOPERM) is a ``PushError`` too, in a sync
    push and in ``wait()``, naming the version and chained to the Redis error."""
    import redis_weights.trainer.updater as updater_module

    def refused(*args, **kwargs):
        raise redis.exceptions.NoPermissionError("this user has no permissions to access one of the keys")

    monkeypatch.setattr(updater_module, "observe_rank_states", refused)
    for sync in (True, False):
        updater = _updater(fake_store, policy, n=1, sync=sync, timeout=5)
        with pytest.raises(PushError, match=r"version \d+ failed: .*NoPermissionError.*acks.*lacks a right") as info:
            updater.update_weights()
            updater.wait()
        assert isinstance(info.value.__cause__, redis.exceptions.NoPermissionError)
        assert info.value.version == updater.version == updater.registry.latest()


def hold_uploads(updater: RedisWeightUpdater, monkeypatch) -> threading.Event:
    """Make every chunk upload of ``updater`` wait (up to 10 s) until the returned event is set."""
    release = threading.Event()
    real_write = updater.registry.chunks.write

    def slow_write(*args, **kwargs):
        release.wait(10)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(updater.registry.chunks, "write", slow_write)
    return release


def test_flush_that_times_out_is_a_push_timeout(fake_store, policy, monkeypatch):
    updater = _updater(fake_store, policy, n=1, background=True)
    release = hold_uploads(updater, monkeypatch)
    updater.update_weights()
    with pytest.raises(PushTimeoutError, match="push of version 1: background upload still running") as info:
        updater.flush(0.05)
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, RuntimeError)
    release.set()
    updater.flush(10)
    assert updater.registry.latest() == 1
    updater.close()


def test_an_error_reply_after_the_commit_happened_says_so_and_keeps_the_chunks(fake_store, policy, monkeypatch):
    """A script that fails part-way (here: after its writes) is not reported as "not committed",
    and the chunks of the committed version are not discarded."""
    updater = _updater(fake_store, policy, n=1)
    real_commit = updater.registry._commit

    def commit_then_fail(*args, **kwargs):
        real_commit(*args, **kwargs)
        raise redis.exceptions.ResponseError("failed after its writes")

    monkeypatch.setattr(updater.registry, "_commit", commit_then_fail)
    with pytest.raises(PushError, match="push of version 1 failed: .*after its writes; its commit failed part-way"):
        updater.update_weights()
    monkeypatch.undo()
    assert updater.registry.latest() == 1 and read_version(updater.registry, 1)[0].version == 1


def test_a_second_writer_is_reported_when_this_updater_pushes_next(fake_store, policy, caplog):
    """Two trainers that take turns are not refused (numbers still rise), but each sees a warning."""
    first, second = _updater(fake_store, policy), _updater(fake_store, policy)
    with caplog.at_level(logging.WARNING, logger="redis_weights.trainer.updater"):
        first.update_weights()
        first.update_weights()
        assert not caplog.records  # one writer: nothing to report
        second.update_weights()  # its first push: nothing of its own to compare with
        assert not caplog.records
        first.update_weights()
    assert [first.version, second.version] == [4, 3]
    (record,) = caplog.records
    assert "version 3 was committed by another writer after this updater's version 2" in record.getMessage()
    assert "version 4 supersedes it" in record.getMessage()


def test_a_push_casts_on_the_encode_threads_and_a_background_push_on_the_caller(fake_store, monkeypatch):
    """The cast to ``wire_dtype`` runs on ``diff_threads``; a background push's snapshot stays on
    the calling thread (on the threads it would queue behind the previous upload's diff)."""
    import redis_weights.format.codec as codec

    ran: list[str] = []
    stage = codec._stage_tensor
    monkeypatch.setattr(codec, "_stage_tensor", lambda job, cast: ran.append(threading.current_thread().name)
                        or stage(job, cast))  # fmt: skip
    policy = nn.Sequential(*(nn.Linear(64, 64) for _ in range(4)))
    foreground = RedisWeightUpdater(fake_store, policy, 1, sync=False, wire_dtype=torch.bfloat16, diff_threads=2)
    foreground.push_weights()
    assert len(ran) == 8 and all(name.startswith("redis-weights-encode") for name in ran), ran
    ran.clear()
    background = RedisWeightUpdater(fake_store, policy, 1, sync=False, wire_dtype=torch.bfloat16, diff_threads=2,
                                    background=True)  # fmt: skip
    try:
        background.push_weights()
        background.flush()
        assert len(ran) == 8 and set(ran) == {threading.current_thread().name}, ran
    finally:
        background.close()
