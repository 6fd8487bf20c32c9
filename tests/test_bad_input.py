"""Bad bytes in Redis, bad weights at push time, bad connection settings: a clear error, nothing lost.

Versions are corrupted directly in a real server; the receiver must refuse them
whole (old weights kept, ``"error: version N: ..."`` status), never crash, and
apply the next good version.
"""

from __future__ import annotations

import json
import time

import pytest
import redis
import torch
from torch import nn

from redis_weights import (
    CodecError,
    ConfigurationError,
    PushError,
    RedisStore,
    RedisWeightReceiver,
    RedisWeightUpdater,
)
from redis_weights.format.codec import flatten_weights
from redis_weights.tools.server import free_port
from tests.codec_support import join_format3, split_format3
from tests.faults_support import chunk_key, perturb
from tests.models import make_model, state_digest

pytestmark = pytest.mark.server

CHUNK = 4096  # small chunks: the test model spans several


@pytest.fixture
def pair(real_store, redis_url, namespace):
    """An async updater and a receiver that has applied the updater's first version."""
    trainer_model = make_model("mlp", seed=1)
    updater = RedisWeightUpdater(real_store, trainer_model, num_workers=1, sync=False, chunk_size=CHUNK)
    receiver = RedisWeightReceiver(RedisStore.from_url(redis_url, namespace), 1, make_model("mlp"))
    updater.update_weights()
    assert receiver.poll() == updater.version
    yield updater, receiver, trainer_model
    receiver.close()


def _edit_manifest(updater: RedisWeightUpdater, edit) -> None:
    """Rewrite the latest manifest: ``edit(meta, table)`` changes the JSON meta in place and returns
    the new chunk table (None: the same)."""
    meta, table = split_format3(updater.store.client.get(updater.keyspace.manifest(updater.version)))
    new_table = edit(meta, table)
    _set_manifest(updater, join_format3(meta, table if new_table is None else new_table))


def _set_manifest(updater: RedisWeightUpdater, raw: bytes) -> None:
    updater.store.client.set(updater.keyspace.manifest(updater.version), raw)


def _flip_byte(updater, version, index=0, offset=-1):
    key = chunk_key(updater.store, version, index)
    data = bytearray(updater.store.client.get(key))
    data[offset] ^= 0xFF
    updater.store.client.set(key, bytes(data))


def _truncate(updater, version, index=0):
    key = chunk_key(updater.store, version, index)
    updater.store.client.set(key, updater.store.client.get(key)[:-3])


def _delete_chunk(updater, version, index=0):
    updater.store.client.delete(chunk_key(updater.store, version, index))


def _lie_about(field: str, value):
    def edit(doc, table):
        name = sorted(doc["tensors"])[0]
        if field == "header_len":
            doc["header_len"] = value
        else:
            doc["tensors"][name][field] = value

    return lambda updater, version: _edit_manifest(updater, edit)


def _many_entries(count: int):
    """A manifest listing ``count`` tiny chained chunk entries."""

    def edit(doc, table):
        doc["total_bytes"] = doc["chunk_size"] * count
        doc["packs"] = [[doc["version"], "c" * 32, 100]]
        return b"\x01" * count + b"a" * 16 * count + b"b" * 16 * count

    return lambda updater, version: _edit_manifest(updater, edit)


def _lie_about_size(updater, version):
    _edit_manifest(updater, lambda doc, table: doc.update(total_bytes=doc["chunk_size"] * 10**6))


def _swap_same_shape_tensors(updater, version):
    """Swap the places of two tensors of one dtype and shape: a manifest that still parses and
    fits the policy, and whose chunks all pass their checksums."""

    def edit(doc, table):
        by_kind: dict[str, list[str]] = {}
        for name, spec in sorted(doc["tensors"].items()):
            by_kind.setdefault(json.dumps([spec["dtype"], spec["shape"]]), []).append(name)
        a, b = next(names for names in by_kind.values() if len(names) > 1)[:2]
        tensors = doc["tensors"]
        tensors[a]["data_offsets"], tensors[b]["data_offsets"] = tensors[b]["data_offsets"], tensors[a]["data_offsets"]

    _edit_manifest(updater, edit)


