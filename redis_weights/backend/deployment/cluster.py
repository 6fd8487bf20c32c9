"""Redis Cluster: ``ClusterDeployment`` (a ``redis.cluster.RedisCluster``), its client, and
whether the node a ``redis://`` URL names belongs to one (``INFO cluster``).

On a cluster the namespace's control keys share one hash tag (one slot: the commit stays
one script) and chunks carry their own id as hash tag (they spread over the masters); bulk
transfers go to each master at once (``group_by_node``, ``connections.run_per_node``), and
with ``replica_reads`` chunk reads go to replicas (``READONLY``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
from collections.abc import Iterator, Sequence
from typing import Any

import redis
from redis.cluster import REPLICA, RedisCluster

from ...errors import ConfigurationError
from ..keys import Keys
from ..values import parse_int
from .base import Deployment, Kind
from .clients import LOST, pure_python_packer
from .connections import RawConnection, raw_connection
from .urls import detail, redacted

log = logging.getLogger(__name__)


def enabled(client: redis.Redis) -> bool:
    """Whether the server ``client`` reaches runs in cluster mode (``INFO cluster``). A server that
    cannot be reached, or a user that may not run INFO, reads as standalone (force it with ``cluster=yes``)."""
    try:
        return bool(parse_int(client.info("cluster").get("cluster_enabled", 0)))
    except (*LOST, redis.exceptions.ResponseError) as exc:
        log.debug("cluster detection: INFO cluster failed (%s); taking the server for a standalone one", exc)
        return False


def _copy_free_packer(connection: Any) -> None:
    """``redis_connect_func`` of cluster clients: RedisCluster passes no ``command_packer`` to its
    nodes' connections, so each gets the pure-Python one here, when it connects."""
    connection._command_packer = pure_python_packer()  # redis-py's attribute: touched only here


def cluster_client(url: str, options: dict[str, Any]) -> RedisCluster:
    """A ``RedisCluster`` discovered from the node ``url`` names (any node of the cluster);
    ``options``: a plain client's (``clients.default_client_options`` and the caller's)."""
    options = dict(options)
    retry = options.pop("retry")  # the cluster client's own retries (it refuses retry objects for its nodes)
    for name in ("retry_on_error", "health_check_interval", "command_packer"):  # not node options there
        options.pop(name, None)
    options["redis_connect_func"] = _copy_free_packer
    try:
        return RedisCluster.from_url(url, retry=retry, **options)
    except redis.exceptions.RedisClusterException as exc:  # "Cluster mode is not enabled on this node", ...
        raise ConfigurationError(f"Redis Cluster at {redacted(url)!r}: {detail(exc, url)}") from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise ConfigurationError(f"cannot reach the Redis Cluster at {redacted(url)!r}: {detail(exc, url)}") from None


