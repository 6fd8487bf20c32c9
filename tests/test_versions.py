"""Version registry: allocation, atomic commit, reading, retention."""

from __future__ import annotations

import pytest
import torch

from redis_weights import StaleVersionError, VersionNotFoundError, VersionRegistry
from redis_weights.codec import Encoder


@pytest.fixture
def registry(fake_store):
    return VersionRegistry(fake_store.client, fake_store.keyspace)


def _stage(registry, floor=0, value=1.0, pending_ttl=60.0):
    encoded = Encoder(4096).encode({"w": torch.full((3000,), value)})
    version = registry.allocate(floor)
    registry.write_chunks(version, encoded.chunks, pending_ttl)
    return encoded.manifest(version, created=1.0, producer="test")


def test_allocate_never_goes_below_latest_or_the_floor(registry, fake_redis):
    assert registry.allocate() == 1
    assert registry.allocate(floor=10) == 11
    assert registry.allocate() == 12
    fake_redis.set(registry.keyspace.latest, 50)
    assert registry.allocate() == 51


def test_uncommitted_chunks_expire_and_nothing_points_at_them(registry, fake_redis):
    manifest = _stage(registry)
    chunk = registry.keyspace.chunk(manifest.version, 0)
    assert 0 < fake_redis.pttl(chunk) <= 60_000
    assert registry.latest() == 0 and registry.list_versions() == []
    registry.commit(manifest, [1, 2])
    assert fake_redis.pttl(chunk) == -1  # permanent once committed
    assert registry.latest() == manifest.version and registry.list_versions() == [manifest.version]
    assert fake_redis.get(registry.keyspace.rank_status(2)) == b"pending"


def test_commit_publishes_the_version_on_the_updates_channel(registry, fake_redis):
    pubsub = fake_redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(registry.keyspace.updates_channel)
    manifest = _stage(registry)
    registry.commit(manifest)
    message = None
    for _ in range(3):  # the first read may consume the subscribe confirmation
        message = message or pubsub.get_message(timeout=0.5)
    assert message and message["data"] == str(manifest.version).encode()


def test_commit_with_a_missing_chunk_changes_nothing(registry, fake_redis):
    manifest = _stage(registry)
    fake_redis.delete(registry.keyspace.chunk(manifest.version, 1))
    with pytest.raises(VersionNotFoundError, match="chunk 1 vanished"):
        registry.commit(manifest, [1])
    assert registry.latest() == 0 and registry.list_versions() == []
    assert fake_redis.get(registry.keyspace.manifest(manifest.version)) is None
    assert fake_redis.pttl(registry.keyspace.chunk(manifest.version, 0)) > 0  # still expiring
    assert fake_redis.get(registry.keyspace.rank_status(1)) is None


def test_a_stale_writer_is_refused_and_latest_never_goes_back(registry):
    older, newer = _stage(registry), _stage(registry)
    registry.commit(newer)
    with pytest.raises(StaleVersionError, match=f"latest is already {newer.version}"):
        registry.commit(older)
    assert registry.latest() == newer.version


def test_a_retried_commit_is_idempotent(registry):
    manifest = _stage(registry)
    registry.commit(manifest)
    registry.commit(manifest)  # e.g. re-sent after a lost reply
    assert registry.list_versions() == [manifest.version]


def test_read_returns_verified_chunks_and_names_what_is_missing(registry, fake_redis):
    manifest = _stage(registry, value=2.0)
    registry.commit(manifest)
    got, chunks = registry.read()
    assert got.version == manifest.version and b"".join(chunks)
    fake_redis.delete(registry.keyspace.chunk(manifest.version, 0))
    with pytest.raises(VersionNotFoundError, match="chunk 0 is gone"):
        registry.read(manifest.version)
    with pytest.raises(VersionNotFoundError, match="version 99 not found"):
        registry.read(99)


def test_read_with_nothing_committed(registry):
    with pytest.raises(VersionNotFoundError, match="no version"):
        registry.read()


def test_gc_keeps_the_newest_and_never_the_latest(registry, fake_redis):
    versions = []
    for _ in range(5):
        m = _stage(registry)
        registry.commit(m)
        versions.append(m.version)
    assert registry.gc(keep=2) == versions[:3]
    assert registry.list_versions() == versions[3:]
    leftover = list(fake_redis.scan_iter(match=f"{registry.keyspace.pattern[:-1]}v:{versions[0]}:*"))
    assert leftover == []
    with pytest.raises(ValueError):
        registry.gc(keep=0)


def test_gc_spares_latest_even_when_newer_versions_exist(registry, fake_redis):
    """The library never commits below ``latest``, so ``latest`` is always the newest committed
    version; an operator who points ``latest`` back by hand must not lose it to retention."""
    versions = []
    for _ in range(5):
        m = _stage(registry)
        registry.commit(m)
        versions.append(m.version)
    fake_redis.set(registry.keyspace.latest, versions[1])
    assert registry.gc(keep=2) == [versions[0], versions[2]]
    assert registry.list_versions() == [versions[1], *versions[3:]]
    assert registry.read(versions[1])[0].version == versions[1]


def test_discard_drops_the_chunks_of_an_uncommitted_version_only(registry, fake_redis):
    staged = _stage(registry)
    committed = _stage(registry)
    registry.commit(committed)
    k = registry.keyspace
    assert registry.discard(staged.version, staged.num_chunks)
    assert not fake_redis.exists(*k.chunks(staged.version, staged.num_chunks))
    assert not registry.discard(committed.version, committed.num_chunks), "a committed version must stay whole"
    assert fake_redis.exists(*k.chunks(committed.version, committed.num_chunks)) == committed.num_chunks
    assert registry.read(committed.version)[0].version == committed.version


def test_delete_finds_chunks_even_when_the_manifest_is_unreadable(registry, fake_redis):
    m = _stage(registry)
    registry.commit(m)
    fake_redis.set(registry.keyspace.manifest(m.version), b"garbage")
    registry.delete(m.version)
    assert list(fake_redis.scan_iter(match=f"{registry.keyspace.pattern[:-1]}v:*")) == []
