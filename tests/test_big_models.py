"""Big models: many chunks, a long delta chain, and every operation on it (real server).

The cost of a push grows with its chunk count, so 4 KiB chunks of a small model stand in
for 2 MiB chunks of a big one. Here 1,200 chunks (5 MB) keep the test a few seconds; the
70,000-chunk shape of a 70B model (a ~280 MB stream) runs the same sequence in
``scripts/bench_chunks.py`` (keyframe, 19 deltas, late joiner, show, export, GC, rollback,
bit-exact), too slow for a test on this machine.
"""

from __future__ import annotations

import torch

from redis_weights import RedisStore, RedisWeightReceiver, RedisWeightUpdater
from redis_weights.format.manifest import MIN_CHUNK_SIZE
from redis_weights.tools.admin import Admin, manifest_dict
from scripts.bench_chunks import sparse_step, weights

CHUNKS = 1200
DEPTH = 19  # keyframe_interval 20: the longest chain


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in b)


def test_a_long_chain_of_many_chunks_keeps_every_reader_bit_exact(real_store, redis_url, namespace, tmp_path):
    trainer = weights(CHUNKS, MIN_CHUNK_SIZE)
    updater = RedisWeightUpdater(real_store, trainer, 1, sync=False, chunk_size=MIN_CHUNK_SIZE,
                                 wire_dtype=torch.bfloat16, delta=True, keyframe_interval=DEPTH + 1,
                                 retention=DEPTH + 1)  # fmt: skip
    worker = {k: torch.zeros_like(v) for k, v in trainer.items()}
    receiver = RedisWeightReceiver(RedisStore.from_url(redis_url, namespace), 1, worker)
    admin = Admin(RedisStore(real_store.client, namespace, owns_client=False))
    sizes, states = {}, {}
    try:
        for step in range(DEPTH + 1):
            if step:
                sparse_step(trainer, MIN_CHUNK_SIZE, step)
            updater.update_weights()
            assert receiver.poll() == updater.version, receiver.last_error
            assert _same(worker, trainer), f"the worker differs after push {step}"
            manifest = updater.registry.read_manifest(updater.version)
            assert manifest.depth == step and manifest.num_chunks >= CHUNKS - 2
            sizes[step] = len(manifest.to_bytes())
            states[updater.version] = {k: v.clone() for k, v in trainer.items()}
        assert sizes[DEPTH] < 1.2 * sizes[1], f"the manifest grows with the chain: {sizes}"
        assert sum(p.size for p in manifest.packs) < manifest.total_bytes / 2
        late = {k: torch.zeros_like(v) for k, v in trainer.items()}  # joins at the end of the chain
        joiner = RedisWeightReceiver(RedisStore.from_url(redis_url, namespace), 2, late)
        try:
            assert joiner.poll() == updater.version and _same(late, trainer)
        finally:
            joiner.close()
        doc = manifest_dict(admin.manifest("latest"))
        assert doc["chain_length"] == DEPTH and doc["chained_chunks"] > CHUNKS / 2
        assert len(doc["chunks"]) == manifest.num_chunks and {p["version"] for p in doc["packs"]} == set(
            range(updater.version - DEPTH + 1, updater.version + 1))
        admin.export("latest", tmp_path / "latest.safetensors")
        import safetensors.torch

        exported = safetensors.torch.load_file(str(tmp_path / "latest.safetensors"))
        assert _same(exported, trainer)
        middle = updater.version - DEPTH // 2
        rolled = admin.rollback(middle)  # a version in the middle of the chain, committed again
        assert receiver.poll() == rolled.version and _same(worker, states[middle])
        kept = set(admin.registry.list_versions())
        assert admin.gc(1) and set(admin.registry.list_versions()) == {rolled.version} < kept
        fresh = {k: torch.zeros_like(v) for k, v in trainer.items()}  # after GC: the chain it needs is whole
        third = RedisWeightReceiver(RedisStore.from_url(redis_url, namespace), 3, fresh)
        try:
            assert third.poll() == rolled.version and _same(fresh, states[middle])
        finally:
            third.close()
    finally:
        receiver.close()
        updater.close()
