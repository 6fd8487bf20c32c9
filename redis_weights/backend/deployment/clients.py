"""What every client built here shares: finite timeouts, idempotent retries, the copy-free packer,
and ``LOST``, the errors that mean "Redis stopped answering".

``redis.Redis.from_url`` retries nothing by default and waits forever on a dead
socket; every client built here gets finite timeouts and a short retry with
backoff on connection errors. Every command this library sends is idempotent
(SET, GET, MGET, the commit and ack scripts) or harmless to repeat (PUBLISH of a
hint, INCR that skips a number), so a retry never corrupts state.

Large values go through redis-py's pure-Python command packer: it hands
memoryviews to ``sendall`` without copying them, where the hiredis packer copies
each value twice (measured with redis-py 8.1 and hiredis 3).
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.connection import PythonRespSerializer
from redis.retry import Retry

DEFAULT_SOCKET_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_RETRIES = 3
# The errors that mean "Redis stopped answering" (as opposed to an error reply): retried by the
# clients built here, and what every caller catches to tell a lost Redis from a refusal. A
# RedisCluster raises RedisClusterException (no RedisError) when its slot map has a hole (a
# master lost without a replica to take over, "slot not covered").
LOST = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.RedisClusterException)
_PACKER_BUFFER_CUTOFF = 6000  # redis-py's own cutoff: smaller args are joined, larger sent as-is


def pure_python_packer() -> PythonRespSerializer:
    """redis-py's pure-Python command packer: large values are sent as they are, never copied."""
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
        "command_packer": pure_python_packer(),
    }


def given_username(client: redis.Redis) -> str | None:
    """The ACL user name ``client`` was given (in its URL or options); None when it was given
    none (a password alone logs in as ``default``)."""
    pool = getattr(client, "connection_pool", None)
    name = getattr(pool, "connection_kwargs", {}).get("username")
    return name.decode() if isinstance(name, bytes) else name
