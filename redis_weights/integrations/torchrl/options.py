"""``RedisSyncOptions``: the options of a Redis weight sync, trainer and worker side, in one object.

It holds the core's own option objects, ``PushOptions`` (the trainer's ``RedisWeightUpdater``)
and ``ReceiveOptions`` (each worker's ``RedisWeightReceiver``), plus the few options of the
TorchRL adapters themselves. Nothing is re-declared here: an option added to the core is one
field there, and the scheme takes it by name at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...errors import ConfigurationError
from ...options import PushOptions, ReceiveOptions, names
from ...trainer.updater import RedisWeightUpdater
from ...worker.receiver import RedisWeightReceiver

# ``background`` names the worker's apply thread here; the updater's ``background`` keeps this name.
_PUSH_ALIASES = {"upload_in_background": "background"}


@dataclass(frozen=True)
class RedisSyncOptions:
    """Options of a Redis weight sync, for both sides.

    Attributes:
        push: the trainer's ``PushOptions`` (``timeout``, ``retention``, ``wire_dtype``,
            ``delta``, ``keyframe_*``, ``overlap_min_bytes``, ``min_replicas``...).
        receive: each worker's ``ReceiveOptions`` (``poll_interval``, ``heartbeat_ttl``,
            ``allow_cast``, ``host_cache``, ``read_from_replicas``...).
        sync: a send waits for every targeted rank's ack (False: see ``push.max_lag``).
        background: (worker) apply new versions from a thread, between batches (False:
            check Redis at the start of each batch; no thread).
        connect_timeout: (worker) seconds a receiver waits at ``connect()`` for the first
            version it must start from (None: ``push.timeout``).
        client_options: extra ``redis.Redis`` options (TLS, timeouts...) used when
            connecting from a URL.

    ``RedisSyncOptions.of(**options)`` takes every option by its name, flat:
    ``of(sync=False, wire_dtype=torch.bfloat16, delta=True, poll_interval=0.5)``;
    ``check_server`` sets both sides, ``upload_in_background`` is the updater's ``background``.
    """

    push: PushOptions = field(default_factory=PushOptions)
    receive: ReceiveOptions = field(default_factory=ReceiveOptions)
    sync: bool = True
    background: bool = True
    connect_timeout: float | None = None
    client_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.push, PushOptions) or not isinstance(self.receive, ReceiveOptions):
            raise ConfigurationError("push must be a PushOptions and receive a ReceiveOptions")
        if self.connect_timeout is not None and self.connect_timeout < 0:
            raise ConfigurationError(f"connect_timeout must be >= 0 or None, got {self.connect_timeout!r}")
        self.push.check_sync(self.sync)

    @classmethod
    def of(cls, options: RedisSyncOptions | None = None, **overrides: Any) -> RedisSyncOptions:
        """``options`` (default: all defaults) with ``overrides`` applied, each by its name: a field of
        this class, of ``PushOptions`` or of ``ReceiveOptions``; an unknown name is refused."""
        base = cls() if options is None else options
        if not isinstance(base, cls):
            raise ConfigurationError(f"options must be a {cls.__name__}, got {type(base).__name__}")
        own, push_names, receive_names = names(cls), names(PushOptions), names(ReceiveOptions)
        mine = {k: v for k, v in overrides.items() if k in own}
        push = {_PUSH_ALIASES.get(k, k): v for k, v in overrides.items()
                if k not in own and _PUSH_ALIASES.get(k, k) in push_names}  # fmt: skip
        receive = {k: v for k, v in overrides.items() if k not in own and k in receive_names}
        unknown = sorted(set(overrides) - own - set(_PUSH_ALIASES) - push_names - receive_names)
        if unknown:
            known = sorted(own | set(_PUSH_ALIASES) | push_names | receive_names)
            raise ConfigurationError(f"unknown option(s) {unknown}; {cls.__name__} takes {known}")
        if not overrides:
            return base
        push_options, receive_options = mine.pop("push", base.push), mine.pop("receive", base.receive)
        return dataclasses.replace(  # a push= or receive= given here, then the flat options on it
            base,
            push=dataclasses.replace(push_options, **push) if push else push_options,
            receive=dataclasses.replace(receive_options, **receive) if receive else receive_options,
            **mine,
        )

    @property
    def first_version_timeout(self) -> float:
        """Seconds a receiver waits at connect time for its first version."""
        return self.push.timeout if self.connect_timeout is None else self.connect_timeout

    def updater(self, store: Any, num_workers: int, policy_weights: Any = None) -> RedisWeightUpdater:
        """A core updater with these options."""
        return RedisWeightUpdater(store, policy_weights, num_workers, self.sync, options=self.push)

    def receiver(self, store: Any, rank: int, policy: Any) -> RedisWeightReceiver:
        """A core receiver with these options."""
        return RedisWeightReceiver(store, rank, policy, options=self.receive)
