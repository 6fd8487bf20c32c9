"""``redis-weights exporter``: the fleet as Prometheus metrics, read from Redis when scraped.

Like rq-exporter for rq, it needs nothing from the trainer or the workers: a scrape
reads the namespace's version list, rank keys and the two fields it needs of each
manifest (``facts``: never a whole manifest) and answers with the latest version, the
versions retained and their bytes, and per rank the applied version, lag, heartbeat
age, liveness, status and ack latency (the rank is a label here: the fleet has a
bounded, known set of ranks). When Redis does not answer, the scrape still succeeds
with ``redis_weights_fleet_up 0`` and nothing else.

It is no amplifier: it listens on loopback unless told otherwise, answers ``/metrics``
only, reads Redis at most once per ``cache_seconds`` however many clients scrape, and
offers basic auth and TLS (``httpd``).

``FLEET_METRICS`` is the catalogue the manual documents (docs/operations/metrics.md) and the dashboard's test
checks against; the in-process metrics of the trainer and workers are in
``redis_weights.observe.metrics``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import redis

from ..observe.metrics import MetricSpec, require
from ..protocol.ranks import ERROR_PREFIX, STATUS_PENDING, STATUS_UPDATED, is_error
from .admin import Admin, WorkerRow
from .facts import read_facts
from .httpd import METRICS_PATH, guarded_app, serve_wsgi

log = logging.getLogger(__name__)

DEFAULT_PORT = 9108
DEFAULT_ADDRESS = "127.0.0.1"  # loopback: exposing the fleet is a choice (--address 0.0.0.0)
DEFAULT_CACHE_SECONDS = 1.0  # a scrape reads Redis at most this often, whoever asks
STATUSES = (STATUS_PENDING, STATUS_UPDATED, ERROR_PREFIX.rstrip(":"), "none")  # the ``status`` label's values
_RANK = ("namespace", "rank")

FLEET_METRICS = (
    MetricSpec("redis_weights_fleet_up", "gauge", ("namespace",), "1 when the last scrape could read Redis, else 0"),
    MetricSpec("redis_weights_fleet_scrape_duration_seconds", "gauge", ("namespace",),
               "Seconds the last scrape spent reading Redis"),
    MetricSpec("redis_weights_fleet_latest_version", "gauge", ("namespace",),
               "The newest committed version (0: none)"),
    MetricSpec("redis_weights_fleet_versions_retained", "gauge", ("namespace",), "Committed versions kept in Redis"),
    MetricSpec("redis_weights_fleet_stored_bytes", "gauge", ("namespace",),
               "Bytes of the retained versions (the sum of their sizes)"),
    MetricSpec("redis_weights_fleet_ranks", "gauge", ("namespace",), "Ranks that ever joined the namespace"),
    MetricSpec("redis_weights_fleet_rank_applied_version", "gauge", _RANK, "The version the rank runs (0: none)"),
    MetricSpec("redis_weights_fleet_rank_lag_versions", "gauge", _RANK, "Versions the rank is behind latest"),
    MetricSpec("redis_weights_fleet_rank_heartbeat_age_seconds", "gauge", _RANK,
               "Seconds since the rank's last heartbeat (absent when it has none)"),
    MetricSpec("redis_weights_fleet_rank_alive", "gauge", _RANK, "1 while the rank's heartbeat has not expired"),
    MetricSpec("redis_weights_fleet_rank_status", "gauge", (*_RANK, "status"),
               "1 for the rank's status (" + ", ".join(STATUSES) + "), 0 for the others"),
    MetricSpec("redis_weights_fleet_rank_ack_latency_seconds", "gauge", _RANK,
               "Seconds from the creation of the version the rank runs to its ack of it"),
)  # fmt: skip
_SPECS = {spec.name: spec for spec in FLEET_METRICS}


def status_label(status: str | None) -> str:
    """The ``status`` label of a rank's status text (an ``"error: ..."`` becomes ``error``)."""
    if status is None:
        return "none"
    if is_error(status):
        return "error"
    return status if status in (STATUS_PENDING, STATUS_UPDATED) else "none"


