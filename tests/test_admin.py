"""The operators' library functions (``redis_weights.tools.admin``), against a real server (fakeredis for one)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from redis_weights import RedisStore, RedisWeightReceiver, RedisWeightUpdater, VersionNotFoundError
from redis_weights.backend.keys import Keys
from redis_weights.errors import CodecError, ConfigurationError
from redis_weights.tools.admin import Admin, RefusedError, drop_namespace, manifest_dict, parse_version
from tests.codec_support import read_version


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder.weight": torch.randn(64, 32, generator=g),
        "encoder.bias": torch.randn(64, generator=g),
        "head.weight": torch.randn(4, 64, generator=g).to(torch.bfloat16),
        "steps": torch.tensor([seed], dtype=torch.int64),
    }


def zeros_like(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in w.items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture
def admin(real_store: RedisStore) -> Admin:
    return Admin(RedisStore(real_store.client, real_store.namespace, owns_client=False))


def push(store: RedisStore, *seeds: int, retention: int = 10) -> list[int]:
    """Commit one version per seed (async: no worker needed); the version numbers."""
    updater = RedisWeightUpdater(RedisStore(store.client, store.namespace, owns_client=False), None, 2,
                                 sync=False, retention=retention, chunk_size=4096)  # fmt: skip
    out = []
    for seed in seeds:
        updater.update_weights(weights(seed))
        out.append(updater.version)
    return out


def test_versions_report_names_sizes_producers_and_ranks(real_store: RedisStore, admin: Admin) -> None:
    assert admin.versions() == []
    v1, v2, v3 = push(real_store, 1, 2, 3)
    receiver = RedisWeightReceiver(RedisStore(real_store.client, real_store.namespace, owns_client=False),
                                   1, zeros_like(weights(0)))  # fmt: skip
    assert receiver.poll() == v3
    rows = admin.versions()
    assert [r.version for r in rows] == [v1, v2, v3]
    assert [r.latest for r in rows] == [False, False, True]
    last = rows[-1]
    assert last.tensors == 4 and last.chunks >= 1 and last.ranks == [1]
    assert last.total_bytes > 64 * 32 * 4 and ":" in last.producer and last.created > 0
    assert rows[0].ranks == []
    assert last.to_dict()["ranks"] == [1]


def test_workers_report_lag_and_dead_ranks(real_store: RedisStore, admin: Admin) -> None:
    (v1,) = push(real_store, 1)
    store = RedisStore(real_store.client, real_store.namespace, owns_client=False)
    live = RedisWeightReceiver(store, 1, zeros_like(weights(0)))
    short = RedisWeightReceiver(store, 2, zeros_like(weights(0)), heartbeat_ttl=0.2)
    assert live.poll() == v1 and short.poll() == v1
    (v2,) = push(real_store, 2)
    assert live.poll() == v2
    assert admin.known_ranks() == [1, 2]
    short.close()  # its process is gone: no more beats
    time.sleep(0.3)  # rank 2's heartbeat expires: it is dead
    live.heartbeat()
    latest, rows = admin.workers()
    assert latest == v2
    one, two = rows
    assert (one.rank, one.status, one.version, one.lag, one.alive) == (1, "updated", v2, 0, True)
    assert one.heartbeat_age is not None and one.heartbeat_age < 5
    assert (two.rank, two.version, two.lag, two.alive) == (2, v1, v2 - v1, False)
    assert two.heartbeat_age is None


def test_export_writes_the_concatenated_chunks(real_store: RedisStore, admin: Admin, tmp_path: Path) -> None:
    push(real_store, 1, 2)
    out = tmp_path / "w.safetensors"
    manifest = admin.export("latest", out)
    assert out.read_bytes() == read_version(admin.registry, manifest.version)[1]
    assert_same(load_file(str(out)), weights(2))
    admin.export(manifest.version - 1, out)  # overwrite with an older version
    assert_same(load_file(str(out)), weights(1))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary left behind


def test_import_publishes_a_checkpoint_that_workers_apply(real_store: RedisStore, admin: Admin, tmp_path: Path) -> None:
    push(real_store, 1)
    store = RedisStore(real_store.client, real_store.namespace, owns_client=False)
    policy = zeros_like(weights(0))
    receiver = RedisWeightReceiver(store, 3, policy)
    receiver.poll()
    path = tmp_path / "ckpt.safetensors"
    save_file(weights(7), str(path), metadata={"step": "7000"})
    manifest = admin.import_file(path, metadata={"source": "ckpt"})
    assert manifest.version == admin.registry.latest()
    assert manifest.metadata == {"step": "7000", "source": "ckpt"}
    assert admin.store.client.get(admin.keyspace.rank_status(3)) == b"pending"
    assert receiver.poll() == manifest.version
    assert_same(policy, weights(7))
    assert len(admin.versions()) == 2  # the import garbage-collects nothing


def test_import_refuses_bad_files(admin: Admin, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CodecError, match="not a valid .safetensors"):
        admin.import_file(bad)
    with pytest.raises(ConfigurationError, match="no such file"):
        admin.import_file(tmp_path / "missing.safetensors")
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    with pytest.raises(CodecError, match="no tensors"):
        admin.import_file(empty)
    assert admin.registry.latest() == 0


def test_rollback_commits_old_weights_as_a_new_version(real_store: RedisStore, admin: Admin) -> None:
    v1, v2 = push(real_store, 1, 2)
    store = RedisStore(real_store.client, real_store.namespace, owns_client=False)
    policy = zeros_like(weights(0))
    receiver = RedisWeightReceiver(store, 1, policy)
    assert receiver.poll() == v2
    manifest = admin.rollback(v1)
    assert manifest.version > v2 and admin.registry.latest() == manifest.version
    assert manifest.ids == admin.registry.read_manifest(v1).ids and manifest.uploaded_bytes == 0
    assert manifest.producer.startswith(f"rollback of v{v1} by ")
    assert admin.store.client.get(admin.keyspace.rank_status(1)) == b"pending"
    assert receiver.poll() == manifest.version
    assert_same(policy, weights(1))
    with pytest.raises(VersionNotFoundError, match=f"committed: {v1}, {v2}, {manifest.version}"):
        admin.rollback(99)


def _bytes_in(admin: Admin) -> int:
    """Bytes written into Redis so far, less this call's own (INFO stats)."""
    return int(admin.client.info("stats")["total_net_input_bytes"])