CORRUPTIONS = {
    "flipped byte": (_flip_byte, "of chunk 0 does not match its id"),
    "truncated chunk": (_truncate, "of chunk 0 does not match its id"),
    "missing chunk": (_delete_chunk, "of chunk 0 is missing from Redis"),
    "manifest of another version": (
        lambda u, v: _set_manifest(u, u.store.client.get(u.keyspace.manifest(v - 1))), "says it is version"
    ),
    "manifest of the previous format": (
        lambda u, v: _set_manifest(u, json.dumps({"format": "redis_weights/1", "version": v}).encode()),
        "push again from the trainer",
    ),
    "manifest of 100k chunk entries": (_many_entries(100_000), "more than the limit"),
    "manifest claiming a million chunks it does not list": (_lie_about_size, "chunk entries"),
    "manifest not JSON": (lambda u, v: _set_manifest(u, b"\x00{not json"), "manifest is not JSON"),
    "manifest meta not JSON": (lambda u, v: _set_manifest(u, b"RWM3\x03\0\0\0{no"), "manifest is not JSON"),
    "manifest with a 5000-digit integer": (
        lambda u, v: _set_manifest(u, b'{"format":"redis_weights/1","version":' + b"9" * 5000 + b"}"),
        "manifest is not JSON",
    ),
    "manifest nested 50000 deep": (lambda u, v: _set_manifest(u, b"[" * 50_000), "not JSON"),
    "offsets out of range": (_lie_about("data_offsets", [0, 10**12]), "outside"),
    "shape whose size overflows": (_lie_about("shape", [2**64, 2**64, 0]), "shape [18446744073709551616"),
    "header of gigabytes": (_lie_about("header_len", 8 + 4 * 2**30), "header_len"),
    "tensors swapped in the manifest": (_swap_same_shape_tensors, "does not match the safetensors header"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupted_version_is_refused_whole_and_the_next_one_applies(pair, corruption):
    updater, receiver, trainer_model = pair
    corrupt, reason = CORRUPTIONS[corruption]
    good_version, good_digest = receiver.version, state_digest(receiver.policy)

    perturb(trainer_model, 11)
    updater.update_weights()
    bad = updater.version
    corrupt(updater, bad)

    assert receiver.poll() is None
    assert receiver.version == good_version
    assert state_digest(receiver.policy) == good_digest, "a refused version changed the weights"
    status = updater.workers()[0].status
    assert status == receiver.last_error
    assert status.startswith(f"error: version {bad}: ") and reason in status, status
    assert status.count(f"version {bad}:") == 1, f"the version is named once: {status}"
    assert receiver.poll() is None  # refused once, not re-fetched on every poll

    perturb(trainer_model, 12)
    updater.update_weights()
    assert receiver.poll() == updater.version
    assert state_digest(receiver.policy) == state_digest(trainer_model)
    assert updater.workers()[0].status == "updated"


def test_the_sync_push_reports_a_corrupted_chunk_naming_the_rank(real_store, redis_url, namespace):
    trainer_model = make_model("mlp", seed=2)
    updater = RedisWeightUpdater(real_store, trainer_model, num_workers=1, sync=True, timeout=30, chunk_size=CHUNK)
    real_commit = updater.registry.commit

    def commit_after_corrupting(manifest, ranks=(), **kwargs):
        key = updater.keyspace.chunk(manifest.chunks[-1].id)  # written, not yet committed
        data = bytearray(updater.store.client.get(key))
        data[-1] ^= 0xFF
        updater.store.client.set(key, bytes(data))
        return real_commit(manifest, ranks, **kwargs)

    worker = make_model("mlp")
    with RedisWeightReceiver(RedisStore.from_url(redis_url, namespace), 1, worker, poll_interval=0.2):
        updater.registry.commit = commit_after_corrupting  # type: ignore[method-assign]
        started = time.monotonic()
        with pytest.raises(PushError) as info:
            updater.update_weights()
        assert time.monotonic() - started < 20, "the error must end the push, not the timeout"
        assert list(info.value.errors) == [1]
        assert "does not match its id" in info.value.errors[1] and "rank 1 reported" in str(info.value)
        assert state_digest(worker) == state_digest(make_model("mlp")), "the worker's weights changed"


# ---------------------------------------------------------------------------------------
# Weights given to a push
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "weights, message",
    [
        ({"a": torch.zeros(2), "b": [1.0, 2.0]}, "'b' is a list, not a tensor"),
        ({"a": torch.zeros(2), "n": 3}, "'n' is a int, not a tensor"),
        ({"m": torch.zeros(3, device="meta")}, "meta device"),
        ({"s": torch.zeros(3, 3).to_sparse()}, "only dense tensors"),
        ({"q": torch.zeros(2, dtype=torch.complex128)}, "safetensors cannot store"),
        ("not weights", "weights must be an nn.Module"),
    ],
    ids=["list", "int", "meta", "sparse", "complex128", "string"],
)
def test_weights_that_cannot_be_sent_fail_at_push_time(real_store, weights, message):
    updater = RedisWeightUpdater(real_store, weights, num_workers=1, sync=False)
    with pytest.raises(CodecError, match=message):
        updater.update_weights()
    assert updater.registry.latest() == 0 and updater.version == 0, "nothing may be committed"


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # shared tensor under two names


def _pairs() -> dict[str, tuple[object, object]]:
    g = torch.Generator().manual_seed(3)
    dtypes = [torch.bfloat16, torch.float16, torch.float64, torch.int8, torch.int64, torch.uint8, torch.bool]
    mixed = {str(d).split(".")[1]: (torch.randn(5, 3, generator=g) * 50).to(d) for d in dtypes}
    return {
        "dtypes": (mixed, {k: torch.zeros_like(v) for k, v in mixed.items()}),
        "scalars": ({"s": torch.tensor(3.5), "i": torch.tensor(7)}, {"s": torch.tensor(0.0), "i": torch.tensor(0)}),
        "empty model": (nn.Sequential(), nn.Sequential()),
        "zero-size tensor": ({"z": torch.zeros(0, 5), "x": torch.ones(2)}, {"z": torch.zeros(0, 5), "x": torch.zeros(2)}),
        "non-contiguous source": ({"t": torch.randn(6, 4, generator=g).t()}, {"t": torch.zeros(4, 6)}),
        "non-contiguous target": ({"t": torch.randn(4, 6, generator=g)}, {"t": torch.zeros(6, 4).t()}),
        "shared tensors": (_Tied(), _Tied()),
        "nested dict": ({"a": {"b": torch.ones(3)}}, {"a": {"b": torch.zeros(3)}}),
    }


def _flat(weights) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in flatten_weights(weights).items()}


