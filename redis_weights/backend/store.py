"""``RedisStore``: the ``dict[str, str]`` store of the updater, over one Redis namespace.

A real ``MutableMapping[str, str]``: ``store["rank:1:status"]`` reads
``rw:{policy}:rank:1:status``. It also offers the TCPStore-like calls the seed's
store has (``set``, ``get``, ``delete_key``, ``wait``) and holds the ``Deployment``
(the redis-py client and what it reaches) that the updater and receiver share.

The mapping covers the namespace's text keys (status, versions, manifests). Weight
chunks are binary and the version list is a sorted set: neither is listed by
iteration, and reading one through the mapping raises ``KeyError``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any

import redis
from redis.cluster import RedisCluster

from ..errors import RedisWeightsError
from .deployment import Deployment, deployment_for, deployment_from_url
from .index import NamespaceIndex
from .keys import DEFAULT_NAMESPACE, Keys
from .values import MAX_VERSION, parse_int

_TYPE_ROUND = 1000  # TYPE commands per round trip while iterating


class StoreTimeoutError(RedisWeightsError, TimeoutError):
    """``RedisStore.wait`` gave up before every key existed."""


class RedisStore(MutableMapping[str, str]):
    """A ``MutableMapping[str, str]`` over the keys of one namespace.

    Args:
        client: a ``redis.Redis`` client, a ``redis.cluster.RedisCluster``, or a ``Deployment``.
        namespace: the namespace; all keys live under ``rw:{namespace}:``.
        owns_client: whether ``close()`` closes ``client``. False by default: a client
            the caller made is the caller's to close (redis-py's convention). A store
            made by ``from_url`` owns the client it built.
        url: the URL the client was built from, if any (kept for processes that
            rebuild the store elsewhere, e.g. the TorchRL scheme).
        replica_reads: workers read chunks from the replicas of a Redis Cluster (a chunk a
            replica lacks is read from its primary).
    """

    def __init__(
        self,
        client: redis.Redis | RedisCluster | Deployment,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        owns_client: bool = False,
        url: str | None = None,
        replica_reads: bool = False,
    ) -> None:
        if isinstance(client, Deployment):
            self.deployment = client
        else:
            self.deployment = deployment_for(client, owns_client=owns_client, replica_reads=replica_reads)
        self.keyspace = Keys(namespace)
        self.url = url

    @classmethod
    def from_url(cls, url: str, namespace: str = DEFAULT_NAMESPACE, **client_options: Any) -> RedisStore:
        """Connect to ``redis://``, ``rediss://`` or ``unix://`` (user and password in the URL): a
        standalone server or any node of a Redis Cluster (``deployment.client_from_url``: detected,
        or forced with ``cluster=True`` / ``?cluster=yes``; ``replica_reads=True`` /
        ``?replica_reads=yes`` for a cluster's replicas)."""
        return cls(deployment_from_url(url, **client_options), namespace, url=url)

    @property
    def client(self) -> redis.Redis | RedisCluster:
        """The redis-py client (the deployment's)."""
        return self.deployment.client

    @property
    def namespace(self) -> str:
        return self.keyspace.namespace

    # -- MutableMapping ---------------------------------------------------------------
    def __getitem__(self, key: str) -> str:
        if self.keyspace.is_blob(key):
            raise KeyError(key)
        try:
            value = self.client.get(self.keyspace.full(key))
        except redis.exceptions.ResponseError as exc:  # WRONGTYPE: not a string key
            raise KeyError(key) from exc
        if value is None:
            raise KeyError(key)
        return value.decode() if isinstance(value, bytes) else str(value)

    def __setitem__(self, key: str, value: str) -> None:
        if not isinstance(value, (str, bytes, int, float)) or isinstance(value, bool):
            raise TypeError(f"RedisStore values are strings, got {type(value).__name__}")
        pipe = self.client.pipeline(transaction=False)  # one slot: the name is indexed, then set
        pipe.sadd(self.keyspace.names_index, key)
        pipe.set(self.keyspace.full(key), value)
        pipe.execute()

    def __delitem__(self, key: str) -> None:
        if not self.delete_key(key):
            raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        """The namespace's text keys, from its index (``index.py``): the names set through this
        mapping, the library's own keys, each rank's and each committed version's; never a SCAN
        of the keyspace. Each candidate is checked (one pipelined TYPE per 1000)."""
        index = NamespaceIndex(self.client, self.keyspace)
        k = self.keyspace
        candidates = ["latest", "next", "gc:epoch", "gc:lease", *index.names()]
        candidates += [k.relative(k.manifest(v)) for v in self._versions()]
        candidates += [k.relative(k.pending(t)) for t in index.pushes()]
        for rank in index.ranks():
            candidates += [k.relative(n) for n in (k.rank_status(rank), k.rank_version(rank), k.rank_alive(rank),
                                                   k.rank_acked(rank))]  # fmt: skip
        candidates = [c for c in dict.fromkeys(candidates) if not k.is_blob(c)]
        for start in range(0, len(candidates), _TYPE_ROUND):
            batch = candidates[start : start + _TYPE_ROUND]
            pipe = self.client.pipeline(transaction=False)
            for relative in batch:
                pipe.type(k.full(relative))
            for relative, kind in zip(batch, pipe.execute(), strict=True):
                if kind in (b"string", "string"):
                    yield relative

    def _versions(self) -> list[int]:
        members = self.client.zrange(self.keyspace.versions, 0, -1)
        return [v for v in (parse_int(m, minimum=1, maximum=MAX_VERSION) for m in members) if v is not None]

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str) or self.keyspace.is_blob(key):
            return False
        return self.client.type(self.keyspace.full(key)) in (b"string", "string")

    # -- TCPStore-like calls ------------------------------------------------------------
    def set(self, key: str, value: str | bytes) -> None:
        """Set ``key`` (TCPStore spelling of ``store[key] = value``)."""
        self[key] = value.decode() if isinstance(value, bytes) else value

    def delete_key(self, key: str) -> bool:
        """Delete ``key``; True if it existed (as ``TCPStore.delete_key``)."""
        existed = bool(self.client.delete(self.keyspace.full(key)))
        self.client.srem(self.keyspace.names_index, key)  # after the key: the index stays a superset
        return existed

    def wait(self, keys: Iterable[str], timeout: float | None = 30.0, poll_interval: float = 0.01) -> None:
        """Block until every key exists; raise ``StoreTimeoutError`` after ``timeout`` seconds."""
        names = [self.keyspace.full(k) for k in keys]
        if not names:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll_interval
        while True:
            if self.client.exists(*names) == len(set(names)):
                return
            if deadline is not None and time.monotonic() >= deadline:
                missing = [self.keyspace.relative(n) for n in names if not self.client.exists(n)]
                raise StoreTimeoutError(f"keys still missing after {timeout}s: {missing}")
            time.sleep(delay)
            delay = min(delay * 2, 0.25)

    # -- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        """Close the client if this store owns it (made by ``from_url``, or ``owns_client=True``)."""
        self.deployment.close()

    def __enter__(self) -> RedisStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisStore(namespace={self.namespace!r}, server={self.deployment.describe()!r})"


def as_store(store: RedisStore | str | redis.Redis | RedisCluster, namespace: str | None = None) -> RedisStore:
    """Accept a ``RedisStore``, a Redis URL (the store owns the client it builds) or a
    redis-py client, standalone or cluster (left open by ``close()``: it is the caller's)."""
    if isinstance(store, RedisStore):
        return store
    if isinstance(store, str):
        return RedisStore.from_url(store, namespace or DEFAULT_NAMESPACE)
    return RedisStore(store, namespace or DEFAULT_NAMESPACE)  # the deployment refuses what is no client
