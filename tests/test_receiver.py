"""RedisWeightReceiver on fakeredis: poll, wait, background thread, refusals, acks, heartbeats."""

from __future__ import annotations

import time

import pytest
import redis
import torch
from tensordict import TensorDict
from torch import nn

from redis_weights import (
    ApplyError,
    ConfigurationError,
    PushError,
    ReceiveTimeoutError,
    RedisStore,
    RedisWeightReceiver,
    RedisWeightUpdater,
)
from redis_weights.errors import CodecError
from redis_weights.protocol import ranks
from redis_weights.worker import receiver as receiver_module
from tests.faults_support import chunk_key


def _pair(fake_store, worker_policy, trainer_policy=None, **kw):
    trainer_policy = trainer_policy if trainer_policy is not None else nn.Linear(8, 4)
    updater = RedisWeightUpdater(fake_store, trainer_policy, 2, sync=False)
    receiver = RedisWeightReceiver(RedisStore(fake_store.client, fake_store.namespace), 1, worker_policy, **kw)
    return updater, receiver, trainer_policy


def test_poll_applies_in_place_and_acks(fake_store):
    worker = nn.Linear(8, 4)
    ptrs = [p.data_ptr() for p in worker.parameters()]
    updater, receiver, trainer = _pair(fake_store, worker)
    assert receiver.poll() is None and receiver.version == 0
    updater.update_weights()
    assert receiver.poll() == 1 and receiver.version == 1
    assert receiver.poll() is None
    assert [p.data_ptr() for p in worker.parameters()] == ptrs
    assert torch.equal(worker.weight, trainer.weight) and torch.equal(worker.bias, trainer.bias)
    state = updater.workers(1)[0]
    assert (state.status, state.version, state.alive, state.joined) == ("updated", 1, True, True)
    assert state.heartbeat_age is not None and state.heartbeat_age < 5


def test_registration_marks_the_rank_joined_and_alive(fake_store):
    _, receiver, _ = _pair(fake_store, nn.Linear(8, 4), heartbeat_ttl=7)
    assert fake_store["rank:1:version"] == "0"
    assert 0 < fake_store.client.pttl(fake_store.keyspace.rank_alive(1)) <= 7000


def test_a_mismatched_version_is_refused_once_and_reported(fake_store):
    worker = nn.Linear(8, 5)
    before = worker.weight.detach().clone()
    updater, receiver, _ = _pair(fake_store, worker)
    updater.update_weights()
    assert receiver.poll() is None
    assert receiver.last_error and "key 'weight': shape [4, 8] pushed" in receiver.last_error
    assert fake_store["rank:1:status"] == receiver.last_error
    assert torch.equal(worker.weight, before) and receiver.version == 0
    assert receiver.poll() is None  # the same bad version is not fetched again


def test_a_corrupted_chunk_is_refused_and_the_next_good_version_applies(fake_store):
    worker = nn.Linear(8, 4)
    updater, receiver, trainer = _pair(fake_store, worker)
    updater.update_weights()
    key = chunk_key(fake_store, 1, 0)
    data = bytearray(fake_store.client.get(key))
    data[-1] ^= 0xFF
    fake_store.client.set(key, bytes(data))
    assert receiver.poll() is None and "does not match its id" in receiver.last_error
    assert not fake_store.client.exists(key), "the corrupted chunk stays, so the next push would not replace it"
    updater.update_weights()
    assert receiver.poll() == 2 and receiver.last_error is None
    assert torch.equal(worker.weight, trainer.weight)


def test_wait_blocks_until_a_new_version_and_times_out_clearly(fake_store):
    updater, receiver, _ = _pair(fake_store, nn.Linear(8, 4), poll_interval=0.05)
    with pytest.raises(ReceiveTimeoutError, match="rank 1: no new version within 0.2s") as info:
        receiver.wait(timeout=0.2)
    assert isinstance(info.value, TimeoutError)
    updater.update_weights()
    assert receiver.wait(timeout=5) == 1