class ClusterDeployment(Deployment):
    """A Redis Cluster behind a ``redis.cluster.RedisCluster``.

    Control keys share the ``{ns}`` hash tag (one slot, one master); chunks carry their
    own id as hash tag, so they spread over every master. ``group_by_node`` and
    ``bulk_connection`` let bulk reads and writes go to each master directly (in
    parallel); with ``replica_reads`` a bulk read goes to a replica of the key's master
    (``READONLY``), and the caller reads what the replica lacks from the primary. A
    connection error or ``MOVED`` on a bulk connection refreshes the slot map before
    the next one (redis-py's own commands refresh it by themselves).
    """

    kind = "cluster"

    def __init__(self, client: RedisCluster, *, owns_client: bool = False, replica_reads: bool = False) -> None:
        if not isinstance(client, RedisCluster):
            raise ConfigurationError(f"expected a redis.cluster.RedisCluster, got {type(client).__name__}")
        self.client = client
        self.owns_client = owns_client
        self.replica_reads = replica_reads
        self._stale = False  # a bulk connection met a moved slot or a lost node: refresh the slot map
        self._scope: str | None = None

    def _refresh(self) -> None:
        if self._stale:
            self._stale = False
            try:
                self.client.nodes_manager.initialize()
            except LOST as exc:
                self._stale = True
                log.debug("cluster slot map refresh failed: %s", exc)

    def _primaries(self) -> list[Any]:
        self._refresh()
        return sorted(self.client.get_primaries(), key=lambda n: n.name)

    def describe(self) -> str:
        """``cluster:host:port,...`` of the masters, without credentials."""
        return "cluster:" + ",".join(n.name for n in self._primaries())

    def scope(self) -> str:
        """The cluster's identity: a digest of every node id it lists (``CLUSTER NODES``), the
        same from every host and across failovers (roles move, ids stay)."""
        if self._scope is None:
            reply = self.client.execute_command("CLUSTER NODES", target_nodes=RedisCluster.DEFAULT_NODE)
            text = reply.decode() if isinstance(reply, bytes) else str(reply)
            ids = sorted(line.split()[0] for line in text.splitlines()
                         if line.strip() and "handshake" not in line.split()[2])  # fmt: skip
            self._scope = "cluster-" + hashlib.sha256(" ".join(ids).encode()).hexdigest()[:24]
        return self._scope

    def masters(self) -> list[tuple[str, redis.Redis]]:
        """``(host:port, the cluster client's own redis.Redis for it)`` of every master, by name."""
        return [(n.name, self.client.get_redis_connection(n)) for n in self._primaries()]

    def nodes(self) -> list[tuple[str, redis.Redis]]:
        """Every master and replica, by name."""
        self._refresh()
        return [(n.name, self.client.get_redis_connection(n))
                for n in sorted(self.client.get_nodes(), key=lambda n: n.name)]  # fmt: skip

    def hash_tag_on(self, address: str) -> str:
        """A hash tag (``t<n>``) whose slot master ``address`` serves now: a key named with it
        (``{t<n>}``) lives on that master, e.g. a marker that a ``WAIT`` on that master counts from."""
        self._refresh()
        for n in range(100_000):  # 16384 slots over the masters: a few tries find one of its slots
            tag = f"t{n}"
            if self.client.nodes_manager.get_node_from_slot(self.client.keyslot(f"{{{tag}}}")).name == address:
                return tag
        raise ConfigurationError(f"{address} is not a master of this cluster (serves no slot)")

    @property
    def single_node(self) -> bool:
        return False

    def marker_on(self, address: str, keyspace: Keys) -> str:
        """A ``WAIT`` marker in one of master ``address``'s own slots (a ``{ns}`` name would be MOVED)."""
        return keyspace.cluster_replication_marker(self.hash_tag_on(address))

    def _node(self, key: str, replica: bool) -> Any:
        """The master of ``key``'s slot, or (``replica``) one of its replicas at random, if it has any."""
        slot = self.client.keyslot(key)
        manager = self.client.nodes_manager
        if replica:
            replicas = [n for n in (manager.slots_cache.get(slot) or [])[1:] if n.server_type == REPLICA]
            if replicas:
                return random.choice(replicas)
        return manager.get_node_from_slot(slot)

    def group_by_node(self, keys: Sequence[str]) -> dict[str, list[int]]:
        """The indices of ``keys``, grouped by the master that holds their slot."""
        self._refresh()
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(self._node(key, False).name, []).append(i)
        return groups

    @contextlib.contextmanager
    def bulk_connection(self, key: str | None = None, *, primary: bool = False) -> Iterator[RawConnection | None]:
        self._refresh()
        node = self._node(key, self.replica_reads and not primary) if key else self.client.get_default_node()
        pool = self.client.get_redis_connection(node).connection_pool
        try:
            replica = node.server_type == REPLICA
            with raw_connection(pool, replica=replica, readonly=replica) as raw:
                yield raw
        except (*LOST, redis.exceptions.ResponseError) as exc:
            if not isinstance(exc, redis.exceptions.ResponseError) or str(exc).startswith(("MOVED", "ASK")):
                self._stale = True
            raise

    def close(self) -> None:
        """Close the connections of a client this deployment owns. Not ``RedisCluster.close()``:
        that one is final (the client forgets its nodes), where a closed ``redis.Redis``
        reconnects when used again; code that closes a store and uses it later works alike."""
        if self.owns_client:
            self.client.disconnect_connection_pools()


# No scheme of its own: a redis:// or rediss:// URL names any node of a cluster (``standalone.connect``).
KIND = Kind("cluster", ClusterDeployment, accepts=lambda client: isinstance(client, RedisCluster))
