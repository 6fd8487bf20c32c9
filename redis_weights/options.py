"""``PushOptions`` and ``ReceiveOptions``: every option of the trainer and of a worker, declared once.

Each is a frozen dataclass whose fields are the keyword arguments of ``RedisWeightUpdater``
(after ``store, policy_weights, num_workers, sync``) and of ``RedisWeightReceiver`` (after
``store, rank, policy``): each default is declared here and each check made here, once.
The constructors, the TorchRL scheme and any other front end take these objects; the
keyword arguments of the constructors build one (``from_kwargs``). A new option is one field.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from .errors import ConfigurationError
from .format.codec import WIRE_DTYPES
from .format.delta import DEFAULT_KEYFRAME_FRACTION, DEFAULT_KEYFRAME_INTERVAL
from .format.manifest import DEFAULT_CHUNK_SIZE, MAX_CHAIN
from .protocol.ranks import DEFAULT_HEARTBEAT_TTL
from .protocol.staging import DEFAULT_OVERLAP_MIN_BYTES
from .protocol.versions import DEFAULT_PENDING_TTL, DEFAULT_RETENTION
from .threads import DEFAULT_THREADS

DEFAULT_TIMEOUT = 60.0  # seconds a sync push waits for the acks
DEFAULT_REPLICA_TIMEOUT = 2.0  # seconds a push waits for the replicas to hold its chunks before it commits
DEFAULT_POLL_INTERVAL = 1.0  # seconds between a worker's reads of ``latest`` when no notification arrives


def _count(value: object) -> bool:
    """A non-negative integer (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class PushOptions:
    """The trainer's options: the keyword arguments of ``RedisWeightUpdater``.

    Attributes:
        timeout: seconds a sync push (or ``wait()``) waits for acks.
        chunk_size: bytes per Redis value (a GET of 2 MiB holds Redis ~0.2 ms).
        retention: committed versions kept; older ones are deleted after each push, then
            every chunk no retained version references is swept (mark and sweep).
        pending_ttl: seconds a push in flight protects its chunks from GC (after a crash,
            its chunks are swept once this passes).
        metadata: strings recorded in every version's safetensors ``__metadata__``.
        check_server: fail at once with a ``ConfigurationError`` when Redis is
            unreachable, refuses the credentials or is unsafe (False: skip the check).
        wire_dtype: cast floating tensors to this dtype (``torch.bfloat16``, ``torch.float16``,
            ``torch.float8_e4m3fn``, ``torch.float8_e5m2``) before encoding: half the bytes
            (or a quarter), and what makes deltas sparse. Integer and bool tensors are sent
            as they are. Workers accept the cast whatever their own floating dtype.
        delta: store a changed chunk as a patch against the previous push's chunk when
            that is smaller (lossless; workers verify every chunk they rebuild). Costs one
            copy of the model in the wire dtype on the trainer (none with ``delta=False``).
        keyframe_interval: with ``delta``, a version storing every chunk whole at least
            every this many versions (the longest patch chain a late joiner applies).
        keyframe_fraction: with ``delta``, a keyframe sooner when the patches a late joiner
            would apply exceed this fraction of the version's size.
        diff_threads: threads that encode a push side by side: the cast to ``wire_dtype``
            (CPU tensors; a ``background`` push's snapshot stays on the calling thread) and,
            with ``delta``, the diff of 64 MiB regions (torch, numpy and zstd release the
            GIL). Default: the CPU count, at most 4.
        background: (needs ``sync=False``) return as soon as the weights are copied
            into a staging buffer; upload and commit from a background thread. A push
            made while an upload runs replaces any push still waiting for it.
            ``version`` is then the version the last push *will* commit; ``flush()``
            waits for the commit, ``wait()`` for the commit and the acks; an upload
            error is raised by the next push, ``flush()`` or ``wait()``.
        max_lag: (with ``sync=False``) bound the policy lag: a push returns at once
            while every targeted rank runs a version at most ``max_lag`` behind the
            one it committed, else waits (up to ``timeout``, failing like a sync push
            and naming the laggards) until they catch up. None: no bound.
            ``sync=True`` behaves as ``max_lag=0``.
        overlap_min_bytes: announce the manifest of a version before uploading it when it
            uploads at least this many bytes, so that workers fetch its chunks while they are
            written and apply right after the commit (``staging.py``): a push then costs
            about the longer of upload and download, not their sum. None: never announce.
        min_replicas: before each commit, wait (``WAIT``) until this many replicas of
            every master hold everything the push wrote. None (default): as many as
            each master reports online, best effort: fewer within ``replica_timeout``
            is a warning and the version is committed anyway. A number: a requirement:
            fewer is a ``PushError`` and nothing is committed. 0: never wait.
        replica_timeout: seconds the ``WAIT`` lasts at most, per master.
    """

    timeout: float = DEFAULT_TIMEOUT
    chunk_size: int = DEFAULT_CHUNK_SIZE
    retention: int = DEFAULT_RETENTION
    pending_ttl: float = DEFAULT_PENDING_TTL
    metadata: Mapping[str, str] = field(default_factory=dict)
    check_server: bool = True
    background: bool = False
    max_lag: int | None = None
    wire_dtype: torch.dtype | None = None
    delta: bool = False
    keyframe_interval: int = DEFAULT_KEYFRAME_INTERVAL
    keyframe_fraction: float = DEFAULT_KEYFRAME_FRACTION
    diff_threads: int = DEFAULT_THREADS
    overlap_min_bytes: int | None = DEFAULT_OVERLAP_MIN_BYTES
    min_replicas: int | None = None
    replica_timeout: float = DEFAULT_REPLICA_TIMEOUT

    def __post_init__(self) -> None:
        object.__setattr__(self, "metadata", dict(self.metadata or {}))  # a copy: the caller's dict may change
        if self.min_replicas is not None and not _count(self.min_replicas):
            raise ConfigurationError(f"min_replicas must be a non-negative integer or None, got {self.min_replicas!r}")
        if self.replica_timeout <= 0:
            raise ConfigurationError("replica_timeout must be positive")
        if self.timeout <= 0:
            raise ConfigurationError("timeout must be positive")
        if self.retention < 1:
            raise ConfigurationError("retention must be at least 1")
        if self.wire_dtype is not None and self.wire_dtype not in WIRE_DTYPES:
            raise ConfigurationError(
                f"wire_dtype must be one of {', '.join(map(str, WIRE_DTYPES))}, got {self.wire_dtype}"
            )
        if not isinstance(self.keyframe_interval, int) or not 1 <= self.keyframe_interval <= MAX_CHAIN:
            raise ConfigurationError(f"keyframe_interval must be within 1..{MAX_CHAIN}")
        if not 0 < self.keyframe_fraction <= 1:
            raise ConfigurationError("keyframe_fraction must be within (0, 1]")
        if not _count(self.diff_threads) or self.diff_threads < 1:
            raise ConfigurationError(f"diff_threads must be a positive integer, got {self.diff_threads!r}")
        if self.max_lag is not None:
            if not _count(self.max_lag):
                raise ConfigurationError(f"max_lag must be a non-negative integer or None, got {self.max_lag!r}")
            if self.background:
                raise ConfigurationError("max_lag needs background=False (a background push returns before its commit)")
        if self.overlap_min_bytes is not None and (not isinstance(self.overlap_min_bytes, int)
                                                   or self.overlap_min_bytes < 0):  # fmt: skip
            raise ConfigurationError(
                f"overlap_min_bytes must be a non-negative integer or None, got {self.overlap_min_bytes!r}"
            )

    def check_sync(self, sync: bool) -> None:
        """The checks that involve the updater's ``sync`` (a positional argument, not an option)."""
        if self.background and sync:
            raise ConfigurationError("background=True needs sync=False (a sync push waits for the acks anyway)")
        if sync and self.max_lag:
            raise ConfigurationError(f"max_lag={self.max_lag} needs sync=False (sync=True is max_lag=0)")


@dataclass(frozen=True)
class ReceiveOptions:
    """A worker's options: the keyword arguments of ``RedisWeightReceiver``.

    Attributes:
        poll_interval: seconds between reads of ``latest`` when no notification arrives.
        heartbeat_ttl: seconds after its last beat at which a rank counts as dead.
        allow_cast: accept pushed dtypes that differ from the policy's (cast on copy). A cast
            the trainer chose (``wire_dtype``) is accepted for floating tensors without it.
        check_server: fail at once with a ``ConfigurationError`` when Redis is
            unreachable, refuses the credentials or is unsafe (False: skip the check).
        host_cache: share each version with the other workers of this host through a
            file in /dev/shm (True) or in the given directory: one worker fetches it
            from Redis, the others memory-map it (see ``hostcache.py``).
        read_from_replicas: read the chunks from replicas (a Redis Cluster's, with
            ``READONLY``, or the ones the sentinels of a ``redis+sentinel://`` store list),
            taking that egress off the primaries; a chunk a replica lacks (it lags) is read
            from its primary. ``latest``, manifests and rank keys are always read from the
            primary. The same as ``?replica_reads=yes`` in the store's URL, for this
            receiver alone; refused on a standalone server (its replicas are unknown).
        apply_threads: threads that apply the patches of a delta version's chunks, and verify
            them, side by side (numpy and zstd release the GIL). Default: the CPU count, at
            most 4. With the host cache they serve the worker that builds the host's file
            while the other local workers wait for it.
    """

    poll_interval: float = DEFAULT_POLL_INTERVAL
    heartbeat_ttl: float = DEFAULT_HEARTBEAT_TTL
    allow_cast: bool = False
    check_server: bool = True
    host_cache: bool | str | os.PathLike[str] = False
    read_from_replicas: bool = False
    apply_threads: int = DEFAULT_THREADS

    def __post_init__(self) -> None:
        if self.poll_interval <= 0 or self.heartbeat_ttl <= 0:
            raise ConfigurationError("poll_interval and heartbeat_ttl must be positive")
        if not _count(self.apply_threads) or self.apply_threads < 1:
            raise ConfigurationError(f"apply_threads must be a positive integer, got {self.apply_threads!r}")


Options = TypeVar("Options", PushOptions, ReceiveOptions)


def names(cls: type[PushOptions] | type[ReceiveOptions]) -> frozenset[str]:
    """The option names of ``cls``."""
    return frozenset(f.name for f in dataclasses.fields(cls))


def from_kwargs(cls: type[Options], options: Options | None, kwargs: Mapping[str, Any], owner: str) -> Options:
    """``options``, or one built from the keyword arguments ``kwargs`` of ``owner``'s constructor
    (not both: which would win is anyone's guess). An unknown name is a ``TypeError``, as Python says it."""
    if options is not None:
        if not isinstance(options, cls):
            raise ConfigurationError(f"{owner}: options must be a {cls.__name__}, got {type(options).__name__}")
        if kwargs:
            raise ConfigurationError(
                f"{owner}: pass options= or keyword options ({', '.join(sorted(kwargs))}), not both; "
                f"dataclasses.replace(options, ...) combines them"
            )
        return options
    unknown = sorted(set(kwargs) - names(cls))
    if unknown:
        raise TypeError(f"{owner}() got an unexpected keyword argument {unknown[0]!r}")
    return cls(**kwargs)


class Option:
    """An attribute of the updater or receiver that reads the option of its name from ``self.options``.

    ``settable``: assigning it replaces ``self.options`` (checked again); for an option the
    constructor consumed (an encoder's chunk size), assigning is refused instead of ignored.
    """

    def __init__(self, settable: bool = False) -> None:
        self.settable = settable
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self if obj is None else getattr(obj.options, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        if not self.settable:
            raise AttributeError(f"{self.name} is fixed when the {type(obj).__name__} is built: build a new one")
        obj._set_options(dataclasses.replace(obj.options, **{self.name: value}))
