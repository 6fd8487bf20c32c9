"""Fault suite, in-process side: a real server the test kills, restarts, pauses or reconfigures.

Workers here are receivers running their background thread in the test process
(each with its own connections); the faults that need a worker or trainer
*process* (SIGKILL) are in ``test_faults_procs.py``. The fault matrix is in
``docs/faults.md``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
import torch

import redis_weights.protocol.chunkstore as chunkstore_module
from redis_weights import (
    BackgroundUploadError,
    PushError,
    PushTimeoutError,
    ReceiveTimeoutError,
    RedisStore,
    RedisWeightReceiver,
    RedisWeightUpdater,
    StaleVersionError,
)
from redis_weights.backend import bulkread
from redis_weights.protocol import ranks
from redis_weights.protocol.push import publish
from redis_weights.tools.admin import Admin, drop_namespace
from tests.faults_support import eventually, perturb
from tests.models import make_model, state_digest

pytestmark = pytest.mark.server

FAST = {"poll_interval": 0.2, "heartbeat_ttl": 1.5}
CHUNK = 64 * 1024  # the "mb:1" model (one 1024x1024 layer) spans ~65 chunks


@contextmanager
def receiver(url: str, namespace: str, rank: int, model, **options) -> Iterator[RedisWeightReceiver]:
    """A started receiver with its own connections; closed even when the test fails."""
    r = RedisWeightReceiver(RedisStore.from_url(url, namespace), rank, model, **{**FAST, **options})
    r.start()
    try:
        yield r
    finally:
        r.close()


class Digests:
    """Digest of the worker's weights at every apply: proves no partial version was ever applied."""

    def __init__(self, r: RedisWeightReceiver) -> None:
        self.seen: list[str] = []
        r.register_post_hook(lambda version: self.seen.append(state_digest(r.policy)))


def _pipeline_hook(client: redis.Redis, on_execute, monkeypatch) -> None:
    """Call ``on_execute(n)`` before the n-th round trip of chunks ``client`` makes: a pipeline
    ``execute()``, or one round of the receiver's direct chunk reads (``bulkread``)."""
    real_pipeline = client.pipeline
    real_send_round = bulkread._send_round
    count = [0]

    def pipeline(*args, **kwargs):
        pipe = real_pipeline(*args, **kwargs)
        real_execute = pipe.execute

        def execute(*a, **kw):
            count[0] += 1
            on_execute(count[0])
            return real_execute(*a, **kw)

        pipe.execute = execute
        return pipe

    def send_round(c, connection, keys):
        if c is client:
            count[0] += 1
            on_execute(count[0])
        return real_send_round(c, connection, keys)

    monkeypatch.setattr(client, "pipeline", pipeline)
    monkeypatch.setattr(bulkread, "_send_round", send_round)


# ---------------------------------------------------------------------------------------
# 1. Redis killed during a push, restarted (with persistence: the orphan chunks survive)
# ---------------------------------------------------------------------------------------
@pytest.fixture
def aof_server(server_factory):
    return server_factory("--appendonly", "yes", "--appendfsync", "always")


