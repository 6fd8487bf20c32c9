"""An eviction policy turned on after the start check: the trainer says so loudly, workers name the
version and chunk that went, and the next push uploads what Redis lost."""

from __future__ import annotations

import logging

import pytest
import redis
import torch

from redis_weights import RedisStore, RedisWeightReceiver, RedisWeightUpdater
from redis_weights.observe import evictionwatch
from tests.models import make_model, state_digest

WATCH = "redis_weights.observe.evictionwatch"


def _errors(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == WATCH and r.levelno == level]


@pytest.mark.server
def test_an_eviction_policy_set_after_the_start_is_reported_and_lost_chunks_are_uploaded_again(
    server_factory, namespace, caplog, monkeypatch
):
    server = server_factory()
    admin = redis.Redis.from_url(server.url)
    store = RedisStore.from_url(server.url, namespace)
    model, policy = make_model("mlp", seed=1), make_model("mlp", seed=None)
    receiver = RedisWeightReceiver(RedisStore.from_url(server.url, namespace), 1, policy)
    caplog.set_level(logging.INFO, logger=WATCH)
    try:
        monkeypatch.setattr(evictionwatch, "RECHECK_SECONDS", 0.0)  # every push re-checks (default: a minute)
        updater = RedisWeightUpdater(store, model, num_workers=1, sync=False, chunk_size=4096)
        updater.update_weights()
        assert _errors(caplog, logging.ERROR) == [] and receiver.poll() == 1
        admin.config_set("maxmemory", "1gb")
        admin.config_set("maxmemory-policy", "allkeys-lru")  # an operator, after the trainer started
        updater.update_weights()
        (error,) = _errors(caplog, logging.ERROR)
        assert "allkeys-lru" in error and "may now evict" in error and "fix: CONFIG SET" in error
        updater.update_weights()
        assert len(_errors(caplog, logging.ERROR)) == 1  # said once per change, not at every push
        admin.config_set("maxmemory-policy", "noeviction")
        updater.update_weights()
        assert any("no longer evicts" in m for m in _errors(caplog, logging.WARNING))
        # what eviction does: a chunk of the committed version gone
        manifest = updater.registry.read_manifest(updater.version)
        admin.delete(store.keyspace.chunk(manifest.ids[-1]))
        receiver._fetcher.forget()  # a late joiner: it holds nothing
        assert receiver.poll() is None
        assert f"version {updater.version}" in receiver.last_error and manifest.ids[-1] in receiver.last_error
        assert "missing from Redis" in receiver.last_error
        updater.update_weights()  # the same weights: the push finds the chunk missing and uploads it again
        assert receiver.poll() == updater.version and state_digest(policy) == state_digest(model)
        assert admin.exists(store.keyspace.chunk(manifest.ids[-1]))
    finally:
        receiver.close()
        store.close()
        admin.close()


@pytest.mark.server
@pytest.mark.parametrize("delta", [False, True], ids=["dense", "delta"])
def test_a_sync_push_whose_objects_are_evicted_before_the_ranks_read_them_is_repaired(
    server_factory, namespace, monkeypatch, caplog, delta
):
    """Evicted between the commit and the ranks' fetch: the rank refuses the version for good, so the
    trainer uploads what went (it still holds the bytes) and commits the weights again as a new
    version, within the same push call."""
    from redis_weights.protocol import push as push_module

    server = server_factory()
    admin = redis.Redis.from_url(server.url)
    store = RedisStore.from_url(server.url, namespace)
    model, policy = make_model("mlp", seed=1), make_model("mlp", seed=None)
    receiver = RedisWeightReceiver(RedisStore.from_url(server.url, namespace), 1, policy)
    updater = RedisWeightUpdater(store, model, num_workers=1, sync=True, timeout=30, chunk_size=4096,
                                 delta=delta, wire_dtype=torch.bfloat16 if delta else None)  # fmt: skip
    try:
        receiver.start()
        updater.update_weights()  # v1, applied
        receiver.stop()  # until the object is gone: no rank reads v2 before
        gone: list[str] = []
        commit = push_module.Push.commit

        def commit_then_evict(self, manifest, epoch):  # what eviction does, before any rank reads
            result = commit(self, manifest, epoch)
            if not gone:
                gone.append(manifest.packs[-1].id if delta else manifest.ids[-1])
                admin.delete(store.keyspace.chunk(gone[0]))
                receiver.start()
            return result

        monkeypatch.setattr(push_module.Push, "commit", commit_then_evict)
        with torch.no_grad():  # a small step: with delta=True the version is a patch in a pack
            next(model.parameters()).view(-1)[:8] += 0.5
        caplog.set_level(logging.WARNING, logger="redis_weights.trainer.updater")
        updater.update_weights()  # v2 refused by rank 1 (its object is gone), then repaired as v3
        assert updater.version == 3 and receiver.version == 3, receiver.last_error
        expected = {k: v.bfloat16().float() if delta and v.is_floating_point() else v
                    for k, v in model.state_dict().items()}  # fmt: skip
        assert all(torch.equal(t, expected[n]) for n, t in policy.state_dict().items())
        repaired = updater.registry.read_manifest(3)
        assert repaired.producer.startswith("repair of v2") and repaired.ids == updater.registry.read_manifest(2).ids
        assert admin.exists(store.keyspace.chunk(gone[0]))
        assert any("uploading them again" in r.getMessage() for r in caplog.records)
        assert updater.last_push.version == 3
    finally:
        receiver.close()
        updater.close()
        admin.close()