class FleetCollector:
    """A prometheus-client collector that reads one namespace, at most once per ``cache_seconds``.

    A scrape that arrives while another one reads Redis waits for it and answers with
    its result: however many clients scrape, Redis sees one read per interval.
    """

    def __init__(self, admin: Admin, cache_seconds: float = DEFAULT_CACHE_SECONDS) -> None:
        require()
        self.admin = admin
        self.namespace = admin.keyspace.namespace
        self.cache_seconds = cache_seconds
        self.reads = 0  # reads of Redis so far
        self._lock = threading.Lock()
        self._cached: list[Any] = []
        self._read_at = -math.inf

    def describe(self) -> list[Any]:
        return []  # families depend on what Redis holds; nothing to check at registration

    def collect(self) -> Iterator[Any]:
        asked = time.monotonic()
        with self._lock:
            if self._read_at < min(asked, time.monotonic() - self.cache_seconds):  # none since asked, none fresh
                self._cached = self._read()
                self._read_at = time.monotonic()
                self.reads += 1
            families = self._cached
        yield from families

    def _read(self) -> list[Any]:
        """Every family, read from Redis now."""
        from prometheus_client.core import GaugeMetricFamily

        families = {name: GaugeMetricFamily(name, spec.help, labels=spec.labels) for name, spec in _SPECS.items()}
        started = time.perf_counter()
        try:
            self._fill(families)
            up = 1.0
        except redis.exceptions.RedisError as exc:
            log.warning("scrape of namespace %r failed: %s", self.namespace, exc)
            kept = ("redis_weights_fleet_up", "redis_weights_fleet_scrape_duration_seconds")
            families = {name: GaugeMetricFamily(name, _SPECS[name].help, labels=_SPECS[name].labels)
                        for name in kept}  # fmt: skip
            up = 0.0
        families["redis_weights_fleet_up"].add_metric([self.namespace], up)
        elapsed = time.perf_counter() - started
        families["redis_weights_fleet_scrape_duration_seconds"].add_metric([self.namespace], elapsed)
        return list(families.values())

    def _fill(self, families: dict[str, Any]) -> None:
        """Read the few fields the metrics need: the version list, the rank keys, two ends of each manifest."""
        ns, registry = self.namespace, self.admin.registry
        latest, versions, states = registry.latest(), registry.list_versions(), self.admin.rank_states()
        facts = read_facts(registry, {*versions, *(s.version for s in states if s.version)})
        families["redis_weights_fleet_latest_version"].add_metric([ns], latest)
        families["redis_weights_fleet_versions_retained"].add_metric([ns], len(versions))
        stored = sum(facts[v].total_bytes for v in versions if v in facts)
        families["redis_weights_fleet_stored_bytes"].add_metric([ns], stored)
        families["redis_weights_fleet_ranks"].add_metric([ns], len(states))
        for state in states:
            fact = facts.get(state.version)
            row = WorkerRow.from_state(state, latest, fact.created if fact else None)
            labels = [ns, str(row.rank)]
            families["redis_weights_fleet_rank_applied_version"].add_metric(labels, row.version)
            families["redis_weights_fleet_rank_lag_versions"].add_metric(labels, row.lag)
            families["redis_weights_fleet_rank_alive"].add_metric(labels, 1.0 if row.alive else 0.0)
            if row.heartbeat_age is not None:
                families["redis_weights_fleet_rank_heartbeat_age_seconds"].add_metric(labels, row.heartbeat_age)
            if row.ack_latency is not None:
                families["redis_weights_fleet_rank_ack_latency_seconds"].add_metric(labels, row.ack_latency)
            current = status_label(row.status)
            for status in STATUSES:
                value = 1.0 if status == current else 0.0
                families["redis_weights_fleet_rank_status"].add_metric([*labels, status], value)


def serve(
    admin: Admin,
    port: int = DEFAULT_PORT,
    address: str = DEFAULT_ADDRESS,
    *,
    cache_seconds: float = DEFAULT_CACHE_SECONDS,
    credentials: tuple[str, str] | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
) -> Any:
    """Serve the fleet metrics of ``admin``'s namespace on ``address:port`` from a daemon thread; the server.

    Loopback by default; ``/metrics`` only; a scrape reads Redis at most once per
    ``cache_seconds``; ``credentials`` (user, password) require basic auth, ``certfile``
    (and ``keyfile``) serve HTTPS (``redis_weights.tools.httpd``). A private registry holds
    only the fleet collector. ``server.server_port`` is the port (useful with ``port=0``);
    ``server.shutdown()`` and ``server.server_close()`` stop it.
    """
    require()
    from prometheus_client import CollectorRegistry, make_wsgi_app

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(admin, cache_seconds))
    app = guarded_app(make_wsgi_app(registry), credentials)
    server = serve_wsgi(app, port, address, certfile=certfile, keyfile=keyfile)
    log.info("serving the fleet metrics on %s://%s:%d%s", "https" if certfile else "http", address,
             server.server_port, METRICS_PATH)  # fmt: skip
    return server
