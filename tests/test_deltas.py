"""Wire dtype and deltas end to end (fakeredis): what is uploaded, what is fetched, that every worker ends bit-exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from redis_weights import ConfigurationError, RedisStore, RedisWeightReceiver, RedisWeightUpdater
from redis_weights.format.delta import DeltaPlanner
from tests.codec_support import count_reads


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 256), nn.Linear(256, 64))


def _step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.randn(8, 128)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _wire(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a fp32 worker holds after a bf16 push: the trainer's weights rounded to bf16."""
    return {k: v.detach().bfloat16().float() for k, v in model.state_dict().items()}


def _exact(worker: nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(t, expected[n]) for n, t in worker.state_dict().items())


@pytest.fixture
def reads(monkeypatch):
    """Bytes every ChunkStore read asked for, per call."""
    return count_reads(monkeypatch)


def _updater(fake_store, model, **kw):
    return RedisWeightUpdater(fake_store, model, 3, sync=False, chunk_size=16384, wire_dtype=torch.bfloat16,
                              delta=True, **kw)  # fmt: skip


def _receiver(fake_store, rank, model=None):
    return RedisWeightReceiver(RedisStore(fake_store.client, fake_store.namespace), rank, model or _model(9))


def test_a_worker_at_the_parent_applies_patches_and_ends_bit_exact(fake_store, reads):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    updater = _updater(fake_store, model)
    worker = _receiver(fake_store, 1)
    updater.update_weights()
    assert worker.poll() == 1 and _exact(worker.policy, _wire(model))
    for _ in range(3):
        _step(model, optimizer)
        updater.update_weights()
        manifest = updater.registry.read_manifest(updater.version)
        reads.clear()
        assert worker.poll() == updater.version, worker.last_error
        assert _exact(worker.policy, _wire(model))
        assert not manifest.is_keyframe and manifest.uploaded_bytes < manifest.total_bytes / 10
        new_packs = [p for p in manifest.packs if p.version == manifest.version]
        assert new_packs and sum(reads) == sum(p.size for p in new_packs), "only the new version's packs"


def test_a_late_joiner_and_a_laggard_reach_the_version_through_the_keyframe_and_chain(fake_store):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    updater = _updater(fake_store, model)
    laggard = _receiver(fake_store, 1)
    updater.update_weights()
    _step(model, optimizer)
    updater.update_weights()
    assert laggard.poll() == 2
    for _ in range(3):
        _step(model, optimizer)
        updater.update_weights()
    manifest = updater.registry.read_manifest(updater.version)
    assert manifest.depth == 4 and {p.version for p in manifest.packs} == set(range(2, 6))
    late = _receiver(fake_store, 2)
    assert late.poll() == updater.version and laggard.poll() == updater.version
    assert _exact(late.policy, _wire(model)) and _exact(laggard.policy, _wire(model))


def test_keyframes_come_every_interval_or_when_the_chain_costs_too_much(fake_store):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    updater = _updater(fake_store, model, keyframe_interval=3)
    kinds = []
    for _ in range(7):
        _step(model, optimizer)
        updater.update_weights()
        kinds.append(updater.registry.read_manifest(updater.version).is_keyframe)
    assert kinds == [True, False, False, True, False, False, True]
    big_steps = torch.optim.AdamW(model.parameters(), lr=1e-1)  # most bf16 values move
    eager = RedisWeightUpdater(RedisStore(fake_store.client, "other"), model, 1, sync=False, chunk_size=16384,
                               wire_dtype=torch.bfloat16, delta=True, keyframe_fraction=0.05)  # fmt: skip
    eager.update_weights()
    _step(model, big_steps)
    eager.update_weights()
    assert eager.registry.read_manifest(eager.version).is_keyframe, "a chain above 5% of the model is a keyframe"


def test_a_refused_worker_and_redis_losing_its_data_still_end_bit_exact(fake_store, fake_redis):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    updater = _updater(fake_store, model)
    worker = _receiver(fake_store, 1)
    updater.update_weights()
    worker.poll()
    _step(model, optimizer)
    updater.update_weights()
    fake_redis.flushall()  # Redis lost every chunk and manifest; the trainer's chain is broken
    _step(model, optimizer)
    updater.update_weights()
    manifest = updater.registry.read_manifest(updater.version)
    assert all(c.base is None for c in manifest.chunks), "nothing may point at objects Redis lost"
    assert worker.poll() == updater.version and _exact(worker.policy, _wire(model))


