"""The Redis deployment a store talks to: building its client, naming it, reaching its nodes.

One owner for everything that depends on *what* Redis is on the other end: the
client built from a URL (timeouts, idempotent retries, TLS and ACL from the URL),
the description of the server in messages (never with credentials), the identity
that scopes the host cache, the nodes (``masters()``, ``nodes()``) that per-node work
goes to, and the per-node connections that bulk reads and writes use.

Three kinds, one module each: ``standalone`` (``Deployment``, one server: ``redis://``,
``rediss://``, ``unix://``), ``sentinel`` (``SentinelDeployment``, the primary of a
Sentinel-managed service: ``redis+sentinel://``) and ``cluster`` (``ClusterDeployment``, a
Redis Cluster, reached from a ``redis://`` URL naming any of its nodes: detected with
``INFO cluster`` unless ``cluster=True/False`` or ``?cluster=yes|no`` says). ``registry``
picks the kind, by URL scheme or by the client handed in (``deployment_for``); a new kind is
one module plus its line in ``registry.KINDS``. Shared by every kind: ``urls`` (checks,
``redacted``), ``clients`` (timeouts, retries, the copy-free packer, ``LOST``),
``connections`` (raw sockets, one thread per node), ``replication`` (``WAIT`` per master).

A client the caller hands in is the caller's: ``close()`` closes only a client
this package built, as redis-py does with a connection pool it was given.
"""

from .base import FAILOVER_WAIT, Deployment, Kind
from .clients import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RETRIES,
    DEFAULT_SOCKET_TIMEOUT,
    LOST,
    default_client_options,
    given_username,
)
from .cluster import ClusterDeployment
from .connections import RawConnection, run_per_node
from .registry import KINDS, client_from_url, deployment_for, deployment_from_url, kind_for_url, kind_of
from .replication import Replication
from .sentinel import REPLICA_SOCKET_TIMEOUT, SentinelDeployment
from .urls import redacted

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_RETRIES",
    "DEFAULT_SOCKET_TIMEOUT",
    "FAILOVER_WAIT",
    "KINDS",
    "LOST",
    "REPLICA_SOCKET_TIMEOUT",
    "ClusterDeployment",
    "Deployment",
    "Kind",
    "RawConnection",
    "Replication",
    "SentinelDeployment",
    "client_from_url",
    "default_client_options",
    "deployment_for",
    "deployment_from_url",
    "given_username",
    "kind_for_url",
    "kind_of",
    "redacted",
    "run_per_node",
]
