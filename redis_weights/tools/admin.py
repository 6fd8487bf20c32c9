"""Operators' view of one namespace: versions, manifests, workers, export, import, rollback, GC, drop.

The ``redis-weights`` command and the scripts in ``scripts/`` both call these, so
a cron job and a person at a shell see the same numbers. Everything goes through
the library's own pieces (``VersionRegistry``, ``Manifest``, ``read_rank_states``,
``RedisWeightUpdater``); nothing here speaks the commit protocol by itself.

::

    with Admin.from_url("redis://localhost:6379/0", "policy") as admin:
        for row in admin.versions():
            print(row.version, row.total_bytes, row.ranks)
        admin.export("latest", "policy.safetensors")
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from ..backend.deployment import LOST, deployment_for, redacted
from ..backend.index import CorruptIndexError, IndexCheck, NamespaceIndex, ReindexReport
from ..backend.keys import DEFAULT_NAMESPACE, Keys
from ..backend.store import RedisStore
from ..backend.subscriptions import Subscription
from ..backend.values import MAX_VERSION, parse_int, text
from ..errors import CodecError, ConfigurationError, RedisWeightsError, VersionNotFoundError
from ..format.manifest import DEFAULT_CHUNK_SIZE, Manifest
from ..protocol.assemble import MissingObjectError
from ..protocol.push import rollback
from ..protocol.ranks import RankState, known_ranks, parse_ack, read_rank_states
from ..protocol.versions import VersionRegistry
from .export import check_target, write_version
from .facts import read_facts

log = logging.getLogger(__name__)

_NO_RETENTION = 2**31  # an import must not garbage-collect the versions an operator keeps
_DROP_BATCH = 1000  # keys per DEL when a namespace is dropped
EXPORT_ATTEMPTS = 5  # exports of "latest" lost to a newer push's GC before giving up
_Path = str | os.PathLike[str]


class RefusedError(RedisWeightsError):
    """An admin action refused because it would break the fleet (e.g. deleting the latest version)."""


@dataclass(frozen=True)
class VersionRow:
    """One committed version as the ``versions`` report shows it."""

    version: int
    latest: bool
    created: float
    total_bytes: int
    tensors: int
    chunks: int
    producer: str
    ranks: list[int] = field(default_factory=list)
    error: str | None = None  # a manifest that could not be read
    keyframe: bool = False  # every chunk stored whole (no patch chain)
    depth: int = 0  # versions since its keyframe
    stored_bytes: int = 0  # what a reader holding nothing downloads
    new_bytes: int = 0  # what its push uploaded

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class WorkerRow:
    """One rank as the ``workers`` report shows it.

    ``ack_latency``: seconds from the creation of the version the rank runs to the
    rank's ack of it (the trainer's and the worker's wall clocks; None when unknown).
    """

    rank: int
    status: str | None
    version: int
    lag: int
    heartbeat_age: float | None
    alive: bool
    ack_latency: float | None = None

    @classmethod
    def from_state(cls, state: RankState, latest: int, created: float | None = None) -> WorkerRow:
        return cls(state.rank, state.status, state.version, state.lag(latest), state.heartbeat_age, state.alive,
                   ack_latency(state, created))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Event:
    """A push (``kind="push"``) or an ack (``kind="ack"``) seen on the namespace's channels."""

    kind: str
    version: int
    time: float
    rank: int | None = None
    status: str | None = None
    total_bytes: int | None = None
    tensors: int | None = None
    producer: str | None = None
    lag: int | None = None  # an ack: versions the rank is behind latest
    ack_latency: float | None = None  # an ack: seconds since the version was created

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def ack_latency(state: RankState, created: float | None) -> float | None:
    """Seconds from ``created`` (the version the rank runs) to the rank's last ack; None when unknown."""
    if state.acked_at is None or not created or not state.version:
        return None
    return max(0.0, state.acked_at - created)


