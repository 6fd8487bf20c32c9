"""Reliability, second round (issue 12), against real servers; workers are processes.

Each test is a row of ``docs/faults.md`` (section "Liveness, repeated failures, causes,
secrets, values"): live ranks are never named dead (long fetches in both modes,
server stalls of every kind), a failure that repeats becomes the rank's status
instead of a silent loop, start checks and errors name the real cause, secrets stay
out of messages and command lines, advice names the right user, and values read
from Redis are checked before use.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import redis

from redis_weights import CodecError, ConfigurationError, PushError, RedisStore, RedisWeightReceiver, RedisWeightUpdater
from redis_weights.backend.keys import Keys
from redis_weights.observe.health import UnsafeServerError, check_acl
from redis_weights.protocol.ranks import read_rank_states
from redis_weights.protocol.versions import VersionRegistry
from redis_weights.tools.demo.procs import worker_command, worker_environment
from tests.conftest import REPO_ROOT
from tests.faults_support import eventually, perturb
from tests.models import make_model, state_digest
from tests.procs import workers

pytestmark = pytest.mark.server

FAST = ["--heartbeat-ttl", "1.0", "--poll-interval", "0.2"]
MiB = 1024 * 1024


# ---------------------------------------------------------------------------------------
# 1. Live ranks are never reported dead
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["background", "foreground"])
def test_a_fetch_three_heartbeat_ttls_long_keeps_the_rank_alive_in_both_modes(
    mode, tmp_path, real_store, redis_url, namespace
):
    # Without a 1 GB model: each round of chunk reads sleeps 3 s (three TTLs) first.
    model = make_model("mlp", seed=1)
    extra = ["--fetch-delay", "3.0", *(["--foreground"] if mode == "foreground" else [])]
    with workers(tmp_path, redis_url, namespace, [1], *FAST, *extra) as procs:
        updater = RedisWeightUpdater(real_store, model, num_workers=1, sync=True, timeout=30)
        updater.update_weights()  # a rank named dead would fail it
        assert procs[1].applied()[updater.version] == state_digest(model)
        assert any(r.get("fetching") for r in procs[1].records()), "the fetch was not slowed down"


def _pause_writes(server, client: redis.Redis) -> None:
    client.execute_command("CLIENT", "PAUSE", 3000, "WRITE")  # what a failover does


def _debug_sleep(server, client: redis.Redis) -> None:
    client.execute_command("DEBUG", "SLEEP", 3)  # the whole server stops answering


def _sigstop(server, client: redis.Redis) -> None:
    os.kill(server.pid, signal.SIGSTOP)  # hung: the trainer's 1 s socket timeout and its retries run out
    try:
        time.sleep(6)
    finally:
        os.kill(server.pid, signal.SIGCONT)


STALLS: dict[str, Callable[..., None]] = {"client-pause-write": _pause_writes, "debug-sleep": _debug_sleep,
                                          "sigstop": _sigstop}  # fmt: skip


@contextmanager
def stall_after_commit(server, namespace: str, after: int, stall: Callable[..., None]) -> Iterator[None]:
    """Stall the server (3 s or more: three heartbeat TTLs) as soon as a version above ``after`` is committed."""
    client = redis.Redis.from_url(server.url)
    latest = Keys(namespace).latest

    def run() -> None:
        eventually(lambda: int(client.get(latest) or 0) > after, timeout=30, what="the commit")
        stall(server, client)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(30)
        client.close()


@pytest.mark.parametrize("kind", sorted(STALLS))
def test_a_server_stall_longer_than_the_ttl_during_the_ack_wait_names_no_live_rank_dead(
    kind, tmp_path, server_factory, namespace
):
    server = server_factory("--enable-debug-command", "yes")
    model = make_model("mlp", seed=2)
    # The workers' fetch takes 0.5 s, so the stall begins while the trainer waits for the acks.
    with workers(tmp_path, server.url, namespace, [1, 2], *FAST, "--fetch-delay", "0.5") as procs:
        store = RedisStore.from_url(server.url, namespace, socket_timeout=1.0)
        with RedisWeightUpdater(store, model, num_workers=2, sync=True, timeout=40) as updater:
            updater.update_weights()
            perturb(model, 3)
            with stall_after_commit(server, namespace, updater.version, STALLS[kind]):
                updater.update_weights()  # healthy ranks named dead would fail it
            for rank in (1, 2):
                assert procs[rank].applied()[updater.version] == state_digest(model)


def test_a_rank_that_died_is_still_named_dead_when_the_server_stalls_during_the_wait(
    tmp_path, server_factory, namespace
):
    server = server_factory()
    model = make_model("mlp", seed=4)
    with workers(tmp_path, server.url, namespace, [1, 2], *FAST, "--fetch-delay", "0.5") as procs:
        with RedisWeightUpdater(RedisStore.from_url(server.url, namespace), model, num_workers=2, sync=True,
                                timeout=40) as updater:  # fmt: skip
            updater.update_weights()
            procs[2].kill()
            perturb(model, 5)
            with stall_after_commit(server, namespace, updater.version, _pause_writes):
                with pytest.raises(PushError) as info:
                    updater.update_weights()
            assert info.value.dead == [2] and "rank 2 is dead" in str(info.value)
            assert procs[1].wait_version(updater.version) == state_digest(model)


def test_a_redis_at_maxmemory_still_takes_the_heartbeats(tmp_path, server_factory, namespace):
    server = server_factory("--maxmemory", "8mb", "--maxmemory-policy", "noeviction")
    client = redis.Redis.from_url(server.url)
    with workers(tmp_path, server.url, namespace, [1], *FAST):
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            for i in range(10_000):  # fill it until it refuses writes that allocate
                client.set(f"filler:{i}", b"x" * 65536)
        time.sleep(3.0)  # three heartbeat TTLs: a heartbeat that needs a SET would have expired by now
        (state,) = read_rank_states(client, Keys(namespace), [1])
        assert state.alive and state.heartbeat_age is not None and state.heartbeat_age < 1.0, state
    client.close()


# ---------------------------------------------------------------------------------------
# 3. A failure that repeats becomes the rank's status, never a silent loop
# ---------------------------------------------------------------------------------------
def _unshare_works() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt 2>/dev/null || "
                            "mount -t tmpfs tmpfs /tmp"], capture_output=True)  # fmt: skip
    return probe.returncode == 0


def test_a_host_cache_on_a_filesystem_too_small_for_the_version_falls_back_to_the_private_buffer(
    tmp_path, real_store, redis_url, namespace
):
    if not _unshare_works():
        pytest.skip("needs unshare -rm and mount (a user and mount namespace with a small tmpfs)")
    shm = tmp_path / "shm"
    shm.mkdir()
    # The worker sees a 4 MB tmpfs on its host-cache directory, as a container sees its 64 MB /dev/shm.
    small_shm = ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=4m,mode=0700 tmpfs "$0" && exec "$@"', str(shm)]
    model = make_model("mb:8", seed=6)
    with workers(tmp_path, redis_url, namespace, [1], *FAST, "--model", "mb:8", "--host-cache", str(shm),
                 prefix=small_shm) as procs:  # fmt: skip
        updater = RedisWeightUpdater(real_store, model, num_workers=1, sync=True, timeout=30, chunk_size=2 * MiB)
        for seed in (7, 8):
            perturb(model, seed)
            updater.update_weights()
            assert procs[1].applied()[updater.version] == state_digest(model)
        assert "no room for version" in procs[1].log() and "private buffer" in procs[1].log()
        assert procs[1].log().count("no room for version") == 1, "one warning per cause, not one per version"


def test_a_fetch_that_fails_every_time_becomes_the_ranks_error_status_with_the_real_cause(
    tmp_path, server_factory, namespace
):
    server = server_factory()
    admin = redis.Redis.from_url(server.url)
    model = make_model("mb:8", seed=9)
    with workers(tmp_path, server.url, namespace, [1], *FAST, "--model", "mb:8") as procs:
        admin.config_set("client-output-buffer-limit", "normal 1mb 1mb 0")  # after the worker's start check
        store = RedisStore.from_url(server.url, namespace)
        with RedisWeightUpdater(store, model, num_workers=1, sync=True, timeout=60, chunk_size=2 * MiB) as updater:
            with pytest.raises(PushError) as info:
                updater.update_weights()
            error = info.value.errors[1]
            assert error.startswith(f"error: version {updater.version}: ") and "failed 3 times in a row" in error
            assert "client-output-buffer-limit" in error and "normal 0 0 0" in error, error
            admin.config_set("client-output-buffer-limit", "normal 0 0 0")  # the fix the status names
            perturb(model, 10)
            updater.update_weights()
            assert procs[1].applied()[updater.version] == state_digest(model)
    admin.close()


def test_latest_pointing_at_a_deleted_version_becomes_the_ranks_error_status(real_store, redis_url, namespace):
    model = make_model("mlp", seed=11)
    updater = RedisWeightUpdater(real_store, model, num_workers=1, sync=False)
    with RedisWeightReceiver(RedisStore.from_url(redis_url, namespace), 1, make_model("mlp")) as worker:
        updater.update_weights()
        eventually(lambda: worker.version == updater.version, what="version applied")
        worker.stop()  # from here on its own poll() calls apply (foreground)
        perturb(model, 12)
        updater.update_weights()
        updater.registry.delete(updater.version)  # deleted by hand (`delete --force`): latest points at nothing
        eventually(lambda: worker.poll() is None and updater.workers()[0].error, what="the error status")
        status = updater.workers()[0].status
        assert status.startswith(f"error: version {updater.version}: latest points at version {updater.version}, "
                                 "which is not in Redis"), status  # fmt: skip
        assert "failed 3 times in a row" in status and worker.version < updater.version


# ---------------------------------------------------------------------------------------
# 4. The start check catches the limits that cut every transfer; errors name them
# ---------------------------------------------------------------------------------------
def test_transfer_limits_below_the_chunk_size_fail_the_start_check_naming_them(server_factory, namespace):
    server = server_factory("--proto-max-bulk-len", "1mb")
    client = redis.Redis.from_url(server.url)
    with pytest.raises(UnsafeServerError, match="proto-max-bulk-len 1.0 MiB is below the chunk size 2.0 MiB"):
        RedisWeightUpdater(RedisStore.from_url(server.url, namespace), None, 1)
    client.config_set("proto-max-bulk-len", "512mb")
    client.config_set("client-query-buffer-limit", "2mb")
    with pytest.raises(UnsafeServerError, match="client-query-buffer-limit 2.0 MiB does not exceed the chunk size"):
        RedisWeightUpdater(RedisStore.from_url(server.url, namespace), None, 1)
    RedisWeightUpdater(RedisStore.from_url(server.url, namespace), None, 1, chunk_size=MiB).close()  # fits
    RedisWeightReceiver(RedisStore.from_url(server.url, namespace), 1, make_model("mlp")).close()  # a worker sends no chunk
    client.config_set("client-output-buffer-limit", "normal 1mb 1mb 0")
    with pytest.raises(UnsafeServerError, match="client-output-buffer-limit.*cuts every worker's fetch"):
        RedisWeightReceiver(RedisStore.from_url(server.url, namespace), 1, make_model("mlp"))
    client.close()


@pytest.mark.parametrize("setting", ["proto-max-bulk-len", "client-query-buffer-limit"])
def test_a_limit_lowered_after_the_start_is_named_by_the_push_error_not_unreachable(setting, server_factory, namespace):
    server = server_factory()
    client = redis.Redis.from_url(server.url)
    updater = RedisWeightUpdater(RedisStore.from_url(server.url, namespace), make_model("mb:8", seed=13), 1,
                                 sync=False, chunk_size=4 * MiB)  # fmt: skip
    client.config_set(setting, "1mb")
    with pytest.raises(PushError) as info:
        updater.update_weights()
    message = str(info.value)
    assert f"{setting} 1.0 MiB" in message and "cut the connection" in message, message
    assert "unreachable" not in message and "the new version was not committed" in message
    client.config_set(setting, "512mb" if setting == "proto-max-bulk-len" else "1gb")
    updater.update_weights()  # fixed as the message says
    updater.close()
    client.close()


# ---------------------------------------------------------------------------------------
# 5. Secrets stay out of messages and command lines
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("special", ["#", "?", "/"])
@pytest.mark.parametrize("pieces", [("S3cr", "Xy9z"), ("4711", "0815")])  # digits would pass for a port
def test_a_password_with_an_unencoded_special_character_never_shows_in_errors(special, pieces, redis_server, namespace):
    url = f"redis://alice:{pieces[0]}{special}{pieces[1]}@127.0.0.1:{redis_server.port}/0"
    with pytest.raises(ConfigurationError) as info:  # the library: refused at once, or at the start check
        RedisWeightUpdater(RedisStore.from_url(url, namespace), None, 1)
    assert not any(p in str(info.value) for p in pieces), str(info.value)
    for env, argv in (({}, ["--url", url]), ({"REDIS_URL": url}, [])):  # the CLI, given --url or $REDIS_URL
        result = subprocess.run([sys.executable, "-m", "redis_weights", *argv, "versions"], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=60, env={**os.environ, **env})  # fmt: skip
        assert result.returncode == 1 and result.stderr.startswith("redis-weights: error: "), result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
        assert not any(p in result.stdout + result.stderr for p in pieces), result.stderr


def test_the_demo_passes_the_url_to_its_workers_through_the_environment_and_never_prints_the_password(
    server_factory,
):
    password = "Demo-S3cret-pw"
    server = server_factory("--requirepass", password)
    url = f"redis://:{password}@127.0.0.1:{server.port}/0"
    command = worker_command(1, "demo-x", 1.0)
    assert not any(password in arg for arg in command) and "--url" not in command
    assert worker_environment(url)["REDIS_URL"] == url
    result = subprocess.run(
        [sys.executable, "-m", "redis_weights", "demo", "--workers", "1", "--size-mb", "0.5", "--versions", "1",
         "--interval", "0"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "REDIS_URL": url},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verified: every worker holds the trainer's weights" in result.stdout
    assert password not in result.stdout + result.stderr and ":***@" in result.stdout


# ---------------------------------------------------------------------------------------
# 6. Advice for the right user; 8. trainer rights
# ---------------------------------------------------------------------------------------
def test_a_user_with_the_readme_rights_is_named_right_and_a_trainer_without_del_is_refused(server_factory, namespace):
    server = server_factory()
    admin = redis.Redis.from_url(server.url)
    keys = Keys(namespace)
    rights = [f"~{keys.acl_pattern}", f"&{keys.acl_pattern}", "+@read", "+@write", "+@scripting", "+@pubsub",
              "+@connection", "+info"]  # exactly what the README lists  # fmt: skip
    admin.execute_command("ACL", "SETUSER", "alice", "on", ">pw", *rights)
    url = f"redis://alice:pw@127.0.0.1:{server.port}/0"
    store = RedisStore.from_url(url, namespace)
    finding = check_acl(store.client, keys)
    assert finding.level == "ok" and "user 'alice'" in finding.what, finding  # alice may not run ACL WHOAMI
    RedisWeightUpdater(store, None, 1).close()
    admin.execute_command("ACL", "SETUSER", "alice", "-del", "-zrem")
    finding = check_acl(store.client, keys)
    assert finding.level == "warn" and "'alice' can run a worker" in finding.what and "ACL SETUSER alice " in finding.fix
    with pytest.raises(UnsafeServerError, match=r"user 'alice' lacks rights: .*(DEL|ZREM)"):
        RedisWeightUpdater(RedisStore.from_url(url, namespace), None, 1)
    RedisWeightReceiver(RedisStore.from_url(url, namespace), 1, make_model("mlp")).close()  # a worker needs neither
    admin.close()


# ---------------------------------------------------------------------------------------
# 7. Values read from Redis are checked before use
# ---------------------------------------------------------------------------------------
def test_rank_values_that_do_not_add_up_read_as_unknown_and_the_cli_reports_them(real_store, redis_url, namespace):
    k, client = real_store.keyspace, real_store.client
    client.set(k.rank_version(1), "-5")  # a negative version
    client.set(k.rank_alive(1), "1e308")  # a TTL of 10^308 seconds
    client.set(k.rank_version(2), "99999999999999999999")  # above what a version may be
    client.set(k.rank_alive(2), "2.0")  # a heartbeat without an expiry
    client.set(k.rank_version(3), "3")
    client.set(k.rank_alive(3), "0.5", px=60_000)  # more time left than its TTL
    client.sadd(k.ranks_index, 1, 2, 3)  # the ranks joined (the index of the namespace lists them)
    one, two, three = read_rank_states(client, k, [1, 2, 3])
    assert (one.version, one.heartbeat_ttl, one.heartbeat_age) == (0, None, None)
    assert (two.version, two.heartbeat_ttl, two.heartbeat_age) == (0, 2.0, None)
    assert (three.version, three.heartbeat_age) == (3, None) and three.alive
    result = subprocess.run([sys.executable, "-m", "redis_weights", "--url", redis_url, "-n", namespace, "workers"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert [line.split()[:3] for line in result.stdout.splitlines()[2:]] == [["1", "-", "0"], ["2", "-", "0"],
                                                                              ["3", "-", "3"]]  # fmt: skip


@pytest.mark.parametrize("garbage", ["abc", "-3", "1.5", "9007199254740993"])
def test_a_latest_or_counter_that_is_no_version_number_is_one_clear_error_everywhere(
    garbage, real_store, redis_url, namespace
):
    k, client = real_store.keyspace, real_store.client
    updater = RedisWeightUpdater(real_store, make_model("mlp", seed=14), 1, sync=False)
    updater.update_weights()
    good = updater.version
    for key in (k.latest, k.counter):
        client.set(key, garbage)
        with pytest.raises(PushError, match=re.escape(f"CORRUPT {key}")):  # the push names the key
            updater.update_weights()
        client.set(key, good)
    client.set(k.latest, garbage)
    with pytest.raises(CodecError, match=re.escape(f"{k.latest} holds")):
        VersionRegistry(real_store.deployment, k).latest()
    result = subprocess.run([sys.executable, "-m", "redis_weights", "--url", redis_url, "-n", namespace, "versions"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"redis-weights: error: {k.latest} holds") and len(result.stderr.splitlines()) == 1
    client.set(k.latest, good)
    client.zadd(k.versions, {"not-a-version": 0})
    assert VersionRegistry(real_store.deployment, k).list_versions() == [good], \
        "a foreign member is ignored, never garbage-collected"

