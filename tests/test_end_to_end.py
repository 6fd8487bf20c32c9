"""A trainer and worker processes against a real server: the whole protocol, end to end."""

from __future__ import annotations

import time

import pytest
import torch

from redis_weights import PushError, RedisStore, RedisWeightUpdater
from tests.models import make_model, state_digest
from tests.procs import workers

pytestmark = pytest.mark.server


def _train_step(model: torch.nn.Module, seed: int) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))


def test_sync_push_reaches_every_worker_over_several_versions(tmp_path, real_store, redis_url, namespace):
    model = make_model("mlp", seed=1)
    with workers(tmp_path, redis_url, namespace, [1, 2]) as procs:
        updater = RedisWeightUpdater(real_store, model, num_workers=2, sync=True, timeout=30)
        for step in range(3):
            _train_step(model, step)
            updater.update_weights()
            expected = state_digest(model)
            # sync: when update_weights returns, every rank has applied and acked this version
            for proc in procs.values():
                assert proc.applied()[updater.version] == expected
        assert [s.status for s in updater.workers()] == ["updated", "updated"]
        assert [s.version for s in updater.workers()] == [updater.version] * 2


def test_async_push_returns_before_acks_and_wait_collects_them(tmp_path, real_store, redis_url, namespace):
    """The workers take 1.5 s per apply (``--apply-delay``): every push returns while both ranks
    are still "pending", and ``wait()`` collects the acks of the last one."""
    model = make_model("mlp", seed=2)
    slow = ["--poll-interval", "0.2", "--apply-delay", "1.5"]
    with workers(tmp_path, redis_url, namespace, [1, 2], *slow) as procs:
        updater = RedisWeightUpdater(real_store, model, num_workers=2, sync=False, timeout=30)
        for _ in range(3):
            _train_step(model, 7)
            updater.push_weights()
            assert [s.status for s in updater.workers()] == ["pending", "pending"], "the push waited for acks"
        updater.wait()
        assert [(s.status, s.version) for s in updater.workers()] == [("updated", updater.version)] * 2
        expected = state_digest(model)
        for proc in procs.values():
            assert proc.wait_version(updater.version) == expected


def test_late_joiner_catches_up_without_a_notification(tmp_path, real_store, redis_url, namespace):
    model = make_model("mlp", seed=3)
    updater = RedisWeightUpdater(real_store, model, num_workers=1, sync=False)
    updater.push_weights()
    updater.push_weights()  # two versions committed before any worker exists
    with workers(tmp_path, redis_url, namespace, [1]) as procs:
        assert procs[1].wait_version(updater.version) == state_digest(model)


@pytest.mark.slow
def test_large_model_of_over_100_mb(tmp_path, real_store, redis_url, namespace):
    model = make_model("mb:110", seed=4)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert size > 100 * 1024 * 1024
    with workers(tmp_path, redis_url, namespace, [1, 2], "--model", "mb:110") as procs:
        updater = RedisWeightUpdater(real_store, model, num_workers=2, sync=True, timeout=120)
        updater.update_weights()
        expected = state_digest(model)
        assert all(p.applied()[updater.version] == expected for p in procs.values())
        manifest = updater.registry.read_manifest(updater.version)
        assert manifest.num_chunks > 10 and max(manifest.chunk_sizes) <= 8 * 1024 * 1024


def test_killed_worker_fails_the_sync_push_early_naming_it(tmp_path, real_store, redis_url, namespace):
    model = make_model("mlp", seed=5)
    ttl = ["--heartbeat-ttl", "1.5", "--poll-interval", "0.2"]
    with workers(tmp_path, redis_url, namespace, [1, 2, 3], *ttl) as procs:
        updater = RedisWeightUpdater(real_store, model, num_workers=3, sync=True, timeout=60)
        updater.update_weights()
        procs[2].kill()
        _train_step(model, 9)
        started = time.monotonic()
        with pytest.raises(PushError) as info:
            updater.update_weights()
        elapsed = time.monotonic() - started
        assert info.value.dead == [2]
        assert "rank 2 is dead" in str(info.value)
        assert elapsed < 30, "the dead rank must fail the push long before the 60 s timeout"
        # the others were updated all the same
        expected = state_digest(model)
        for rank in (1, 3):
            assert procs[rank].wait_version(updater.version) == expected
        # a restarted rank 2 catches up on its own
        with workers(tmp_path, redis_url, namespace, [2], *ttl) as again:
            assert again[2].wait_version(updater.version) == expected


def test_a_store_from_url_is_a_mutable_mapping_on_a_real_server(real_store):
    real_store["hello"] = "world"
    assert real_store["hello"] == "world" and "hello" in real_store
    assert dict(real_store) == {"hello": "world"}
    del real_store["hello"]
    assert len(real_store) == 0
    with pytest.raises(KeyError):
        real_store["hello"]
    assert isinstance(real_store, RedisStore)
