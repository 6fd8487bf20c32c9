"""The data path's performance features, tested for behaviour (never for speed).

Lazy chunk gathering with one reused buffer, background (async) uploads that
supersede waiting ones and surface their errors, staging runs sent without copies.
"""

from __future__ import annotations

import threading

import pytest
import redis
import safetensors.torch
import torch
from torch import nn

from redis_weights import ConfigurationError, RedisWeightReceiver, RedisWeightUpdater
from redis_weights.errors import BackgroundUploadError
from redis_weights.format.codec import Encoder, flatten_weights, plan_chunks
from redis_weights.format.manifest import checksum
from redis_weights.protocol.versions import VersionRegistry
from redis_weights.trainer.uploader import BackgroundUploader
from tests.codec_support import built_chunks


def _many_small(n: int = 300, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"p{i:03d}": torch.randn(97, generator=g) for i in range(n)}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- lazy gathering ------------------------------------------------------------------------
def test_chunks_spanning_small_tensors_are_gathered_into_a_ring_of_buffers_and_ids_need_no_gather(monkeypatch):
    import redis_weights.format.codec as codec

    monkeypatch.setattr(codec, "GATHER_BYTES", 4 * 4096)  # a ring of 4 chunk buffers
    weights = _many_small()
    encoded = Encoder(4096).encode(weights)
    ids = encoded.ids  # hashed from the parts, before any chunk is gathered
    assert encoded._gather == []
    streamed, reused_ids = [], set()
    for index in range(len(encoded.plan)):
        chunk, reused = encoded.chunk(index)
        streamed.append(bytes(chunk))  # copy now: a reused chunk is overwritten by the next one
        if reused:
            reused_ids.add(id(chunk.obj))  # type: ignore[union-attr]
    assert len(streamed) > 5 and len(reused_ids) == 1  # flagged: the ring's last buffer, always the same
    assert len(encoded._gather) == 4
    assert ids == [checksum(c) for c in streamed]
    assert encoded.manifest(1, created=0.0, producer="t").ids == ids
    loaded = safetensors.torch.load(b"".join(streamed))
    assert _equal(loaded, weights)


def test_big_pieces_stay_zero_copy_views_and_are_not_marked_reused():
    weights = {"big": torch.zeros(1 << 16), "small": torch.ones(3)}
    encoded = Encoder(64 << 10).encode(weights)
    flags = [(len(c), reused) for c, reused in map(encoded.chunk, range(len(encoded.plan)))]
    assert any(size == 64 << 10 and not reused for size, reused in flags)
    weights["big"].fill_(2.0)  # the plan reads the live memory: not a copy
    assert bytes(encoded.chunk(2)[0])[:4] == torch.tensor([2.0]).numpy().tobytes()


