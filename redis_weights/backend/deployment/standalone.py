"""A standalone server: ``redis://``, ``rediss://`` (TLS) and ``unix://`` URLs, built into a
``redis.Redis`` (``Deployment``, ``base.py``), or into a cluster client when the node the URL
names belongs to a Redis Cluster (asked with ``INFO cluster`` unless ``cluster=`` says)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import redis
from redis.cluster import RedisCluster

from ...errors import ConfigurationError
from . import cluster
from .base import Deployment, Kind
from .clients import default_client_options
from .urls import detail, redacted


def _database(url: str) -> str:
    """The database part of ``url``'s path ("" when none, and for a unix socket)."""
    if url.startswith("unix://"):
        return ""
    try:
        return urlsplit(redacted(url)).path.strip("/")  # the credentials, redacted, cannot hold a '/'
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        raise ConfigurationError(f"invalid Redis URL {redacted(url)!r}: {exc}") from None


def check(url: str) -> None:
    """Refuse a database that is no number (redis-py would silently use database 0)."""
    if url.startswith("unix://"):
        return
    database = _database(url)
    if database and not database.isdigit():
        raise ConfigurationError(f"invalid Redis URL {redacted(url)!r}: database {database!r} is not a number")


def connect(url: str, wanted: bool | None, overrides: dict[str, Any]) -> redis.Redis | RedisCluster:
    """The client of the server ``url`` names: a ``redis.Redis``, or a ``RedisCluster`` when
    ``wanted`` (the cluster flag) says so or, None, the server says it is a cluster node. A URL
    with a database other than 0, or a unix socket, is standalone without asking."""
    database = _database(url)
    unix = url.startswith("unix://")
    options = default_client_options()
    if unix:
        del options["socket_keepalive"]  # a TCP option: redis-py's UnixDomainSocketConnection refuses it
    options.update(overrides)
    options["decode_responses"] = False
    if wanted:
        if unix or database not in ("", "0"):
            raise ConfigurationError(f"invalid Redis URL {redacted(url)!r}: a Redis Cluster has no unix sockets "
                                     "and only database 0")  # fmt: skip
        return cluster.cluster_client(url, options)
    try:
        client = redis.Redis.from_url(url, **options)
    except ValueError as exc:
        raise ConfigurationError(f"invalid Redis URL {redacted(url)!r}: {detail(exc, url)}") from None
    if wanted is None and not unix and database in ("", "0") and cluster.enabled(client):
        client.close()
        return cluster.cluster_client(url, options)
    return client


# Accepts any client: the registry asks it last, and ``Deployment`` refuses what is no redis.Redis.
KIND = Kind("standalone", Deployment, accepts=lambda client: True, schemes=("redis", "rediss", "unix"),
            check=check, connect=connect)  # fmt: skip
