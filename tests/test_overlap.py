"""Overlap (``staging.py``): workers stage a version's chunks while the trainer writes them, apply after the commit.

The trainer is a process (``tests/trainer_main.py``) whose upload pauses where the test
says, so what the workers do during the upload is observed, not timed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from redis_weights import RedisStore, RedisWeightReceiver, RedisWeightUpdater
from redis_weights.chunkstore import ChunkStore
from redis_weights.codec import Encoder
from redis_weights.deployment import Deployment
from redis_weights.keys import Keys
from redis_weights.staging import PLAN_TTL, announce, hinted_version, plan_version, read_plan, stage
from tests.faults_support import eventually
from tests.models import make_model, state_digest
from tests.procs import Worker, workers


MODEL = "mb:4"  # one 1024x1024 layer and its bias: 4 MB
CHUNK = 256 * 1024  # 17 chunks
STALL = ["--stage-stall", "60"]  # a stager waits as long as the test needs (the trainer pauses on purpose)


class Trainer(Worker):
    """A ``tests/trainer_main.py`` process."""

    module = "tests.trainer_main"

    def record(self, key: str) -> dict | None:
        return next((r for r in self.records() if key in r), None)


def _trainer(tmp_path: Path, url: str, namespace: str, seed: int, block_after: int, workers_: int) -> tuple[Trainer, Path]:
    go = tmp_path / f"go-{seed}"
    out = tmp_path / f"trainer-{seed}.jsonl"
    args = ["--url", url, "--namespace", namespace, "--model", MODEL, "--seed", str(seed), "--chunk-size", str(CHUNK),
            "--block-after", str(block_after), "--go", str(go), "--workers", str(workers_)]  # fmt: skip
    return Trainer(out, args), go


def _staged(worker: Worker, version: int) -> set[int]:
    return {r["index"] for r in worker.records() if r.get("staged") == version and "index" in r}


def _push(store, seed: int, num_workers: int) -> tuple[int, str]:
    model = make_model(MODEL, seed=seed)
    updater = RedisWeightUpdater(store, model, num_workers=num_workers, sync=True, chunk_size=CHUNK, timeout=30,
                                 overlap_min_bytes=0)  # fmt: skip
    updater.update_weights()
    return updater.version, state_digest(model)


@pytest.mark.server
def test_workers_stage_chunks_during_a_slow_upload_and_apply_bit_exact_after_the_commit(
    tmp_path, real_store, redis_url, namespace
):
    with workers(tmp_path, redis_url, namespace, [1, 2], "--model", MODEL, *STALL) as ws:
        v1, d1 = _push(real_store, seed=1, num_workers=2)
        for w in ws.values():
            assert w.wait_version(v1) == d1
        trainer, go = _trainer(tmp_path, redis_url, namespace, seed=2, block_after=6, workers_=2)
        try:
            eventually(lambda: trainer.record("blocked"), timeout=60, what="the trainer to pause mid-upload")
            v2 = real_store.client.hget(real_store.keyspace.plan, "version")
            assert v2 is not None
            v2 = int(v2)
            for w in ws.values():  # the six chunks written so far are staged, before any commit
                eventually(lambda w=w: _staged(w, v2) >= set(range(6)), what="the written chunks to be staged")
            assert int(real_store.client.get(real_store.keyspace.latest)) == v1
            assert all(v2 not in w.applied() for w in ws.values())  # staged, never applied before the commit
            go.touch()
            eventually(lambda: trainer.record("pushed"), timeout=60, what="the trainer's commit")
            digest = trainer.record("pushed")["digest"]
            assert digest != d1
            for w in ws.values():
                assert w.wait_version(v2) == digest  # bit-exact
                record = next(r for r in w.records() if r.get("version") == v2)
                total = sum(c.numel() * 4 for c in make_model(MODEL, seed=2).state_dict().values())
                assert record["fetched"] < total  # the staged chunks were not downloaded again
        finally:
            trainer.stop()


@pytest.mark.server
def test_a_trainer_killed_mid_upload_leaves_the_workers_on_their_weights_and_the_next_push_applies(
    tmp_path, real_store, redis_url, namespace
):
    with workers(tmp_path, redis_url, namespace, [1], "--model", MODEL, "--stage-stall", "1") as ws:
        v1, d1 = _push(real_store, seed=1, num_workers=1)
        assert ws[1].wait_version(v1) == d1
        trainer, _ = _trainer(tmp_path, redis_url, namespace, seed=2, block_after=8, workers_=1)
        try:
            eventually(lambda: trainer.record("blocked"), timeout=60, what="the trainer to pause mid-upload")
            v2 = int(real_store.client.hget(real_store.keyspace.plan, "version"))
            eventually(lambda: _staged(ws[1], v2) >= set(range(8)), what="the written chunks to be staged")
        finally:
            trainer.kill()  # dies with its plan announced, before its commit
        assert int(real_store.client.get(real_store.keyspace.latest)) == v1
        assert list(ws[1].applied()) == [v1]
        v3, d3 = _push(real_store, seed=3, num_workers=1)  # after the stager gave up on the dead plan
        assert v3 > v2
        assert ws[1].wait_version(v3) == d3
        assert v2 not in ws[1].applied()


@pytest.mark.server
def test_a_plan_superseded_by_a_newer_push_is_never_applied(tmp_path, real_store, redis_url, namespace):
    with workers(tmp_path, redis_url, namespace, [1], "--model", MODEL, *STALL) as ws:
        v1, d1 = _push(real_store, seed=1, num_workers=1)
        assert ws[1].wait_version(v1) == d1
        trainer, go = _trainer(tmp_path, redis_url, namespace, seed=2, block_after=5, workers_=1)
        try:
            eventually(lambda: trainer.record("blocked"), timeout=60, what="the trainer to pause mid-upload")
            v2 = int(real_store.client.hget(real_store.keyspace.plan, "version"))
            eventually(lambda: _staged(ws[1], v2) >= set(range(5)), what="the written chunks to be staged")
            v3, d3 = _push(real_store, seed=3, num_workers=1)  # a second writer commits a newer version
            assert ws[1].wait_version(v3) == d3
            go.touch()  # the first trainer's commit is refused as stale
            eventually(lambda: trainer.record("error"), timeout=60, what="the stale commit to be refused")
            assert "StaleVersionError" in trainer.record("error")["error"]
        finally:
            trainer.stop()
        assert v2 not in ws[1].applied()
        assert int(real_store.client.get(real_store.keyspace.latest)) == v3


@pytest.mark.server
def test_the_host_cache_fetcher_streams_the_plan_into_the_shared_file(tmp_path, real_store, redis_url, namespace):
    cache = tmp_path / "cache"
    with workers(tmp_path, redis_url, namespace, [1, 2, 3], "--model", MODEL, "--host-cache", str(cache),
                 *STALL) as ws:  # fmt: skip
        v1, d1 = _push(real_store, seed=1, num_workers=3)
        for w in ws.values():
            assert w.wait_version(v1) == d1
        trainer, go = _trainer(tmp_path, redis_url, namespace, seed=2, block_after=7, workers_=3)
        try:
            eventually(lambda: trainer.record("blocked"), timeout=60, what="the trainer to pause mid-upload")
            v2 = int(real_store.client.hget(real_store.keyspace.plan, "version"))
            eventually(lambda: any(_staged(w, v2) >= set(range(7)) for w in ws.values()),
                       what="one worker to stage the written chunks")  # fmt: skip
            stagers = [r for r, w in ws.items() if _staged(w, v2)]
            assert len(stagers) == 1  # one fetch per host: the others wait for its file
            go.touch()
            eventually(lambda: trainer.record("pushed"), timeout=60, what="the trainer's commit")
            digest = trainer.record("pushed")["digest"]
            for w in ws.values():
                assert w.wait_version(v2) == digest
            files = sorted(p.name for p in cache.rglob(f"v{v2}-*.safetensors"))
            assert len(files) == 1
        finally:
            trainer.stop()


@pytest.mark.server
def test_small_pushes_are_not_announced(real_store):
    model = make_model("mlp", seed=1)
    updater = RedisWeightUpdater(real_store, model, num_workers=1, sync=False)
    updater.update_weights()
    assert not real_store.client.exists(real_store.keyspace.plan)
    big = RedisWeightUpdater(real_store, make_model("mlp", seed=2), num_workers=1, sync=False, overlap_min_bytes=0)
    big.update_weights()
    assert int(real_store.client.hget(real_store.keyspace.plan, "version")) == big.version


# -- the plan protocol, its hostile values (read from Redis, checked, never trusted) -------------


def _weights(seed: int) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(3000, generator=torch.Generator().manual_seed(seed))}  # 12 KB: 3 chunks of 4 KiB


def _manifest(version: int, seed: int = 1):
    return Encoder(4096).encode(_weights(seed)).manifest(version)


@pytest.mark.parametrize("message, expected", [
    ("plan:3", 3), ("plan:-1", None), ("plan:x", None), ("3", None), ("plan:", None),
    ("plan:99999999999999999999", None), ("plan:\u0661", None), ("xplan:3", None),
])  # fmt: skip
def test_only_plan_messages_with_a_version_number_are_hints(message, expected):
    assert hinted_version(message) == expected


def test_read_plan_returns_the_announced_manifest(fake_redis):
    k = Keys("t")
    manifest = _manifest(4)
    announce(fake_redis, k, manifest)
    plan = read_plan(fake_redis, k)
    assert plan is not None and plan.version == 4 and plan.ids == manifest.ids
    assert plan_version(fake_redis, k) == 4
    assert 0 < fake_redis.pttl(k.plan) <= PLAN_TTL * 1000


@pytest.mark.parametrize("fields", [
    {"version": "abc", "manifest": "{}"},
    {"version": "-2", "manifest": "{}"},
    {"version": "4"},
    {"version": "4", "manifest": "not json"},
    {"version": "4", "manifest": '{"format": "redis_weights/2"}'},
    {"version": "5", "manifest": "MANIFEST"},  # version 4's manifest under version 5
])  # fmt: skip
def test_hostile_plans_are_ignored(fake_redis, fields):
    k = Keys("t")
    fields = {f: (_manifest(4).to_json() if v == "MANIFEST" else v) for f, v in fields.items()}
    fake_redis.hset(k.plan, mapping=fields)
    assert read_plan(fake_redis, k) is None


def test_a_plan_larger_than_the_limit_is_not_downloaded(fake_redis):
    k = Keys("t")
    announce(fake_redis, k, _manifest(4))
    assert read_plan(fake_redis, k, max_bytes=100) is None
    fake_redis.hset(k.plan, "version", "x" * 50)
    assert plan_version(fake_redis, k) == 0


def test_stage_reads_what_is_written_and_verifies_every_chunk(fake_redis):
    k = Keys("t")
    encoded = Encoder(4096).encode(_weights(1))
    manifest = encoded.manifest(2)
    store = ChunkStore(fake_redis, k, Deployment(fake_redis))
    assert manifest.num_chunks >= 2
    store.write([(encoded.ids[0], *encoded.chunk(0))])  # only the first chunk written so far
    fake_redis.set(k.chunk(encoded.ids[1]), b"x" * manifest.chunk_sizes[1])  # wrong bytes under an id
    target = memoryview(bytearray(manifest.total_bytes))
    held: list[str | None] = []
    got = stage(store, manifest, target, held, current=lambda: True, stall=0.05)
    assert got == manifest.chunk_sizes[0]
    assert held[0] == encoded.ids[0] and all(h is None for h in held[1:])  # the corrupt one is not held
    assert bytes(target[: manifest.chunk_sizes[0]]) == bytes(encoded.chunk(0)[0])
    fake_redis.delete(k.chunk(encoded.ids[1]))
    store.write((i, *encoded.chunk(n)) for n, i in enumerate(encoded.ids))  # the rest is written
    stage(store, manifest, target, held, current=lambda: True, stall=0.05)
    assert held == manifest.ids


def test_stage_stops_when_the_plan_is_no_longer_current(fake_redis):
    k = Keys("t")
    manifest = _manifest(2)
    store = ChunkStore(fake_redis, k, Deployment(fake_redis))
    calls = []
    held: list[str | None] = []
    got = stage(store, manifest, memoryview(bytearray(manifest.total_bytes)), held,
                current=lambda: calls.append(1) or False, stall=60)  # fmt: skip
    assert got == 0 and calls == [1] and held == [None] * manifest.num_chunks


@pytest.mark.server
def test_a_receiver_never_applies_a_plan_and_ignores_one_that_does_not_fit(real_store, redis_url, namespace):
    policy = make_model("mlp", seed=None)
    receiver = RedisWeightReceiver(RedisStore.from_url(redis_url, namespace), 1, policy)
    try:
        RedisWeightUpdater(real_store, make_model("mlp", seed=1), num_workers=1, sync=False).update_weights()
        assert receiver.poll() == 1
        before = state_digest(policy)
        model2 = make_model("mlp", seed=2)
        encoded = Encoder(4096).encode({k_: v for k_, v in model2.state_dict().items()})
        plan = encoded.manifest(5)
        ChunkStore(real_store.client, real_store.keyspace, Deployment(real_store.client)).write(
            (i, *encoded.chunk(n)) for n, i in enumerate(encoded.ids))  # fmt: skip
        announce(real_store.client, real_store.keyspace, plan)
        receiver._plan_hint = 5  # the hint, as if its message had arrived
        assert receiver.poll() is None  # staged, not applied: nothing committed it
        assert receiver.version == 1 and state_digest(policy) == before
        assert receiver.staged_bytes == plan.total_bytes
        wrong = Encoder(4096).encode({"other": make_model("mb:4", seed=1)[0].weight.detach()}).manifest(6)
        announce(real_store.client, real_store.keyspace, wrong)
        receiver._plan_hint = 6
        assert receiver.poll() is None and receiver.staged_bytes == plan.total_bytes  # does not fit: ignored
        assert receiver.version == 1 and receiver.last_error is None
    finally:
        receiver.close()
