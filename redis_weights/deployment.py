"""The Redis deployment a store talks to: building its client, naming it, reaching its nodes.

One owner for everything that depends on *what* Redis is on the other end: the
client built from a URL (timeouts, idempotent retries, TLS and ACL from the URL),
the description of the server in messages (never with credentials), the identity
that scopes the host cache, the nodes (``masters()``, ``nodes()``) that per-node work
goes to, and the per-node connections that bulk reads and writes use.

Three kinds: ``Deployment`` (one standalone server), ``SentinelDeployment`` (the primary of a
Sentinel-managed service, ``redis+sentinel://``; the Sentinel details live in ``sentinel.py``)
and ``ClusterDeployment`` (a Redis Cluster behind a ``redis.cluster.RedisCluster``);
``deployment_for(client)`` picks. Each names its masters (``masters()``), which a push
waits on before its commit (``wait_for_replicas``: a marker write and ``WAIT`` per master).
A URL names any node of a cluster: ``client_from_url`` asks it (``INFO cluster``)
unless ``cluster=True/False`` (or ``?cluster=yes|no``) says. On a cluster the
namespace's control keys share one hash tag (one slot: the commit stays one script)
and chunks carry their own id as hash tag (they spread over the masters); bulk
transfers go to each master at once (``group_by_node``, ``run_per_node``), and with
``replica_reads`` chunk reads go to replicas (a cluster's, ``READONLY``; the ones the
sentinels list). redis-py's own sockets
are touched only here.

``redis.Redis.from_url`` retries nothing by default and waits forever on a dead
socket; every client built here gets finite timeouts and a short retry with
backoff on connection errors. Every command this library sends is idempotent
(SET, GET, MGET, the commit and ack scripts) or harmless to repeat (PUBLISH of a
hint, INCR that skips a number), so a retry never corrupts state.

Large values go through redis-py's pure-Python command packer: it hands
memoryviews to ``sendall`` without copying them, where the hiredis packer copies
each value twice (measured with redis-py 8.1 and hiredis 3).

A client the caller hands in is the caller's: ``close()`` closes only a client
this module built, as redis-py does with a connection pool it was given.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import re
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import REPLICA, RedisCluster
from redis.connection import PythonRespSerializer
from redis.retry import Retry

from . import sentinel
from .errors import ConfigurationError
from .keys import Keys
from .values import parse_int

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_SOCKET_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_RETRIES = 3
# The errors that mean "Redis stopped answering" (as opposed to an error reply): retried by the
# clients built here, and what every caller catches to tell a lost Redis from a refusal. A
# RedisCluster raises RedisClusterException (no RedisError) when its slot map has a hole (a
# master lost without a replica to take over, "slot not covered").
LOST = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.RedisClusterException)
REPLICA_SOCKET_TIMEOUT = 5.0  # seconds a replica read waits for a silent replica before reading from the primary
_MARKER_TTL_MS = 60_000  # the WAIT marker is a few bytes that vanish by themselves
_PACKER_BUFFER_CUTOFF = 6000  # redis-py's own cutoff: smaller args are joined, larger sent as-is
_SCHEMES = ("redis://", "rediss://", "unix://", *sentinel.SCHEMES)
_QUERY_PASSWORD = re.compile(r"([?&](?:sentinel_)?password=)[^&#]*", re.IGNORECASE)
_SPECIAL = re.compile(r"[#?/@:]")
_UNENCODED = re.compile(r"[#?/]")  # characters that end a URL's host part: never inside its credentials


# ---------------------------------------------------------------------------------------
# URLs
# ---------------------------------------------------------------------------------------
def _credentials(text: str) -> tuple[int, int]:
    """``(start, end)`` of the credentials in a URL: between ``://`` and the last ``@``
    (a password may hold an unencoded ``#``, ``?``, ``/`` or ``@``); ``(0, -1)`` if none."""
    scheme_end = text.find("://")
    start = 0 if scheme_end < 0 else scheme_end + 3
    end = text.rfind("@")
    return (start, end) if end >= start else (0, -1)


def _secret(text: str) -> str:
    """The password part of a URL's credentials ("" when there is none)."""
    start, end = _credentials(text)
    return text[start:end].partition(":")[2] if end >= 0 else ""


def redacted(url: object) -> str:
    """``url`` for messages and logs: its password (also ``?password=``) replaced by ``***``.

    The user name stays. Everything between ``://`` and the last ``@`` counts as
    credentials, so an unencoded ``#``, ``?``, ``/`` or ``@`` in a password never
    shows, and neither do bracketed IPv6 hosts get lost. Any object is accepted
    (``str()`` of it); nothing here raises.
    """
    text = str(url)
    start, end = _credentials(text)
    if end >= 0:
        user, colon, _ = text[start:end].partition(":")
        if colon:
            text = f"{text[:start]}{user}:***{text[end:]}"
    return _QUERY_PASSWORD.sub(r"\1***", text)


def _detail(exc: Exception, url: str) -> str:
    """redis-py's reason for refusing ``url``, unless it quotes any piece of the password."""
    message = str(exc)
    pieces = [p for p in _SPECIAL.split(_secret(url)) if p]
    if any(piece in message for piece in pieces):
        return "it does not parse (percent-encode '#', '?' and '/' in a user or password: %23, %3F, %2F)"
    return message


# ---------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------
def _pure_python_packer() -> PythonRespSerializer:
    encoder = redis.connection.Encoder(encoding="utf-8", encoding_errors="strict", decode_responses=False)
    return PythonRespSerializer(_PACKER_BUFFER_CUTOFF, encoder.encode)


def default_client_options() -> dict[str, Any]:
    """Keyword arguments applied to every client built from a URL (callers may override any)."""
    return {
        "socket_timeout": DEFAULT_SOCKET_TIMEOUT,
        "socket_connect_timeout": DEFAULT_CONNECT_TIMEOUT,
        "socket_keepalive": True,
        "health_check_interval": 30,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.02), DEFAULT_RETRIES),
        "retry_on_error": [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        "command_packer": _pure_python_packer(),
    }