@pytest.mark.parametrize("case", sorted(_pairs()))
def test_unusual_weights_round_trip_exactly(real_store, redis_url, namespace, case):
    source, target = _pairs()[case]
    if isinstance(source, _Tied):
        nn.init.normal_(source.embed.weight)
    ptrs = {k: v.data_ptr() for k, v in flatten_weights(target).items()}
    updater = RedisWeightUpdater(real_store, source, num_workers=1, sync=False, chunk_size=CHUNK)
    updater.update_weights()
    receiver = RedisWeightReceiver(RedisStore.from_url(redis_url, namespace), 1, target)
    try:
        assert receiver.poll() == updater.version, receiver.last_error
    finally:
        receiver.close()
    got, want = _flat(target), _flat(source)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    assert {k: v.data_ptr() for k, v in flatten_weights(target).items()} == ptrs, "weights must be written in place"


def test_a_dtype_mismatch_is_refused_unless_cast_is_allowed(real_store, redis_url, namespace):
    updater = RedisWeightUpdater(real_store, {"w": torch.full((4,), 1.5, dtype=torch.float16)}, 1, sync=False)
    updater.update_weights()
    strict = RedisWeightReceiver(RedisStore.from_url(redis_url, namespace), 1, {"w": torch.zeros(4)})
    lenient = RedisWeightReceiver(
        RedisStore.from_url(redis_url, namespace), 2, {"w": torch.zeros(4)}, allow_cast=True
    )
    try:
        assert strict.poll() is None
        assert "key 'w': dtype torch.float16 pushed, the policy has torch.float32" in strict.last_error
        assert strict.policy["w"].eq(0).all()
        assert lenient.poll() == updater.version and lenient.policy["w"].eq(1.5).all()
    finally:
        strict.close()
        lenient.close()