def test_snapshot_sends_the_staging_buffer_as_zero_copy_chunks_after_the_header():
    weights = _many_small(n=300)
    encoded = Encoder(64 << 10).encode(weights, snapshot=True)
    sizes = encoded.chunk_sizes
    assert all(s == 64 << 10 for s in sizes[:-1]) and len(sizes) == -(-encoded.total_bytes // (64 << 10))
    assert all(not encoded.chunk(i)[1] for i in range(1, len(sizes))), "inside the staging run: views"


def test_plan_chunks_bounds_sizes_and_keeps_order():
    pieces = [b"a" * 10, b"b" * 100, b"c" * 5, bytes(range(256)) * 4, b"d" * 31]
    plan = plan_chunks(pieces, 64)
    assert b"".join(b"".join(bytes(p) for p in parts) for parts in plan) == b"".join(pieces)
    assert [sum(len(p) for p in parts) for parts in plan][:-1] == [64] * (len(plan) - 1)


@pytest.mark.server
def test_many_small_tensors_round_trip_through_a_real_server(real_store):
    weights = _many_small(n=2000)
    updater = RedisWeightUpdater(real_store, weights, 1, sync=False, chunk_size=8192)
    updater.push_weights()
    target = {k: torch.zeros_like(v) for k, v in weights.items()}
    receiver = RedisWeightReceiver(real_store, 1, target)
    assert receiver.poll() == updater.version
    assert _equal(target, weights)
    assert VersionRegistry(real_store.deployment, real_store.keyspace).read_manifest(updater.version).num_chunks > 100


# -- background uploads --------------------------------------------------------------------
def test_a_newer_job_supersedes_a_waiting_one_and_never_gets_the_inflight_slot():
    release = threading.Event()
    uploaded: list[tuple[str, int]] = []
    started = threading.Event()

    def upload(job: tuple[str, int]) -> None:
        started.set()
        release.wait(10)
        uploaded.append(job)

    uploader: BackgroundUploader[tuple[str, int]] = BackgroundUploader(upload)
    uploader.submit(lambda slot: ("a", slot))
    assert started.wait(10)
    uploader.submit(lambda slot: ("b", slot))
    uploader.submit(lambda slot: ("c", slot))
    assert uploader.busy and uploader.superseded == 1
    release.set()
    uploader.flush(10)
    assert uploaded == [("a", 0), ("c", 1)]
    uploader.close(5)


def test_an_upload_error_is_raised_once_on_the_callers_thread():
    def upload(job: int) -> None:
        if job == 1:
            raise redis.exceptions.ConnectionError("boom")

    uploader: BackgroundUploader[int] = BackgroundUploader(upload)
    uploader.submit(lambda slot: 1)
    with pytest.raises(BackgroundUploadError, match="boom") as info:
        uploader.flush(10)
    assert isinstance(info.value.__cause__, redis.exceptions.ConnectionError)
    uploader.submit(lambda slot: 2)  # the error was reported once; work goes on
    uploader.flush(10)
    uploader.close(5)


@pytest.mark.server
def test_background_push_returns_a_snapshot_and_commits_it(real_store):
    policy = nn.Linear(64, 32)
    updater = RedisWeightUpdater(real_store, policy, 1, sync=False, background=True)
    with torch.no_grad():
        policy.weight.fill_(1.0)
    updater.push_weights()
    with torch.no_grad():
        policy.weight.fill_(2.0)  # after the push returned: must not leak into it
    updater.flush()
    registry = VersionRegistry(real_store.deployment, real_store.keyspace)
    assert registry.latest() == updater.version
    worker = nn.Linear(64, 32)
    with RedisWeightReceiver(real_store, 1, worker, poll_interval=0.05):
        updater.wait(timeout=30)
    assert torch.equal(worker.weight, torch.ones(32, 64))
    updater.close()


@pytest.mark.server
def test_background_errors_surface_on_the_next_push_and_work_resumes(real_store, monkeypatch):
    policy = nn.Linear(4, 4)
    updater = RedisWeightUpdater(real_store, policy, 1, sync=False, background=True)
    registry = updater.registry
    real_commit = registry.commit
    calls = []

    def failing_commit(manifest, ranks=(), **kwargs):  # type: ignore[no-untyped-def]
        calls.append(manifest.version)
        if len(calls) == 1:
            raise redis.exceptions.ConnectionError("server went away")
        return real_commit(manifest, ranks, **kwargs)

    monkeypatch.setattr(registry, "commit", failing_commit)
    updater.push_weights()
    while updater._uploader is not None and updater._uploader.busy:
        threading.Event().wait(0.01)
    with pytest.raises(BackgroundUploadError, match="server went away"):
        updater.push_weights()
    updater.push_weights()
    updater.flush()
    assert registry.latest() == updater.version == calls[-1]
    updater.close()


def test_background_needs_async(fake_store):
    with pytest.raises(ConfigurationError, match="sync=False"):
        RedisWeightUpdater(fake_store, nn.Linear(2, 2), 1, sync=True, background=True)


def test_encode_snapshot_of_every_dtype_decodes_equal():
    weights = {
        "f32": torch.randn(5, 3),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "i64": torch.arange(9),
        "b": torch.tensor([True, False, True]),
        "t": torch.arange(12.0).reshape(3, 4).t(),
    }
    encoded = Encoder(4096).encode(weights, snapshot=True)
    loaded = safetensors.torch.load(b"".join(built_chunks(encoded)))
    assert _equal(loaded, {k: v.contiguous() for k, v in flatten_weights(weights).items()})
