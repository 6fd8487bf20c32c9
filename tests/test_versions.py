"""Version registry: allocation, atomic commit over content-addressed chunks, retention, mark-and-sweep GC."""

from __future__ import annotations

import pytest
import torch

from redis_weights import StaleVersionError, VersionNotFoundError, VersionRegistry
from redis_weights.errors import CodecError
from redis_weights.format.codec import Encoder
from redis_weights.protocol.push import publish, rollback
from redis_weights.protocol.versions import GcRaceError, ObjectsMissingError
from tests.codec_support import read_version
from tests.faults_support import stored_objects


@pytest.fixture
def registry(fake_store):
    return VersionRegistry(fake_store.deployment, fake_store.keyspace)


def _encode(value=1.0, n=3000):
    return Encoder(4096).encode({"w": torch.full((n,), value), "x": torch.arange(n, dtype=torch.float32)})


def _push(registry, value=1.0, ranks=(), n=3000):
    """Upload and commit one version of a small model; returns (manifest, bytes uploaded)."""
    encoded = _encode(value, n)
    manifest = encoded.manifest(registry.allocate(), created=1.0, producer="test")

    def upload(missing):
        return registry.chunks.write((i, *encoded.chunk(k)) for k, i in enumerate(encoded.ids) if i in missing)

    return manifest, publish(registry, manifest, ranks, upload=upload)


def _objects(registry):
    return stored_objects(registry.client, registry.keyspace)


def test_allocate_never_goes_below_latest_or_the_floor(registry, fake_redis):
    assert registry.allocate() == 1
    assert registry.allocate(floor=10) == 11
    assert registry.allocate() == 12
    fake_redis.set(registry.keyspace.latest, 50)
    assert registry.allocate() == 51


def test_a_commit_moves_latest_marks_ranks_and_drops_its_pending_record(registry, fake_redis):
    manifest, uploaded = _push(registry, ranks=[1, 2])
    assert uploaded == manifest.total_bytes == manifest.uploaded_bytes
    assert registry.latest() == manifest.version and registry.list_versions() == [manifest.version]
    assert fake_redis.get(registry.keyspace.rank_status(2)) == b"pending"
    assert list(fake_redis.scan_iter(match=registry.keyspace.pending_pattern)) == []
    assert all(fake_redis.ttl(registry.keyspace.chunk(i)) == -1 for i in manifest.ids), "chunks carry no TTL"


def test_the_manifest_is_staged_then_renamed_so_the_script_never_carries_it(registry, fake_redis):
    """The commit script gets no manifest bytes: a plain SET stages it (with the push's TTL), the
    script renames it; a refused commit leaves only the staged key, which the failed push deletes."""
    k = registry.keyspace
    manifest, _ = _push(registry)
    assert fake_redis.ttl(k.manifest(manifest.version)) == -1, "a committed manifest carries no TTL"
    assert list(fake_redis.scan_iter(match=k.full("staged:*"))) == []
    encoded = _encode(2.0)
    second = encoded.manifest(registry.allocate(), created=1.0, producer="test")
    epoch = registry.begin("t", second.objects())
    fake_redis.incr(k.gc_epoch)
    with pytest.raises(GcRaceError):
        registry.commit(second, epoch=epoch, token="t", pending_ttl=60)
    assert fake_redis.get(k.staged_manifest("t")) == second.to_json()
    assert 0 < fake_redis.ttl(k.staged_manifest("t")) <= 60 and not fake_redis.exists(k.manifest(second.version))
    registry.end("t")
    assert not fake_redis.exists(k.staged_manifest("t")) and not fake_redis.exists(k.pending("t"))
    assert registry.latest() == manifest.version