def manifest_dict(manifest: Manifest) -> dict[str, Any]:
    """A JSON-ready view of a manifest: version facts, storage (keyframe or patches), tensors
    (offset order), the packs of its chain and chunks (``patches``: a format-2 chain's own)."""
    return {
        "version": manifest.version,
        "created": manifest.created,
        "producer": manifest.producer,
        "total_bytes": manifest.total_bytes,
        "header_bytes": manifest.header_len,
        "metadata": dict(manifest.metadata),
        "checksum_algo": manifest.checksum_algo,
        "storage": "full" if manifest.is_keyframe else "patch",
        "keyframe": manifest.keyframe,
        "base": manifest.parent,
        "chain_length": manifest.depth,
        "chained_chunks": sum(c.base is not None for c in manifest.chunks),
        "packs": [{"version": p.version, "id": p.id, "bytes": p.size} for p in manifest.packs],
        "stored_bytes": manifest.stored_bytes(),
        "new_bytes": manifest.uploaded_bytes,
        "wire_dtype": manifest.wire_dtype,
        "cast": dict(manifest.cast),
        "tensors": [
            {"name": e.name, "dtype": e.dtype, "shape": list(e.shape), "bytes": e.nbytes,
             "offsets": [manifest.header_len + e.begin, manifest.header_len + e.end]}
            for e in manifest.tensors
        ],  # fmt: skip
        "chunks": [{"index": i, "bytes": size, "id": entry.id, "base": entry.base,
                    "patches": [{"id": s.patch, "bytes": s.size} for s in entry.steps]}
                   for i, (entry, size) in enumerate(zip(manifest.chunks, manifest.chunk_sizes, strict=True))],
    }


def parse_version(spec: str | int) -> int | str:
    """``"latest"`` or a positive version number; anything else is a ``ConfigurationError``."""
    if isinstance(spec, int):
        value = spec
    elif spec.strip().lower() == "latest":
        return "latest"
    else:
        try:
            value = int(spec.strip().lstrip("v"))
        except ValueError:
            raise ConfigurationError(f"version must be a number or 'latest', got {spec!r}") from None
    if value < 1:
        raise ConfigurationError(f"version numbers start at 1, got {value}")
    return value