_TRUE, _FALSE = ("1", "yes", "true", "on"), ("0", "no", "false", "off")
_OUR_QUERY = ("cluster", "replica_reads")  # query parameters this module reads; redis-py never sees them


def _flag(value: Any, name: str, url: str) -> bool | None:
    """``True``/``False`` for yes/no-like values, None for None or ``auto`` (``cluster``)."""
    if value is None or isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    if word == "auto" and name == "cluster":
        return None
    raise ConfigurationError(f"invalid Redis URL {redacted(url)!r}: {name}={value!r} (expected yes or no)")


def _split_query(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without this module's own query parameters, and their values."""
    base, mark, query = url.partition("?")
    if not mark:
        return url, {}
    ours: dict[str, str] = {}
    kept = []
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if name.lower() in _OUR_QUERY:
            ours[name.lower()] = value
        elif pair:
            kept.append(pair)
    return (f"{base}?{'&'.join(kept)}" if kept else base), ours


def _validated(url: str) -> str:
    """``url`` if redis-py will read it as the user meant; ``ConfigurationError`` otherwise. Returns
    the database part of its path ("" when none)."""
    if not isinstance(url, str) or not url.startswith(_SCHEMES):
        raise ConfigurationError(
            f"unsupported Redis URL {redacted(url)!r}: expected redis://, rediss://, unix://, "
            "redis+sentinel:// or rediss+sentinel://"
        )
    start, end = _credentials(url)
    if end >= 0 and _UNENCODED.search(url, start, end):
        # The URL ends its host part at the first of them, so a piece of the password would be
        # taken for the host or the port, and show in every later message ("cannot reach user:1234").
        raise ConfigurationError(
            f"invalid Redis URL {redacted(url)!r}: percent-encode '#', '?' and '/' in a user or password "
            "(%23, %3F, %2F), and '@' anywhere after the host (%40)"
        )
    if sentinel.is_sentinel_url(url):
        return ""  # sentinel.parse_url reads the service and the database
    try:
        database = urlsplit(redacted(url)).path.strip("/")  # the credentials, redacted, cannot hold a '/'
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        raise ConfigurationError(f"invalid Redis URL {redacted(url)!r}: {exc}") from None
    if not url.startswith("unix://") and database and not database.isdigit():
        # redis-py would silently use database 0
        raise ConfigurationError(f"invalid Redis URL {redacted(url)!r}: database {database!r} is not a number")
    return "" if url.startswith("unix://") else database


def _cluster_enabled(client: redis.Redis) -> bool:
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
    connection._command_packer = _pure_python_packer()  # redis-py's attribute: touched only here


def _cluster_client(url: str, options: dict[str, Any]) -> RedisCluster:
    """A ``RedisCluster`` discovered from the node ``url`` names (any node of the cluster)."""
    options = dict(options)
    retry = options.pop("retry")  # the cluster client's own retries (it refuses retry objects for its nodes)
    for name in ("retry_on_error", "health_check_interval", "command_packer"):  # not node options there
        options.pop(name, None)
    options["redis_connect_func"] = _copy_free_packer
    try:
        return RedisCluster.from_url(url, retry=retry, **options)
    except redis.exceptions.RedisClusterException as exc:  # "Cluster mode is not enabled on this node", ...
        raise ConfigurationError(f"Redis Cluster at {redacted(url)!r}: {_detail(exc, url)}") from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise ConfigurationError(f"cannot reach the Redis Cluster at {redacted(url)!r}: {_detail(exc, url)}") from None


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
    database = _validated(url)
    url, ours = _split_query(url)
    wanted = _flag(cluster if cluster is not None else ours.get("cluster"), "cluster", url)
    options = default_client_options()
    if url.startswith("unix://"):
        del options["socket_keepalive"]  # a TCP option: redis-py's UnixDomainSocketConnection refuses it
    if sentinel.is_sentinel_url(url):
        if wanted:
            raise ConfigurationError(f"invalid Redis URL {redacted(url)!r}: a Sentinel service is not a Redis Cluster")
        options["decode_responses"] = False
        target = sentinel.parse_url(url, shown=redacted(url))
        try:
            return sentinel.master_client(target, options, {**overrides, "decode_responses": False})
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"invalid Redis URL {redacted(url)!r}: {_detail(exc, url)}") from None
    options.update(overrides)
    options["decode_responses"] = False
    if wanted:
        if url.startswith("unix://") or database not in ("", "0"):
            raise ConfigurationError(f"invalid Redis URL {redacted(url)!r}: a Redis Cluster has no unix sockets "
                                     "and only database 0")  # fmt: skip
        return _cluster_client(url, options)
    try:
        client = redis.Redis.from_url(url, **options)
    except ValueError as exc:
        raise ConfigurationError(f"invalid Redis URL {redacted(url)!r}: {_detail(exc, url)}") from None
    if wanted is None and not url.startswith("unix://") and database in ("", "0") and _cluster_enabled(client):
        client.close()
        return _cluster_client(url, options)
    return client


