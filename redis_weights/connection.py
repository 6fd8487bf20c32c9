"""Build the redis-py client: timeouts, idempotent retries, TLS and ACL from the URL.

``redis.Redis.from_url`` retries nothing by default and waits forever on a dead
socket; here every client gets finite timeouts and a short retry with backoff on
connection errors. Every command this library sends is idempotent (SET, GET,
MGET, the commit and ack scripts) or harmless to repeat (PUBLISH of a hint,
INCR that skips a number), so a retry never corrupts state.

Large values go through redis-py's pure-Python command packer: it hands
memoryviews to ``sendall`` without copying them, where the hiredis packer
copies each value twice (see DESIGN.md).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.connection import PythonRespSerializer
from redis.retry import Retry

from . import health
from .errors import ConfigurationError
from .keys import Keys

log = logging.getLogger(__name__)

DEFAULT_SOCKET_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_RETRIES = 3
_PACKER_BUFFER_CUTOFF = 6000  # redis-py's own cutoff: smaller args are joined, larger sent as-is


def subscribe(client: redis.Redis, channel: str) -> redis.client.PubSub:
    """A pub/sub connection subscribed to ``channel``, yielding messages only (no confirmations)."""
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel)
    return pubsub


def close_subscription(pubsub: redis.client.PubSub | None) -> None:
    """Close a pub/sub connection; one already lost with Redis closes quietly."""
    if pubsub is not None:
        with contextlib.suppress(redis.exceptions.ConnectionError, OSError):
            pubsub.close()


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
    """A ``redis.Redis`` for ``redis://``, ``rediss://`` (TLS) or ``unix://`` URLs.

    User and password come from the URL (``redis://user:pass@host:6379/0``); TLS
    options (``ssl_ca_certs=...``) may be given as keyword arguments or query
    parameters. Responses stay bytes: weights are binary.
    """
    if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigurationError(
            f"unsupported Redis URL {redacted(url)!r}: expected redis://, rediss:// or unix://"
        )
    database = urlsplit(url).path.strip("/")
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
        raise ConfigurationError(f"invalid Redis URL {redacted(url)!r}: {exc}") from exc


def redacted(url: object) -> str:
    """The URL with its password replaced by ``***``, for messages and logs."""
    text = str(url)
    try:
        parts = urlsplit(text)
        if parts.password is None:
            return text
        user = f"{parts.username}:" if parts.username else ":"
        host = parts.netloc.rsplit("@", 1)[1]
        return parts._replace(netloc=f"{user}***@{host}").geturl()
    except ValueError:
        return "<unparsable URL>"


def describe(client: Any) -> str:
    """``host:port/db`` (or the socket path) of a client, without credentials, for messages."""
    try:
        kwargs = client.connection_pool.connection_kwargs
    except AttributeError:
        return type(client).__name__
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


def ensure_reachable(client: Any, probe_key: str) -> None:
    """Fail at start, with one clear ``ConfigurationError``, when Redis cannot be used.

    Reads ``probe_key`` (a key the caller needs anyway): that proves the server
    answers, the credentials are accepted and the user may read the namespace.
    Bounded by the client's connect timeout and retries, never a hang.
    """
    where = describe(client)
    try:
        client.get(probe_key)
    except redis.exceptions.AuthenticationError as exc:
        raise ConfigurationError(f"Redis at {where} refused the credentials: {exc}") from exc
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise ConfigurationError(f"cannot reach Redis at {where}: {exc}") from exc
    except redis.exceptions.ResponseError as exc:  # NOAUTH, NOPERM, WRONGTYPE
        raise ConfigurationError(f"Redis at {where} refused to read {probe_key!r}: {exc}") from exc


def ensure_server(client: Any, keyspace: Keys) -> None:
    """Everything a trainer or worker checks at start: reachable, credentials accepted,
    no eviction policy that could drop committed chunks, and the ACL rights the
    namespace needs (keys, scripts, channels). One ``ConfigurationError`` otherwise."""
    ensure_reachable(client, keyspace.latest)
    health.ensure_no_eviction(client)
    acl = health.check_acl(client, keyspace)
    if acl.unsafe:
        raise health.UnsafeServerError(f"Redis at {describe(client)}: {acl.what}; fix: {acl.fix}")