def test_redis_killed_between_chunks_push_fails_clearly_then_everything_recovers(aof_server, namespace, monkeypatch):
    monkeypatch.setattr(chunkstore_module, "ROUND_BYTES", CHUNK)  # one round trip per chunk
    monkeypatch.setattr(chunkstore_module, "READ_ROUND_BYTES", CHUNK)
    url = aof_server.url
    model = make_model("mb:1", seed=1)
    updater = RedisWeightUpdater(RedisStore.from_url(url, namespace), model, 1, sync=True, timeout=20, chunk_size=CHUNK)
    with receiver(url, namespace, 1, make_model("mb:1")) as worker:
        digests = Digests(worker)
        updater.update_weights()
        v1, d1 = updater.version, state_digest(model)

        _pipeline_hook(updater.store.client, lambda n: aof_server.kill() if n == 3 else None, monkeypatch)
        perturb(model, 2)
        started = time.monotonic()
        with pytest.raises(PushError, match="unreachable") as info:
            updater.update_weights()
        assert time.monotonic() - started < 15, "a dead server must fail the push, not hang it"
        assert "not committed" in str(info.value)
        assert state_digest(worker.policy) == d1

        aof_server.start()  # same port, same data
        admin = redis.Redis(port=aof_server.port)
        k = updater.keyspace
        assert int(admin.get(k.latest)) == v1, "the interrupted version must not be the latest"
        orphan = v1 + 1
        assert not admin.exists(k.manifest(orphan))
        (record,) = admin.scan_iter(match=k.pending_pattern)  # the orphans' protection outlives no push long
        assert 0 < admin.pttl(record) <= updater.pending_ttl * 1000, "a pending record must expire"

        perturb(model, 3)
        updater.update_weights()  # the next push works; the worker reconnected by itself
        assert updater.version > orphan
        assert worker.version == updater.version and state_digest(worker.policy) == state_digest(model)
        assert digests.seen == [d1, state_digest(model)], "a worker applied something it should not have"
        admin.close()
    updater.close()


def test_redis_killed_during_the_commit_push_fails_clearly_then_recovers(aof_server, namespace):
    url = aof_server.url
    model = make_model("mlp", seed=4)
    updater = RedisWeightUpdater(RedisStore.from_url(url, namespace), model, 1, sync=True, timeout=20)
    admin = redis.Redis(port=aof_server.port)
    with receiver(url, namespace, 1, make_model("mlp")) as worker:
        updater.update_weights()
        v1, d1 = updater.version, state_digest(model)
        real_commit = updater.registry._commit

        def commit_then_crash(*args, **kwargs):
            # The commit script is sent while writes are paused; the server dies before running it.
            admin.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
            threading.Timer(0.3, aof_server.kill).start()
            return real_commit(*args, **kwargs)

        updater.registry._commit = commit_then_crash
        perturb(model, 5)
        with pytest.raises(PushError, match="unreachable") as info:
            updater.update_weights()
        assert "could not be confirmed" in str(info.value)
        updater.registry._commit = real_commit
        aof_server.start()
        admin = redis.Redis(port=aof_server.port)
        assert int(admin.get(updater.keyspace.latest)) == v1
        assert state_digest(worker.policy) == d1
        perturb(model, 6)
        updater.update_weights()
        assert state_digest(worker.policy) == state_digest(model)
    admin.close()
    updater.close()


# ---------------------------------------------------------------------------------------
# 2. Redis restarted empty while workers run
# ---------------------------------------------------------------------------------------
def test_redis_restarted_empty_workers_keep_weights_report_the_loss_and_follow(server_factory, namespace):
    server = server_factory()
    model = make_model("mlp", seed=7)
    updater = RedisWeightUpdater(RedisStore.from_url(server.url, namespace), model, 2, sync=True, timeout=20)
    with receiver(server.url, namespace, 1, make_model("mlp")) as w1, receiver(
        server.url, namespace, 2, make_model("mlp")
    ) as w2:
        updater.update_weights()
        updater.update_weights()
        before, d_before = updater.version, state_digest(model)
        server.kill()
        server.start()  # no persistence: empty
        for w in (w1, w2):
            eventually(lambda w=w: w.last_error and "no committed version" in w.last_error, what="loss reported")
            assert w.version == before and state_digest(w.policy) == d_before, "weights must be kept"
        statuses = [s.status for s in updater.workers()]
        assert all(s and s.startswith("error: Redis holds no committed version") for s in statuses), statuses

        perturb(model, 8)
        updater.update_weights()  # sync: returns only once both ranks applied it
        assert updater.version > before, "version numbers never go backwards"
        for w in (w1, w2):
            assert w.version == updater.version and state_digest(w.policy) == state_digest(model)
            assert w.last_error is None
        assert [s.status for s in updater.workers()] == ["updated", "updated"]
    updater.close()


# ---------------------------------------------------------------------------------------
# 5. Lost notifications
# ---------------------------------------------------------------------------------------
def _numsub(client: redis.Redis, channel: str) -> int:
    return int(dict(client.pubsub_numsub(channel))[channel.encode()])


