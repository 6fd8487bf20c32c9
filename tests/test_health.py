"""Server checks (``redis_weights.observe.health``) against real servers with chosen settings."""

from __future__ import annotations

import pytest
import redis

from redis_weights.backend.deployment import client_from_url
from redis_weights.backend.keys import Keys
from redis_weights.observe.health import (
    OK,
    UNSAFE,
    WARN,
    Finding,
    UnsafeServerError,
    check_acl,
    check_bulk_len,
    check_eviction,
    check_io_threads,
    check_persistence,
    check_server,
    check_version,
    ensure_no_eviction,
    worst,
)


def _by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


def test_default_test_server_is_safe(redis_url: str, namespace: str) -> None:
    client = client_from_url(redis_url)
    try:
        findings = _by_check(check_server(client, Keys(namespace)))
    finally:
        client.close()
    assert set(findings) == {"version", "maxmemory-policy", "proto-max-bulk-len", "client-query-buffer-limit",
                             "client-output-buffer-limit", "persistence", "acl", "io-threads"}
    assert findings["version"].level == OK
    assert findings["client-query-buffer-limit"].level == findings["client-output-buffer-limit"].level == OK
    assert findings["maxmemory-policy"].level == OK
    assert "noeviction" in findings["maxmemory-policy"].what
    assert findings["proto-max-bulk-len"].level == OK
    # The fixtures run without RDB and AOF: a warning, with the fix.
    assert findings["persistence"].level == WARN
    assert "appendonly" in findings["persistence"].fix
    assert findings["acl"].level == OK
    assert worst(findings.values()) == WARN