def test_a_worker_policy_on_the_meta_device_is_refused_at_construction(real_store):
    with pytest.raises(CodecError, match="meta device"):
        RedisWeightReceiver(real_store, 1, {"w": torch.zeros(2, device="meta")})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_weights_reach_a_cpu_worker_and_back(real_store, redis_url, namespace):
    source = {"w": torch.randn(1000, 100, device="cuda"), "b": torch.randn(7, device="cuda").half()}
    updater = RedisWeightUpdater(real_store, source, num_workers=1, sync=False, chunk_size=CHUNK)
    updater.update_weights()
    cpu_target = {"w": torch.zeros(1000, 100), "b": torch.zeros(7).half()}
    receiver = RedisWeightReceiver(RedisStore.from_url(redis_url, namespace), 1, cpu_target)
    try:
        assert receiver.poll() == updater.version
    finally:
        receiver.close()
    assert torch.equal(cpu_target["w"], source["w"].cpu()) and torch.equal(cpu_target["b"], source["b"].cpu())


# ---------------------------------------------------------------------------------------
# Connection settings: one clear error at start, never a hang
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url, message",
    [
        ("http://127.0.0.1:6379/0", "unsupported Redis URL"),
        ("127.0.0.1:6379", "unsupported Redis URL"),
        ("redis://127.0.0.1:notaport/0", "invalid Redis URL"),
        ("redis://127.0.0.1:6379/notadb", "invalid Redis URL"),
    ],
)
def test_a_malformed_url_is_refused(url, message):
    with pytest.raises(ConfigurationError, match=message):
        RedisStore.from_url(url)


def test_a_refused_url_never_shows_its_password():
    for url in ("redis://:s3cret@127.0.0.1:notaport/0", "redis://u:s3cret@127.0.0.1/x", "http://u:s3cret@h/0"):
        with pytest.raises(ConfigurationError) as info:
            RedisStore.from_url(url)
        assert "s3cret" not in str(info.value) and "***" in str(info.value)


@pytest.mark.parametrize("side", ["updater", "receiver"])
def test_nothing_listening_is_one_clear_error_at_start(side):
    port = free_port()
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", "ns")
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match=f"cannot reach Redis at 127.0.0.1:{port}/0"):
        if side == "updater":
            RedisWeightUpdater(store, {"w": torch.zeros(1)}, 1)
        else:
            RedisWeightReceiver(store, 1, {"w": torch.zeros(1)})
    assert time.monotonic() - started < 10
    store.close()


def test_a_wrong_password_is_one_clear_error_at_start(server_factory):
    server = server_factory("--requirepass", "right-password")
    for side, url in (
        ("updater", f"redis://:wrong-password@127.0.0.1:{server.port}/0"),
        ("receiver", f"redis://nobody:right-password@127.0.0.1:{server.port}/0"),
        ("receiver", f"redis://127.0.0.1:{server.port}/0"),  # no password at all
    ):
        store = RedisStore.from_url(url, "ns")
        started = time.monotonic()
        with pytest.raises(ConfigurationError, match="refused") as info:
            if side == "updater":
                RedisWeightUpdater(store, {"w": torch.zeros(1)}, 1)
            else:
                RedisWeightReceiver(store, 1, {"w": torch.zeros(1)})
        assert "wrong-password" not in str(info.value) and "right-password" not in str(info.value)
        assert time.monotonic() - started < 10
        store.close()
    good = RedisStore.from_url(f"redis://:right-password@127.0.0.1:{server.port}/0", "ns")
    RedisWeightUpdater(good, {"w": torch.zeros(1)}, 1).close()