def test_pubsub_connection_killed_worker_resubscribes_and_applies(redis_url, real_store, namespace):
    model = make_model("mlp", seed=9)
    updater = RedisWeightUpdater(real_store, model, 1, sync=True, timeout=20)
    channel = real_store.keyspace.updates_channel
    with receiver(redis_url, namespace, 1, make_model("mlp"), poll_interval=4.0) as worker:
        eventually(lambda: _numsub(real_store.client, channel) == 1, what="subscribed")
        real_store.client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        perturb(model, 10)
        updater.update_weights()  # the notification may be lost; the poll finds it
        assert worker.version == updater.version
        eventually(lambda: _numsub(real_store.client, channel) == 1, what="resubscribed")
        perturb(model, 11)
        started = time.monotonic()
        updater.update_weights()
        assert time.monotonic() - started < 3.0, "notifications must work again (poll interval is 4 s)"
        assert state_digest(worker.policy) == state_digest(model)
        assert worker._thread is not None and worker._thread.is_alive()


def test_notifications_dropped_for_good_worker_applies_within_its_poll_interval(server_factory, namespace, caplog):
    server = server_factory()
    admin = redis.Redis(port=server.port)
    admin.execute_command("ACL", "SETUSER", "trainer", "on", ">pw", "~*", "&*", "+@all")
    trainer_url = f"redis://trainer:pw@127.0.0.1:{server.port}/0"
    model = make_model("mlp", seed=12)
    updater = RedisWeightUpdater(RedisStore.from_url(trainer_url, namespace), model, 1, sync=True, timeout=20)
    channel = updater.keyspace.updates_channel
    with receiver(server.url, namespace, 1, make_model("mlp"), poll_interval=1.0) as worker:
        updater.update_weights()
        # The worker's user loses its channel rights: its subscription is killed and every
        # resubscription refused, so no notification can reach it any more.
        admin.execute_command("ACL", "SETUSER", "default", "resetchannels")
        admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        for step in range(3):
            assert _numsub(admin, channel) == 0
            perturb(model, 13 + step)
            started = time.monotonic()
            updater.update_weights()
            assert time.monotonic() - started < 1.0 + 2.0, "must apply within about one poll interval"
            assert state_digest(worker.policy) == state_digest(model)
        assert worker._thread is not None and worker._thread.is_alive(), "the receiver thread died"
        # The acks' PUBLISH is refused too: only a hint, it must not fail the ack (and raise at every poll).
        assert not [r for r in caplog.records if "Redis error" in r.getMessage()], "an ack failed"
        # The trainer loses its channel rights as well: the commit's PUBLISH is refused, the commit is not.
        admin.execute_command("ACL", "SETUSER", "trainer", "resetchannels")
        unheard = RedisWeightUpdater(RedisStore.from_url(trainer_url, namespace), model, 1, sync=False,
                                     check_server=False)  # fmt: skip
        perturb(model, 20)
        unheard.update_weights()
        assert unheard.version == updater.version + 1
        eventually(lambda: worker.version == unheard.version, what="the worker applies it")
        assert state_digest(worker.policy) == state_digest(model)
        unheard.close()
        # The sync updater's own acks subscription is gone and refused: it decides by polling.
        admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        for step in range(2):
            perturb(model, 21 + step)
            updater.update_weights()  # returns only once rank 1 reads "updated" at this version
            assert worker.version == updater.version
            assert state_digest(worker.policy) == state_digest(model)
        refused = [r for r in caplog.records if "acks subscription refused" in r.getMessage()]
        assert len(refused) == 1, "one warning, not one per poll"
    updater.close()
    admin.close()


