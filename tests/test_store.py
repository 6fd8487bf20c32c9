"""RedisStore: a real MutableMapping[str, str] over one namespace, plus TCPStore-like calls."""

from __future__ import annotations

import threading
import time

import pytest

from redis_weights import ConfigurationError, RedisStore
from redis_weights.backend.store import StoreTimeoutError, as_store


def test_mapping_get_set_delete_iterate(fake_store):
    assert len(fake_store) == 0 and fake_store.get("x") is None
    fake_store["x"] = "1"
    fake_store.set("y", b"two")
    assert fake_store["x"] == "1" and fake_store["y"] == "two"
    assert sorted(fake_store) == ["x", "y"] and len(fake_store) == 2
    assert "x" in fake_store and "z" not in fake_store
    del fake_store["x"]
    assert "x" not in fake_store
    with pytest.raises(KeyError):
        del fake_store["x"]
    with pytest.raises(KeyError):
        fake_store["x"]
    assert fake_store.delete_key("y") is True and fake_store.delete_key("y") is False


def test_values_are_strings(fake_store):
    with pytest.raises(TypeError):
        fake_store["x"] = ["not", "a", "string"]
    with pytest.raises(TypeError):
        fake_store["x"] = True
    fake_store["n"] = 5
    assert fake_store["n"] == "5"


def test_namespaces_are_isolated(fake_redis):
    a, b = RedisStore(fake_redis, "a", owns_client=False), RedisStore(fake_redis, "b", owns_client=False)
    a["k"] = "in-a"
    assert "k" not in b and dict(a) == {"k": "in-a"}
    assert fake_redis.get("rw:{a}:k") == b"in-a"


def test_binary_chunks_and_sorted_sets_are_not_part_of_the_mapping(fake_store, fake_redis):
    k = fake_store.keyspace
    fake_redis.set(k.full("v:1:c:0"), b"\xff\xfe binary")  # the old layout's chunk keys
    fake_redis.set(k.chunk("ab" * 16), b"\xff\xfe binary")  # content-addressed: outside the prefix
    fake_redis.zadd(k.versions, {"1": 1})
    fake_store["latest"] = "1"
    assert list(fake_store) == ["latest"]
    with pytest.raises(KeyError):
        fake_store["v:1:c:0"]
    with pytest.raises(KeyError):
        fake_store["versions"]
    assert "versions" not in fake_store and "v:1:c:0" not in fake_store


def test_wait_returns_when_keys_appear_and_times_out_naming_the_missing(fake_store):
    threading.Timer(0.1, lambda: fake_store.set("ready", "1")).start()
    started = time.monotonic()
    fake_store.wait(["ready"], timeout=5)
    assert time.monotonic() - started < 5
    with pytest.raises(StoreTimeoutError, match="never") as info:
        fake_store.wait(["ready", "never"], timeout=0.1)
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, RuntimeError)
    fake_store.wait([], timeout=0)


@pytest.mark.parametrize("url", ["http://localhost:6379", "localhost:6379", ""])
def test_from_url_refuses_unknown_schemes(url):
    with pytest.raises(ConfigurationError, match="unsupported Redis URL"):
        RedisStore.from_url(url)


def test_from_url_sets_timeouts_retries_and_the_copy_free_packer():
    store = RedisStore.from_url("redis://user:secret@127.0.0.1:1/3", namespace="n")
    kwargs = store.client.connection_pool.connection_kwargs
    assert kwargs["username"] == "user" and kwargs["password"] == "secret" and kwargs["db"] == 3
    assert kwargs["socket_timeout"] and kwargs["socket_connect_timeout"]
    assert kwargs["retry"].get_retries() == 3
    assert type(kwargs["command_packer"]).__name__ == "PythonRespSerializer"
    assert "secret" not in repr(store)
    store.close()


def test_as_store_accepts_store_url_and_client(fake_redis, fake_store):
    assert as_store(fake_store) is fake_store
    assert as_store(fake_redis).client is fake_redis
    assert as_store("redis://127.0.0.1:1/0", "x").namespace == "x"
    with pytest.raises(ConfigurationError):
        as_store(42)  # type: ignore[arg-type]


def test_unix_socket_url_pushes_and_receives(server_factory, tmp_path, namespace):
    """unix:// gets the same defaults minus the TCP-only ones, and the whole path works over it."""
    import torch

    from redis_weights import RedisWeightReceiver, RedisWeightUpdater

    socket = tmp_path / "redis.sock"
    server_factory("--unixsocket", str(socket), "--unixsocketperm", "700")
    url = f"unix://{socket}?db=0"
    trainer = {"w": torch.arange(6, dtype=torch.float32)}
    worker = {"w": torch.zeros(6)}
    with RedisStore.from_url(url, namespace=namespace) as store:
        store["hello"] = "world"
        assert store["hello"] == "world"
        assert f"unix:{socket}" in repr(store)
    receiver = RedisWeightReceiver(RedisStore.from_url(url, namespace=namespace), 1, worker)
    with RedisWeightUpdater(RedisStore.from_url(url, namespace=namespace), trainer, 1, sync=False) as updater:
        updater.update_weights()
        assert receiver.poll() == updater.version == 1
        updater.wait(timeout=10)
    receiver.close()
    assert torch.equal(worker["w"], trainer["w"])
