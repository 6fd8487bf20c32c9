"""``RedisSyncOptions``: every option of a Redis weight sync, trainer and worker side, declared once.

The scheme, ``CollectorWeightReceiver`` and the core classes they build all read
their options from one frozen dataclass instead of re-declaring each keyword. The
defaults are read from the core constructors' signatures, so a changed default in
``RedisWeightUpdater`` / ``RedisWeightReceiver`` needs no edit here.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...errors import ConfigurationError
from ...receiver import RedisWeightReceiver
from ...updater import RedisWeightUpdater


def _default(cls: type, name: str) -> Any:
    """The default of keyword ``name`` of ``cls.__init__`` (the one place it is declared)."""
    return inspect.signature(cls.__init__).parameters[name].default


@dataclass(frozen=True)
class RedisSyncOptions:
    """Options of a Redis weight sync, for both sides.

    Trainer side (the core ``RedisWeightUpdater``):
        sync: a send waits for every targeted rank's ack.
        max_lag: with ``sync=False``, a send returns while every targeted rank runs a
            version at most this many behind, else waits for the laggards (None: no bound).
        timeout: seconds a sync send (or ``wait()``) waits for acks.
        chunk_size, retention, pending_ttl, metadata: as ``RedisWeightUpdater``.
        upload_in_background: the updater's ``background`` (needs ``sync=False``):
            a send returns after a memcpy; the upload runs on a thread.
        min_replicas, replica_timeout: the ``WAIT`` before each commit, as ``RedisWeightUpdater``.

    Worker side (the core ``RedisWeightReceiver`` and the collector guard):
        background: apply new versions from a thread, between batches (False:
            check Redis at the start of each batch; no thread).
        connect_timeout: seconds a receiver waits at ``connect()`` for the first
            version it must start from (None: ``timeout``).
        poll_interval, heartbeat_ttl, allow_cast, host_cache, read_from_replicas: as
            ``RedisWeightReceiver``.

    Both sides:
        check_server: check at start-up that Redis is reachable and safe.
        client_options: extra ``redis.Redis`` options (TLS, timeouts...) used when
            connecting from a URL.
    """

    sync: bool = True
    max_lag: int | None = _default(RedisWeightUpdater, "max_lag")
    timeout: float = _default(RedisWeightUpdater, "timeout")
    chunk_size: int = _default(RedisWeightUpdater, "chunk_size")
    retention: int = _default(RedisWeightUpdater, "retention")
    pending_ttl: float = _default(RedisWeightUpdater, "pending_ttl")
    metadata: Mapping[str, str] = field(default_factory=dict)
    upload_in_background: bool = False
    min_replicas: int | None = _default(RedisWeightUpdater, "min_replicas")
    replica_timeout: float = _default(RedisWeightUpdater, "replica_timeout")
    background: bool = True
    connect_timeout: float | None = None
    poll_interval: float = _default(RedisWeightReceiver, "poll_interval")
    heartbeat_ttl: float = _default(RedisWeightReceiver, "heartbeat_ttl")
    allow_cast: bool = _default(RedisWeightReceiver, "allow_cast")
    host_cache: bool | str = _default(RedisWeightReceiver, "host_cache")
    read_from_replicas: bool = _default(RedisWeightReceiver, "read_from_replicas")
    check_server: bool = _default(RedisWeightUpdater, "check_server")
    client_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ConfigurationError(f"timeout must be positive, got {self.timeout!r}")
        if self.connect_timeout is not None and self.connect_timeout < 0:
            raise ConfigurationError(f"connect_timeout must be >= 0 or None, got {self.connect_timeout!r}")
        if self.upload_in_background and self.sync:
            raise ConfigurationError("upload_in_background=True needs sync=False")

    @classmethod
    def of(cls, options: RedisSyncOptions | None = None, **overrides: Any) -> RedisSyncOptions:
        """``options`` (default: all defaults) with ``overrides`` applied; unknown names are refused."""
        base = cls() if options is None else options
        if not isinstance(base, cls):
            raise ConfigurationError(f"options must be a {cls.__name__}, got {type(base).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigurationError(f"unknown option(s) {unknown}; {cls.__name__} has {sorted(known)}")
        return dataclasses.replace(base, **overrides) if overrides else base

    @property
    def first_version_timeout(self) -> float:
        """Seconds a receiver waits at connect time for its first version."""
        return self.timeout if self.connect_timeout is None else self.connect_timeout

    def updater_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``RedisWeightUpdater`` (after store, weights, num_workers)."""
        return {
            "sync": self.sync,
            "max_lag": self.max_lag,
            "timeout": self.timeout,
            "chunk_size": self.chunk_size,
            "retention": self.retention,
            "pending_ttl": self.pending_ttl,
            "metadata": dict(self.metadata),
            "check_server": self.check_server,
            "background": self.upload_in_background,
            "min_replicas": self.min_replicas,
            "replica_timeout": self.replica_timeout,
        }

    def receiver_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``RedisWeightReceiver`` (after store, rank, policy)."""
        return {
            "poll_interval": self.poll_interval,
            "heartbeat_ttl": self.heartbeat_ttl,
            "allow_cast": self.allow_cast,
            "check_server": self.check_server,
            "host_cache": self.host_cache,
            "read_from_replicas": self.read_from_replicas,
        }

    def updater(self, store: Any, num_workers: int, policy_weights: Any = None) -> RedisWeightUpdater:
        """A core updater with these options."""
        return RedisWeightUpdater(store, policy_weights, num_workers, **self.updater_kwargs())

    def receiver(self, store: Any, rank: int, policy: Any) -> RedisWeightReceiver:
        """A core receiver with these options."""
        return RedisWeightReceiver(store, rank, policy, **self.receiver_kwargs())