def test_background_thread_applies_new_versions(fake_store):
    worker = nn.Linear(8, 4)
    updater, receiver, trainer = _pair(fake_store, worker, poll_interval=0.05)
    with receiver:
        for expected in (1, 2):
            with torch.no_grad():
                trainer.weight.add_(1.0)
            updater.update_weights()
            assert receiver.wait(timeout=10, min_version=expected) == expected
            with receiver.lock:
                assert torch.equal(worker.weight, trainer.weight)
    assert receiver._thread is None


def test_post_hooks_see_the_version_before_the_ack(fake_store):
    updater, receiver, _ = _pair(fake_store, nn.Linear(8, 4))
    seen = []
    receiver.register_post_hook(lambda v: seen.append((v, fake_store.get("rank:1:version"))))
    updater.update_weights()
    receiver.poll()
    assert seen == [(1, "0")]  # the hook ran before the ack recorded version 1
    assert fake_store["rank:1:version"] == "1"


def test_a_post_hook_raising_apply_error_reports_the_version_as_refused(fake_store):
    """``ApplyError`` from a hook: the rank reports an error instead of acking (the push fails,
    naming it) and the hooks after it are skipped; any other hook exception is logged, and the rank acks."""
    worker = nn.Linear(8, 4)
    updater, receiver, trainer = _pair(fake_store, worker)
    failed, after = [], []

    def flaky(version):
        failed.append(version)
        raise RuntimeError("the metrics backend is down")

    def forward(version):
        if version == 1:
            raise ApplyError("the worker processes did not take it")

    for hook in (flaky, forward, after.append):
        receiver.register_post_hook(hook)
    updater.update_weights()
    assert receiver.poll() == 1 and receiver.version == 1 and torch.equal(worker.weight, trainer.weight)
    assert receiver.last_error == "error: version 1: the worker processes did not take it"
    assert fake_store["rank:1:status"] == receiver.last_error and fake_store["rank:1:version"] == "0"
    assert after == []
    with pytest.raises(PushError, match="rank 1 reported: error: version 1: the worker processes") as info:
        updater.wait(timeout=5)
    assert info.value.errors[1] == receiver.last_error
    assert receiver.poll() is None  # neither applied nor reported again
    updater.update_weights()
    assert receiver.poll() == 2 and receiver.last_error is None
    assert fake_store["rank:1:status"] == "updated" and fake_store["rank:1:version"] == "2"
    assert failed == [1, 2] and after == [2]


def test_a_tensordict_policy_is_updated_in_place(fake_store):
    module = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    params = TensorDict.from_module(module)
    trainer = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with torch.no_grad():
        trainer[1].running_mean.fill_(2.0)
    updater, receiver, _ = _pair(fake_store, params, trainer)
    updater.update_weights()
    assert receiver.poll() == 1
    assert torch.equal(module[0].weight, trainer[0].weight)
    assert torch.equal(module[1].running_mean, torch.full((3,), 2.0))


def test_losing_every_version_is_reported_and_the_weights_kept(fake_store):
    worker = nn.Linear(8, 4)
    updater, receiver, trainer = _pair(fake_store, worker)
    updater.update_weights()
    receiver.poll()
    fake_store.client.flushall()  # Redis restarted empty
    receiver.heartbeat()
    assert receiver.poll() is None
    assert "no committed version" in receiver.last_error and "keeping version 1" in receiver.last_error
    assert torch.equal(worker.weight, trainer.weight)
    updater.update_weights()  # the trainer's next push continues above its last version
    assert updater.version == 2 and receiver.poll() == 2


def test_constructor_validates(fake_store):
    for rank in (0, -1, True, "1"):
        with pytest.raises(ConfigurationError):
            RedisWeightReceiver(fake_store, rank, nn.Linear(1, 1))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        RedisWeightReceiver(fake_store, 1, nn.Linear(1, 1), poll_interval=0)
    with pytest.raises(Exception, match="nn.Module"):
        RedisWeightReceiver(fake_store, 1, object())


