"""The deployment: redacted URLs, refused URLs without secrets, who closes a client, bulk connections."""

from __future__ import annotations

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from redis_weights import ConfigurationError, RedisStore
from redis_weights.backend.deployment import Deployment, client_from_url, redacted

REDACTED = [
    ("redis://user:secret@host:6380/0", "redis://user:***@host:6380/0"),
    ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
    ("redis://host:6379/0", "redis://host:6379/0"),
    ("redis://user@host:6379/0", "redis://user@host:6379/0"),  # a user name alone is no secret
    ("rediss://u:pw@[::1]:6380/2", "rediss://u:***@[::1]:6380/2"),  # IPv6: brackets and port stay
    ("redis://u:pw@[fe80::1%25eth0]:6379", "redis://u:***@[fe80::1%25eth0]:6379"),
    ("redis://u:pa#ss@host:6379/0", "redis://u:***@host:6379/0"),  # unencoded '#', '?', '/', '@'
    ("redis://u:pa?ss@host:6379/0", "redis://u:***@host:6379/0"),
    ("redis://u:pa/ss@host:6379/0", "redis://u:***@host:6379/0"),
    ("redis://u:p@ss@host:6379/0", "redis://u:***@host:6379/0"),
    ("redis://u:p%40ss@host/0", "redis://u:***@host/0"),
    ("redis://u:pw@[::1/0", "redis://u:***@[::1/0"),  # does not parse as a URL: still redacted
    ("unix://:pw@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
    ("unix:///run/redis.sock?db=1&password=secret", "unix:///run/redis.sock?db=1&password=***"),
    ("redis://host/0?password=secret&socket_timeout=3", "redis://host/0?password=***&socket_timeout=3"),
    ("u:secret@host:6379", "u:***@host:6379"),  # no scheme at all
    ("", ""),
]


@pytest.mark.parametrize("url, expected", REDACTED)
def test_redacted_replaces_the_password_and_keeps_the_rest(url, expected):
    assert redacted(url) == expected


def test_redacted_accepts_anything():
    assert redacted(None) == "None" and redacted(42) == "42"


PASSWORD = st.text(alphabet=st.sampled_from("abcXYZ019#?/@:%!*&="), min_size=4, max_size=24).filter(
    lambda p: "***" not in p
)
HOST = st.sampled_from(["host", "127.0.0.1", "[::1]", "[2001:db8::7]", "redis.example.com"])


@given(user=st.sampled_from(["", "alice", "svc-1"]), password=PASSWORD, host=HOST,
       port=st.sampled_from(["", ":6379", ":7000"]), tail=st.sampled_from(["", "/0", "/3?socket_timeout=2"]))
def test_redacted_never_shows_a_password_and_keeps_host_port_and_path(user, password, host, port, tail):
    url = f"redis://{user}:{password}@{host}{port}{tail}"
    assert redacted(url) == f"redis://{user}:***@{host}{port}{tail}"


@pytest.mark.parametrize("url", [
    "redis://u:qx#zk1@127.0.0.1:6379/0",
    "redis://u:qx?zk1@127.0.0.1:6379/0",
    "redis://u:qx/zk1@127.0.0.1:6379/0",
    "redis://:s3cret@127.0.0.1:notaport/0",
    "redis://u:s3cret@127.0.0.1/x",
    "redis://u:s3/cret@127.0.0.1/x",
    "http://u:s3cret@h/0",
    "redis://u:s3cret@[::1/0",
])
def test_a_refused_url_never_shows_any_piece_of_its_password(url):
    secret = url.split("://", 1)[1].rsplit("@", 1)[0].split(":", 1)[1]
    pieces = [p for p in secret.replace("#", "/").replace("?", "/").split("/") if len(p) > 1]
    with pytest.raises(ConfigurationError) as info:
        client_from_url(url)
    message = str(info.value)
    assert "***" in message and all(piece not in message for piece in pieces), message


def test_a_client_handed_in_is_not_closed_by_the_store(fake_redis):
    """redis-py's convention: what the caller made, the caller closes."""
    closed = []
    fake_redis.close = lambda: closed.append(True)  # type: ignore[method-assign]
    with RedisStore(fake_redis, "a") as store:
        store["k"] = "v"
    assert not closed
    owned = RedisStore(fake_redis, "a", owns_client=True)
    owned.close()
    assert closed == [True]


def test_a_store_from_a_url_owns_its_client():
    store = RedisStore.from_url("redis://127.0.0.1:1/0")
    assert store.deployment.owns_client
    store.close()


def test_describe_and_scope_never_carry_credentials():
    deployment = Deployment(client_from_url("redis://user:s3cret@10.1.2.3:6390/4"))
    assert deployment.describe() == "10.1.2.3:6390/4" and "s3cret" not in deployment.scope()
    unix = Deployment(client_from_url("unix:///run/r.sock?db=0"))
    assert unix.describe() == "unix:/run/r.sock"
    assert deployment.scope() != unix.scope()


def test_only_redis_clients_are_accepted():
    with pytest.raises(ConfigurationError, match="unsupported Redis client"):
        Deployment(object())  # type: ignore[arg-type]


def test_bulk_connection_is_returned_to_the_pool_or_dropped_after_an_error(real_store):
    deployment = real_store.deployment
    key = real_store.keyspace.full("bulk")
    deployment.client.set(key, b"value")
    with deployment.bulk_connection(key) as raw:
        assert raw is not None
        raw.send([("PING",)])
        assert raw.sock.recv(64) == b"+PONG\r\n"
    assert deployment.client.get(key) == b"value"
    with pytest.raises(RuntimeError), deployment.bulk_connection(key) as raw:
        assert raw is not None
        raw.send([("PING",)])  # its reply is never read
        raise RuntimeError("reader failed half-way")
    # Not the unread PONG: the half-read connection was dropped, not reused.
    assert deployment.client.get(key) == b"value"


def test_fakeredis_has_no_plain_socket(fake_store):
    with fake_store.deployment.bulk_connection() as raw:
        assert raw is None
    assert fake_store.client.ping()


def test_redis_errors_in_urls_are_configuration_errors():
    with pytest.raises(ConfigurationError, match="database 'x' is not a number"):
        client_from_url("redis://127.0.0.1:6379/x")
    assert isinstance(client_from_url("redis://127.0.0.1:6379/2"), redis.Redis)


def test_the_registry_picks_one_kind_per_scheme_and_per_client(fake_redis):
    from redis.cluster import RedisCluster
    from redis.sentinel import Sentinel

    from redis_weights.backend.deployment import (
        KINDS,
        ClusterDeployment,
        SentinelDeployment,
        deployment_for,
        kind_for_url,
    )

    assert [k.name for k in KINDS] == [k.deployment.kind for k in KINDS]  # a kind's name is its class's
    schemes = [s for k in KINDS for s in k.schemes]
    assert len(schemes) == len(set(schemes)), "a scheme registered by two kinds"
    assert {s: kind_for_url(f"{s}://h/0").name for s in schemes} == {
        "redis": "standalone", "rediss": "standalone", "unix": "standalone",
        "redis+sentinel": "sentinel", "rediss+sentinel": "sentinel",
    }  # fmt: skip
    with pytest.raises(ConfigurationError, match="unsupported Redis URL") as refused:
        kind_for_url("http://u:secret@h/0")
    assert all(f"{s}://" in str(refused.value) for s in schemes) and "secret" not in str(refused.value)
    assert type(deployment_for(fake_redis)) is Deployment
    master = Sentinel([("127.0.0.1", 1)]).master_for("svc")  # connects only when used
    assert type(deployment_for(master)) is SentinelDeployment
    cluster = RedisCluster.__new__(RedisCluster)  # a cluster client without a cluster: only its type matters here
    assert type(deployment_for(cluster)) is ClusterDeployment


def test_a_new_kind_is_one_kind_object_in_the_registry(monkeypatch):
    import fakeredis

    from redis_weights.backend.deployment import Kind, deployment_from_url, registry

    class Memory(Deployment):
        kind = "memory"

        def describe(self) -> str:
            return "memory"

    server = fakeredis.FakeServer()
    built = []

    def connect(url, cluster, overrides):
        built.append((url, cluster, overrides))
        return fakeredis.FakeRedis(server=server)

    memory = Kind("memory", Memory, accepts=lambda c: isinstance(c, fakeredis.FakeRedis), schemes=("memory",),
                  connect=connect)  # fmt: skip
    monkeypatch.setattr(registry, "KINDS", (memory, *registry.KINDS))
    deployment = deployment_from_url("memory://anything?cluster=no&socket_timeout=1", socket_timeout=2)
    assert type(deployment) is Memory and deployment.owns_client
    assert built == [("memory://anything?socket_timeout=1", False, {"socket_timeout": 2})]
    with RedisStore(deployment, "ns") as store:
        store["k"] = "v"
        assert store["k"] == "v" and repr(store) == "RedisStore(namespace='ns', server='memory')"