def test_redis_errors_are_not_swallowed_by_the_start_check(server_factory):
    server = server_factory()
    client = redis.Redis(port=server.port)
    client.lpush("rw:{ns}:latest", "x")  # WRONGTYPE on GET: someone else's key
    with pytest.raises(ConfigurationError, match="WRONGTYPE"):
        RedisWeightUpdater(RedisStore.from_url(server.url, "ns"), {"w": torch.zeros(1)}, 1)
    client.close()


def test_an_evicting_maxmemory_policy_is_one_clear_error_at_start(server_factory):
    server = server_factory("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    store = RedisStore.from_url(server.url, "ns")
    for build in (
        lambda: RedisWeightUpdater(store, {"w": torch.zeros(1)}, 1),
        lambda: RedisWeightReceiver(store, 1, {"w": torch.zeros(1)}),
    ):
        with pytest.raises(ConfigurationError, match="allkeys-lru"):
            build()
    # the check can be skipped on purpose (a cache you accept to lose)
    RedisWeightUpdater(store, {"w": torch.zeros(1)}, 1, check_server=False).close()


# ---------------------------------------------------------------------------------------
# Bad patches and chains (delta=True)
# ---------------------------------------------------------------------------------------
def _delta_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.randn(4, model[0].in_features)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.fixture
def delta_pair(real_store, redis_url, namespace):
    """A delta updater (bf16 on the wire) whose second version is patches only, and a receiver at the first."""
    torch.manual_seed(0)  # the same weights and step in every run: a chunk the step left unchanged is no patch
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    updater = RedisWeightUpdater(real_store, model, 1, sync=False, chunk_size=CHUNK, wire_dtype=torch.bfloat16,
                                 delta=True)  # fmt: skip
    receiver = RedisWeightReceiver(RedisStore.from_url(redis_url, namespace), 1, _like(model))
    updater.update_weights()
    assert receiver.poll() == updater.version
    _delta_step(model, optimizer)
    updater.update_weights()
    manifest = updater.registry.read_manifest(updater.version)
    assert all(c.base is not None for c in manifest.chunks), "the fixture needs a version of patches only"
    yield updater, receiver, model, optimizer, manifest
    receiver.close()


def _like(model: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 32))


def _replace_packs(updater, manifest, records) -> None:
    """Store packs of ``records`` and make the manifest name them instead of its own."""
    from redis_weights.format.manifest import checksum
    from redis_weights.format.packs import build_packs

    packs = build_packs(records, 1 << 20)
    updater.registry.chunks.write([(checksum(p), p, False) for p in packs])
    _edit_manifest(updater, lambda doc, table: doc.update(packs=[[manifest.version, checksum(p), len(p)]
                                                                 for p in packs]))  # fmt: skip


def _records(updater, manifest):
    """The records of the version's packs: ``(index, source, target, patch bytes)``."""
    from redis_weights.format.packs import parse_pack

    out = []
    for pack in manifest.packs:
        data = updater.store.client.get(updater.keyspace.chunk(pack.id))
        out += [(r.index, r.source, r.target, data[r.offset : r.offset + r.length])
                for r in parse_pack(data, manifest.chunk_sizes, "pack")]  # fmt: skip
    return out


