"""Reports of one push and one apply: version, bytes and seconds per phase, for code to log.

A training script logs these to its own tracker (TensorBoard, W&B...) without parsing
logs: ``updater.last_push`` and ``receiver.last_apply`` hold the latest report, and a
post-hook that declares a ``report`` parameter is given it. Hooks that do not keep
their old calls: ``hook()`` for the updater's post-hooks (TorchRL's zero-argument
hooks), ``hook(version)`` for the receiver's::

    updater.register_post_hook(lambda report: writer.add_scalar("push_s", report.total_seconds, report.version))
    receiver.register_post_hook(lambda version, report: print(version, report.seconds["fetch"]))

``PhaseClock`` measures the phases while a push or an apply runs, and hands each
one to a callback as it ends (the Prometheus histograms of ``metrics.py``).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

PUSH_PHASES = ("encode", "upload", "replicas", "commit", "gc", "acks")  # in the order a push runs them
APPLY_PHASES = ("fetch", "apply")


class PhaseClock:
    """Seconds spent in each named phase (added up when a phase runs twice), and bytes.

    ``total_bytes``: the size of what is pushed or applied; ``bytes``: what was moved
    (written to Redis, or read from it).

    ``on_phase(name, seconds)`` is called as each phase ends; the clock may be shared
    between the trainer's thread and the background upload thread, which time
    different phases.
    """

    def __init__(self, on_phase: Callable[[str, float], None] | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.total_bytes = 0
        self.bytes = 0
        self.gc: Any = None  # the ``versions.GcReport`` of the GCs finished since the previous push
        self._on_phase = on_phase

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as phase ``name`` (also when it raises)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        """Count ``seconds`` to phase ``name`` (for a phase that a ``with`` block cannot delimit)."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        if self._on_phase is not None:
            self._on_phase(name, seconds)


class _Timed:
    """What a report timed by phases adds to its fields: their total, and a JSON-ready dict."""

    seconds: Mapping[str, float]

    @property
    def total_seconds(self) -> float:
        """Seconds all phases took together."""
        return sum(self.seconds.values())

    def to_dict(self) -> dict[str, Any]:
        """The fields (tuples as lists, ``seconds`` as a dict) and ``total_seconds``."""
        doc = {name: list(value) if isinstance(value, tuple) else value
               for name, value in asdict(self).items()}  # type: ignore[call-overload]  # fmt: skip
        doc.update(seconds=dict(self.seconds), total_seconds=self.total_seconds)
        return doc


@dataclass(frozen=True)
class PushReport(_Timed):
    """One push, as the trainer saw it when the push returned.

    ``seconds`` holds the phases that ran (``PUSH_PHASES``): ``encode`` (a snapshot into a
    staging buffer with ``background=True``), ``upload`` (writing the chunks), ``replicas``
    (the ``WAIT`` for the replicas to hold them, ``min_replicas``), ``commit``, ``gc`` (how
    long the push waited for the garbage collection the previous push started on the
    collector's thread; ``gc_versions``, ``gc_objects`` and ``gc_keys``: what the collections
    finished since the previous push deleted and read) and ``acks`` (the wait for acks, or for the ranks to come within ``max_lag``). A
    ``background`` push returns before its upload: its report has ``encode`` only and
    ``written_bytes`` 0; the upload's own figures go to the metrics when it commits.
    """

    version: int
    ranks: tuple[int, ...]
    total_bytes: int  # size of the version (its safetensors blob)
    written_bytes: int  # bytes this push wrote to Redis
    seconds: Mapping[str, float] = field(default_factory=dict)
    sync: bool = True
    max_lag: int | None = 0
    background: bool = False
    gc_versions: int = 0
    gc_objects: int = 0
    gc_keys: int = 0



@dataclass(frozen=True)
class ApplyReport(_Timed):
    """One version applied by a worker.

    ``fetched_bytes`` are the bytes read from Redis (0 when the host cache mapped a file
    another worker had fetched); ``lag``: versions behind ``latest`` right after the
    apply (``latest`` as read before the fetch; version numbers may skip, so an upper
    bound); ``seconds``: ``fetch`` (reading and staging the chunks) and ``apply`` (the
    copy into the live tensors).
    """

    version: int
    previous: int
    total_bytes: int
    fetched_bytes: int
    seconds: Mapping[str, float] = field(default_factory=dict)
    lag: int = 0



def wants_report(hook: Callable[..., Any]) -> bool:
    """Whether ``hook`` declares a ``report`` parameter (or takes ``**kwargs``)."""
    try:
        parameters = inspect.signature(hook).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: call it the old way
        return False
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return any((p.name == "report" and p.kind in keyword) or p.kind is inspect.Parameter.VAR_KEYWORD
               for p in parameters)  # fmt: skip


def call_hook(hook: Callable[..., Any], *args: Any, report: Any) -> Any:
    """``hook(*args, report=report)`` if it takes a report, else ``hook(*args)``."""
    if report is not None and wants_report(hook):
        return hook(*args, report=report)
    return hook(*args)