def test_allkeys_eviction_with_maxmemory_is_unsafe(server_factory) -> None:
    server = server_factory("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    client = redis.Redis.from_url(server.url)
    try:
        finding = check_eviction(client)
        assert finding.level == UNSAFE
        assert "allkeys-lru" in finding.what and "noeviction" in finding.fix
        with pytest.raises(UnsafeServerError, match="allkeys-lru"):
            ensure_no_eviction(client)
        # Fixed as the finding says: safe again.
        client.config_set("maxmemory-policy", "noeviction")
        assert check_eviction(client).level == OK
        ensure_no_eviction(client)
        # volatile-* never touches committed weights (they carry no TTL).
        client.config_set("maxmemory-policy", "volatile-lru")
        assert check_eviction(client).level == OK
        # allkeys-* without a limit: a warning only.
        client.config_set("maxmemory-policy", "allkeys-random")
        client.config_set("maxmemory", "0")
        assert check_eviction(client).level == WARN
    finally:
        client.close()


def test_nearly_full_memory_warns(server_factory) -> None:
    server = server_factory("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    client = redis.Redis.from_url(server.url)
    try:
        # Fill up to the limit (noeviction refuses the rest).
        with pytest.raises(redis.exceptions.ResponseError, match="maxmemory"):
            for i in range(64):
                client.set(f"filler:{i}", b"x" * 100_000)
        finding = check_eviction(client)
        assert finding.level == WARN and "OOM" in finding.what
    finally:
        client.close()


def test_small_proto_max_bulk_len_is_unsafe(server_factory) -> None:
    server = server_factory("--proto-max-bulk-len", "1mb")
    client = redis.Redis.from_url(server.url)
    try:
        finding = check_bulk_len(client, chunk_size=8 * 1024 * 1024)
        assert finding.level == UNSAFE and "proto-max-bulk-len" in finding.fix
        assert check_bulk_len(client, chunk_size=512 * 1024).level == OK
    finally:
        client.close()


def test_persistence_with_aof_is_ok(server_factory) -> None:
    server = server_factory("--appendonly", "yes")
    client = redis.Redis.from_url(server.url)
    try:
        finding = check_persistence(client)
        assert finding.level == OK and "AOF" in finding.what
    finally:
        client.close()


def test_acl_user_without_channel_rights_is_unsafe(server_factory, namespace: str) -> None:
    server = server_factory()
    admin = redis.Redis.from_url(server.url)
    keys = Keys(namespace)
    pattern = f"rw:{{{namespace}}}:*"
    both = [f"~{p}" for p in keys.acl_key_patterns]  # control keys and chunks
    try:
        admin.execute_command("ACL", "SETUSER", "nochan", "on", ">pw", *both, "resetchannels", "+@all")
        admin.execute_command("ACL", "SETUSER", "good", "on", ">pw", *both, f"&{pattern}", "+@all")
        admin.execute_command("ACL", "SETUSER", "workeronly", "on", ">pw", *both, f"&{pattern}", "+@all",
                              "-del", "-zrem")  # fmt: skip (a worker needs EXISTS: its heartbeat script)
        admin.execute_command("ACL", "SETUSER", "nochunks", "on", ">pw", f"~{pattern}", f"&{pattern}", "+@all")
        # A user that may not run ACL DRYRUN: the check probes with real commands instead.
        admin.execute_command(
            "ACL", "SETUSER", "plain", "on", ">pw", *both, "resetchannels", "+@all", "-acl|dryrun"
        )
        url = f"redis://{{}}:pw@{server.host}:{server.port}/0"
        for user, level in (("nochan", UNSAFE), ("good", OK), ("plain", UNSAFE), ("workeronly", WARN),
                            ("nochunks", UNSAFE)):  # fmt: skip
            client = redis.Redis.from_url(url.format(user))
            try:
                finding = check_acl(client, keys)
                assert finding.level == level, (user, finding)
                if user == "nochunks":
                    assert f"~rw:{namespace}:c:*" in finding.fix and "GET" in finding.what
                elif level == UNSAFE:
                    assert "SUBSCRIBE" in finding.what or "PUBLISH" in finding.what
                    assert f"&rw:{{{namespace}}}:*" in finding.fix
                if level == WARN:
                    assert "not a trainer" in finding.what and "DEL" in finding.what and "ZREM" in finding.what
            finally:
                client.close()
        # The probe leaves nothing behind.
        assert admin.exists(keys.probe) == 0
    finally:
        admin.close()


def test_unreadable_settings_warn_instead_of_failing(fake_redis) -> None:
    # fakeredis knows neither INFO nor CONFIG: like a managed service that hides them.
    assert check_version(fake_redis).level == WARN
    assert check_eviction(fake_redis).level == WARN
    assert check_bulk_len(fake_redis).level == WARN
    ensure_no_eviction(fake_redis)  # unknown is not refused


def test_finding_levels_are_validated() -> None:
    with pytest.raises(ValueError):
        Finding("x", "fatal", "nope")
    assert worst([]) == OK
    assert worst([Finding("a", OK, ""), Finding("b", UNSAFE, ""), Finding("c", WARN, "")]) == UNSAFE
    assert Finding("a", WARN, "w", "f").to_dict() == {"check": "a", "level": "warn", "what": "w", "fix": "f"}


def test_io_threads_advice_names_the_setting_and_never_raises_the_verdict(server_factory) -> None:
    """io-threads is advice (level ok): off, doctor says how to turn it on; on, it only reports it."""
    off = redis.Redis.from_url(server_factory().url)
    try:
        valkey = "valkey_version" in off.info("server")
        finding = check_io_threads(off)
    finally:
        off.close()
    assert finding.level == OK and finding.what.startswith("io-threads 1")
    assert "io-threads" in finding.fix and ("valkey" if valkey else "redis") in finding.fix.lower()
    args = ["--io-threads", "2"] + ([] if valkey else ["--io-threads-do-reads", "yes"])
    on = redis.Redis.from_url(server_factory(*args).url)
    try:
        finding = check_io_threads(on)
        assert (finding.level, finding.what, finding.fix) == (OK, "io-threads 2", "")
        assert worst(check_server(on, Keys("p"))) != UNSAFE
    finally:
        on.close()
