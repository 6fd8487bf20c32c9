"""A namespace knows what it owns: the index, on a server full of other keys, never a SCAN.

Real servers: a private one with ``DEBUG POPULATE`` keys for the SCAN counts, the
session's for the rest. Workers here are in-process receivers (the worker processes
of the fault suite are exercised by test_faults_procs, whose crashed-trainer test
relies on the index to sweep the orphans).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import redis
import torch

from redis_weights import RedisStore, RedisWeightReceiver, RedisWeightUpdater
from redis_weights.backend.index import CorruptIndexError, NamespaceIndex
from redis_weights.protocol.push import rollback
from redis_weights.protocol.ranks import known_ranks
from redis_weights.tools.admin import Admin
from tests.conftest import REPO_ROOT
from tests.faults_support import perturb, stored_objects
from tests.models import state_digest

pytestmark = pytest.mark.server

UNRELATED = 20_000  # keys of "other applications" (DEBUG POPULATE): enough that one SCAN of them shows


def _model(seed: int | None):
    """Two 64x64 layers: ~33 KB, nine chunks of 4 KiB (zeros with ``seed`` None: a fresh worker)."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed or 0)
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) if seed is not None else 0 * tensor)
    return model


def _commandstats(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def _stored(store: RedisStore) -> set[str]:
    return stored_objects(store.client, store.keyspace)


@pytest.fixture
def crowded(server_factory, namespace):
    """A private server pre-filled with unrelated keys, and a store on it."""
    server = server_factory("--enable-debug-command", "yes")
    store = RedisStore.from_url(server.url, namespace)
    store.client.execute_command("DEBUG", "POPULATE", UNRELATED, "other:key")
    yield store
    store.close()


def test_pushes_gc_workers_and_the_store_never_scan_a_crowded_server(crowded, namespace):
    model = _model(1)
    updater = RedisWeightUpdater(crowded, model, num_workers=1, sync=True, timeout=30, chunk_size=4096, retention=2)
    receiver = RedisWeightReceiver(RedisStore.from_url(crowded.url, namespace), 1, _model(None))
    admin = Admin(RedisStore.from_url(crowded.url, namespace))
    try:
        receiver.start()
        updater.update_weights()  # the first push indexes the (new) namespace: no SCAN needed either
        before = _commandstats(crowded.client)
        for step in range(4):  # versions drop out of retention: GC runs (on the collector's thread)
            perturb(model, step)
            updater.update_weights()
        assert updater.last_push.gc_versions == 1, "each push reports the GC the previous one started"
        updater.flush()
        assert admin.known_ranks() == [1]
        assert [r.rank for r in admin.workers()[1]] == [1]
        crowded["mine"] = "1"
        assert "mine" in set(crowded) and "latest" in set(crowded)
        after = _commandstats(crowded.client)
        assert after.get("scan", 0) == before.get("scan", 0), "no SCAN: the namespace's index says what it owns"
        assert state_digest(receiver.policy) == state_digest(model)
        assert _stored(crowded) <= NamespaceIndex(crowded.client, crowded.keyspace).objects()
        assert crowded.client.dbsize() > UNRELATED  # nothing of the others was touched
        assert crowded.client.exists("other:key:0") and crowded.client.exists(f"other:key:{UNRELATED - 1}")
    finally:
        receiver.close()
        updater.close()
        admin.close()


def test_a_push_within_retention_does_no_gc_work(real_store):
    updater = RedisWeightUpdater(real_store, _model(2), num_workers=1, sync=False, retention=3)
    for _ in range(3):
        updater.update_weights()
        assert "gc" not in updater.last_push.seconds and updater.last_push.gc_versions == 0
    perturb(updater.policy_weights, 1)
    updater.update_weights()  # a fourth version: the oldest is collected, on the collector's thread
    updater.flush()  # waits for that GC
    assert len(updater.registry.list_versions()) == 3
    perturb(updater.policy_weights, 2)
    updater.update_weights()
    assert updater.last_push.gc_versions == 1 and updater.last_push.gc_keys > 0, "the GC the previous push started"
    updater.close()


def test_an_index_entry_whose_chunk_was_deleted_by_hand_is_uploaded_again(real_store, redis_url, namespace):
    model = _model(3)
    updater = RedisWeightUpdater(real_store, model, num_workers=1, sync=False, chunk_size=4096)
    updater.update_weights()
    manifest = updater.registry.read_manifest(updater.version)
    gone = manifest.ids[1]
    real_store.client.delete(real_store.keyspace.chunk(gone))  # the index still names it
    assert gone in NamespaceIndex(real_store.client, real_store.keyspace).objects()
    updater.update_weights()  # the same weights: only the lost chunk is written
    assert updater.last_push.written_bytes == manifest.chunk_sizes[1]
    receiver = RedisWeightReceiver(RedisStore.from_url(redis_url, namespace), 1, _model(None))
    try:
        assert receiver.poll() == updater.version
        assert state_digest(receiver.policy) == state_digest(model)
    finally:
        receiver.close()
        updater.close()


@pytest.mark.parametrize("member", ["*", "rw:*", "x" * 100_000, "0123456789abcdef0123456789abcdeZ"])
def test_a_hostile_index_member_is_refused_and_nothing_outside_is_deleted(real_store, member):
    updater = RedisWeightUpdater(real_store, _model(4), num_workers=1, sync=False, retention=1)
    updater.update_weights()
    real_store.client.set("bystander", "keep me")
    real_store.client.sadd(real_store.keyspace.objects_index, member)
    with pytest.raises(CorruptIndexError, match=r"index:objects"):
        updater.registry.gc(keep=1)
    perturb(updater.policy_weights, 2)
    updater.update_weights()  # housekeeping fails with a warning; the push itself works
    assert real_store.client.get("bystander") == b"keep me"
    assert updater.registry.latest() == updater.version
    real_store.client.delete("bystander")
    updater.close()


def test_an_index_key_of_the_wrong_type_is_named(real_store):
    real_store.client.set(real_store.keyspace.ranks_index, "not a set")
    with pytest.raises(CorruptIndexError, match=r"index:ranks is a string"):
        Admin(real_store).known_ranks()


def test_a_namespace_written_before_the_index_is_indexed_and_collected(real_store, redis_url, namespace):
    """The layout of the previous release: the same keys, no index. The trainer's first push
    indexes it (one SCAN of its pattern), and its old objects are collected from then on."""
    model = _model(5)
    updater = RedisWeightUpdater(real_store, model, num_workers=1, sync=False, retention=1, chunk_size=4096)
    updater.update_weights()
    old = set(updater.registry.read_manifest(updater.version).ids)
    updater.close()
    k = real_store.keyspace
    real_store.client.delete(*k.index_keys)  # as the previous release left it
    real_store.client.set(k.rank_version(7), 0)  # a rank that joined back then
    assert NamespaceIndex(real_store.client, k).ranks() == []
    updater = RedisWeightUpdater(real_store, model, num_workers=1, sync=False, retention=1, chunk_size=4096)
    for step in range(2):
        perturb(model, 10 + step)
        updater.update_weights()
    updater.flush()  # the last push's GC
    index = NamespaceIndex(real_store.client, k)
    assert index.complete() and known_ranks(real_store.client, k) == [7]
    assert not old & _stored(real_store), "the old objects were indexed, then swept"
    assert _stored(real_store) == set(updater.registry.read_manifest(updater.version).ids)
    updater.close()


def test_reindex_from_the_cli_is_resumable(crowded, namespace):
    real_store, redis_url = crowded, crowded.url
    updater = RedisWeightUpdater(real_store, _model(6), num_workers=1, sync=False, chunk_size=4096)
    updater.update_weights()
    ids = set(updater.registry.read_manifest(updater.version).ids)
    updater.close()
    real_store.client.delete(*real_store.keyspace.index_keys)
    run = [sys.executable, "-m", "redis_weights", "--url", redis_url, "-n", namespace]
    first = subprocess.run([*run, "reindex", "--max-steps", "1"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert first.returncode == 0 and "paused" in first.stdout, first.stderr
    second = subprocess.run([*run, "reindex"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert second.returncode == 0 and "complete" in second.stdout, second.stderr
    assert NamespaceIndex(real_store.client, real_store.keyspace).objects() >= ids
    doctor = subprocess.run([*run, "doctor", "--deep"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert "keys in the database" in doctor.stdout and "a SCAN of the namespace agrees" in doctor.stdout, doctor.stdout


def test_doctor_says_when_the_index_misses_an_object(real_store, redis_url, namespace):
    updater = RedisWeightUpdater(real_store, _model(7), num_workers=1, sync=False, chunk_size=4096)
    updater.update_weights()
    updater.close()
    some = next(iter(updater.registry.read_manifest(updater.version).ids))
    real_store.client.srem(real_store.keyspace.objects_index, some)
    check = Admin(real_store).check_index(deep=True)
    assert not check.agrees and check.unindexed_objects == 1


def test_a_rollback_and_two_gcs_at_once_keep_what_retained_versions_reference(real_store):
    """A GC that starts while another holds the lease skips; a rollback under a GC retries its commit;
    every retained version stays whole."""
    model = _model(8)
    updater = RedisWeightUpdater(real_store, model, num_workers=1, sync=False, retention=2, chunk_size=4096)
    updater.update_weights()
    first = updater.version
    for step in range(3):
        perturb(model, 20 + step)
        updater.update_weights()
    updater.flush()  # the last push's GC
    registry = updater.registry
    lease = registry._take_lease("other-gc")  # a GC in progress elsewhere
    assert lease is True
    assert registry.collect(1).skipped, "a second GC at once must step aside"
    registry._give_back("other-gc", lease)
    rolled = rollback(registry, registry.list_versions()[0])
    registry.gc(keep=2)
    for version in registry.list_versions():
        needed = registry.read_manifest(version).objects()
        assert needed <= _stored(real_store), f"version {version} lost an object"
    assert rolled.version == registry.latest() and first not in registry.list_versions()
    updater.close()