def test_a_manifest_larger_than_one_piece_is_read_in_pieces(registry, fake_redis, monkeypatch):
    from redis_weights.protocol import versions

    manifest, _ = _push(registry)
    whole = registry.read_manifest(manifest.version)
    stored = fake_redis.get(registry.keyspace.manifest(manifest.version))
    monkeypatch.setattr(versions, "_MANIFEST_PIECE", 100)
    assert len(stored) > 3 * 100
    again = registry.read_manifest(manifest.version)
    assert again.to_json() == whole.to_json() == stored
    with pytest.raises(CodecError, match="more than the limit"):
        registry.read_manifest(manifest.version, max_bytes=len(stored) - 1)


def test_chunks_redis_holds_are_not_uploaded_again(registry):
    first, _ = _push(registry, value=1.0)
    second, uploaded = _push(registry, value=1.0)
    assert second.ids == first.ids and uploaded == 0 and second.uploaded_bytes == 0
    third, uploaded = _push(registry, value=2.0)  # "w" changed, "x" did not
    changed = sum(size for a, b, size in zip(first.ids, third.ids, third.chunk_sizes, strict=True) if a != b)
    assert 0 < uploaded == changed < third.total_bytes


def test_commit_publishes_the_version_on_the_updates_channel(registry, fake_redis):
    pubsub = fake_redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(registry.keyspace.updates_channel)
    manifest, _ = _push(registry)
    message = None
    for _ in range(3):  # the first read may consume the subscribe confirmation
        message = message or pubsub.get_message(timeout=0.5)
    assert message and message["data"] == str(manifest.version).encode()


def test_a_publish_that_may_not_upload_refuses_missing_chunks_and_changes_nothing(registry, fake_redis):
    encoded = _encode()
    manifest = encoded.manifest(registry.allocate(), created=1.0, producer="test")
    with pytest.raises(VersionNotFoundError, match="gone from Redis"):
        publish(registry, manifest, [1])
    assert registry.latest() == 0 and registry.list_versions() == []
    assert fake_redis.get(registry.keyspace.rank_status(1)) is None
    assert list(fake_redis.scan_iter(match=registry.keyspace.pending_pattern)) == [], "the pending record stays"


def test_a_stale_writer_is_refused_and_latest_never_goes_back(registry):
    older = _encode().manifest(registry.allocate(), created=1.0, producer="test")
    newer, _ = _push(registry)
    with pytest.raises(StaleVersionError, match=f"latest is already {newer.version}"):
        publish(registry, older)
    assert registry.latest() == newer.version


def test_a_retried_commit_is_idempotent(registry):
    manifest, _ = _push(registry)
    publish(registry, manifest)  # e.g. re-sent after a lost reply
    assert registry.list_versions() == [manifest.version]


def test_a_manifest_stored_under_another_versions_key_is_refused(registry, fake_redis):
    manifest, _ = _push(registry)
    fake_redis.set(registry.keyspace.manifest(manifest.version + 1), manifest.to_json())
    with pytest.raises(Exception, match=f"says it is version {manifest.version}"):
        registry.read_manifest(manifest.version + 1)


def test_a_manifest_too_large_is_refused_without_downloading_it(registry, fake_redis, monkeypatch):
    import redis_weights.protocol.versions as versions

    monkeypatch.setattr(versions, "MAX_MANIFEST_BYTES", 100)
    fake_redis.set(registry.keyspace.manifest(7), b"x" * 5000)
    with pytest.raises(Exception, match="5000 bytes, more than the limit of 100"):
        registry.read_manifest(7)


def test_gc_keeps_the_newest_and_sweeps_what_only_old_versions_used(registry, fake_redis):
    manifests = [_push(registry, value=float(v))[0] for v in range(5)]
    assert registry.gc(keep=2) == [m.version for m in manifests[:3]]
    assert registry.list_versions() == [m.version for m in manifests[3:]]
    assert _objects(registry) == manifests[3].objects() | manifests[4].objects()
    assert not fake_redis.exists(registry.keyspace.manifest(manifests[0].version))
    for m in manifests[3:]:
        assert read_version(registry, m.version)[0].version == m.version
    with pytest.raises(ValueError):
        registry.gc(keep=0)