# ---------------------------------------------------------------------------------------
# 6. GC while a slow worker reads an old version
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("when", ["before the chunks", "between chunk rounds"])
def test_gc_while_a_worker_reads_an_old_version(real_store, redis_url, namespace, monkeypatch, when):
    monkeypatch.setattr(chunkstore_module, "ROUND_BYTES", CHUNK)
    monkeypatch.setattr(chunkstore_module, "READ_ROUND_BYTES", CHUNK)  # one read round per chunk
    model = make_model("mb:1", seed=20)
    updater = RedisWeightUpdater(real_store, model, 1, sync=False, retention=1, chunk_size=CHUNK)
    updater.update_weights()
    committed = {updater.version: state_digest(model)}
    worker = RedisWeightReceiver(RedisStore.from_url(redis_url, namespace), 1, make_model("mb:1"), **FAST)
    digests = Digests(worker)
    fired = []

    def push_two_more_versions() -> None:  # retention=1: the version being read is deleted
        fired.append(True)
        for step in (21, 22):
            perturb(model, step)
            updater.update_weights()
            committed[updater.version] = state_digest(model)

    target_round = 1 if when == "before the chunks" else 3
    _pipeline_hook(worker.store.client, lambda n: push_two_more_versions() if n == target_round else None, monkeypatch)
    try:
        applied = worker.poll()
    finally:
        worker.close()
    assert fired
    assert applied == updater.version, "the worker must move on to latest"
    assert digests.seen == [committed[updater.version]], "applied a mix, or an old version"
    assert worker.last_error is None


# ---------------------------------------------------------------------------------------
# 7. Two trainers on one namespace
# ---------------------------------------------------------------------------------------
def test_two_trainers_versions_stay_monotonic_and_a_stale_commit_is_refused(real_store, redis_url, namespace):
    a_model, b_model = make_model("mlp", seed=30), make_model("mlp", seed=31)
    a = RedisWeightUpdater(real_store, a_model, 1, sync=False)
    b = RedisWeightUpdater(RedisStore.from_url(redis_url, namespace), b_model, 1, sync=False)
    seen = []
    for updater in (a, b, a, b):
        updater.update_weights()
        seen.append(updater.version)
    assert seen == sorted(set(seen)), f"versions must strictly increase: {seen}"

    # Interleaved: a allocates, b allocates and commits a newer version, then a commits.
    real_commit = a.registry.commit

    def b_overtakes(manifest, ranks=(), **kwargs):
        b.update_weights()
        real_commit(manifest, ranks, **kwargs)

    a.registry.commit = b_overtakes
    with pytest.raises(StaleVersionError, match="second trainer") as info:
        a.update_weights()
    assert f"latest is already {b.version}" in str(info.value)
    assert a.registry.latest() == b.version, "latest must never go backwards"
    a.registry.commit = real_commit
    worker = RedisWeightReceiver(RedisStore.from_url(redis_url, namespace), 1, make_model("mlp"))
    try:
        assert worker.poll() == b.version and state_digest(worker.policy) == state_digest(b_model)
    finally:
        worker.close()
    # the refused version left nothing behind that points at its chunks
    assert a.registry.list_versions()[-1] == b.version
    b.close()


# ---------------------------------------------------------------------------------------
# Liveness and limits
# ---------------------------------------------------------------------------------------
def test_workers_reports_alive_dead_and_lag_per_rank(real_store, redis_url, namespace):
    model = make_model("mlp", seed=40)
    updater = RedisWeightUpdater(real_store, model, 3, sync=False)
    updater.update_weights()
    first = updater.version
    with receiver(redis_url, namespace, 1, make_model("mlp"), heartbeat_ttl=0.6) as w1:
        w2 = RedisWeightReceiver(RedisStore.from_url(redis_url, namespace), 2, make_model("mlp"), heartbeat_ttl=0.6)
        assert w2.poll() == first
        w2.close()  # stops beating: dead once its TTL passes
        eventually(lambda: w1.version == first, what="rank 1 applied")
        updater.update_weights()
        updater.update_weights()
        eventually(lambda: w1.version == updater.version, what="rank 1 caught up")
        time.sleep(0.7)
        states = {s.rank: s for s in updater.workers()}
        assert states[1].alive and not states[1].dead and states[1].lag(updater.version) == 0
        assert states[1].heartbeat_age is not None and states[1].heartbeat_age < 0.6
        assert states[2].dead and not states[2].alive and states[2].version == first
        assert states[2].lag(updater.version) >= 2
        assert not states[3].joined and not states[3].alive and not states[3].dead