class Admin:
    """Admin actions on one namespace of one Redis (see the module docstring)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.client = store.client
        self.keyspace: Keys = store.keyspace
        self.registry = VersionRegistry(store.deployment, self.keyspace)

    @classmethod
    def from_url(cls, url: str, namespace: str = DEFAULT_NAMESPACE) -> Admin:
        return cls(RedisStore.from_url(url, namespace))

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- resolving ------------------------------------------------------------------------
    def resolve(self, spec: str | int) -> int:
        """A version number from ``"latest"`` or a number; ``VersionNotFoundError`` if none is committed."""
        parsed = parse_version(spec)
        if parsed == "latest":
            latest = self.registry.latest()
            if latest == 0:
                raise VersionNotFoundError(f"namespace {self.keyspace.namespace!r} has no committed version")
            return latest
        assert isinstance(parsed, int)
        return parsed

    def manifest(self, spec: str | int) -> Manifest:
        """The manifest of a version; a clear error when it does not exist."""
        version = self.resolve(spec)
        try:
            return self.registry.read_manifest(version)
        except VersionNotFoundError:
            known = self.registry.list_versions()
            hint = f" (committed: {', '.join(map(str, known))})" if known else " (no version is committed)"
            raise VersionNotFoundError(
                f"version {version} not found in namespace {self.keyspace.namespace!r}{hint}"
            ) from None

    # -- reports --------------------------------------------------------------------------
    def known_ranks(self) -> list[int]:
        """Every rank that ever joined this namespace (its version key exists), sorted."""
        return known_ranks(self.client, self.keyspace)

    def rank_states(self, ranks: list[int] | None = None) -> list[RankState]:
        return read_rank_states(self.client, self.keyspace, self.known_ranks() if ranks is None else ranks)

    def workers(self, ranks: list[int] | None = None) -> tuple[int, list[WorkerRow]]:
        """``(latest, one row per rank)``: status, applied version, lag, heartbeat age, alive, ack latency."""
        latest = self.registry.latest()
        states = self.rank_states(ranks)
        created = self.created_times({s.version for s in states if s.version})
        return latest, [WorkerRow.from_state(s, latest, created.get(s.version)) for s in states]

    def _manifests(self, versions: list[int]) -> list[Manifest | CodecError]:
        """The manifest of each of ``versions`` (one round trip, a GET each: an MGET of many big
        manifests would hold Redis while it copies them all), or the ``CodecError`` saying why it cannot be read."""
        pipe = self.client.pipeline(transaction=False)
        for v in versions:
            pipe.get(self.keyspace.manifest(v))
        raws = pipe.execute() if versions else []
        out: list[Manifest | CodecError] = []
        for version, raw in zip(versions, raws, strict=True):
            try:
                out.append(Manifest.from_bytes(raw, version) if raw is not None else CodecError("manifest is missing"))
            except CodecError as exc:
                out.append(exc)
        return out

    def created_times(self, versions: set[int] | list[int]) -> dict[int, float]:
        """The ``created`` time of each of ``versions`` still in Redis (the two ends of each manifest: ``facts``)."""
        return {v: f.created for v, f in read_facts(self.registry, versions).items()}

    def versions(self) -> list[VersionRow]:
        """One row per committed version, oldest first, with the ranks that run it."""
        versions = self.registry.list_versions()
        latest = self.registry.latest()
        running: dict[int, list[int]] = {}
        for state in self.rank_states():
            if state.version:
                running.setdefault(state.version, []).append(state.rank)
        rows = []
        for version, m in zip(versions, self._manifests(versions), strict=True):
            ranks = running.get(version, [])
            if isinstance(m, CodecError):
                rows.append(VersionRow(version, version == latest, 0.0, 0, 0, 0, "", ranks, str(m)))
                continue
            rows.append(VersionRow(version, version == latest, m.created, m.total_bytes, len(m.tensors),
                                   m.num_chunks, m.producer, ranks, keyframe=m.is_keyframe, depth=m.depth,
                                   stored_bytes=m.stored_bytes(), new_bytes=m.uploaded_bytes))  # fmt: skip
        return rows

    def watch(self, timeout: float | None = None) -> Iterator[Event]:
        """Pushes and acks as they are published, until ``timeout`` seconds pass (None: forever).

        Pub/sub is at-most-once: a watcher that falls behind may miss events; the
        ``versions`` and ``workers`` reports are the truth. A lost connection is
        subscribed again; a subscription the server refuses (``NOPERM``) raises.
        """
        k = self.keyspace
        subscription = Subscription(self.client, [k.updates_channel, k.acks_channel], what="watch subscription",
                                    poll_every=1.0)  # fmt: skip
        subscription.open()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if wait <= 0:
                    return
                for channel, data in subscription.messages(wait):
                    event = self._event(channel, data)
                    if event is not None:
                        yield event
                if subscription.refused and subscription.error is not None:  # nothing to watch without it
                    raise subscription.error
        finally:
            subscription.close()

    def _event(self, channel: str, data: str) -> Event | None:
        """The event a message announces; None for a message that is not one (checked, never trusted)."""
        now = time.time()
        if channel == self.keyspace.updates_channel:
            version = parse_int(data, minimum=1, maximum=MAX_VERSION)
            if version is not None:
                try:
                    m = self.registry.read_manifest(version)
                except (VersionNotFoundError, CodecError):
                    return Event("push", version, now)
                return Event("push", version, now, total_bytes=m.total_bytes, tensors=len(m.tensors),
                             producer=m.producer)  # fmt: skip
        elif (ack := parse_ack(data)) is not None:
            rank, version = ack
            state = read_rank_states(self.client, self.keyspace, [rank])[0]
            latency = ack_latency(state, self.created_times([state.version]).get(state.version))
            return Event("ack", version, now, rank=rank, status=state.status, lag=state.lag(self.registry.latest()),
                         ack_latency=latency)  # fmt: skip
        log.debug("ignoring message %r on %s", data, channel)
        return None

    # -- files ----------------------------------------------------------------------------
    def export(self, spec: str | int, path: _Path | Callable[[int], _Path]) -> Manifest:
        """Write a version to ``path``: a ``.safetensors`` file, bit-exact, whether the version is
        stored whole or as patches (keyframe chunks patched in the file, each chunk verified).

        ``path`` may be a function of the version number (``scripts/export_latest.py`` names
        its files after the version). Written to a temporary file in the same directory, then
        renamed: a reader never sees half a file (``redis_weights.tools.export``). A ``path``
        that is a directory, or whose directory does not exist, is a ``ConfigurationError``,
        checked before anything is read from Redis; write errors name ``path``.

        ``"latest"`` exported while a trainer pushes (and its GC drops the version being read)
        is tried again on the new latest, up to ``EXPORT_ATTEMPTS`` times. A chunk missing
        from a version still retained, or a version garbage-collected while it was read, is a
        ``RedisWeightsError`` naming the version.
        """
        if not callable(path):
            check_target(path)
        latest = parse_version(spec) == "latest"
        for attempt in range(1, EXPORT_ATTEMPTS + 1):
            version = self.resolve(spec)
            target = check_target(path(version) if callable(path) else path)
            try:
                manifest = self.manifest(version)
            except VersionNotFoundError:
                if not latest:
                    raise  # never committed, or deleted: the error lists the committed versions
                continue  # a newer push's GC took it between the two reads
            try:
                write_version(self.registry.chunks, manifest, target)
                return manifest
            except MissingObjectError as exc:
                if self.registry.exists(version):
                    raise MissingObjectError(f"{exc}: the version is damaged, export another one") from None
                if not latest:
                    raise VersionNotFoundError(
                        f"version {version} was garbage-collected while it was exported ({exc})"
                    ) from None
            log.info("export of latest: version %d was garbage-collected while it was read (attempt %d)",
                     version, attempt)  # fmt: skip
        raise RedisWeightsError(
            f"latest moved {EXPORT_ATTEMPTS} times while it was exported: the trainer garbage-collects "
            "each version faster than it can be read; export while it pauses, or raise its retention"
        )

    def import_file(
        self,
        path: str | os.PathLike[str],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        metadata: dict[str, str] | None = None,
    ) -> Manifest:
        """Publish a ``.safetensors`` checkpoint as a new version, through ``RedisWeightUpdater``.

        Every rank that has joined is marked ``"pending"``; nothing waits for acks and
        no version is garbage-collected. The file's own ``__metadata__`` is kept. Chunks
        Redis already holds (the file was exported from a retained version) are not
        uploaded again.
        """
        from ..trainer.updater import RedisWeightUpdater  # imports torch: only this command needs it

        tensors, file_metadata = read_safetensors(path)
        ranks = self.known_ranks()
        store = RedisStore(self.client, self.keyspace.namespace, owns_client=False)
        updater = RedisWeightUpdater(
            store, tensors, num_workers=max(ranks, default=1), sync=False, retention=_NO_RETENTION,
            chunk_size=chunk_size, metadata={**file_metadata, **(metadata or {})},
        )  # fmt: skip
        with updater:
            updater.update_weights(worker_ids=ranks)
        return self.registry.read_manifest(updater.version)

    # -- changes ----------------------------------------------------------------------------
    def rollback(self, spec: str | int) -> Manifest:
        """Commit an older version again as the newest (a new number), so every worker applies it."""
        source = self.manifest(spec)
        return rollback(self.registry, source.version, self.known_ranks())

    def reindex(self, *, max_steps: int | None = None) -> ReindexReport:
        """Index a namespace written before its index (SCAN of its own patterns; resumable)."""
        return NamespaceIndex(self.client, self.keyspace).reindex(max_steps=max_steps)

    def check_index(self, *, deep: bool = False) -> IndexCheck:
        """How the namespace's index compares with what it owns (``deep``: SCAN its patterns)."""
        return NamespaceIndex(self.client, self.keyspace).verify(deep=deep)

    def gc(self, keep: int) -> list[int]:
        """Delete all but the newest ``keep`` versions (never the latest); the deleted ones."""
        if keep < 1:
            raise ConfigurationError("--keep must be at least 1")
        return self.registry.gc(keep)

    def delete(self, spec: str | int, *, force: bool = False) -> int:
        """Delete one version. The latest is refused unless ``force`` (workers would have nothing to fetch)."""
        manifest_version = self.resolve(spec)
        if manifest_version not in self.registry.list_versions():
            self.manifest(manifest_version)  # raises the not-found error, with the committed list
        if manifest_version == self.registry.latest() and not force:
            raise RefusedError(
                f"version {manifest_version} is the latest: workers follow it. Roll back to an older "
                "version first, or pass --force"
            )
        self.registry.delete(manifest_version)
        self.registry.gc(keep=_NO_RETENTION)  # no other version goes: only the chunks nothing references now
        return manifest_version


