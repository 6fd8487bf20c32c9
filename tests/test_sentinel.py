"""Sentinel: URLs, pushes and reads through a Sentinel-managed service, WAIT, replica reads, failovers.

Everything but the URL parsing runs against real processes (``LocalSentinelSet``: a
primary, a replica and sentinels on loopback, started and stopped by pid). The
tests that do not kill anything share one set; each failover test gets its own,
with three sentinels (Sentinel's documented minimum for a quorum) and
``down-after-milliseconds`` 1000 (Sentinel's default is 30 000).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import redis

import redis_weights.protocol.chunkstore as chunkstore_module
from redis_weights import ConfigurationError, PushError, RedisStore, RedisWeightReceiver, RedisWeightUpdater
from redis_weights.backend.deployment import client_from_url, redacted
from redis_weights.backend.deployment.sentinel import DEFAULT_PORT, parse_url
from redis_weights.tools.admin import drop_namespace
from redis_weights.tools.server import LocalRedisServer, LocalSentinelSet
from tests.conftest import REPO_ROOT, _need_server
from tests.faults_support import eventually, perturb
from tests.models import make_model, state_digest
from tests.procs import wait_ready, workers

CHUNK = 64 * 1024


# ---------------------------------------------------------------------------------------
# URLs (unit)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("url, sentinels, service, db, tls, options, sentinel_options", [
    ("redis+sentinel://h1:26380,h2/mymaster", (("h1", 26380), ("h2", DEFAULT_PORT)), "mymaster", 0, False, {}, {}),
    ("redis+sentinel://u:p%40ss@h1:1/svc/3", (("h1", 1),), "svc", 3, False, {"username": "u", "password": "p@ss"}, {}),
    ("rediss+sentinel://:pw@[::1]:5000,10.0.0.2:5001/svc?socket_timeout=2&sentinel_password=sp",
     (("::1", 5000), ("10.0.0.2", 5001)), "svc", 0, True, {"password": "pw", "socket_timeout": 2.0},
     {"password": "sp"}),
    ("redis+sentinel://h/svc/1?db=2&sentinel_username=watcher", (("h", DEFAULT_PORT),), "svc", 2, False, {},
     {"username": "watcher"}),
])  # fmt: skip
def test_a_sentinel_url_gives_the_sentinels_the_service_the_database_and_the_options(
    url, sentinels, service, db, tls, options, sentinel_options
):
    target = parse_url(url, shown=redacted(url))
    assert (target.sentinels, target.service, target.db, target.tls) == (sentinels, service, db, tls)
    assert dict(target.options) == options and dict(target.sentinel_options) == sentinel_options


@pytest.mark.parametrize("url, why", [
    ("redis+sentinel://:hunter2@h1:26379", "no service name"),
    ("redis+sentinel://:hunter2@h1:26379/", "no service name"),
    ("redis+sentinel://:hunter2@h1:port/svc", "is not a port number"),
    ("redis+sentinel://:hunter2@h1:26379,/svc", "without a host"),
    ("redis+sentinel://:hunter2@h1/svc/zero", "is not a number"),
    ("redis+sentinel://:hunter2@h1/svc/0/extra", "path segments"),
    ("redis+sentinel://:hunter2@h1/svc?socket_timeout=soon", "invalid value"),
    ("redis+sentinel://:hun#ter2@h1/svc", "percent-encode"),
])  # fmt: skip
def test_a_malformed_sentinel_url_is_one_configuration_error_without_the_password(url, why):
    with pytest.raises(ConfigurationError, match=why) as info:
        client_from_url(url)
    assert "hunter2" not in str(info.value) and "hun#ter2" not in str(info.value)


def test_sentinel_passwords_are_redacted_in_the_userinfo_and_the_query():
    url = "rediss+sentinel://app:s3cret@h1:26379,h2:26379/svc/0?sentinel_password=watch&socket_timeout=2"
    assert redacted(url) == "rediss+sentinel://app:***@h1:26379,h2:26379/svc/0?sentinel_password=***&socket_timeout=2"


# ---------------------------------------------------------------------------------------
# A shared set: primary, replica, one sentinel
# ---------------------------------------------------------------------------------------
SERVER_FIXTURES = ("sentinel_set", "failover_set")  # conftest marks the tests that use them ``server``


@pytest.fixture(scope="module")
def sentinel_set() -> Iterator[LocalSentinelSet]:
    _need_server()
    with LocalSentinelSet(replicas=1, sentinels=1) as service:
        yield service


@pytest.fixture
def sentinel_store(sentinel_set, namespace) -> Iterator[RedisStore]:
    store = RedisStore.from_url(sentinel_set.url, namespace)
    yield store
    drop_namespace(store.client, store.keyspace)
    store.close()


def _node(server: LocalRedisServer) -> redis.Redis:
    return redis.Redis(host=server.host, port=server.port, socket_timeout=5)


def _on(server: LocalRedisServer, store: RedisStore, version: int) -> set[str]:
    """The objects of ``version`` (read from the primary) that ``server`` lacks."""
    objects = _registry(store).read_manifest(version).objects()
    with _node(server) as client:
        return {i for i in objects if not client.exists(store.keyspace.chunk(i))}


def _gets(server: LocalRedisServer) -> int:
    """GET commands ``server`` has run (``INFO commandstats``)."""
    with _node(server) as client:
        return int(client.info("commandstats").get("cmdstat_get", {}).get("calls", 0))


def _registry(store: RedisStore):
    from redis_weights import VersionRegistry

    return VersionRegistry(store.deployment, store.keyspace)


def test_a_sentinel_store_names_the_service_and_scopes_by_it_never_by_the_primary(sentinel_set, namespace):
    url = sentinel_set.url.replace("redis+sentinel://", "redis+sentinel://app:s3cret@") + "?sentinel_password=w4tch"
    with RedisStore.from_url(url, namespace) as secret:  # never connected: only what it says is checked
        said = f"{secret.deployment.describe()} {secret.deployment.scope()} {secret!r}"
        assert "s3cret" not in said and "w4tch" not in said
    with RedisStore.from_url(sentinel_set.url, namespace) as store:
        store.client.ping()
        where, scope = store.deployment.describe(), store.deployment.scope()
        primary = sentinel_set.primary()
        assert sentinel_set.service in where and f"{primary.port}" in where  # messages name the node too
        assert sentinel_set.service in scope and f"{primary.port}" not in scope  # the cache key does not
        assert store.deployment.masters()[0][0] == f"{primary.host}:{primary.port}"


def test_push_and_receive_through_a_sentinel_url_with_worker_processes(sentinel_set, sentinel_store, tmp_path):
    model = make_model("mlp", seed=3)
    with workers(tmp_path, sentinel_set.url, sentinel_store.namespace, [1, 2], "--poll-interval", "0.2") as procs:
        with RedisWeightUpdater(sentinel_store, model, 2, timeout=30) as updater:
            for step in range(2):
                perturb(model, step)
                updater.update_weights()
                for w in procs.values():
                    assert w.wait_version(updater.version) == state_digest(model)
            assert updater.last_push is not None and "replicas" in updater.last_push.seconds
            assert not _on(sentinel_set.replicas()[0], sentinel_store, updater.version)


def test_the_cli_reads_through_a_sentinel_url(sentinel_set, sentinel_store):
    with RedisWeightUpdater(sentinel_store, make_model("mlp", seed=1), 1, sync=False) as updater:
        updater.update_weights()
        version = updater.version
    env = {**os.environ, "REDIS_URL": sentinel_set.url, "REDIS_WEIGHTS_NAMESPACE": sentinel_store.namespace}
    result = subprocess.run([sys.executable, "-m", "redis_weights", "versions"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert str(version) in result.stdout


# ---------------------------------------------------------------------------------------
# WAIT before the commit
# ---------------------------------------------------------------------------------------
def test_a_paused_replica_fails_a_push_that_requires_it_and_only_slows_a_best_effort_one(
    sentinel_set, sentinel_store, caplog
):
    model = make_model("mlp", seed=5)
    replica = sentinel_set.replicas()[0]
    strict = RedisWeightUpdater(sentinel_store, model, 1, sync=False, min_replicas=1, replica_timeout=0.5)
    best_effort = RedisWeightUpdater(RedisStore(sentinel_store.client, sentinel_store.namespace), model, 1,
                                     sync=False, replica_timeout=0.5)  # fmt: skip
    strict.update_weights()
    assert not _on(replica, sentinel_store, strict.version), "WAIT returned before the replica held every chunk"
    committed = strict.version
    os.kill(replica.pid, signal.SIGSTOP)
    try:
        perturb(model, 1)
        with pytest.raises(PushError, match=r"fewer replicas than min_replicas=1 .* 0 of 1 .*not committed") as info:
            strict.update_weights()
        assert info.value.version == committed + 1
        assert _registry(sentinel_store).latest() == committed
        with caplog.at_level(logging.WARNING, logger="redis_weights.trainer.updater"):
            best_effort.update_weights()  # waits replica_timeout, warns, commits
        assert _registry(sentinel_store).latest() == best_effort.version > committed
        assert best_effort.last_push.seconds["replicas"] >= 0.5
        assert any("0 of 1" in r.getMessage() and "committed anyway" in r.getMessage() for r in caplog.records)
    finally:
        os.kill(replica.pid, signal.SIGCONT)
    perturb(model, 2)
    strict.update_weights()  # the replica is back: the requirement is met again
    assert not _on(replica, sentinel_store, strict.version)
    best_effort.close()
    strict.close()


# ---------------------------------------------------------------------------------------
# Replica reads
# ---------------------------------------------------------------------------------------
def test_a_worker_reads_chunks_from_the_replica_and_one_the_replica_lacks_from_the_primary(
    sentinel_set, sentinel_store, monkeypatch
):
    monkeypatch.setattr(chunkstore_module, "READ_ROUND_BYTES", CHUNK)  # several rounds, so a gap sits mid-read
    model = make_model("mb:1", seed=7)
    with RedisWeightUpdater(sentinel_store, model, 2, sync=False, chunk_size=CHUNK, min_replicas=1) as updater:
        updater.update_weights()
        version = updater.version
    manifest = _registry(sentinel_store).read_manifest(version)
    sentinel_set.wait_until_replicas_listed()  # an earlier test paused it: the sentinels must list it again
    replica = sentinel_set.replicas()[0]
    first = RedisWeightReceiver(RedisStore.from_url(sentinel_set.url, sentinel_store.namespace), 1,
                                make_model("mb:1"), read_from_replicas=True)  # fmt: skip
    gets = _gets(replica)
    assert first.poll() == version and state_digest(first.policy) == state_digest(model)
    assert _gets(replica) - gets >= manifest.num_chunks, "the chunks were not read from the replica"
    first.close()

    gone = manifest.ids[manifest.num_chunks // 2]
    with _node(replica) as client:  # a replica that lags: it lacks one chunk the primary has
        client.config_set("replica-read-only", "no")
        client.delete(sentinel_store.keyspace.chunk(gone))
        client.config_set("replica-read-only", "yes")
    second = RedisWeightReceiver(RedisStore.from_url(sentinel_set.url, sentinel_store.namespace), 2,
                                 make_model("mb:1"), read_from_replicas=True)  # fmt: skip
    gets = _gets(replica)
    # bit-exact although the replica lacks a chunk: that one came from the primary
    assert second.poll() == version and state_digest(second.policy) == state_digest(model)
    assert _gets(replica) - gets >= manifest.num_chunks, "the chunks were not read from the replica"
    second.close()


def test_replica_reads_need_a_sentinel_deployment(redis_server, namespace):
    with pytest.raises(ConfigurationError, match="replica reads need a Redis Cluster or a Sentinel service"):
        RedisWeightReceiver(RedisStore.from_url(redis_server.url, namespace), 1, make_model("mlp"),
                            read_from_replicas=True)  # fmt: skip


# ---------------------------------------------------------------------------------------
# Failovers (a set of their own each)
# ---------------------------------------------------------------------------------------
@pytest.fixture
def failover_set() -> Iterator[LocalSentinelSet]:
    _need_server()
    with LocalSentinelSet(replicas=1, sentinels=3) as service:
        yield service


def _kill_at_round(client: redis.Redis, round_number: int, kill, monkeypatch) -> list[float]:
    """Call ``kill()`` before the ``round_number``-th pipeline round trip of ``client``; the time it did."""
    real_pipeline = client.pipeline
    count, killed = [0], []

    def pipeline(*args, **kwargs):
        pipe = real_pipeline(*args, **kwargs)
        real_execute = pipe.execute

        def execute(*a, **kw):
            count[0] += 1
            if count[0] == round_number and not killed:
                kill()
                killed.append(time.monotonic())
            return real_execute(*a, **kw)

        pipe.execute = execute
        return pipe

    monkeypatch.setattr(client, "pipeline", pipeline)
    return killed


def test_the_primary_killed_mid_push_one_push_error_then_the_next_push_succeeds_and_workers_converge(
    failover_set, namespace, tmp_path, monkeypatch
):
    monkeypatch.setattr(chunkstore_module, "ROUND_BYTES", CHUNK)  # one round trip per chunk
    url = failover_set.url
    model = make_model("mb:1", seed=11)
    store = RedisStore.from_url(url, namespace)
    common = ["--poll-interval", "0.2", "--heartbeat-ttl", "2", "--model", "mb:1"]
    with workers(tmp_path, url, namespace, [1], *common, ready=False) as plain, \
            workers(tmp_path, url, namespace, [2], *common, "--read-from-replicas", ready=False) as from_replicas:
        wait_ready(plain, from_replicas)
        procs = {**plain, **from_replicas}  # rank 2 reads chunks from the replica, which becomes the primary
        updater = RedisWeightUpdater(store, model, 2, timeout=30, chunk_size=CHUNK)
        updater.update_weights()
        old = failover_set.primary()
        killed = _kill_at_round(store.client, 4, old.kill, monkeypatch)  # mid-upload
        perturb(model, 1)
        with pytest.raises(PushError, match="unreachable") as info:
            updater.update_weights()
        assert killed and info.value.version == updater.version + 1
        assert f"push of version {info.value.version} failed" in str(info.value)
        perturb(model, 2)
        updater.update_weights()  # waits for the sentinels to promote the replica, then goes through
        recovered = time.monotonic() - killed[0]
        print(f"\nfirst successful push {recovered:.2f}s after the primary was killed")
        new = failover_set.primary()
        assert new is not old and not _on(new, store, updater.version), "a committed version lacks chunks"
        for w in procs.values():
            assert w.wait_version(updater.version) == state_digest(model)
        assert store.deployment.scope() == RedisStore.from_url(url, namespace).deployment.scope()
        updater.close()


def test_a_failover_during_the_ack_wait_names_no_live_rank_dead(failover_set, namespace, tmp_path):
    """Heartbeats (TTL 1 s) expire while no primary takes writes: the ranks are alive, and the push says so."""
    url = failover_set.url
    model = make_model("mlp", seed=13)
    with workers(tmp_path, url, namespace, [1, 2], "--poll-interval", "0.2", "--heartbeat-ttl", "1",
                 "--apply-delay", "1.5") as procs:  # fmt: skip
        with RedisWeightUpdater(RedisStore.from_url(url, namespace), model, 2, timeout=40) as updater:
            updater.update_weights()
            old = failover_set.primary()
            for w in procs.values():  # the next push's apply is under way when the primary dies
                w.out.write_text("")
            perturb(model, 1)

            def kill_once_applying() -> None:
                eventually(lambda: all(any(r.get("applying") for r in w.records()) for w in procs.values()),
                           timeout=20, what="both workers applying")  # fmt: skip
                old.kill()

            killer = threading.Thread(target=kill_once_applying)
            killer.start()
            updater.update_weights()  # the commit is on the replica (WAIT); the acks come after the failover
            killer.join()
            # the push got the new primary from a sentinel; the others learn of it moments later
            eventually(lambda: failover_set.primary() is not old, timeout=15, what="the new primary")
            for w in procs.values():
                assert w.wait_version(updater.version) == state_digest(model)
            perturb(model, 2)
            updater.update_weights()  # and the next push is an ordinary one


@pytest.mark.server
def test_waiting_for_a_primary_ends_when_one_answers_or_when_the_wait_is_over(namespace):
    """No replica to promote: the wait gives up after its timeout (False); the primary back: True."""
    _need_server()
    with LocalSentinelSet(replicas=0, sentinels=1) as service, RedisStore.from_url(service.url, namespace) as store:
        assert store.deployment.wait_for_primary(1.0)
        primary = service.primary()
        primary.kill()
        assert not store.deployment.wait_for_primary(1.0), "a dead primary must not count as one"
        primary.start()  # same port: the sentinels still name it
        assert store.deployment.wait_for_primary(20.0)
        store.client.set("k", "v")  # and the client follows
        assert store.client.get("k") == b"v"