def test_the_policy_is_walked_at_construction_and_at_each_assignment_only(fake_store, monkeypatch):
    """The receiver fills the tensors it found at construction (no walk of the policy per version)
    or at the last ``policy =``: a new module, or the same one after a tensor of it was replaced."""
    worker = nn.Linear(8, 4)
    updater, receiver, trainer = _pair(fake_store, worker)
    walks: list[object] = []
    flatten = receiver_module.flatten_weights
    monkeypatch.setattr(receiver_module, "flatten_weights", lambda policy: walks.append(policy) or flatten(policy))
    updater.update_weights()
    assert receiver.poll() == 1 and walks == []
    assert torch.equal(worker.weight, trainer.weight)

    other, before = nn.Linear(8, 4), worker.weight.detach().clone()
    receiver.policy = other
    assert receiver.policy is other and walks == [other]
    with torch.no_grad():
        trainer.weight.add_(1.0)
    updater.update_weights()
    assert receiver.poll() == 2
    assert torch.equal(other.weight, trainer.weight) and torch.equal(worker.weight, before)

    other.weight = nn.Parameter(torch.zeros(4, 8))  # a new tensor object: found at the next assignment
    receiver.policy = other
    with torch.no_grad():
        trainer.weight.add_(1.0)
    updater.update_weights()
    assert receiver.poll() == 3 and torch.equal(other.weight, trainer.weight)

    with pytest.raises(CodecError, match="nn.Module"):
        receiver.policy = object()
    assert receiver.policy is other


def test_stop_is_prompt(fake_store):
    _, receiver, _ = _pair(fake_store, nn.Linear(8, 4), poll_interval=30)
    receiver.start()
    started = time.monotonic()
    receiver.stop()
    assert time.monotonic() - started < 2


def test_a_lost_report_is_sent_again_by_the_next_poll(fake_store, monkeypatch):
    """A refusal whose report did not reach Redis is reported by the next poll; once, not forever."""
    updater, receiver, _ = _pair(fake_store, nn.Linear(8, 5))
    updater.update_weights()
    real_ack, sent = ranks.ack, []

    def report_lost_once(client, keyspace, rank, version, status):
        sent.append(status)
        if len(sent) == 1:
            raise redis.exceptions.TimeoutError("timed out")
        return real_ack(client, keyspace, rank, version, status)

    monkeypatch.setattr(ranks, "ack", report_lost_once)
    with pytest.raises(redis.exceptions.TimeoutError):
        receiver.poll()
    assert fake_store["rank:1:status"] == "pending" and receiver.last_error
    assert receiver.poll() is None
    assert fake_store["rank:1:status"] == receiver.last_error and len(sent) == 2
    assert receiver.poll() is None and len(sent) == 2


@pytest.mark.parametrize("host_cache", [False, True])
def test_a_version_that_does_not_fit_is_refused_before_anything_is_fetched(
    fake_store, monkeypatch, tmp_path, host_cache
):
    """A worker with a small model and a manifest of a big one: refused from the manifest alone."""
    worker = nn.Linear(8, 4)
    before = worker.weight.detach().clone()
    updater = RedisWeightUpdater(fake_store, nn.Linear(1024, 1024), 1, sync=False)
    cache = tmp_path / "cache" if host_cache else False
    receiver = RedisWeightReceiver(RedisStore(fake_store.client, fake_store.namespace), 1, worker, host_cache=cache)
    updater.update_weights()
    reads: list[object] = []
    monkeypatch.setattr(receiver.registry.chunks, "read_into", lambda *args: reads.append(args))
    assert receiver.poll() is None
    assert receiver.last_error == "error: version 1: key 'weight': shape [1024, 1024] pushed, the policy has [4, 8]"
    assert fake_store["rank:1:status"] == receiver.last_error
    assert reads == [], "chunks were fetched for a version the policy cannot hold"
    assert receiver._fetcher.buffer_size == 0, "a receive buffer was allocated for it"
    assert not host_cache or not any((tmp_path / "cache").rglob("v1-*"))
    assert torch.equal(worker.weight, before) and receiver.version == 0