def drop_namespace(client: redis.Redis, keyspace: Keys) -> int:
    """Delete every key of ``keyspace``'s namespace; how many were deleted.

    For throw-away namespaces (the demo's ``demo-<hex>``, the tests'): it takes no
    lease and no lock, so never run it on a namespace a fleet still uses. The keys come
    from the namespace's index (``index.py``), not from a SCAN of the server.
    """
    index = NamespaceIndex(client, keyspace)
    k = keyspace

    def read(members: Callable[[], list[Any]]) -> list[Any]:
        try:
            return members()
        except CorruptIndexError:  # a hand-made member: what it names is not ours to delete
            return []

    registry_versions = [int(v) for v in client.zrange(k.versions, 0, -1) if text(v).isdigit()]
    names = [k.chunk(i) for i in read(lambda: list(index.objects()))]
    names += [k.full(n) for n in read(index.names)]
    names += [k.manifest(v) for v in registry_versions]
    for token in read(index.pushes):
        names += [k.pending(token), k.staged_manifest(token)]
    for rank in read(index.ranks):
        names += [k.rank_status(rank), k.rank_version(rank), k.rank_alive(rank), k.rank_acked(rank)]
    names += [k.latest, k.counter, k.versions, k.plan, k.gc_epoch, k.gc_lease, k.probe, k.replication_marker,
              k.stall_probe, *k.index_keys]  # fmt: skip
    deployment = deployment_for(client)
    names += [deployment.marker_on(master, k) for master, _ in deployment.masters()]  # a cluster's WAIT markers
    deleted = 0
    for start in range(0, len(names), _DROP_BATCH):
        pipe = client.pipeline(transaction=False)  # one key per DEL: chunks lie in many slots
        for name in names[start : start + _DROP_BATCH]:
            pipe.delete(name)
        deleted += sum(int(n) for n in pipe.execute())
    return deleted


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors and ``__metadata__`` of a ``.safetensors`` file; ``CodecError`` if it is not one."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    source = Path(path)
    if not source.is_file():
        raise ConfigurationError(f"{source}: no such file")
    try:
        with safe_open(str(source), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(source))
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError, ValueError)
        raise CodecError(f"{source}: not a valid .safetensors file ({exc})") from None
    if not tensors:
        raise CodecError(f"{source}: the file holds no tensors")
    return tensors, metadata


def connection_error_message(exc: redis.exceptions.RedisError, url: str) -> str:
    """One line for a connection or authentication failure, without the password."""
    where = redacted(url)
    text = str(exc)
    if isinstance(exc, redis.exceptions.AuthenticationError) or "WRONGPASS" in text or "NOAUTH" in text:
        if "HELLO must be called" in text or "NOAUTH" in text or "Authentication required" in text:
            return (f"authentication failed at {where}: the server requires a password "
                    "(give it in the URL: redis://USER:PASSWORD@HOST:PORT/DB)")  # fmt: skip
        return f"authentication failed at {where}: {exc}"
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return f"permission denied at {where}: {exc} (see `redis-weights doctor`)"
    if isinstance(exc, LOST):
        return f"cannot reach Redis at {where}: {exc}"
    return f"Redis error at {where}: {exc}"
