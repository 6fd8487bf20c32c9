"""``Deployment``: the Redis behind one client, as one standalone server is; the other kinds
(``sentinel``, ``cluster``) subclass it and change what differs (who the nodes are, how keys
spread over them). ``Kind``: what the registry knows of each kind."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from ...errors import ConfigurationError
from ..keys import Keys
from .connections import RawConnection, raw_connection
from .replication import Replication, wait_for_replicas

FAILOVER_WAIT = 45.0  # seconds a push after a lost primary waits for a new one (Sentinel's default down-after is 30 s)


class Deployment:
    """The Redis behind one client: describe it, scope caches by it, reach its nodes.

    This class is a standalone server; ``SentinelDeployment`` a Sentinel-managed primary,
    ``ClusterDeployment`` a Redis Cluster (``deployment_for`` picks). Every method that
    reaches "the nodes" (``masters``, ``nodes``, ``group_by_node``, ``bulk_connection``)
    hides which it is from the callers.

    Args:
        client: a ``redis.Redis`` (a standalone server; fakeredis works too).
        owns_client: whether ``close()`` closes the client. False for a client the
            caller handed in (redis-py's convention: the caller closes what it made);
            True for one built from a URL (``client_from_url``).
        replica_reads: read chunks from replicas (a standalone server has none: refused).
    """

    kind = "standalone"

    def __init__(self, client: redis.Redis, *, owns_client: bool = False, replica_reads: bool = False) -> None:
        if not isinstance(client, redis.Redis):
            raise ConfigurationError(
                f"unsupported Redis client {type(client).__name__}: expected a redis.Redis (standalone server) "
                "or a redis.cluster.RedisCluster"
            )
        if replica_reads and type(self) is Deployment:
            raise ConfigurationError("replica reads need a Redis Cluster or a Sentinel service (redis+sentinel://), "
                                     "whose replicas are known: this client reaches one standalone server")
        self.client: Any = client
        self.owns_client = owns_client
        self.replica_reads = replica_reads

    def _connection_kwargs(self) -> dict[str, Any]:
        return dict(self.client.connection_pool.connection_kwargs)

    def describe(self) -> str:
        """``host:port/db`` (or ``unix:<path>``) of the server, without credentials, for messages."""
        kwargs = self._connection_kwargs()
        if "path" in kwargs:
            return f"unix:{kwargs['path']}"
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"

    def scope(self) -> str:
        """A stable identity of the data this client reaches (server and database), for scoping
        caches: two deployments with the same scope hold the same keys."""
        return self.describe()

    def masters(self) -> list[tuple[str, redis.Redis]]:
        """``(host:port, a plain redis.Redis to it)`` for every master: per-node work (checks,
        ``WAIT``). Standalone: the one server, through the deployment's own client."""
        return [(self.describe(), self.client)]

    def nodes(self) -> list[tuple[str, redis.Redis]]:
        """Like ``masters()``, replicas included (the server checks look at every node)."""
        return self.masters()

    def group_by_node(self, keys: Sequence[str]) -> dict[str, list[int]]:
        """The indices of ``keys``, grouped by the master that holds them (one group here)."""
        return {self.describe(): list(range(len(keys)))} if keys else {}

    def with_replica_reads(self) -> Deployment:
        """This deployment reading chunks from replicas: itself if it does already, else a view of
        the same kind over the same client (never closing it); ``ConfigurationError`` where the
        replicas are unknown (a standalone server)."""
        if self.replica_reads:
            return self
        return type(self)(self.client, owns_client=False, replica_reads=True)

    @property
    def single_node(self) -> bool:
        """Whether one node holds every key (standalone, Sentinel), so one script may read any key."""
        return isinstance(self.client, redis.Redis)

    def wait_for_replicas(self, keyspace: Keys, replicas: int | None, timeout: float) -> list[Replication]:
        """For each master: write a marker key and send ``WAIT n timeout`` on the same connection.

        A master's replication stream is ordered, so once a replica has acknowledged the
        marker it holds everything written to that master before it, on any connection
        (every chunk of the push). ``replicas``: how many must acknowledge; None: as many
        as the master reports online (``INFO replication``; none: no WAIT at all). Waits
        at most ``timeout`` seconds per master; returns what each said (the caller decides
        whether a short count fails the push).
        """
        return wait_for_replicas(self, keyspace, replicas, timeout)

    def marker_on(self, address: str, keyspace: Keys) -> str:
        """The ``WAIT`` marker's name on master ``address``: the namespace's own where one node holds
        every key (a cluster names a key in one of that master's slots instead)."""
        return keyspace.replication_marker

    def wait_for_primary(self, timeout: float = FAILOVER_WAIT) -> bool:
        """After a lost connection: wait until a primary answers (a Sentinel service: until the
        sentinels have promoted one); True at once here (nobody promotes a standalone server,
        and a cluster's client follows its failovers by itself)."""
        return True

    @contextlib.contextmanager
    def bulk_connection(self, key: str | None = None, *, primary: bool = False) -> Iterator[RawConnection | None]:
        """A pooled connection, with its plain socket, to the node that holds ``key``
        (a standalone server holds every key; a cluster picks the key's master, or one
        of its replicas with replica reads unless ``primary``).

        Yields None when the client has no plain socket (fakeredis): the caller then
        takes redis-py's ordinary path. After the block the connection goes back to
        the pool; if the block raised it is disconnected first, so a connection with
        unread replies is never reused.
        """
        with raw_connection(self.client.connection_pool) as raw:
            yield raw

    def close(self) -> None:
        """Close the client's connections, if this deployment owns the client."""
        if self.owns_client:
            self.client.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()!r}, owns_client={self.owns_client})"


def _any_url(url: str) -> None:
    """A kind's URL check that refuses nothing."""


@dataclass(frozen=True)
class Kind:
    """One kind of deployment, as the registry (``registry.KINDS``) knows it.

    ``schemes``: the URL schemes whose clients it builds (none: it is reached otherwise, as a
    cluster is from a ``redis://`` URL naming one of its nodes); ``check(url)`` refuses a URL of
    those schemes (``ConfigurationError``) before anything else is read from it; ``connect(url,
    cluster, overrides)`` builds the client (``url`` without this library's query parameters,
    ``cluster`` the cluster flag, True/False/None for auto); ``accepts(client)``: whether a
    client handed in is of this kind; ``deployment`` the class that wraps it.
    """

    name: str
    deployment: type[Deployment]
    accepts: Callable[[Any], bool]
    schemes: tuple[str, ...] = ()
    check: Callable[[str], None] = _any_url
    connect: Callable[[str, bool | None, dict[str, Any]], Any] | None = None