def test_a_chunk_shared_with_a_retained_version_is_never_swept(registry):
    first, _ = _push(registry, value=1.0)
    for value in (2.0, 3.0):
        _push(registry, value=value)
    shared = set(first.ids) & set(registry.read_manifest(registry.latest()).ids)
    assert shared, "the unchanged tensor 'x' shares its chunks"
    registry.gc(keep=1)
    assert shared <= _objects(registry)


def test_gc_spares_latest_even_when_newer_versions_exist(registry, fake_redis):
    """An operator who points ``latest`` back by hand must not lose it to retention."""
    manifests = [_push(registry, value=float(v))[0] for v in range(5)]
    fake_redis.set(registry.keyspace.latest, manifests[1].version)
    assert registry.gc(keep=2) == [manifests[0].version, manifests[2].version]
    assert read_version(registry, manifests[1].version)[0].version == manifests[1].version


def test_gc_sweeps_orphans_but_spares_the_objects_of_a_pending_push(registry):
    registry.chunks.write([("a" * 32, b"orphan", False), ("b" * 32, b"pending", False)])
    registry.begin("push1", ["b" * 32])
    registry.gc(keep=1)
    assert _objects(registry) == {"b" * 32}
    registry.end("push1")
    registry.gc(keep=1)
    assert _objects(registry) == set()


def test_gc_frees_in_small_steps(registry, monkeypatch):
    import redis_weights.protocol.chunkstore as chunkstore

    registry.chunks.write((f"{i:032x}", b"x", False) for i in range(40))
    calls = []
    real = registry.chunks.delete
    monkeypatch.setattr(registry.chunks, "delete", lambda ids: calls.append(len(ids)) or real(ids))
    monkeypatch.setattr(chunkstore, "DELETE_BATCH", 16)
    registry.gc(keep=1)
    assert _objects(registry) == set() and sum(calls) == 40 and max(calls) <= 16


def test_gc_does_not_sweep_when_a_retained_manifest_is_unreadable(registry, fake_redis):
    manifest, _ = _push(registry)
    fake_redis.set(registry.keyspace.manifest(manifest.version), b"garbage")
    registry.chunks.write([("a" * 32, b"orphan", False)])
    registry.gc(keep=1)
    assert set(manifest.ids) | {"a" * 32} <= _objects(registry)


def test_a_commit_after_a_concurrent_gc_is_refused_then_retried_with_the_missing_chunks(registry):
    """The race: a push finds a chunk present, a GC (that did not see the push) deletes it, the push
    commits a version whose chunk is gone. The GC epoch makes the commit refuse; the retry re-uploads."""
    first, _ = _push(registry, value=1.0)
    second, _ = _push(registry, value=2.0)
    registry.gc(keep=1)  # the first version's "w" chunks are gone now, its "x" chunks shared
    shared = set(first.ids) & set(second.ids)
    encoded = _encode(1.0)
    manifest = encoded.manifest(registry.allocate(), created=1.0, producer="test")
    uploads = []

    def upload(missing):
        uploads.append(set(missing))
        if len(uploads) == 1:  # after this push's EXISTS: an operator deletes the version that held
            other = VersionRegistry(registry.deployment, registry.keyspace)  # the shared chunks, and a GC that
            registry.client.delete(registry.keyspace.pending(token[0]))  # did not see this push sweeps them
            other.delete(second.version)
            other.gc(keep=1)
            assert not shared & _objects(registry)
        return registry.chunks.write((i, *encoded.chunk(k)) for k, i in enumerate(encoded.ids) if i in missing)

    token = []
    real_begin = registry.begin
    registry.begin = lambda t, *a, **kw: token.append(t) or real_begin(t, *a, **kw)  # type: ignore[method-assign]
    publish(registry, manifest, upload=upload)
    assert len(uploads) == 2, "the first commit must be refused and the push checked again"
    assert uploads[1] == shared
    assert read_version(registry, manifest.version)[0].ids == first.ids