def test_unchanged_chunks_are_neither_uploaded_nor_downloaded_without_deltas(fake_store, reads):
    frozen, head = nn.Linear(256, 256), nn.Linear(256, 8)
    model = nn.Sequential(frozen, head)
    updater = RedisWeightUpdater(fake_store, model, 1, sync=False, chunk_size=16384)
    worker = _receiver(fake_store, 1, nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 8)))
    updater.update_weights()
    worker.poll()
    with torch.no_grad():
        head.bias.add_(1.0)  # a fine-tuned head, frozen body
    updater.update_weights()
    manifest = updater.registry.read_manifest(updater.version)
    reads.clear()
    assert worker.poll() == updater.version
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), worker.policy.state_dict().values(), strict=True))
    assert manifest.uploaded_bytes == sum(reads) <= 2 * 16384, "only the chunk(s) holding the head's bias"


def test_the_trainer_keeps_one_wire_copy_with_deltas_and_none_without(fake_store):
    model = _model()
    with_delta = _updater(fake_store, model)
    with_delta.update_weights()
    manifest = with_delta.registry.read_manifest(with_delta.version)
    assert with_delta._delta is not None and with_delta._delta._buffer.nbytes == manifest.total_bytes
    assert manifest.total_bytes < sum(p.numel() for p in model.parameters()) * 2 + 4096  # bf16, not fp32
    plain = RedisWeightUpdater(RedisStore(fake_store.client, "plain"), model, 1, sync=False)
    plain.update_weights()
    assert plain._delta is None