def test_rollback_and_reimport_upload_no_chunk(real_store: RedisStore, admin: Admin, tmp_path: Path) -> None:
    push(real_store, 1, 2)  # ~11 KB each
    v1 = admin.registry.list_versions()[0]
    path = tmp_path / "v1.safetensors"
    admin.export(v1, path)
    before = _bytes_in(admin)
    rolled = admin.rollback(v1)
    after_rollback = _bytes_in(admin)
    imported = admin.import_file(path, chunk_size=4096)
    after_import = _bytes_in(admin)
    assert rolled.uploaded_bytes == 0 and imported.uploaded_bytes == 0
    assert imported.ids == rolled.ids  # the same weights, the same chunks
    assert after_rollback - before < 4096, "a rollback sent chunk bytes"
    assert after_import - after_rollback < 4 * 4096, "an import of retained weights sent chunk bytes"


def test_rollback_of_a_version_with_a_lost_chunk_fails_cleanly(real_store: RedisStore, admin: Admin) -> None:
    v1, v2 = push(real_store, 1, 2)
    admin.store.client.delete(admin.keyspace.chunk(admin.registry.read_manifest(v1).ids[-1]))
    with pytest.raises(VersionNotFoundError, match="gone from Redis"):
        admin.rollback(v1)
    assert admin.registry.latest() == v2  # nothing committed


def test_gc_and_delete(real_store: RedisStore, admin: Admin) -> None:
    v1, v2, v3, v4 = push(real_store, 1, 2, 3, 4)
    gone = set(admin.registry.read_manifest(v1).ids) - admin.registry.read_manifest(v3).objects()
    gone -= admin.registry.read_manifest(v4).objects()
    assert gone
    assert admin.gc(2) == [v1, v2]
    assert admin.registry.list_versions() == [v3, v4]
    assert not any(admin.store.client.exists(admin.keyspace.chunk(i)) for i in gone)
    with pytest.raises(ConfigurationError):
        admin.gc(0)
    with pytest.raises(RefusedError, match="latest"):
        admin.delete("latest")
    with pytest.raises(VersionNotFoundError, match="not found"):
        admin.delete(v1)
    assert admin.delete(v3) == v3
    assert admin.delete(v4, force=True) == v4
    assert admin.registry.list_versions() == []