def test_a_commit_whose_objects_are_not_on_the_committing_node_is_refused_then_uploaded_again(registry):
    """A client that reconnected to a promoted replica mid-push sent part of its chunks to the old primary
    only: the commit script finds them missing (one node holds every key) and the push uploads them again."""
    encoded = _encode(3.0)
    manifest = encoded.manifest(registry.allocate(), created=1.0, producer="test")
    uploads, lost = [], []

    def upload(missing):
        uploads.append(set(missing))
        sent = registry.chunks.write((i, *encoded.chunk(k)) for k, i in enumerate(encoded.ids) if i in missing)
        if len(uploads) == 1:  # the "failover": the node that commits never got the first chunk
            lost.append(encoded.ids[0])
            registry.client.delete(registry.keyspace.chunk(encoded.ids[0]))
        return sent

    publish(registry, manifest, upload=upload)
    assert uploads == [set(encoded.ids), set(lost)], "the commit must be refused and the lost chunk uploaded again"
    assert read_version(registry, manifest.version)[0].ids == manifest.ids
    assert registry.latest() == manifest.version
    with pytest.raises(ObjectsMissingError, match="not on the server that commits"):  # and nothing changes
        registry.client.delete(registry.keyspace.chunk(encoded.ids[1]))
        later = encoded.manifest(registry.allocate(), created=2.0, producer="test")
        registry.commit(later, epoch=registry.begin("t", later.objects()), token="t")
    assert registry.latest() == manifest.version and not registry.exists(later.version)


def test_a_commit_refused_by_the_gc_epoch_names_the_race(registry, fake_redis):
    encoded = _encode()
    manifest = encoded.manifest(registry.allocate(), created=1.0, producer="test")
    epoch = registry.begin("t", manifest.objects())
    fake_redis.incr(registry.keyspace.gc_epoch)
    with pytest.raises(GcRaceError, match="garbage collection ran"):
        registry.commit(manifest, epoch=epoch, token="t")
    fake_redis.set(registry.keyspace.gc_lease, "someone", px=10_000)
    with pytest.raises(GcRaceError):
        registry.commit(manifest, epoch=fake_redis.get(registry.keyspace.gc_epoch).decode(), token="t")


def test_a_second_gc_skips_while_one_holds_the_lease(registry, fake_redis):
    registry.chunks.write([("a" * 32, b"orphan", False)])
    fake_redis.set(registry.keyspace.gc_lease, "other", px=10_000)
    assert registry.gc(keep=1) == []
    assert _objects(registry) == {"a" * 32}


def test_rollback_uploads_nothing(registry, fake_redis):
    first, _ = _push(registry, value=1.0)
    _push(registry, value=2.0)
    writes = []
    registry.chunks.write = lambda objects: writes.append(list(objects)) or 0  # type: ignore[method-assign]
    rolled = rollback(registry, first.version)
    assert rolled.ids == first.ids and rolled.uploaded_bytes == 0 and registry.latest() == rolled.version
    assert "rollback of v1" in rolled.producer and writes == []


def test_rollback_of_a_version_whose_chunks_are_gone_changes_nothing(registry, fake_redis):
    first, _ = _push(registry, value=1.0)
    fake_redis.delete(registry.keyspace.chunk(first.ids[-1]))
    with pytest.raises(VersionNotFoundError, match="gone from Redis"):
        rollback(registry, first.version)
    assert registry.latest() == first.version


def test_delete_removes_the_manifest_and_the_sweep_its_chunks(registry, fake_redis):
    m, _ = _push(registry)
    registry.delete(m.version)
    assert registry.list_versions() == [] and not registry.exists(m.version)
    registry.gc(keep=1)
    assert _objects(registry) == set()