def test_a_hung_server_fails_calls_within_their_timeouts_and_workers_recover(server_factory, namespace):
    server = server_factory()
    options = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}
    model = make_model("mlp", seed=50)
    store = RedisStore.from_url(server.url, namespace, **options)
    updater = RedisWeightUpdater(store, model, 1, sync=True, timeout=10)
    with receiver(server.url, namespace, 1, make_model("mlp")) as worker:
        updater.update_weights()
        os.kill(server.pid, signal.SIGSTOP)  # the server hangs: connections stay open, nothing answers
        try:
            perturb(model, 51)
            started = time.monotonic()
            with pytest.raises(PushError, match="unreachable"):
                updater.update_weights()
            assert time.monotonic() - started < 10, "a hung server must not hang the trainer"
        finally:
            os.kill(server.pid, signal.SIGCONT)
        updater.update_weights()
        assert state_digest(worker.policy) == state_digest(model)
    updater.close()


def test_a_sync_push_to_a_rank_that_never_joined_times_out_naming_it(real_store):
    updater = RedisWeightUpdater(real_store, make_model("mlp", seed=60), 2, sync=True, timeout=1.0)
    started = time.monotonic()
    with pytest.raises(PushTimeoutError, match="rank 1 never joined; rank 2 never joined") as info:
        updater.update_weights()
    assert 1.0 <= time.monotonic() - started < 5
    assert info.value.lagging == [1, 2]


def test_receiver_wait_times_out(real_store):
    worker = RedisWeightReceiver(real_store, 1, {"w": torch.zeros(1)}, poll_interval=0.1)
    with pytest.raises(ReceiveTimeoutError, match="no new version within 0.5s"):
        worker.wait(timeout=0.5)


def test_redis_and_trainer_restarted_together_a_repeated_version_number_is_still_applied(server_factory, namespace):
    """Both lost their memory: the new trainer's first version gets the number the worker already holds."""
    server = server_factory()
    old = make_model("mlp", seed=70)
    first = RedisWeightUpdater(RedisStore.from_url(server.url, namespace), old, 1, sync=False)
    first.update_weights()
    worker = RedisWeightReceiver(RedisStore.from_url(server.url, namespace), 1, make_model("mlp"), **FAST)
    try:
        assert worker.poll() == first.version == 1
        server.kill()
        server.start()  # empty
        first.close()
        new = make_model("mlp", seed=71)
        second = RedisWeightUpdater(RedisStore.from_url(server.url, namespace), new, 1, sync=False)
        second.update_weights()
        assert second.version == 1, "a fresh trainer on an empty Redis starts again at 1"
        assert worker.poll() == 1, "the worker must not take the new version 1 for the one it holds"
        assert state_digest(worker.policy) == state_digest(new)
        assert second.workers()[0].status == "updated"
        second.close()
    finally:
        worker.close()


def test_a_loss_report_never_hides_a_newer_pending_version(real_store, redis_url, namespace, monkeypatch):
    """The worker reads ``latest`` = 0 (data lost); a trainer commits before its report lands."""
    model = make_model("mlp", seed=72)
    updater = RedisWeightUpdater(real_store, model, 1, sync=False)
    for _ in range(3):
        updater.update_weights()
    worker = RedisWeightReceiver(RedisStore.from_url(redis_url, namespace), 1, make_model("mlp"), **FAST)
    try:
        assert worker.poll() == updater.version == 3
        drop_namespace(real_store.client, real_store.keyspace)  # data lost
        updater = RedisWeightUpdater(real_store, model, 1, sync=False)  # a restarted trainer
        updater.update_weights()  # version 1, status "pending"
        assert updater.version == 1
        monkeypatch.setattr(worker.registry, "latest", lambda: 0)  # the worker's stale view: nothing committed
        assert worker.poll() is None and "no committed version" in worker.last_error
        assert updater.workers()[0].status == "pending", "the loss report overwrote a newer pending status"
    finally:
        worker.close()