def _corrupt_patch(updater, manifest):
    key = updater.keyspace.chunk(manifest.packs[-1].id)
    data = bytearray(updater.store.client.get(key))
    data[len(data) // 2] ^= 0xFF
    updater.store.client.set(key, bytes(data))


def _malformed_patch_in_a_valid_pack(updater, manifest):
    """Bytes that are not a patch, in a pack stored under its own id and named by the manifest."""
    records = _records(updater, manifest)
    index, source, target, _ = records[0]
    _replace_packs(updater, manifest, [(index, source, target, b"RWPT" + bytes(range(60))), *records[1:]])


def _patch_of_another_chunk(updater, manifest):
    """A real patch (its pack's id right), but of chunk 1: applied to chunk 0 it cannot give chunk 0's bytes."""
    records = _records(updater, manifest)
    (index, source, target, _), other = records[0], records[1]
    _replace_packs(updater, manifest, [(index, source, target, other[3]), *records[1:]])


def _missing_patch(updater, manifest):
    updater.store.client.delete(updater.keyspace.chunk(manifest.packs[-1].id))


def _record_of_another_chain(updater, manifest):
    records = _records(updater, manifest)
    index, source, _, patch = records[0]
    _replace_packs(updater, manifest, [(index, source, "f" * 32, patch), *records[1:]])


DELTA_CORRUPTIONS = {
    "corrupted pack": (_corrupt_patch, "does not match its id (corrupted in Redis; deleted)"),
    "malformed patch in a valid pack": (_malformed_patch_in_a_valid_pack, "the patch of chunk 0 in pack"),
    "patch of another chunk": (_patch_of_another_chunk, "chunk 0 does not match its id after patching"),
    "missing pack (a gap in the chain)": (_missing_patch, "is missing from Redis"),
    "record of another chain": (_record_of_another_chain, "chunk 0: pack"),
}


@pytest.mark.parametrize("corruption", sorted(DELTA_CORRUPTIONS))
def test_a_bad_patch_or_chain_is_refused_whole_and_the_next_version_applies(delta_pair, corruption):
    updater, receiver, model, optimizer, manifest = delta_pair
    corrupt, reason = DELTA_CORRUPTIONS[corruption]
    good_version, good_digest = receiver.version, state_digest(receiver.policy)
    corrupt(updater, manifest)
    assert receiver.poll() is None
    assert receiver.version == good_version and state_digest(receiver.policy) == good_digest
    status = updater.workers()[0].status
    assert status == receiver.last_error and status.startswith(f"error: version {manifest.version}: "), status
    assert reason in status, status
    _delta_step(model, optimizer)
    updater.update_weights()  # whatever the receive buffer holds now, the next version lands bit-exact
    assert receiver.poll() == updater.version, receiver.last_error
    expected = {k: v.detach().bfloat16().float() for k, v in model.state_dict().items()}
    assert all(torch.equal(t, expected[n]) for n, t in receiver.policy.state_dict().items())


@pytest.mark.parametrize("change", ["nothing", "one layer"])
def test_a_push_after_a_lost_pack_stores_what_only_that_pack_held(delta_pair, change):
    """The pack is gone (a worker deleted it as corrupt): the next version is a keyframe, and its
    chunks that the lost pack alone held (unchanged since) are uploaded again, not assumed."""
    updater, receiver, model, _, manifest = delta_pair
    _corrupt_patch(updater, manifest)
    assert receiver.poll() is None and not updater.store.client.exists(updater.keyspace.chunk(manifest.packs[-1].id))
    if change == "one layer":
        with torch.no_grad():
            model[1].weight.add_(0.01)
    updater.update_weights()
    assert updater.registry.read_manifest(updater.version).keyframe == updater.version
    assert receiver.poll() == updater.version, receiver.last_error
    expected = {k: v.detach().bfloat16().float() for k, v in model.state_dict().items()}
    assert all(torch.equal(t, expected[n]) for n, t in receiver.policy.state_dict().items())


def test_a_late_joiner_whose_chain_base_is_gone_refuses_and_keeps_its_weights(delta_pair, redis_url, namespace):
    """A patch whose base the worker does not hold, and Redis lost the keyframe's chunk."""
    updater, _, model, _, manifest = delta_pair
    updater.store.client.delete(updater.keyspace.chunk(manifest.chunks[0].base))
    late = RedisWeightReceiver(RedisStore.from_url(redis_url, namespace), 2, _like(model))
    before = state_digest(late.policy)
    try:
        assert late.poll() is None
        assert f"error: version {manifest.version}: " in late.last_error
        assert "base chunk" in late.last_error and "of chunk 0 is missing from Redis" in late.last_error
        assert state_digest(late.policy) == before and late.version == 0
    finally:
        late.close()
