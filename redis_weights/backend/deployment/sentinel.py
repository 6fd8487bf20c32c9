"""Redis Sentinel: ``SentinelDeployment``, the ``redis+sentinel://`` URL, the client of the current
primary, its replicas.

The URL (the convention of the Redis-Sentinel-Url package and of prefect-redis/docket)::

    redis+sentinel://[user:password@]host1[:port1][,host2[:port2],...]/<service>[/<db>][?options]
    rediss+sentinel://...                    TLS to the sentinels and the data nodes

Sentinel ports default to 26379. ``user:password`` authenticate to the primary and
its replicas; the options ``sentinel_username`` and ``sentinel_password``
authenticate to the sentinels themselves (none by default: a sentinel's
``requirepass`` is its own). Every other option is one of redis-py's URL options
(``socket_timeout=2``, ``ssl_cert_reqs=none``...), for the data nodes.

The client is ``Sentinel(...).master_for(service)``: a ``redis.Redis`` whose
``SentinelConnectionPool`` asks the sentinels for the primary's address whenever
it connects, so reconnecting after a failover reaches the new primary; a
connection to a demoted primary is dropped at its first ``READONLY``. Replicas
(``slave_for``) are the ones the sentinels list as up. The URL redaction and the
client defaults are every kind's (``urls.py``, ``clients.py``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.connection import URL_QUERY_ARGUMENT_PARSERS, Connection, SSLConnection
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from ...errors import ConfigurationError
from .base import FAILOVER_WAIT, Deployment, Kind
from .clients import LOST, default_client_options
from .connections import RawConnection, raw_connection
from .urls import detail, redacted

SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
DEFAULT_PORT = 26379
REPLICA_SOCKET_TIMEOUT = 5.0  # seconds a replica read waits for a silent replica before reading from the primary
_WAIT_STEP = 0.1  # seconds between looks for a primary
_PROBE_TIMEOUT = 1.0  # seconds one look waits for the node the sentinels name
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")


def is_sentinel_url(url: object) -> bool:
    """Whether ``url`` uses one of the Sentinel schemes."""
    return isinstance(url, str) and url.startswith(SCHEMES)


@dataclass(frozen=True)
class SentinelURL:
    """What a ``redis+sentinel://`` URL says: the sentinels, the service, and the clients' options."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    tls: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)  # for the data nodes (username, password, ...)
    sentinel_options: Mapping[str, Any] = field(default_factory=dict)  # for the sentinels


def parse_url(url: str, *, shown: str) -> SentinelURL:
    """Parse a Sentinel URL; a ``ConfigurationError`` (quoting ``shown``, the URL without its
    password) for a URL that lacks a sentinel or a service, or whose port or database is no number."""

    def refuse(why: str) -> ConfigurationError:
        form = "redis+sentinel://[user:password@]host[:port][,host2[:port2]...]/service[/db]"
        return ConfigurationError(f"invalid Redis Sentinel URL {shown!r}: {why} (expected {form})")

    scheme, _, rest = url.partition("://")
    credentials, at, tail = rest.rpartition("@")
    if not at:
        credentials, tail = "", rest
    end = min((i for i in (tail.find("/"), tail.find("?"), tail.find("#")) if i >= 0), default=len(tail))
    hosts, path_and_query = tail[:end], tail[end:]
    path, _, query = path_and_query.partition("?")
    query = query.partition("#")[0]
    sentinels = tuple(_host_port(item, refuse) for item in hosts.split(","))
    parts = [unquote(p) for p in path.split("/") if p]
    if not parts:
        raise refuse("no service name")
    if len(parts) > 2:
        raise refuse(f"{len(parts)} path segments")
    service, db_text = parts[0], parts[1] if len(parts) == 2 else "0"
    if not db_text.isdigit():
        raise refuse(f"database {db_text!r} is not a number")
    options: dict[str, Any] = {}
    sentinel_options: dict[str, Any] = {}
    for name, values in parse_qs(query).items():
        value: Any = values[-1]
        if name in _SENTINEL_OPTIONS:
            sentinel_options[name.removeprefix("sentinel_")] = value
            continue
        parser = URL_QUERY_ARGUMENT_PARSERS.get(name)
        if parser is not None:
            try:
                value = parser(value)
            except (TypeError, ValueError):
                raise refuse(f"option {name!r} has an invalid value") from None
        options[name] = value
    user, colon, password = credentials.partition(":")
    if user:
        options["username"] = unquote(user)
    if colon and password:
        options["password"] = unquote(password)
    db = int(options.pop("db", db_text))
    return SentinelURL(sentinels, service, db, scheme == "rediss+sentinel", options, sentinel_options)