def test_retried_commands_are_idempotent(real_store, redis_url, namespace):
    """The client retries on connection errors: a commit or an ack sent twice changes nothing;
    a commit that is not above ``latest`` is refused; a late ack never hides a newer "pending"."""
    from redis_weights.format.codec import Encoder

    updater = RedisWeightUpdater(real_store, make_model("mlp", seed=80), 1, sync=False)
    worker = RedisWeightReceiver(RedisStore.from_url(redis_url, namespace), 1, make_model("mlp"), **FAST)
    registry, k, client = updater.registry, real_store.keyspace, real_store.client

    def state() -> tuple:
        keys = [k.latest, k.rank_status(1), k.rank_version(1), k.manifest(1), k.manifest(2)]
        return tuple(client.mget(keys)) + (tuple(registry.list_versions()),)

    try:
        updater.update_weights()
        updater.update_weights()
        assert updater.version == 2 and worker.poll() == 2
        before = state()
        assert before[:3] == (b"2", b"updated", b"2")

        publish(registry, registry.read_manifest(2), [1])  # the same commit again, as a retry would send it
        assert state() == before, "a retried commit must change nothing (nor re-mark the rank pending)"
        worker._report(2, "updated")  # the same ack again
        assert state() == before, "a retried ack must change nothing"

        older = Encoder().encode(make_model("mlp", seed=81)).manifest(1, created=0, producer="x")
        epoch = registry.begin("retry", [])
        with pytest.raises(StaleVersionError, match="latest is already 2"):
            registry.commit(older, [1], epoch=epoch, token="retry")  # below latest: refused, version 1 untouched
        assert state() == before

        updater.update_weights()  # version 3: the rank is "pending"
        worker._report(2, "updated")  # a late retry of the ack of version 2
        assert client.mget(k.rank_status(1), k.rank_version(1)) == [b"pending", b"2"]
    finally:
        worker.close()


# ---------------------------------------------------------------------------------------
# 14. Redis refuses writes (maxmemory reached with noeviction)
# ---------------------------------------------------------------------------------------
def _chunk_keys(admin: redis.Redis, keyspace) -> list[bytes]:
    return list(admin.scan_iter(match=keyspace.chunk_pattern))


def test_a_push_refused_for_lack_of_memory_is_a_push_error_and_the_next_push_works(server_factory, namespace):
    """``maxmemory`` + ``noeviction``: Redis answers OOM; the push raises one ``PushError`` (a
    ``RuntimeError``), nothing is committed, no chunk is left behind, the worker keeps its weights."""
    server = server_factory("--maxmemory-policy", "noeviction")
    admin = redis.Redis(port=server.port)
    model = make_model("mb:4", seed=90)  # one 4 MiB layer
    updater = RedisWeightUpdater(RedisStore.from_url(server.url, namespace), model, 1, sync=True, timeout=20)
    with receiver(server.url, namespace, 1, make_model("mb:4")) as worker:
        admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) + 1024 * 1024)  # 1 MiB of room
        with pytest.raises(PushError, match=r"push of version 1 failed: .*OutOfMemoryError.*gc --keep 1") as info:
            updater.update_weights()
        assert isinstance(info.value, RuntimeError) and info.value.version == 1
        assert isinstance(info.value.__cause__, redis.exceptions.OutOfMemoryError)
        k = updater.keyspace
        assert admin.get(k.latest) is None and not admin.exists(k.manifest(1))
        assert _chunk_keys(admin, k) == [], "the chunks of a refused push must not stay in Redis"
        assert worker.version == 0 and state_digest(worker.policy) == state_digest(make_model("mb:4"))

        admin.config_set("maxmemory", 0)
        updater.update_weights()
        assert worker.version == updater.version == 2
        assert state_digest(worker.policy) == state_digest(model)
    updater.close()
    admin.close()