def deployment_from_url(
    url: str, *, cluster: bool | str | None = None, replica_reads: bool | str | None = None, **overrides: Any
) -> Deployment:
    """The ``Deployment`` (owning its client) for a URL: ``client_from_url``, plus
    ``replica_reads`` (keyword, or ``?replica_reads=yes``): workers read chunks from replicas."""
    _, ours = _split_query(url) if isinstance(url, str) else (url, {})
    reads = _flag(replica_reads if replica_reads is not None else ours.get("replica_reads"), "replica_reads", url)
    return deployment_for(_client(url, cluster, overrides), owns_client=True, replica_reads=bool(reads))


def given_username(client: redis.Redis) -> str | None:
    """The ACL user name ``client`` was given (in its URL or options); None when it was given
    none (a password alone logs in as ``default``)."""
    pool = getattr(client, "connection_pool", None)
    name = getattr(pool, "connection_kwargs", {}).get("username")
    return name.decode() if isinstance(name, bytes) else name


# ---------------------------------------------------------------------------------------
# The deployment
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RawConnection:
    """A pooled redis-py connection and its plain socket, for reading replies by hand.
    ``replica``: the connection is to a replica (READONLY), so a miss may be replication lag."""

    connection: Any
    sock: socket.socket
    replica: bool = False

    def send(self, commands: list[tuple[Any, ...]]) -> None:
        """Send ``commands`` pipelined, without reading any reply."""
        self.connection.send_packed_command(self.connection.pack_commands(commands))


