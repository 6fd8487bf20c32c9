"""Overlap (``staging.py``): workers stage a version's chunks while the trainer writes them, apply after the commit.

The trainer is a process (``tests/trainer_main.py``) whose upload pauses where the test
says, so what the workers do during the upload is observed, not timed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from redis_weights import RedisStore, RedisWeightReceiver, RedisWeightUpdater
from redis_weights.backend.deployment import Deployment
from redis_weights.backend.keys import Keys
from redis_weights.format.codec import Encoder
from redis_weights.protocol import staging
from redis_weights.protocol.chunkstore import ChunkStore
from redis_weights.protocol.push import publish
from redis_weights.protocol.staging import PLAN_TTL, announce, hinted_version, read_plan, stage, still_planned
from redis_weights.protocol.versions import VersionRegistry
from redis_weights.tools.admin import drop_namespace
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


@dataclass
class Fleet:
    """Two worker processes on one namespace, shared by the tests of this module (starting
    processes is what costs here); each test pushes a fresh version first."""

    url: str
    store: RedisStore
    workers: dict[int, Worker]
    tmp: Path

    def push(self, seed: int) -> tuple[int, str]:
        version, digest = _push(self.store, seed, len(self.workers))
        for w in self.workers.values():
            assert w.wait_version(version) == digest
        return version, digest

    @contextmanager
    def paused_upload(self, seed: int, block_after: int) -> Iterator[tuple[Trainer, Path, int]]:
        """A trainer paused after ``block_after`` chunks, once every worker staged them:
        ``(trainer, go file, the planned version)``; stopped on exit."""
        trainer, go = _trainer(self.tmp, self.url, self.store.keyspace.namespace, seed, block_after, len(self.workers))
        try:
            eventually(lambda: trainer.record("blocked"), timeout=60, what="the trainer to pause mid-upload")
            planned = int(self.store.client.hget(self.store.keyspace.plan, "version"))
            for w in self.workers.values():  # the chunks written so far are staged, before any commit
                eventually(lambda w=w: _staged(w, planned) >= set(range(block_after)),
                           what="the written chunks to be staged")  # fmt: skip
            yield trainer, go, planned
        finally:
            trainer.stop()

    def latest(self) -> int:
        return int(self.store.client.get(self.store.keyspace.latest))


@pytest.fixture(scope="module")
def fleet(redis_server, tmp_path_factory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("overlap")
    namespace = f"t{uuid.uuid4().hex[:12]}"
    store = RedisStore.from_url(redis_server.url, namespace)
    try:
        with workers(tmp, redis_server.url, namespace, [1, 2], "--model", MODEL, "--stage-stall", "2") as ws:
            yield Fleet(redis_server.url, store, ws, tmp)
    finally:
        drop_namespace(store.client, store.keyspace)
        store.close()


@pytest.mark.server
def test_workers_stage_chunks_during_a_slow_upload_and_apply_bit_exact_after_the_commit(fleet):
    v1, d1 = fleet.push(seed=1)
    with fleet.paused_upload(seed=2, block_after=6) as (trainer, go, v2):
        assert fleet.latest() == v1
        assert all(v2 not in w.applied() for w in fleet.workers.values())  # staged, never applied before the commit
        go.touch()
        eventually(lambda: trainer.record("pushed"), timeout=60, what="the trainer's commit")
        digest = trainer.record("pushed")["digest"]
    assert digest != d1
    total = sum(t.numel() * 4 for t in make_model(MODEL, seed=2).state_dict().values())
    for w in fleet.workers.values():
        assert w.wait_version(v2) == digest  # bit-exact
        record = next(r for r in w.records() if r.get("version") == v2)
        assert record["fetched"] < total  # the staged chunks were not downloaded again


@pytest.mark.server
def test_a_trainer_killed_mid_upload_leaves_the_workers_on_their_weights_and_the_next_push_applies(fleet):
    v1, d1 = fleet.push(seed=4)
    with fleet.paused_upload(seed=5, block_after=8) as (trainer, _, v2):
        trainer.kill()  # dies with its plan announced, before its commit
    for w in fleet.workers.values():  # the stagers give up on the dead plan (no new chunk for 2 s)
        eventually(lambda w=w: any(r.get("stage_ended") == v2 for r in w.records()), what="staging to stop")
    assert fleet.latest() == v1
    assert all(v2 not in w.applied() and w.applied()[v1] == d1 for w in fleet.workers.values())
    v3, _ = fleet.push(seed=6)  # bit-exact, checked by push
    assert v3 > v2 and all(v2 not in w.applied() for w in fleet.workers.values())


@pytest.mark.server
def test_a_plan_superseded_by_a_newer_push_is_never_applied(fleet):
    fleet.push(seed=7)
    with fleet.paused_upload(seed=8, block_after=5) as (trainer, go, v2):
        v3, _ = fleet.push(seed=9)  # a second writer commits a newer version
        go.touch()  # the first trainer's commit is refused as stale
        eventually(lambda: trainer.record("error"), timeout=60, what="the stale commit to be refused")
        assert "StaleVersionError" in trainer.record("error")["error"]
    assert all(v2 not in w.applied() for w in fleet.workers.values())
    assert fleet.latest() == v3


@pytest.mark.server
def test_the_host_cache_fetcher_streams_the_plan_into_the_shared_file(tmp_path, real_store, redis_url, namespace):
    cache = tmp_path / "cache"
    with workers(tmp_path, redis_url, namespace, [1, 2], "--model", MODEL, "--host-cache", str(cache),
                 *STALL) as ws:  # fmt: skip
        v1, d1 = _push(real_store, seed=1, num_workers=2)
        for w in ws.values():
            assert w.wait_version(v1) == d1
        trainer, go = _trainer(tmp_path, redis_url, namespace, seed=2, block_after=7, workers_=2)
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
    assert read_plan(fake_redis, k) is None  # no push allocated version 4
    fake_redis.set(k.counter, 4)
    plan = read_plan(fake_redis, k)
    assert plan is not None and plan.version == 4 and plan.ids == manifest.ids
    assert still_planned(fake_redis, k, 4) and not still_planned(fake_redis, k, 3)
    fake_redis.set(k.latest, 4)
    assert not still_planned(fake_redis, k, 4)  # committed
    fake_redis.set(k.latest, "garbage")
    assert not still_planned(fake_redis, k, 4)
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
    assert not still_planned(fake_redis, k, 4)


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


def test_stage_reads_every_chunk_past_the_first_window_over_an_older_version(fake_redis, monkeypatch):
    """A receive buffer that holds the previous version (every chunk changed): staging goes on past its
    first window until every chunk of the plan is in (it once stopped after one window, because the
    chunks beyond it still held the previous version's ids)."""
    monkeypatch.setattr(staging, "WINDOW_CHUNKS", 1)
    k = Keys("t")
    old, new = Encoder(4096).encode(_weights(1)), Encoder(4096).encode(_weights(2))
    manifest = new.manifest(2)
    assert manifest.num_chunks >= 3 and not set(old.ids) & set(new.ids)
    store = ChunkStore(fake_redis, k, Deployment(fake_redis))
    store.write((i, *new.chunk(n)) for n, i in enumerate(new.ids))
    target = memoryview(bytearray(manifest.total_bytes))
    held: list[str | None] = list(old.ids)
    got = stage(store, manifest, target, held, current=lambda: True, stall=0.05)
    assert held == manifest.ids and got == manifest.total_bytes


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
        real_store.client.set(real_store.keyspace.counter, 6)  # versions 5 and 6 allocated
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


# -- hostile plans: bounded work, never a delayed apply ------------------------------------------------

HOSTILE_CHUNK = 4096  # a 4 MB model in 1025 chunks that are never written


@contextmanager
def _hostile_setup(real_store, redis_url, namespace) -> Iterator[tuple[RedisWeightReceiver, list[int], set[str]]]:
    """A receiver on version 1 (a 4 MB model) whose chunk reads are counted: ``(receiver, keys read of
    the hostile plan's chunks per call, the plan's ids)``; the plan (``_hostile_plan``) is announced by
    the test, as anyone with a worker's rights can."""
    policy = make_model("mb:4", seed=None)
    receiver = RedisWeightReceiver(RedisStore.from_url(redis_url, namespace), 1, policy)
    try:
        RedisWeightUpdater(real_store, make_model("mb:4", seed=1), num_workers=1, sync=False).update_weights()
        assert receiver.poll() == 1
        ids = set(Encoder(HOSTILE_CHUNK).encode(make_model("mb:4", seed=9).state_dict()).ids)
        reads: list[int] = []
        chunks = receiver.registry.chunks
        real_read = chunks.read_into

        def counted(chunk_ids, sizes, target):
            reads.append(sum(1 for i in chunk_ids if i in ids))
            return real_read(chunk_ids, sizes, target)

        chunks.read_into = counted  # type: ignore[method-assign]
        yield receiver, reads, ids
    finally:
        receiver.close()


def _hostile_plan(store: RedisStore, version: int):
    plan = Encoder(HOSTILE_CHUNK).encode(make_model("mb:4", seed=9).state_dict()).manifest(version)
    announce(store.client, store.keyspace, plan)
    return plan


@pytest.mark.server
def test_a_hostile_plan_never_delays_the_apply_of_a_commit(real_store, redis_url, namespace, monkeypatch):
    """A trainer has allocated version 2 and is uploading it; someone bumps the counter and announces a
    plan of a later version whose chunks never come. The commit of version 2 is applied after at most
    one read round of the plan (before: every worker kept staging until the stall limit)."""
    monkeypatch.setattr(staging, "STALL_SECONDS", 0.5)  # the bound the test would otherwise wait for
    with _hostile_setup(real_store, redis_url, namespace) as (receiver, reads, _):
        registry = VersionRegistry(real_store.deployment, real_store.keyspace)
        second = registry.read_manifest(1).renumbered(registry.allocate(), created=time.time(), producer="t")  # v2
        real_store.client.set(real_store.keyspace.counter, 1000)  # the hostile INCRs
        plan = _hostile_plan(real_store, 1000)
        assert plan.num_chunks > 1000
        read = receiver.registry.chunks.read_into

        def commit_during_the_first_round(chunk_ids, sizes, target):
            got = read(chunk_ids, sizes, target)
            if len(reads) == 1:
                publish(registry, second, [1])
            return got

        receiver.registry.chunks.read_into = commit_during_the_first_round  # type: ignore[method-assign]
        receiver._plan_hint = 1000  # its hint, as if the message had arrived
        assert receiver.poll() == 2  # applied in the same poll, once the round ended
        assert sum(reads) <= staging.WINDOW_CHUNKS, reads  # one round, of one window
        assert receiver.version == 2 and receiver.last_error is None


@pytest.mark.server
def test_a_plan_whose_chunks_never_come_costs_bounded_reads_once(real_store, redis_url, namespace, monkeypatch):
    """However many chunks a plan lists, a stager reads at most ``WINDOW_CHUNKS`` per round until the
    stall limit (before: every missing chunk every round, ~30k GETs a second), and a repeated hint of
    the same plan costs nothing; a plan of a version no push allocated is not even read."""
    stall = 0.3
    monkeypatch.setattr(staging, "STALL_SECONDS", stall)
    with _hostile_setup(real_store, redis_url, namespace) as (receiver, reads, _):
        real_store.client.set(real_store.keyspace.counter, 50)
        _hostile_plan(real_store, 50)
        receiver._plan_hint = 50
        assert receiver.poll() is None and receiver.version == 1
        # pauses double from _PAUSE_MIN up to _PAUSE_MAX and add up to less than the stall limit
        rounds = 1 + 4 + stall / staging._PAUSE_MAX + 1
        assert 0 < sum(reads) <= staging.WINDOW_CHUNKS * rounds, (sum(reads), len(reads))
        assert max(reads) <= staging.WINDOW_CHUNKS
        spent = sum(reads)
        receiver._plan_hint = 50  # the same hint again (repeated every few seconds)
        assert receiver.poll() is None and sum(reads) == spent
        _hostile_plan(real_store, 10**6)  # far in the future: above the counter
        receiver._plan_hint = 10**6
        assert receiver.poll() is None and sum(reads) == spent and receiver.staged_bytes == 0
        assert receiver.last_error is None


def test_wait_for_commit_ends_at_the_commit_an_abandoned_plan_or_the_stall():
    looks = iter([False, False, True])
    assert staging.wait_for_commit(lambda: next(looks), lambda: True, stall=5)
    assert not staging.wait_for_commit(lambda: False, lambda: False, stall=5)  # superseded: at once
    started = time.monotonic()
    assert not staging.wait_for_commit(lambda: False, lambda: True, stall=0.05)  # the trainer died: bounded
    assert time.monotonic() - started < 2
