"""The kinds of deployment, and the lookups that pick one: by URL scheme (``client_from_url``,
``deployment_from_url``) or by the client handed in (``deployment_for``).

A new kind of deployment is one module (a ``Deployment`` subclass and its ``Kind``) plus
its line in ``KINDS``.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.cluster import RedisCluster

from ...errors import ConfigurationError
from .base import Deployment, Kind
from .cluster import KIND as CLUSTER
from .sentinel import KIND as SENTINEL
from .standalone import KIND as STANDALONE
from .urls import check_credentials, flag, redacted, scheme, split_query

# Most particular first: a client handed in is of the first kind that accepts it.
KINDS: tuple[Kind, ...] = (
    SENTINEL,
    CLUSTER,
    STANDALONE,
)


def kind_for_url(url: object) -> Kind:
    """The kind that builds clients for ``url``'s scheme; ``ConfigurationError`` when none does."""
    name = scheme(url)
    for kind in KINDS:
        if name in kind.schemes and kind.connect is not None:
            return kind
    known = sorted((s for kind in KINDS for s in kind.schemes), key=lambda s: (len(s), s))
    expected = ", ".join(f"{s}://" for s in known[:-1]) + f" or {known[-1]}://"
    raise ConfigurationError(f"unsupported Redis URL {redacted(url)!r}: expected {expected}")


def kind_of(client: object) -> Kind:
    """The kind of a client handed in."""
    return next(kind for kind in KINDS if kind.accepts(client))


def client_from_url(url: str, *, cluster: bool | str | None = None, **overrides: Any) -> redis.Redis | RedisCluster:
    """A client for ``redis://``, ``rediss://`` (TLS) or ``unix://`` URLs: a ``redis.Redis``, or
    a ``redis.cluster.RedisCluster`` when the server is a node of a Redis Cluster; for
    ``redis+sentinel://[user:pass@]host1:26379,host2:26379/<service>[/db]``
    (``rediss+sentinel://`` for TLS) the ``redis.Redis`` of the service's current primary
    (``sentinel.py``).

    User and password come from the URL (``redis://user:pass@host:6379/0``); TLS
    options (``ssl_ca_certs=...``) may be given as keyword arguments or query
    parameters. Responses stay bytes: weights are binary. A refused URL is a
    ``ConfigurationError`` that never shows the password.

    Cluster mode: ``cluster=None`` (or ``?cluster=auto``) asks the node the URL names
    (``INFO cluster``, one round trip when the client is built); ``cluster=True`` /
    ``?cluster=yes`` forces it, ``False`` / ``?cluster=no`` never probes. A URL with a
    database other than 0, or a ``unix://`` socket, is standalone without probing (a
    cluster has database 0 only). The keyword wins over the query parameter.
    """
    return _client(url, cluster, overrides)


def _client(url: str, cluster: bool | str | None, overrides: dict[str, Any]) -> redis.Redis | RedisCluster:
    kind = kind_for_url(url)
    check_credentials(url)
    kind.check(url)
    url, ours = split_query(url)
    wanted = flag(cluster if cluster is not None else ours.get("cluster"), "cluster", url)
    assert kind.connect is not None  # kind_for_url picks only kinds that connect
    return kind.connect(url, wanted, overrides)


def deployment_from_url(
    url: str, *, cluster: bool | str | None = None, replica_reads: bool | str | None = None, **overrides: Any
) -> Deployment:
    """The ``Deployment`` (owning its client) for a URL: ``client_from_url``, plus
    ``replica_reads`` (keyword, or ``?replica_reads=yes``): workers read chunks from replicas."""
    _, ours = split_query(url) if isinstance(url, str) else (url, {})
    reads = flag(replica_reads if replica_reads is not None else ours.get("replica_reads"), "replica_reads", url)
    return deployment_for(_client(url, cluster, overrides), owns_client=True, replica_reads=bool(reads))


def deployment_for(
    client: redis.Redis | RedisCluster, *, owns_client: bool = False, replica_reads: bool = False
) -> Deployment:
    """The ``Deployment`` of ``client``: a ``ClusterDeployment`` for a ``RedisCluster``, a
    ``SentinelDeployment`` for a Sentinel ``master_for`` client, else a standalone ``Deployment``."""
    return kind_of(client).deployment(client, owns_client=owns_client, replica_reads=replica_reads)