def _checkout(pool: Any) -> Any:
    try:
        return pool.get_connection()
    except TypeError:  # redis-py 5 requires a command name
        return pool.get_connection("GET")


@contextlib.contextmanager
def _raw_connection(pool: Any, *, replica: bool = False, readonly: bool = False) -> Iterator[RawConnection | None]:
    """A connection of ``pool`` with its plain socket (None without one), back to the pool after
    the block; disconnected first if the block raised. ``replica``: the pool's node is a replica;
    ``readonly``: a cluster replica, which serves reads only after ``READONLY``."""
    connection = _checkout(pool)
    try:
        connection.connect()
        if readonly:
            connection.send_command("READONLY")
            if connection.read_response() not in (b"OK", "OK"):
                raise redis.exceptions.ConnectionError("READONLY refused by the replica")
    except BaseException:
        connection.disconnect()
        pool.release(connection)
        raise
    sock = getattr(connection, "_sock", None)  # redis-py's socket: touched only here
    if not isinstance(sock, socket.socket):
        pool.release(connection)
        yield None
        return
    try:
        yield RawConnection(connection, sock, replica)
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


def run_per_node(groups: dict[str, T], work: Callable[[T], None]) -> None:
    """``work(group)`` for every node's group: inline for one node, else one thread per node
    (socket reads and writes release the GIL, so the nodes' transfers overlap). Waits for all;
    the first error raised in any of them is raised here."""
    if len(groups) <= 1:
        for group in groups.values():
            work(group)
        return
    errors: list[BaseException] = []

    def run(group: T) -> None:
        try:
            work(group)
        except BaseException as exc:  # handed to the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(g,), name=f"redis-weights-node-{n}", daemon=True)
               for n, g in groups.items()]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


@dataclass(frozen=True)
class Replication:
    """What one master said to a push's ``WAIT``: how many replicas it had online, how many the
    push asked for, and how many acknowledged everything written before the marker."""

    master: str
    online: int
    wanted: int
    acknowledged: int

    @property
    def short(self) -> bool:
        """Fewer replicas acknowledged than were asked for."""
        return self.acknowledged < self.wanted


def _online_replicas(client: redis.Redis) -> int | None:
    """How many replicas the master reports online (``INFO replication``); None when it will not say
    (fakeredis, a user without ``+info``)."""
    try:
        info = client.info("replication")
    except redis.exceptions.ResponseError:
        return None
    count = 0
    for name, value in info.items():
        if str(name).startswith("slave") and isinstance(value, dict) and value.get("state") == "online":
            count += 1
    return count


class Deployment:
    """The Redis behind one client: describe it, scope caches by it, reach its nodes.

    This class is a standalone server; ``SentinelDeployment`` a Sentinel-managed primary,
    ``ClusterDeployment`` a Redis Cluster (``deployment_for`` picks). Every method that
    reaches "the nodes" (``masters``, ``group_by_node``, ``bulk_connection``) hides which
    it is from the callers.

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
        results = []
        for address, client in self.masters():
            online = _online_replicas(client)
            wanted = (online or 0) if replicas is None else replicas
            if wanted <= 0:
                results.append(Replication(address, online or 0, 0, 0))
                continue
            pipe = client.pipeline(transaction=False)  # one connection: WAIT counts from the marker
            pipe.set(self.marker_on(address, keyspace), "1", px=_MARKER_TTL_MS)
            pipe.execute_command("WAIT", wanted, max(1, int(timeout * 1000)))
            _, acknowledged = pipe.execute()
            results.append(Replication(address, online or 0, wanted, int(acknowledged)))
        return results

    def marker_on(self, address: str, keyspace: Keys) -> str:
        """The ``WAIT`` marker's name on master ``address``: the namespace's own where one node holds
        every key (a cluster names a key in one of that master's slots instead)."""
        return keyspace.replication_marker

    def wait_for_primary(self, timeout: float = sentinel.FAILOVER_WAIT) -> bool:
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
        with _raw_connection(self.client.connection_pool) as raw:
            yield raw

    def close(self) -> None:
        """Close the client's connections, if this deployment owns the client."""
        if self.owns_client:
            self.client.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()!r}, owns_client={self.owns_client})"