def _host_port(item: str, refuse: Any) -> tuple[str, int]:
    """``(host, port)`` of one ``host[:port]`` (``[v6]:port`` too) of the sentinel list."""
    if item.startswith("["):
        host, bracket, port = item[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            raise refuse(f"sentinel {item!r} is not host[:port]")
        port = port[1:]
    else:
        host, _, port = item.partition(":")
    if not host:
        raise refuse("a sentinel without a host")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise refuse(f"sentinel port {port!r} is not a port number")
    return unquote(host), int(port) if port else DEFAULT_PORT


def master_client(target: SentinelURL, defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> redis.Redis:
    """The ``master_for`` client of ``target``: ``defaults`` (the library's), then the URL's
    options, then ``overrides`` (the caller's keyword arguments). The sentinels get the
    socket options and TLS settings too, plus their own credentials."""
    options = {**defaults, **target.options, **overrides, "db": target.db}
    if target.tls:
        options["ssl"] = True
    sentinel_kwargs = {k: v for k, v in options.items() if k.startswith(("socket_", "ssl"))}
    sentinel_kwargs.update(target.sentinel_options)
    manager = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs, **options)
    return manager.master_for(target.service)


# ---------------------------------------------------------------------------------------
# A client of a Sentinel-managed primary
# ---------------------------------------------------------------------------------------
def pool_of(client: object) -> SentinelConnectionPool | None:
    """The ``SentinelConnectionPool`` of a ``master_for``/``slave_for`` client, None for any other client."""
    pool = getattr(client, "connection_pool", None)
    return pool if isinstance(pool, SentinelConnectionPool) else None


def sentinel_addresses(pool: SentinelConnectionPool) -> list[str]:
    """``host:port`` of every sentinel the pool asks."""
    found = []
    for node in pool.sentinel_manager.sentinels:
        kwargs = node.connection_pool.connection_kwargs
        found.append(f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}")
    return found


def describe(pool: SentinelConnectionPool) -> str:
    """``service/db via sentinels h:p,... (primary h:p)`` for messages: no credentials; the primary
    as last seen (no round trip)."""
    db = pool.connection_kwargs.get("db", 0)
    primary = pool.master_address
    seen = f" (primary {primary[0]}:{primary[1]})" if primary else ""
    return f"{pool.service_name}/{db} via sentinels {','.join(sentinel_addresses(pool))}{seen}"


def scope(pool: SentinelConnectionPool) -> str:
    """The data's identity: the service and database behind these sentinels, whichever node is primary."""
    db = pool.connection_kwargs.get("db", 0)
    return f"sentinel:{','.join(sorted(sentinel_addresses(pool)))}/{pool.service_name}/{db}"


def primary_address(pool: SentinelConnectionPool) -> str:
    """``host:port`` of the primary, asked of the sentinels (a ``MasterNotFoundError`` when none is up)."""
    host, port = pool.get_master_address()
    return f"{host}:{port}"


def replica_client(pool: SentinelConnectionPool, **overrides: Any) -> redis.Redis:
    """A ``slave_for`` client of the same service, with the primary's connection options: its
    connections go round-robin to the replicas the sentinels list as up (to the primary when none is)."""
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k != "connection_pool"}
    kwargs["connection_class"] = pool.connection_class
    kwargs.update(overrides)
    return pool.sentinel_manager.slave_for(pool.service_name, **kwargs)


def wait_for_primary(pool: SentinelConnectionPool, timeout: float) -> bool:
    """Until the sentinels name a primary that answers PING as a primary (True), or ``timeout``
    seconds (False).

    Used after a lost connection: a failover takes the sentinels' ``down-after-milliseconds``
    plus an election before a replica is promoted, longer than a client's retries. Each look
    is one short-lived connection with a short timeout and no retries, so a hung node does
    not stretch the wait.
    """
    deadline = time.monotonic() + timeout
    while True:
        if _answers_as_primary(pool, max(0.1, min(_PROBE_TIMEOUT, deadline - time.monotonic()))):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_WAIT_STEP)


def _answers_as_primary(pool: SentinelConnectionPool, timeout: float) -> bool:
    try:
        host, port = pool.get_master_address()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):  # no primary named yet
        return False
    skip = ("connection_pool", "retry", "socket_timeout", "socket_connect_timeout", "health_check_interval")
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k not in skip}
    plain = SSLConnection if issubclass(pool.connection_class, SSLConnection) else Connection
    connections = redis.ConnectionPool(connection_class=plain, host=host, port=port, socket_timeout=timeout,
                                       socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0), **kwargs)
    try:
        return redis.Redis(connection_pool=connections).info("replication").get("role") == "master"
    except redis.exceptions.RedisError:
        return False
    finally:
        connections.disconnect()


