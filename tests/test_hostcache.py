"""Host-local /dev/shm cache (one fetch per host and version) and reads into reused buffers."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

import redis_weights.worker.receiver as receiver_module
from redis_weights import RedisStore, RedisWeightReceiver, RedisWeightUpdater
from redis_weights.backend.bulkread import read_values_into
from redis_weights.backend.deployment import Deployment
from redis_weights.errors import ConfigurationError
from redis_weights.format.manifest import Manifest
from redis_weights.worker.hostcache import DEFAULT_DIRECTORY, HostCache, private_directory
from tests.codec_support import count_reads
from tests.faults_support import chunk_key
from tests.models import make_model, state_digest
from tests.procs import workers

pytestmark = pytest.mark.server


def _policy(seed: int | None = None) -> nn.Module:
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 64))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed))) if seed else p.zero_()
    return model


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _out_bytes(store: RedisStore) -> int:
    return int(store.client.info("stats")["total_net_output_bytes"])


@contextmanager
def _receivers(redis_url: str, namespace: str, n: int, cache: Path) -> Iterator[list[RedisWeightReceiver]]:
    """``n`` receivers with their own connections, sharing ``cache``; all closed on exit."""
    receivers = [
        RedisWeightReceiver(RedisStore.from_url(redis_url, namespace), r, _policy(), host_cache=cache)
        for r in range(1, n + 1)
    ]
    try:
        yield receivers
    finally:
        for r in receivers:
            r.close()


def test_one_worker_fetches_the_others_map_the_file(real_store, redis_url, namespace, tmp_path):
    trainer = _policy(seed=1)
    updater = RedisWeightUpdater(real_store, trainer, 4, sync=False, chunk_size=64 << 10)
    updater.push_weights()
    with _receivers(redis_url, namespace, 4, tmp_path) as receivers:
        model_bytes = sum(t.numel() * 4 for t in trainer.state_dict().values())
        before = _out_bytes(real_store)
        assert receivers[0].poll() == updater.version
        first = _out_bytes(real_store) - before
        for r in receivers[1:]:
            assert r.poll() == updater.version
        others = _out_bytes(real_store) - before - first
        assert first >= model_bytes and others < model_bytes // 4  # the others read only small keys
        assert all(_same(r.policy, trainer) for r in receivers)
        assert [r.host_cache.fetched for r in receivers] == [1, 0, 0, 0]
        assert [r.host_cache.shared for r in receivers] == [0, 1, 1, 1]
        files = list(Path(receivers[0].host_cache.directory).glob("*.safetensors"))
        total = updater.registry.read_manifest(updater.version).total_bytes
        assert len(files) == 1 and files[0].stat().st_size == total


def test_the_fetcher_verifies_each_chunk_once_and_the_others_verify_the_file(
    real_store, redis_url, namespace, tmp_path, monkeypatch
):
    trainer = _policy(seed=3)
    updater = RedisWeightUpdater(real_store, trainer, 2, sync=False, chunk_size=64 << 10)
    updater.push_weights()
    checked: list[int] = []
    real_verify = Manifest.verify_chunk
    monkeypatch.setattr(Manifest, "verify_chunk", lambda self, i, data: checked.append(i) or real_verify(self, i, data))
    with _receivers(redis_url, namespace, 2, tmp_path) as (fetcher, other):
        chunks = updater.registry.read_manifest(updater.version).num_chunks
        assert fetcher.poll() == updater.version and fetcher.host_cache.fetched == 1
        assert checked == []  # assemble verified what it built: the file is not checked a second time
        assert other.poll() == updater.version and other.host_cache.shared == 1
        assert sorted(checked) == list(range(chunks))  # a file another process built: every chunk checked
        assert _same(fetcher.policy, trainer) and _same(other.policy, trainer)


def test_every_worker_gets_read_only_views_of_the_shared_file_the_fetcher_too(
    real_store, redis_url, namespace, tmp_path
):
    """The fetcher built the file through a writable mapping; what it hands on must not write into
    the file the other workers map (they trust a file another process built only after verifying)."""
    updater = RedisWeightUpdater(real_store, _policy(seed=4), 2, sync=False, chunk_size=64 << 10)
    updater.push_weights()
    with _receivers(redis_url, namespace, 1, tmp_path) as (receiver,):
        cache, registry = receiver.host_cache, updater.registry
        manifest = registry.read_manifest(updater.version)
        with cache.chunks(manifest, registry.chunks) as fetched:  # this one builds the file
            assert cache.fetched == 1
            assert fetched and all(memoryview(c).readonly for c in fetched)
            with pytest.raises(TypeError):
                memoryview(fetched[0])[0] = 0
        with cache.chunks(manifest, registry.chunks) as shared:  # this one maps it
            assert cache.shared == 1 and all(memoryview(c).readonly for c in shared)


def test_concurrent_workers_fetch_once_and_old_files_are_recycled(real_store, redis_url, namespace, tmp_path):
    trainer = _policy(seed=2)
    updater = RedisWeightUpdater(real_store, trainer, 4, sync=False)
    with _receivers(redis_url, namespace, 4, tmp_path) as receivers:
        for step in range(3):
            with torch.no_grad():
                trainer[0].bias.fill_(float(step))
            updater.push_weights()
            threads = [threading.Thread(target=r.poll) for r in receivers]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert all(r.version == updater.version and _same(r.policy, trainer) for r in receivers)
        assert sum(r.host_cache.fetched for r in receivers) == 3  # once per version, for the host
        assert sum(r.host_cache.recycled for r in receivers) == 2  # each older file was reused
        names = [p.name for p in Path(receivers[0].host_cache.directory).iterdir()]
        assert all(n.startswith(f"v{updater.version}-") for n in names), names  # one model size in /dev/shm


def test_a_file_being_read_is_never_recycled(real_store, redis_url, namespace, tmp_path):
    trainer = _policy(seed=5)
    updater = RedisWeightUpdater(real_store, trainer, 1, sync=False)
    updater.push_weights()
    with _receivers(redis_url, namespace, 1, tmp_path) as (receiver,):
        cache, registry = receiver.host_cache, updater.registry
        manifest = registry.read_manifest(updater.version)
        with cache.chunks(manifest, registry.chunks) as held:  # a slow reader of version 1
            for step in (1, 2):
                with torch.no_grad():
                    trainer[0].bias.fill_(float(step))
                updater.push_weights()
                assert receiver.poll() == updater.version
            assert cache.recycled == 1  # version 2's file became version 3's; version 1's is held
            assert list(Path(cache.directory).glob("v1-*.safetensors"))
            for index, chunk in enumerate(held):
                manifest.verify_chunk(index, chunk)  # still version 1's bytes
        assert _same(receiver.policy, trainer)


def test_a_damaged_cache_file_is_discarded_and_refetched(real_store, redis_url, namespace, tmp_path):
    trainer = _policy(seed=3)
    updater = RedisWeightUpdater(real_store, trainer, 1, sync=False)
    updater.push_weights()
    with _receivers(redis_url, namespace, 2, tmp_path) as (first, second):
        first.poll()
        (path,) = Path(first.host_cache.directory).glob("*.safetensors")
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
        assert second.poll() == updater.version
        assert _same(second.policy, trainer) and second.host_cache.fetched == 1
        assert path.read_bytes() != bytes(data)  # replaced by a good copy


def test_a_missing_chunk_publishes_no_file_and_is_reported(real_store, redis_url, namespace, tmp_path):
    trainer = _policy(seed=4)
    updater = RedisWeightUpdater(real_store, trainer, 1, sync=False, chunk_size=64 << 10)
    updater.push_weights()
    real_store.client.delete(chunk_key(real_store, updater.version, 1))
    with _receivers(redis_url, namespace, 1, tmp_path) as (receiver,):
        assert receiver.poll() is None
        assert "missing" in (receiver.last_error or "")
        assert not list(Path(receiver.host_cache.directory).glob("*.safetensors"))
        assert all(not torch.any(p) for p in receiver.policy.parameters())  # old weights whole


def test_read_values_into_places_values_and_flags_missing_and_wrong_sizes(real_store):
    client = real_store.client
    keys = [real_store.keyspace.full(f"x{i}") for i in range(4)]
    client.set(keys[0], b"a" * 100_000)
    client.set(keys[2], b"c" * 7)
    client.set(keys[3], b"d" * 3)  # expected 5: the wrong size comes back as bytes
    target = memoryview(bytearray(100_000 + 10 + 7 + 5))
    out = read_values_into(Deployment(client), keys, [100_000, 10, 7, 5], target)
    assert bytes(out[0]) == b"a" * 100_000 and out[0].obj is target.obj  # type: ignore[union-attr]
    assert out[1] is None and bytes(out[2]) == b"c" * 7 and out[3] == b"d" * 3
    assert client.ping()  # the connection went back to the pool in a clean state


def test_fakeredis_takes_the_copying_path(fake_store):
    keys = [fake_store.keyspace.full("y")]
    fake_store.client.set(keys[0], b"xyz")
    target = memoryview(bytearray(3))
    out = read_values_into(fake_store.deployment, keys, [3], target)
    assert bytes(target) == b"xyz" and bytes(out[0]) == b"xyz"  # type: ignore[arg-type]


def test_host_cache_directory_is_scoped_by_server_and_namespace(real_store, tmp_path):
    a = RedisWeightReceiver(real_store, 1, _policy(), host_cache=tmp_path)
    other = RedisStore(real_store.client, "another", owns_client=False)
    b = RedisWeightReceiver(other, 1, _policy(), host_cache=tmp_path)
    assert isinstance(a.host_cache, HostCache) and a.host_cache.directory != b.host_cache.directory
    assert RedisWeightReceiver(real_store, 2, _policy()).host_cache is None


def test_files_left_from_an_earlier_life_of_the_redis_data_are_removed(real_store, redis_url, namespace, tmp_path):
    trainer = _policy(seed=6)
    updater = RedisWeightUpdater(real_store, trainer, 1, sync=False)
    with _receivers(redis_url, namespace, 1, tmp_path) as (receiver,):
        stale = Path(receiver.host_cache.directory) / "v9-0123456789abcdef.safetensors"
        stale.write_bytes(b"x" * 100)  # version numbers restarted after a flush: 9 is from before
        os.utime(stale, (1_000_000, 1_000_000))
        updater.push_weights()
        assert receiver.poll() == updater.version == 1
        assert not stale.exists()


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_cache_directory_is_created_private_per_user(real_store, tmp_path, monkeypatch):
    assert DEFAULT_DIRECTORY == f"/dev/shm/redis_weights-{os.getuid()}"  # users never share the default
    monkeypatch.setattr(receiver_module, "DEFAULT_DIRECTORY", str(tmp_path / "shm" / "redis_weights-x"))
    receiver = RedisWeightReceiver(real_store, 1, _policy(), host_cache=True)
    cache = Path(receiver.host_cache.directory)
    assert cache.parent == tmp_path / "shm" / "redis_weights-x"
    for level in (tmp_path / "shm", cache.parent, cache):  # every level it created, whatever the umask
        assert _mode(level) == 0o700 and os.stat(level).st_uid == os.getuid()


def test_a_directory_others_could_write_to_is_refused(real_store, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigurationError, match=r"writable by group or others \(mode 777\).*chmod 700"):
        RedisWeightReceiver(real_store, 1, _policy(), host_cache=shared)
    assert list(shared.iterdir()) == []  # nothing created in it
    shared.chmod(0o770)
    with pytest.raises(ConfigurationError, match="mode 770"):
        private_directory(shared)
    shared.chmod(0o750)  # readable by the group is fine: only writers could plant files
    assert private_directory(shared) == shared


def test_a_directory_of_another_user_is_refused(tmp_path):
    if os.getuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)
    else:
        foreign = Path("/")  # root's
    with pytest.raises(ConfigurationError, match=rf"belongs to uid {os.stat(foreign).st_uid}, not to this user"):
        private_directory(foreign)


def test_a_directory_that_cannot_be_created_is_a_configuration_error(real_store, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigurationError, match="cannot create the host cache directory .*/file/cache: Not a dir"):
        RedisWeightReceiver(real_store, 1, _policy(), host_cache=tmp_path / "file" / "cache")
    with pytest.raises(ConfigurationError, match="is not a directory"):
        private_directory(tmp_path / "file")


def test_worker_processes_sharing_a_cache_make_redis_send_the_version_once(server_factory, namespace, tmp_path):
    server = server_factory()  # private: its egress counter sees only this test
    store = RedisStore.from_url(server.url, namespace)
    cache = tmp_path / "cache"
    try:
        trainer = make_model("mb:8", seed=7)
        model_bytes = sum(t.numel() * t.element_size() for t in trainer.state_dict().values())
        updater = RedisWeightUpdater(store, trainer, 3, sync=False)
        with workers(tmp_path, server.url, namespace, [1, 2, 3], "--model", "mb:8", "--host-cache", str(cache),
                     "--poll-interval", "0.2") as procs:  # fmt: skip
            before = _out_bytes(store)
            updater.push_weights()
            digests = {w.wait_version(updater.version, timeout=60) for w in procs.values()}
            sent = _out_bytes(store) - before
        assert digests == {state_digest(trainer)}
        assert model_bytes <= sent < 1.5 * model_bytes, (sent, model_bytes)  # one model size, not three
        assert len(list(cache.glob("*/*.safetensors"))) == 1
    finally:
        store.close()


def test_with_deltas_the_host_fetches_each_version_once_and_only_its_patches(
    real_store, redis_url, namespace, tmp_path, monkeypatch
):
    """The fetcher builds the new shared file from the recycled old one: unchanged chunks stay,
    patched ones are patched in the file, so Redis sends the host the patches, not a model size."""
    fetched = count_reads(monkeypatch)
    trainer = _policy(seed=6)
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=1e-6)
    updater = RedisWeightUpdater(real_store, trainer, 3, sync=False, chunk_size=16384, wire_dtype=torch.bfloat16,
                                 delta=True)  # fmt: skip
    with _receivers(redis_url, namespace, 3, tmp_path) as receivers:
        sizes = []
        for _ in range(3):
            trainer(torch.randn(4, 256)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            updater.push_weights()
            fetched.clear()
            for receiver in receivers:
                assert receiver.poll() == updater.version, receiver.last_error
            sizes.append(sum(fetched))
            expected = {k: v.detach().bfloat16().float() for k, v in trainer.state_dict().items()}
            assert all(torch.equal(t, expected[n]) for r in receivers for n, t in r.policy.state_dict().items())
        manifest = updater.registry.read_manifest(updater.version)
        assert not manifest.is_keyframe
        assert sum(r.host_cache.fetched for r in receivers) == 3  # once per version for the host
        assert sizes[0] == manifest.total_bytes  # the keyframe: the whole model, once
        assert 0 < sizes[2] < manifest.total_bytes / 5, sizes  # a delta version: its patches only


def test_a_stager_with_patches_left_waits_for_the_commit_and_patches_its_recycled_file(
    real_store, redis_url, namespace, tmp_path
):
    """A delta version's plan has nothing to stage (patches need their parent chunk): its stager
    waits for the commit and patches the recycled file then, instead of dropping it (and the
    host's only file with it: the next fetch would build the version from nothing)."""
    trainer = _policy(seed=7)
    updater = RedisWeightUpdater(real_store, trainer, 1, sync=False, chunk_size=16384, wire_dtype=torch.bfloat16,
                                 delta=True)  # fmt: skip
    cache = HostCache(tmp_path / "cache")
    updater.push_weights()  # the keyframe
    with cache.chunks(updater.registry.read_manifest(updater.version), updater.registry.chunks):
        pass  # the host's file of the keyframe: recycled for the next version
    with torch.no_grad():
        for t in trainer.parameters():
            t.add_(1e-2)
    updater.push_weights()
    manifest = updater.registry.read_manifest(updater.version)
    assert not manifest.is_keyframe and manifest.packs
    asked = []

    def committed() -> bool:  # the commit lands on the third look
        asked.append(1)
        return len(asked) >= 3

    staged = cache.stage(manifest, updater.registry.chunks, lambda: True, committed=committed)
    assert len(asked) >= 3 and staged > 0 and cache.recycled == 1 and cache.fetched == 2  # the keyframe, this one
    with cache.chunks(manifest, updater.registry.chunks) as chunks:
        assert cache.shared == 1 and cache.fetched == 2  # the staged file, mapped: nothing fetched again
        for index, chunk in enumerate(chunks):
            manifest.verify_chunk(index, chunk)  # raises on a byte that is not the version's
    abandoned = cache.stage(manifest, updater.registry.chunks, lambda: False, committed=lambda: False)
    assert abandoned == 0  # the file exists already: nothing to do


def _mapped_files(directory: Path) -> list[str]:
    """This process's mappings of files in ``directory`` (``/proc/self/maps``), deleted ones too."""
    with open("/proc/self/maps") as maps:
        return [line.split(maxsplit=5)[-1].strip() for line in maps if str(directory) in line]


def test_each_worker_keeps_its_mapping_of_the_recycled_file_from_version_to_version(
    real_store, redis_url, namespace, tmp_path
):
    """With one file recycled version after version, no worker maps a file after the first version
    (mapping and unmapping a large file costs page tables each time), and every worker still
    applies each version's bytes: the fetcher writes the pages the others keep mapped."""
    trainer = _policy(seed=8)
    updater = RedisWeightUpdater(real_store, trainer, 2, sync=False, chunk_size=64 << 10)
    with _receivers(redis_url, namespace, 2, tmp_path) as receivers:
        for step in range(4):
            with torch.no_grad():
                trainer[0].bias.fill_(float(step))
            updater.push_weights()
            for r in receivers[step % 2 :] + receivers[: step % 2]:  # the fetcher alternates
                assert r.poll() == updater.version
            assert all(_same(r.policy, trainer) for r in receivers)
        assert [r.host_cache.mapped for r in receivers] == [1, 1]
        assert sum(r.host_cache.recycled for r in receivers) == 3 and sum(r.host_cache.fetched for r in receivers) == 4
        directory = receivers[0].host_cache.directory
        assert len(_mapped_files(directory)) == 2  # one kept mapping per worker, of the same file
        for r in receivers:
            r.host_cache.close()
        assert _mapped_files(directory) == []


def test_a_kept_mapping_of_a_deleted_file_is_dropped_at_the_next_version(real_store, redis_url, namespace, tmp_path):
    """A kept mapping holds the file's memory: once the file is deleted, the worker unmaps it at
    its next version, and a size change (a recycled file truncated or grown) maps the file anew."""
    small, big = _policy(seed=9), nn.Sequential(nn.Linear(256, 512))
    other = RedisStore.from_url(redis_url, f"{namespace}-big")
    first = RedisWeightUpdater(real_store, small, 1, sync=False, chunk_size=64 << 10)
    second = RedisWeightUpdater(other, big, 1, sync=False, chunk_size=64 << 10)
    cache = HostCache(tmp_path / "cache")
    try:
        first.push_weights()
        manifest = first.registry.read_manifest(first.version)
        with cache.chunks(manifest, first.registry.chunks):
            pass
        (path,) = Path(cache.directory).glob("*.safetensors")
        path.unlink()  # an operator's clean-up: the worker's mapping is the only hold on its memory
        assert [m for m in _mapped_files(cache.directory) if m.endswith("(deleted)")]
        with cache.chunks(manifest, first.registry.chunks):  # refetched into a new file
            assert not [m for m in _mapped_files(cache.directory) if m.endswith("(deleted)")]
        assert cache.mapped == 2 and cache.fetched == 2
        second.push_weights()
        second.push_weights()  # version 2: recycles the small model's file, grown
        grown = second.registry.read_manifest(second.version)
        assert grown.total_bytes > manifest.total_bytes
        with cache.chunks(grown, second.registry.chunks) as chunks:
            assert cache.recycled == 1 and cache.mapped == 3
            for index, chunk in enumerate(chunks):
                grown.verify_chunk(index, chunk)
    finally:
        cache.close()
        second.close()
        other.close()