class SentinelDeployment(Deployment):
    """The primary of a Sentinel-managed service behind a ``master_for`` client (``sentinel.py``).

    One node holds every key, as on a standalone server; the difference is who that node
    is: the sentinels say, and a failover changes it. Messages name the service and the
    primary last seen, the cache scope is the service (whichever node is its primary),
    and with ``replica_reads`` bulk reads go to the replicas the sentinels list
    (round-robin; the caller reads what a replica lacks from the primary).
    """

    kind = "sentinel"

    def __init__(self, client: redis.Redis, *, owns_client: bool = False, replica_reads: bool = False) -> None:
        pool = sentinel.pool_of(client)
        if pool is None:
            raise ConfigurationError(
                f"expected the master_for client of a Sentinel service, got {type(client).__name__}"
            )
        super().__init__(client, owns_client=owns_client, replica_reads=replica_reads)
        self._pool = pool
        self._replicas: redis.Redis | None = None  # built on first use, always closed by close()

    def describe(self) -> str:
        """The service, its sentinels and the primary last seen, without credentials."""
        return sentinel.describe(self._pool)

    def scope(self) -> str:
        """The service and its sentinels: the same whichever node is the primary now."""
        return sentinel.scope(self._pool)

    def masters(self) -> list[tuple[str, redis.Redis]]:
        """The primary as last seen (asked of the sentinels before the first connection)."""
        seen = self._pool.master_address
        try:
            address = f"{seen[0]}:{seen[1]}" if seen else sentinel.primary_address(self._pool)
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
            self._replicas = sentinel.replica_client(self._pool, retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
                                                     socket_timeout=min(REPLICA_SOCKET_TIMEOUT, own))  # fmt: skip
        return self._replicas

    @contextlib.contextmanager
    def bulk_connection(self, key: str | None = None, *, primary: bool = False) -> Iterator[RawConnection | None]:
        pool = (self._replica_client() if self.replica_reads and not primary else self.client).connection_pool
        with _raw_connection(pool, replica=pool is not self.client.connection_pool) as raw:
            yield raw

    def wait_for_primary(self, timeout: float = sentinel.FAILOVER_WAIT) -> bool:
        """Wait until the sentinels have promoted a primary that answers (after a lost connection)."""
        return sentinel.wait_for_primary(self._pool, timeout)

    def close(self) -> None:
        """The replicas' client (built here) in any case; the primary's and the sentinels' connections
        if this deployment owns the client."""
        if self._replicas is not None:
            self._replicas.close()
            self._replicas = None
        if self.owns_client:
            self.client.close()
            sentinel.close(self._pool)


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
            with _raw_connection(pool, replica=replica, readonly=replica) as raw:
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


def deployment_for(
    client: redis.Redis | RedisCluster, *, owns_client: bool = False, replica_reads: bool = False
) -> Deployment:
    """The ``Deployment`` of ``client``: a ``ClusterDeployment`` for a ``RedisCluster``, a
    ``SentinelDeployment`` for a Sentinel ``master_for`` client."""
    kind: type[Deployment] = Deployment
    if isinstance(client, RedisCluster):
        kind = ClusterDeployment
    elif sentinel.pool_of(client) is not None:
        kind = SentinelDeployment
    return kind(client, owns_client=owns_client, replica_reads=replica_reads)