def test_manifest_view_and_version_parsing(real_store: RedisStore, admin: Admin) -> None:
    (v1,) = push(real_store, 1)
    doc = manifest_dict(admin.manifest("latest"))
    assert doc["version"] == v1
    by_name = {t["name"]: t for t in doc["tensors"]}
    assert by_name["head.weight"] == {**by_name["head.weight"], "dtype": "BF16", "shape": [4, 64], "bytes": 512}
    assert sum(c["bytes"] for c in doc["chunks"]) == doc["total_bytes"]
    assert all(len(c["id"]) == 32 and c["base"] is None for c in doc["chunks"])
    assert (doc["storage"], doc["chain_length"], doc["base"]) == ("full", 0, None)
    assert doc["stored_bytes"] == doc["new_bytes"] == doc["total_bytes"]
    assert parse_version("latest") == "latest" and parse_version("v3") == 3 and parse_version(" 12 ") == 12
    for bad in ("0", "-1", "abc", "1.5"):
        with pytest.raises(ConfigurationError):
            parse_version(bad)
    with pytest.raises(VersionNotFoundError, match="no committed version"):
        Admin(RedisStore(real_store.client, real_store.namespace + "x", owns_client=False)).resolve("latest")


def test_watch_reports_pushes_and_acks(real_store: RedisStore, admin: Admin) -> None:
    events = []
    watching = threading.Thread(target=lambda: events.extend(admin.watch(timeout=3.0)))
    watching.start()
    time.sleep(0.3)  # let the watcher subscribe
    k = real_store.keyspace
    for channel, hostile in ((k.updates_channel, "-1"), (k.updates_channel, "99999999999999999999"),
                             (k.updates_channel, "\u0661"), (k.acks_channel, "0:5"), (k.acks_channel, "3:-2"),
                             (k.acks_channel, "x")):  # fmt: skip
        real_store.client.publish(channel, hostile)  # checked, never trusted: no event, no error
    (v1,) = push(real_store, 1)
    receiver = RedisWeightReceiver(RedisStore(real_store.client, real_store.namespace, owns_client=False),
                                   2, zeros_like(weights(0)))  # fmt: skip
    receiver.poll()
    watching.join(10)
    kinds = [(e.kind, e.version, e.rank) for e in events]
    assert kinds == [("push", v1, None), ("ack", v1, 2)]
    assert events[0].tensors == 4 and events[0].total_bytes and events[1].status == "updated"
    assert events[1].lag == 0 and events[1].ack_latency is not None and events[1].ack_latency >= 0


def test_drop_namespace_deletes_that_namespace_and_nothing_else(fake_redis) -> None:
    for namespace in ("demo", "demo-1", "other"):
        updater = RedisWeightUpdater(RedisStore(fake_redis, namespace, owns_client=False), weights(1), 2, sync=False)
        updater.update_weights()
    fake_redis.set("unrelated", b"1")
    before = fake_redis.dbsize()
    keyspace = Keys("demo")
    dropped = drop_namespace(fake_redis, keyspace)
    assert dropped > 0 and fake_redis.dbsize() == before - dropped
    assert list(fake_redis.scan_iter(match=keyspace.pattern)) == []
    assert list(fake_redis.scan_iter(match=keyspace.chunk_pattern)) == [], "its chunks stay behind"
    assert list(fake_redis.scan_iter(match=Keys("other").chunk_pattern)), "another namespace lost its chunks"
    assert fake_redis.exists("unrelated", Keys("demo-1").latest, Keys("other").latest) == 3
    assert drop_namespace(fake_redis, keyspace) == 0


def test_delta_versions_export_bit_exact_and_show_their_chain(real_store: RedisStore, admin: Admin,
                                                               tmp_path: Path) -> None:  # fmt: skip
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.Linear(256, 64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    updater = RedisWeightUpdater(RedisStore(real_store.client, real_store.namespace, owns_client=False), model, 1,
                                 sync=False, retention=10, chunk_size=16384, wire_dtype=torch.bfloat16, delta=True,
                                 keyframe_interval=3)  # fmt: skip
    expected = {}
    for _ in range(4):
        model(torch.randn(8, 128)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        updater.update_weights()
        expected[updater.version] = {k: v.detach().bfloat16() for k, v in model.state_dict().items()}
    rows = {r.version: r for r in admin.versions()}
    v1, v2, v3, v4 = sorted(expected)
    assert [rows[v].keyframe for v in (v1, v2, v3, v4)] == [True, False, False, True]
    assert (rows[v3].depth, rows[v3].new_bytes < rows[v3].total_bytes / 5) == (2, True)
    doc = manifest_dict(admin.manifest(v3))
    assert (doc["storage"], doc["base"], doc["keyframe"], doc["chain_length"]) == ("patch", v2, v1, 2)
    assert doc["stored_bytes"] > doc["total_bytes"] > doc["new_bytes"] > 0
    for version, tensors in expected.items():
        out = tmp_path / f"v{version}.safetensors"
        admin.export(version, out)
        assert_same(load_file(str(out)), tensors)
    updater.close()