def test_the_planner_keeps_the_committed_cast_stream_and_the_encoder_stages_in_its_old_buffer(fake_store):
    """Two wire-size buffers alternate: the committed version's staging buffer becomes the planner's
    base and the old base the next staging buffer; nothing is copied, every push stays bit-exact.
    The second buffer exists from the keyframe's commit on (faulted in then, not in the first delta
    push's cast)."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    updater = _updater(fake_store, model)
    worker = _receiver(fake_store, 1)
    buffers = []
    for step in range(5):
        if step:
            _step(model, optimizer)
        updater.update_weights()
        buffers.append(updater._delta._buffer)
        staging = updater._encoder._staging
        assert staging is not None and not np.shares_memory(staging.numpy(), buffers[-1])
        assert worker.poll() == updater.version and _exact(worker.policy, _wire(model))
    assert updater.registry.read_manifest(updater.version).depth == 4  # every push after the first a delta
    assert len({b.ctypes.data for b in buffers}) == 2  # from the keyframe on: two buffers, traded


@pytest.mark.parametrize("bad", [dict(wire_dtype=torch.int8), dict(keyframe_interval=0),
                                 dict(keyframe_interval=65), dict(keyframe_fraction=0.0)])  # fmt: skip
def test_bad_delta_options_are_refused(fake_store, bad):
    with pytest.raises(ConfigurationError):
        RedisWeightUpdater(fake_store, _model(), 1, sync=False, **bad)


def test_a_dense_step_is_a_keyframe_decided_from_samples_with_no_diff_and_no_copy_of_the_model(fake_store,
                                                                                               monkeypatch):
    """fp32 steps that move every element: each push is a keyframe decided from a few 128 KiB samples
    (no chunk diffed, the planner keeps samples, not a copy of the model); the first sparse push after
    them is a keyframe too (nothing to diff against), the next one a delta; every worker bit-exact."""
    from redis_weights.format import delta, patch

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(1024, 512, bias=False) for _ in range(8)))  # 16 MiB: 16 chunks of 1 MiB
    updater = RedisWeightUpdater(fake_store, model, 1, sync=False, chunk_size=1 << 20, delta=True)
    worker = _receiver(fake_store, 1, nn.Sequential(*(nn.Linear(1024, 512, bias=False) for _ in range(8))))
    planner = updater._delta
    diffed, estimated = [], []
    real_diff, real_estimate = delta.DeltaPlanner._diff, patch.estimate_from_sample
    monkeypatch.setattr(delta.DeltaPlanner, "_diff", lambda self, *a: diffed.append(a) or real_diff(self, *a))
    monkeypatch.setattr(patch, "estimate_from_sample", lambda *a: estimated.append(1) or real_estimate(*a))

    def push(dense: bool) -> bool:
        with torch.no_grad():
            if dense:
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 1e-3)
            else:
                model[0].weight[0, 0] += 1.0
        diffed.clear()
        estimated.clear()
        updater.update_weights()
        assert worker.poll() == updater.version, worker.last_error
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), worker.policy.state_dict().values(),
                                                     strict=True))  # fmt: skip
        return updater.registry.read_manifest(updater.version).is_keyframe

    assert push(dense=True) and planner._full  # the first push: a keyframe, the stream kept to diff the next
    for _ in range(2):
        assert push(dense=True)
        assert not diffed and len(estimated) <= delta.SPREAD_SAMPLES, "decided on a few samples"
        assert not planner._full and planner._samples is not None
        kept = sum(len(s) for s in planner._samples.values())
        assert kept <= 16 * (128 << 10) + 4096  # samples (and the short last chunk), not the model
    assert push(dense=False) and planner._full  # sparse at last, but no stream to diff against: a keyframe
    assert not push(dense=False) and diffed  # then a delta again


def test_after_a_density_keyframe_a_sparse_step_in_the_short_last_chunk_is_estimated_not_counted_whole():
    """The planner keeps a short last chunk whole beside the samples: a step that changes one element
    there projects a small patch, so a model whose last chunk is large never stays a keyframe."""
    from redis_weights.format.codec import Encoder
    from redis_weights.format.delta import DeltaPlanner

    weights = {"a": torch.randn(262144), "b": torch.randn(180000)}  # 1 MiB, then a last chunk of ~720 KB
    first = Encoder(1 << 20).encode(weights)
    assert first.chunk_sizes[-1] > 512 * 1024
    planner = DeltaPlanner(20, 0.5)
    manifest = first.manifest(1, keyframe=1)
    planner._dense = True  # as after a push whose samples said "dense"
    planner.committed(first, manifest)
    assert not planner._full
    with torch.no_grad():
        weights["b"][5] += 1.0
    second = Encoder(1 << 20).encode(weights)
    projected = planner._projected_bytes(second, manifest, set(second.ids), 0.5 * second.total_bytes)
    assert 0 < projected < second.chunk_sizes[-1] / 10


def _planned(threads: int, fraction: float, monkeypatch) -> tuple[object, dict[str, bytes], DeltaPlanner]:
    """The second version's plan of a 16-chunk bf16 model diffed in regions of two chunks by ``threads``."""
    from redis_weights.format import delta
    from redis_weights.format.codec import Encoder

    monkeypatch.setattr(delta, "DIFF_BYTES", 2 * 16384)
    generator = torch.Generator().manual_seed(3)
    weights = {"w": torch.randn(16 * 8192, generator=generator).bfloat16()}
    planner = delta.DeltaPlanner(20, fraction, threads)
    first = Encoder(16384, torch.bfloat16).encode(weights)
    planner.committed(first, first.manifest(1, keyframe=1))
    with torch.no_grad():  # a sparse step: ~3% of the elements, in every chunk
        changed = torch.rand(weights["w"].shape, generator=generator) < 0.03
        weights["w"][changed] += 1.0
    second = Encoder(16384, torch.bfloat16).encode(weights)
    manifest, packs = planner.plan(second, 2, set(second.ids) - set(first.ids))  # Redis holds the first version
    return manifest, packs, planner


def test_diff_threads_make_the_same_patches_and_an_early_stop_leaves_no_diff_running(monkeypatch):
    """Regions diffed side by side are taken in order: the same manifest and packs as one thread; a
    keyframe decided by the budget midway returns only once no diff thread still reads the old stream."""
    import threading
    import time

    one, one_packs, _ = _planned(1, 0.5, monkeypatch)
    two, two_packs, planner = _planned(2, 0.5, monkeypatch)
    assert one_packs and two_packs == one_packs
    assert two == one and two.depth == 1
    planner.close()
    assert not any(t.name.startswith("redis-weights-diff") for t in threading.enumerate())

    running, started = [0], [0]
    diff = DeltaPlanner._diff

    def slow_diff(self, *args):
        running[0] += 1
        started[0] += 1
        try:
            time.sleep(0.05)  # still running when the first region's patches already exceed the budget
            return diff(self, *args)
        finally:
            running[0] -= 1

    monkeypatch.setattr(DeltaPlanner, "_diff", slow_diff)
    stopped, packs, planner = _planned(2, 0.01, monkeypatch)  # the budget is spent by the first region
    assert stopped.depth == 0 and stopped.keyframe == 2 and not packs
    assert running[0] == 0 and 2 <= started[0] < 8  # stopped early, and waited for the diff in flight
    planner.close()
