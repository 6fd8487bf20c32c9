"""The Redis deployment a store talks to: building its client, naming it, reaching its nodes.

One owner for everything that depends on *what* Redis is on the other end: the
client built from a URL (timeouts, idempotent retries, TLS and ACL from the URL),
the description of the server in messages (never with credentials), the identity
that scopes the host cache, the per-node connections that bulk reads use, the
masters a push waits on (``WAIT``) and the replicas workers may read from.
Standalone servers and Sentinel-managed primaries (``redis+sentinel://``, whose
details live in ``sentinel.py``) are supported; Cluster belongs here.

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
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.connection import PythonRespSerializer
from redis.retry import Retry

from . import sentinel
from .errors import ConfigurationError

DEFAULT_SOCKET_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_RETRIES = 3
REPLICA_SOCKET_TIMEOUT = 5.0  # seconds a replica read waits for a silent replica before reading from the primary
_PACKER_BUFFER_CUTOFF = 6000  # redis-py's own cutoff: smaller args are joined, larger sent as-is
_SCHEMES = ("redis://", "rediss://", "unix://", *sentinel.SCHEMES)
_QUERY_PASSWORD = re.compile(r"([?&](?:sentinel_)?password=)[^&#]*", re.IGNORECASE)
_SPECIAL = re.compile(r"[#?/@:]")
_UNENCODED = re.compile(r"[#?/]")  # characters that end a URL's host part: never inside its credentials
_LOST = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
_MARKER_TTL_MS = 60_000  # the WAIT marker is a few bytes that vanish by themselves


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


def client_from_url(url: str, **overrides: Any) -> redis.Redis:
    """A ``redis.Redis`` for ``redis://``, ``rediss://`` (TLS), ``unix://`` or Sentinel URLs.

    User and password come from the URL (``redis://user:pass@host:6379/0``); TLS
    options (``ssl_ca_certs=...``) may be given as keyword arguments or query
    parameters. ``redis+sentinel://[user:pass@]host1:26379,host2:26379/<service>[/db]``
    (``rediss+sentinel://`` for TLS) gives the client of the service's current
    primary (see ``sentinel.py``). Responses stay bytes: weights are binary. A
    refused URL is a ``ConfigurationError`` that never shows the password.
    """
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
        options = default_client_options()
        options["decode_responses"] = False
        target = sentinel.parse_url(url, shown=redacted(url))
        try:
            return sentinel.master_client(target, options, {**overrides, "decode_responses": False})
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"invalid Redis URL {redacted(url)!r}: {_detail(exc, url)}") from None
    try:
        database = urlsplit(redacted(url)).path.strip("/")  # the credentials, redacted, cannot hold a '/'
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        raise ConfigurationError(f"invalid Redis URL {redacted(url)!r}: {exc}") from None
    if not url.startswith("unix://") and database and not database.isdigit():
        # redis-py would silently use database 0
        raise ConfigurationError(f"invalid Redis URL {redacted(url)!r}: database {database!r} is not a number")
    options = default_client_options()
    if url.startswith("unix://"):
        del options["socket_keepalive"]  # a TCP option: redis-py's UnixDomainSocketConnection refuses it
    options.update(overrides)
    options["decode_responses"] = False
    try:
        return redis.Redis.from_url(url, **options)
    except ValueError as exc:
        raise ConfigurationError(f"invalid Redis URL {redacted(url)!r}: {_detail(exc, url)}") from None


# ---------------------------------------------------------------------------------------
# The deployment
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RawConnection:
    """A pooled redis-py connection and its plain socket, for reading replies by hand."""

    connection: Any
    sock: socket.socket

    def send(self, commands: list[tuple[Any, ...]]) -> None:
        """Send ``commands`` pipelined, without reading any reply."""
        self.connection.send_packed_command(self.connection.pack_commands(commands))


def _checkout(pool: Any) -> Any:
    try:
        return pool.get_connection()
    except TypeError:  # redis-py 5 requires a command name
        return pool.get_connection("GET")


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


class Deployment:
    """The Redis behind one client: describe it, scope caches by it, reach its nodes.

    Args:
        client: a ``redis.Redis``: a standalone server, or the ``master_for`` client of a
            Sentinel-managed service (fakeredis works too).
        owns_client: whether ``close()`` closes the client. False for a client the
            caller handed in (redis-py's convention: the caller closes what it made);
            True for one built from a URL (``client_from_url``).
    """

    def __init__(self, client: redis.Redis, *, owns_client: bool = False) -> None:
        if not isinstance(client, redis.Redis):
            raise ConfigurationError(
                f"unsupported Redis client {type(client).__name__}: expected a redis.Redis "
                "(a standalone server or a Sentinel master_for client)"
            )
        self.client = client
        self.owns_client = owns_client
        self._sentinel = sentinel.pool_of(client)
        self._replicas: Deployment | None = None  # built on first use, always closed by close()

    def _connection_kwargs(self) -> dict[str, Any]:
        return dict(self.client.connection_pool.connection_kwargs)

    def describe(self) -> str:
        """``host:port/db`` (or ``unix:<path>``, or a Sentinel service) of the server, without
        credentials, for messages."""
        if self._sentinel is not None:
            return sentinel.describe(self._sentinel)
        kwargs = self._connection_kwargs()
        if "path" in kwargs:
            return f"unix:{kwargs['path']}"
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"

    def scope(self) -> str:
        """A stable identity of the data this client reaches (server and database; a Sentinel
        service, whichever node is its primary now), for scoping caches: two deployments with
        the same scope hold the same keys."""
        if self._sentinel is not None:
            return sentinel.scope(self._sentinel)
        return self.describe()

    @property
    def single_node(self) -> bool:
        """Whether one node holds every key (standalone, Sentinel), so one script may read any key."""
        return isinstance(self.client, redis.Redis)

    # -- masters and their replicas -------------------------------------------------------
    def masters(self) -> list[tuple[str, redis.Redis]]:
        """``(host:port, client)`` of every master: the server, or the Sentinel service's primary
        (as last seen; asked of the sentinels before the first connection)."""
        if self._sentinel is not None:
            seen = self._sentinel.master_address
            try:
                address = f"{seen[0]}:{seen[1]}" if seen else sentinel.primary_address(self._sentinel)
            except _LOST:
                address = f"{self._sentinel.service_name} (primary unknown)"
            return [(address, self.client)]
        kwargs = self._connection_kwargs()
        if "path" in kwargs:
            return [(f"unix:{kwargs['path']}", self.client)]
        return [(f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}", self.client)]

    def wait_for_replicas(self, marker: str, replicas: int | None, timeout: float) -> list[Replication]:
        """For each master: write ``marker`` and send ``WAIT n timeout`` on the same connection.

        A master's replication stream is ordered, so once a replica has acknowledged the
        marker it holds everything written before it, on any connection (every chunk of
        the push). ``replicas``: how many must acknowledge; None: as many as the master
        reports online (``INFO replication``; none: no WAIT at all). Waits at most
        ``timeout`` seconds per master; returns what each said (the caller decides
        whether a short count fails the push).
        """
        results = []
        for address, client in self.masters():
            key = self.marker_on(address, marker)
            online = _online_replicas(client)
            wanted = (online or 0) if replicas is None else replicas
            if wanted <= 0:
                results.append(Replication(address, online or 0, 0, 0))
                continue
            pipe = client.pipeline(transaction=False)  # one connection: WAIT counts from the marker
            pipe.set(key, "1", px=_MARKER_TTL_MS)
            pipe.execute_command("WAIT", wanted, max(1, int(timeout * 1000)))
            _, acknowledged = pipe.execute()
            results.append(Replication(address, online or 0, wanted, int(acknowledged)))
        return results

    def marker_on(self, address: str, marker: str) -> str:
        """The name of the ``WAIT`` marker written on master ``address``: ``marker`` itself where one
        node holds every key (a cluster names a key in one of that master's own slots instead)."""
        return marker

    def replica_reader(self) -> Deployment | None:
        """A deployment over the replicas that the sentinels list as up (round-robin; the
        primary when none is), for bulk reads of chunks; None for a standalone server (its
        replicas are unknown). Its client retries once and gives up on a silent replica after
        ``REPLICA_SOCKET_TIMEOUT``: a replica that fails sends the reader back to the primary,
        it does not hold it up."""
        if self._sentinel is None:
            return None
        if self._replicas is None:
            own = self._connection_kwargs().get("socket_timeout") or REPLICA_SOCKET_TIMEOUT
            timeout = min(REPLICA_SOCKET_TIMEOUT, own)
            client = sentinel.replica_client(self._sentinel, retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
                                             socket_timeout=timeout)  # fmt: skip
            self._replicas = Deployment(client, owns_client=True)
        return self._replicas

    def wait_for_primary(self, timeout: float = sentinel.FAILOVER_WAIT) -> bool:
        """After a lost connection: wait until a primary answers (a Sentinel service: until the
        sentinels have promoted one); True at once for a standalone server (nobody promotes one)."""
        if self._sentinel is None:
            return True
        return sentinel.wait_for_primary(self._sentinel, timeout)

    @contextlib.contextmanager
    def bulk_connection(self, key: str | None = None) -> Iterator[RawConnection | None]:
        """A pooled connection, with its plain socket, to the node that holds ``key``
        (a standalone server or a Sentinel primary holds every key; a cluster will pick
        the key's master).

        Yields None when the client has no plain socket (fakeredis): the caller then
        takes redis-py's ordinary path. After the block the connection goes back to
        the pool; if the block raised it is disconnected first, so a connection with
        unread replies is never reused.
        """
        pool = self.client.connection_pool
        connection = _checkout(pool)
        try:
            connection.connect()
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
            yield RawConnection(connection, sock)
        except BaseException:
            connection.disconnect()
            raise
        finally:
            pool.release(connection)

    def close(self) -> None:
        """Close the client's connections (and the sentinels'), if this deployment owns the client;
        the replicas' client, which it built itself, in any case."""
        if self._replicas is not None:
            self._replicas.close()
            self._replicas = None
        if self.owns_client:
            self.client.close()
            if self._sentinel is not None:
                sentinel.close(self._sentinel)

    def __repr__(self) -> str:
        return f"Deployment({self.describe()!r}, owns_client={self.owns_client})"


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