def test_a_background_push_refused_for_lack_of_memory_raises_on_the_next_call(server_factory, namespace):
    server = server_factory("--maxmemory-policy", "noeviction")
    admin = redis.Redis(port=server.port)
    updater = RedisWeightUpdater(
        RedisStore.from_url(server.url, namespace), make_model("mb:4", seed=91), 1, sync=False, background=True
    )
    admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) + 1024 * 1024)
    updater.update_weights()  # returns at once; the upload fails on the background thread
    with pytest.raises(BackgroundUploadError) as info:
        updater.flush(10)
    cause = info.value.__cause__
    assert isinstance(cause, PushError) and cause.version == 1 and "OutOfMemoryError" in str(cause)
    assert isinstance(cause.__cause__, redis.exceptions.OutOfMemoryError)
    assert _chunk_keys(admin, updater.keyspace) == []
    admin.config_set("maxmemory", 0)
    updater.update_weights()
    updater.flush(10)
    assert updater.registry.latest() == updater.version == 2
    updater.close()
    admin.close()


def test_retention_is_not_wedged_when_redis_is_over_maxmemory(server_factory, namespace):
    """Issue 12: GC used to run inside MULTI/EXEC, which Redis refuses over maxmemory, so every push
    and every operator's gc failed out of memory. Now deleting works while Redis is full, the OOM
    error says what helps, and after `gc --keep 1` the next push goes through with no config change."""
    server = server_factory("--maxmemory-policy", "noeviction")
    admin = redis.Redis(port=server.port)
    model = make_model("mb:4", seed=92)  # one 4 MiB layer: every version has its own 4 MiB of chunks
    store = RedisStore.from_url(server.url, namespace)
    updater = RedisWeightUpdater(store, model, 1, sync=False, retention=3)
    for step in range(3):
        perturb(model, 100 + step)
        updater.update_weights()
    assert len(updater.registry.list_versions()) == 3
    admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) - 1024 * 1024)  # over the limit
    perturb(model, 110)
    with pytest.raises(PushError, match=r"OutOfMemoryError.*`redis-weights gc --keep 1` frees older versions"):
        updater.update_weights()
    with Admin(RedisStore.from_url(server.url, namespace)) as operator:
        deleted = operator.gc(1)  # while Redis is still over maxmemory
    assert len(deleted) == 2 and len(updater.registry.list_versions()) == 1
    perturb(model, 111)
    updater.update_weights()  # room again: the next push works, maxmemory unchanged
    assert updater.registry.latest() == updater.version
    assert len(updater.registry.list_versions()) == 2
    held = {k.decode() for k in _chunk_keys(admin, updater.keyspace)}
    referenced = set().union(*(updater.registry.read_manifest(v).objects() for v in updater.registry.list_versions()))
    assert held == {updater.keyspace.chunk(i) for i in referenced}, "orphans or lost chunks after the cleanup"
    updater.close()
    admin.close()



# ---------------------------------------------------------------------------------------
# 15. A worker's ack lost (Redis blip after the apply)
# ---------------------------------------------------------------------------------------
def test_a_lost_ack_is_sent_again_and_the_sync_push_completes(real_store, redis_url, namespace, monkeypatch):
    """The ack script fails once after the weights were applied: the next poll sends it again."""
    model = make_model("mlp", seed=95)
    updater = RedisWeightUpdater(real_store, model, 1, sync=True, timeout=10)
    with receiver(redis_url, namespace, 1, make_model("mlp")) as worker:
        real_ack, sent = ranks.ack, []

        def ack_lost_once(client, keyspace, rank, version, status):
            sent.append([version, status])
            if len(sent) == 1:
                raise redis.exceptions.ConnectionError("connection reset while acking")
            return real_ack(client, keyspace, rank, version, status)

        monkeypatch.setattr(ranks, "ack", ack_lost_once)
        updater.update_weights()  # before the fix: PushTimeoutError, the rank stays "pending"
        assert sent[:2] == [[1, "updated"], [1, "updated"]]
        state = updater.workers()[0]
        assert (state.status, state.version) == ("updated", 1)
        assert state_digest(worker.policy) == state_digest(model)
        count = len(sent)
        assert worker.poll() is None and len(sent) == count, "a confirmed ack is not sent again"
    updater.close()