def close(pool: SentinelConnectionPool) -> None:
    """Close the connections to the sentinels (``Redis.close`` closes only the data nodes' pool)."""
    pool.sentinel_manager.close()


# ---------------------------------------------------------------------------------------
# The deployment
# ---------------------------------------------------------------------------------------
class SentinelDeployment(Deployment):
    """The primary of a Sentinel-managed service behind a ``master_for`` client.

    One node holds every key, as on a standalone server; the difference is who that node
    is: the sentinels say, and a failover changes it. Messages name the service and the
    primary last seen, the cache scope is the service (whichever node is its primary),
    and with ``replica_reads`` bulk reads go to the replicas the sentinels list
    (round-robin; the caller reads what a replica lacks from the primary).
    """

    kind = "sentinel"

    def __init__(self, client: redis.Redis, *, owns_client: bool = False, replica_reads: bool = False) -> None:
        pool = pool_of(client)
        if pool is None:
            raise ConfigurationError(
                f"expected the master_for client of a Sentinel service, got {type(client).__name__}"
            )
        super().__init__(client, owns_client=owns_client, replica_reads=replica_reads)
        self._pool = pool
        self._replicas: redis.Redis | None = None  # built on first use, always closed by close()

    def describe(self) -> str:
        """The service, its sentinels and the primary last seen, without credentials."""
        return describe(self._pool)

    def scope(self) -> str:
        """The service and its sentinels: the same whichever node is the primary now."""
        return scope(self._pool)

    def masters(self) -> list[tuple[str, redis.Redis]]:
        """The primary as last seen (asked of the sentinels before the first connection)."""
        seen = self._pool.master_address
        try:
            address = f"{seen[0]}:{seen[1]}" if seen else primary_address(self._pool)
        except LOST:
            address = f"{self._pool.service_name} (primary unknown)"
        return [(address, self.client)]

    def group_by_node(self, keys: Sequence[str]) -> dict[str, list[int]]:
        return {self._pool.service_name: list(range(len(keys)))} if keys else {}

    def _replica_client(self) -> redis.Redis:
        """A client of the replicas the sentinels list as up (the primary when none is). It retries
        once and gives up on a silent replica after ``REPLICA_SOCKET_TIMEOUT``: a replica that
        fails sends the reader back to the primary, it does not hold it up."""
        if self._replicas is None:
            own = self._connection_kwargs().get("socket_timeout") or REPLICA_SOCKET_TIMEOUT
            self._replicas = replica_client(self._pool, retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
                                            socket_timeout=min(REPLICA_SOCKET_TIMEOUT, own))  # fmt: skip
        return self._replicas

    @contextlib.contextmanager
    def bulk_connection(self, key: str | None = None, *, primary: bool = False) -> Iterator[RawConnection | None]:
        pool = (self._replica_client() if self.replica_reads and not primary else self.client).connection_pool
        with raw_connection(pool, replica=pool is not self.client.connection_pool) as raw:
            yield raw

    def wait_for_primary(self, timeout: float = FAILOVER_WAIT) -> bool:
        """Wait until the sentinels have promoted a primary that answers (after a lost connection)."""
        return wait_for_primary(self._pool, timeout)

    def close(self) -> None:
        """The replicas' client (built here) in any case; the primary's and the sentinels' connections
        if this deployment owns the client."""
        if self._replicas is not None:
            self._replicas.close()
            self._replicas = None
        if self.owns_client:
            self.client.close()
            close(self._pool)


def connect(url: str, wanted: bool | None, overrides: dict[str, Any]) -> redis.Redis:
    """The ``master_for`` client of the service a Sentinel URL names (never a cluster)."""
    if wanted:
        raise ConfigurationError(f"invalid Redis URL {redacted(url)!r}: a Sentinel service is not a Redis Cluster")
    options = default_client_options()
    options["decode_responses"] = False
    target = parse_url(url, shown=redacted(url))
    try:
        return master_client(target, options, {**overrides, "decode_responses": False})
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"invalid Redis URL {redacted(url)!r}: {detail(exc, url)}") from None


KIND = Kind("sentinel", SentinelDeployment, accepts=lambda client: pool_of(client) is not None,
            schemes=tuple(s.removesuffix("://") for s in SCHEMES), connect=connect)  # fmt: skip
