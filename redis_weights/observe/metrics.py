"""In-process Prometheus metrics of the trainer and of the workers (the optional ``metrics`` extra).

With ``prometheus-client`` installed (``pip install 'redis_weights[metrics]'``), every
``RedisWeightUpdater`` and ``RedisWeightReceiver`` records what it does in
prometheus-client's default registry; expose them with ``serve(port)`` (or your own
``prometheus_client.start_http_server``). Without the package every recorder is a
no-op and the core works as before.

Names follow Prometheus' conventions: one ``redis_weights_`` prefix, base units
(seconds, bytes), ``_total`` for counters. The only labels are ``namespace`` and, where
listed, ``phase`` or ``kind``: never a rank or a version, whose values grow without
bound (the fleet's per-rank view is the exporter's, ``tools/exporter.py``).
``TRAINER_METRICS`` and ``WORKER_METRICS`` are the catalogue the manual documents (docs/operations/metrics.md) and
the dashboard's test checks against.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any

from ..errors import BackgroundUploadError, ConfigurationError, PushError, PushTimeoutError
from .reports import PUSH_PHASES

log = logging.getLogger(__name__)

try:  # the optional extra
    import prometheus_client
except ImportError:  # pragma: no cover - exercised by a test in a subprocess without it
    prometheus_client = None

AVAILABLE = prometheus_client is not None
# Seconds: a push of 1 MB takes ~10 ms, one of 1 GB ~10 s; a lag-bounded wait may last the timeout.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
FAILURE_KINDS = ("timeout", "rank_error", "dead_rank", "redis", "background_upload", "other")


@dataclass(frozen=True)
class MetricSpec:
    """One metric as exposed: its full name (counters with ``_total``), type, labels and meaning."""

    name: str
    kind: str  # "counter", "gauge" or "histogram"
    labels: tuple[str, ...]
    help: str

    @property
    def samples(self) -> tuple[str, ...]:
        """The sample names a scrape shows for it (a histogram's ``_bucket``, ``_sum``, ``_count``)."""
        if self.kind == "histogram":
            return tuple(f"{self.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        return (self.name,)


TRAINER_METRICS = (
    MetricSpec("redis_weights_push_duration_seconds", "histogram", ("namespace",),
               "Seconds a push blocked its caller (with sync or max_lag, the wait for the ranks included)"),
    MetricSpec("redis_weights_push_phase_duration_seconds", "histogram", ("namespace", "phase"),
               "Seconds of each phase of a push: encode, upload, replicas, commit, acks"),
    MetricSpec("redis_weights_push_written_bytes_total", "counter", ("namespace",),
               "Bytes of weight chunks written to Redis by pushes"),
    MetricSpec("redis_weights_versions_committed_total", "counter", ("namespace",),
               "Versions committed by this process"),
    MetricSpec("redis_weights_committed_version", "gauge", ("namespace",),
               "The last version this process committed"),
    MetricSpec("redis_weights_push_failures_total", "counter", ("namespace", "kind"),
               "Failed pushes by kind: " + ", ".join(FAILURE_KINDS)),
    MetricSpec("redis_weights_background_uploads_superseded_total", "counter", ("namespace",),
               "Background pushes dropped because a newer push came before their upload started"),
)  # fmt: skip
WORKER_METRICS = (
    MetricSpec("redis_weights_fetch_duration_seconds", "histogram", ("namespace",),
               "Seconds a worker spent reading and staging the chunks of a version"),
    MetricSpec("redis_weights_apply_duration_seconds", "histogram", ("namespace",),
               "Seconds a worker spent copying a version into its live tensors"),
    MetricSpec("redis_weights_fetched_bytes_total", "counter", ("namespace",),
               "Bytes of weight chunks read from Redis by workers"),
    MetricSpec("redis_weights_versions_applied_total", "counter", ("namespace",), "Versions applied by workers"),
    MetricSpec("redis_weights_versions_refused_total", "counter", ("namespace",),
               "Versions refused by workers (mismatched, corrupted or missing chunks)"),
    MetricSpec("redis_weights_applied_version", "gauge", ("namespace",), "The version the worker runs (0: none)"),
    MetricSpec("redis_weights_lag_versions", "gauge", ("namespace",),
               "Versions the worker is behind latest, as of its last check of Redis"),
)  # fmt: skip

_LABEL_VALUES = {"phase": PUSH_PHASES, "kind": FAILURE_KINDS}  # the values of the labels besides ``namespace``
_families: dict[int, dict[str, Any]] = {}  # id(registry) -> metric name -> prometheus_client metric
_families_lock = threading.Lock()
_holders: dict[tuple[int, str, str], int] = {}  # (id(registry), namespace, first metric) -> open recorders
# Releases are handed to one thread: ``close()`` may run inside a garbage collector's finalizer
# (a ``__del__`` that closes an updater) on a thread that holds a prometheus_client lock at that
# moment; taking any lock there could deadlock. ``SimpleQueue.put`` is reentrant, made for that.
_releases: queue.SimpleQueue[_Recorder] = queue.SimpleQueue()
_releaser: threading.Thread | None = None


def _family(spec: MetricSpec, registry: Any) -> Any:
    """The prometheus_client metric of ``spec`` in ``registry``, created once (under ``_families_lock``)."""
    made = _families.setdefault(id(registry), {})
    if spec.name not in made:
        if spec.kind == "counter":
            metric = prometheus_client.Counter(spec.name, spec.help, spec.labels, registry=registry)
        elif spec.kind == "gauge":
            metric = prometheus_client.Gauge(spec.name, spec.help, spec.labels, registry=registry)
        else:
            metric = prometheus_client.Histogram(spec.name, spec.help, spec.labels, registry=registry,
                                                 buckets=DURATION_BUCKETS)  # fmt: skip
        made[spec.name] = metric
    return made[spec.name]


def _release_forever() -> None:
    """The releaser thread: drop each released recorder's hold, in order, under ``_families_lock``."""
    while True:
        _releases.get()._drop()


class _Recorder:
    """The metrics of ``specs`` for one namespace; every method is a no-op without prometheus-client."""

    def __init__(self, specs: tuple[MetricSpec, ...], namespace: str, registry: Any = None) -> None:
        global _releaser
        self.namespace = namespace
        self._specs = specs
        self._metrics: dict[str, Any] | None = None
        self._holder: tuple[int, str, str] | None = None
        if AVAILABLE:
            registry = prometheus_client.REGISTRY if registry is None else registry
            with _families_lock:  # a release being dropped meanwhile cannot remove the series made here
                self._metrics = {s.name: _family(s, registry) for s in specs}
                self._holder = (id(registry), namespace, specs[0].name)
                _holders[self._holder] = _holders.get(self._holder, 0) + 1
                for spec in specs:  # every series exists from the start, at 0 (no gaps before the first event)
                    for extra in _extra_labels(spec):
                        self._child(spec.name, **extra)
                if _releaser is None:
                    _releaser = threading.Thread(target=_release_forever, name="redis-weights-metrics", daemon=True)
                    _releaser.start()

    def release(self) -> None:
        """Called at close: when the process's last recorder of this namespace goes, so do its series
        (on the releaser thread, within moments; see ``_releases``).

        Without it a process that opens updaters or receivers of many namespaces over its
        life (a sweep launcher, a test suite) would keep every namespace's series forever,
        and each scrape would grow with them. Idempotent; takes no lock.
        """
        if self._holder is not None:
            _releases.put(self)

    def _drop(self) -> None:
        with _families_lock:
            holder, self._holder = self._holder, None
            if holder is None or self._metrics is None:
                return
            _holders[holder] -= 1
            if _holders[holder]:
                return
            del _holders[holder]
            for spec in self._specs:
                for extra in _extra_labels(spec):
                    try:
                        self._metrics[spec.name].remove(self.namespace, *extra.values())
                    except KeyError:  # already gone
                        pass

    def _child(self, name: str, **labels: str) -> Any | None:
        if self._metrics is None:
            return None
        return self._metrics[name].labels(namespace=self.namespace, **labels)

    def _inc(self, name: str, amount: float = 1, **labels: str) -> None:
        child = self._child(name, **labels)
        if child is not None and amount:
            child.inc(amount)

    def _observe(self, name: str, value: float, **labels: str) -> None:
        child = self._child(name, **labels)
        if child is not None:
            child.observe(value)

    def _set(self, name: str, value: float) -> None:
        child = self._child(name)
        if child is not None:
            child.set(value)


def _extra_labels(spec: MetricSpec) -> list[dict[str, str]]:
    """Every value of ``spec``'s label besides ``namespace`` (``[{}]`` when it has none)."""
    extra = [label for label in spec.labels if label != "namespace"]
    return [{extra[0]: value} for value in _LABEL_VALUES[extra[0]]] if extra else [{}]


class TrainerMetrics(_Recorder):
    """What a ``RedisWeightUpdater`` records (``TRAINER_METRICS``)."""

    def __init__(self, namespace: str, registry: Any = None) -> None:
        super().__init__(TRAINER_METRICS, namespace, registry)

    def phase(self, phase: str, seconds: float) -> None:
        self._observe("redis_weights_push_phase_duration_seconds", seconds, phase=phase)

    def pushed(self, seconds: float) -> None:
        self._observe("redis_weights_push_duration_seconds", seconds)

    def committed(self, version: int, written_bytes: int) -> None:
        self._inc("redis_weights_versions_committed_total")
        self._inc("redis_weights_push_written_bytes_total", written_bytes)
        self._set("redis_weights_committed_version", version)

    def failed(self, error: BaseException) -> None:
        self._inc("redis_weights_push_failures_total", kind=failure_kind(error))

    def superseded(self, count: int) -> None:
        self._inc("redis_weights_background_uploads_superseded_total", count)


class WorkerMetrics(_Recorder):
    """What a ``RedisWeightReceiver`` records (``WORKER_METRICS``)."""

    def __init__(self, namespace: str, registry: Any = None) -> None:
        super().__init__(WORKER_METRICS, namespace, registry)

    def phase(self, phase: str, seconds: float) -> None:
        self._observe(f"redis_weights_{phase}_duration_seconds", seconds)

    def applied(self, version: int, fetched_bytes: int) -> None:
        self._inc("redis_weights_versions_applied_total")
        self._inc("redis_weights_fetched_bytes_total", fetched_bytes)
        self._set("redis_weights_applied_version", version)

    def refused(self) -> None:
        self._inc("redis_weights_versions_refused_total")

    def lag(self, versions: int) -> None:
        self._set("redis_weights_lag_versions", versions)


def failure_kind(error: BaseException) -> str:
    """The ``kind`` label of a failed push (one of ``FAILURE_KINDS``)."""
    if isinstance(error, BackgroundUploadError):
        return "background_upload"
    if isinstance(error, PushError):
        if error.errors:
            return "rank_error"
        if error.dead:
            return "dead_rank"
        if isinstance(error, PushTimeoutError):
            return "timeout"
        return "redis" if error.__cause__ is not None else "other"
    return "other"


def serve(port: int, address: str = "0.0.0.0", registry: Any = None) -> Any:
    """Serve the in-process metrics over HTTP on ``address:port`` from a daemon thread; the server.

    A ``ConfigurationError`` when prometheus-client is not installed.
    """
    require()
    registry = prometheus_client.REGISTRY if registry is None else registry
    server, _thread = prometheus_client.start_http_server(port, addr=address, registry=registry)
    log.info("serving metrics on http://%s:%d/metrics", address, server.server_port)
    return server


def require() -> None:
    """Raise a ``ConfigurationError`` saying how to install prometheus-client when it is missing."""
    if not AVAILABLE:
        raise ConfigurationError(
            "Prometheus metrics need prometheus-client: pip install 'redis_weights[metrics]'"
        )
