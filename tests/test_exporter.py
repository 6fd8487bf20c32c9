"""``redis-weights exporter`` over real HTTP, against a real server; then scraped by a real Prometheus.

The Prometheus test runs where the ``prometheus`` binary is installed
(``scripts/install_prometheus.sh``, which ``.ci/run`` calls) and skips elsewhere. It
also sends every query of the Grafana dashboard to that Prometheus: each must parse.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from redis_weights import RedisStore, VersionRegistry
from redis_weights.observe import metrics
from redis_weights.tools.admin import Admin
from redis_weights.tools.exporter import FLEET_METRICS, STATUSES, serve
from redis_weights.tools.server import free_port
from tests import test_cli
from tests.procs import running, spawn, stop
from tests.test_dashboard import dashboard_queries

pytestmark = pytest.mark.server
fleet = test_cli.fleet  # the fixture: rank 1 runs v3, rank 2 v2, rank 3 ran v1 and died
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def scrape(port: int) -> dict[str, list[Any]]:
    """``/metrics`` of ``127.0.0.1:port``: samples by name."""
    with _HTTP.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


def by_rank(samples: dict[str, list[Any]], name: str) -> dict[int, float]:
    return {int(s.labels["rank"]): s.value for s in samples.get(name, [])}


@pytest.fixture
def exporter(real_store: RedisStore) -> Iterator[int]:
    """The exporter of the test's namespace on a free loopback port; stopped at teardown."""
    admin = Admin(RedisStore(real_store.client, real_store.namespace, owns_client=False))
    server = serve(admin, 0, "127.0.0.1", cache_seconds=0)
    yield server.server_port
    server.shutdown()
    server.server_close()


def test_the_fleet_over_http(fleet, exporter: int, namespace: str, real_store: RedisStore) -> None:
    registry = VersionRegistry(real_store.deployment, real_store.keyspace)
    samples = scrape(exporter)
    names = {spec.name for spec in FLEET_METRICS}
    assert names <= set(samples), names - set(samples)
    for items in samples.values():
        assert all(s.labels["namespace"] == namespace for s in items)
    one = {name: samples[name][0].value for name in names
           if len(samples[name]) == 1 and "rank" not in samples[name][0].labels}  # fmt: skip
    v1, v2, v3 = fleet["versions"]
    sizes = [registry.read_manifest(v).total_bytes for v in (v1, v2, v3)]
    assert one["redis_weights_fleet_up"] == 1 and one["redis_weights_fleet_ranks"] == 3
    assert one["redis_weights_fleet_latest_version"] == v3 and one["redis_weights_fleet_versions_retained"] == 3
    assert one["redis_weights_fleet_stored_bytes"] == sum(sizes)
    assert by_rank(samples, "redis_weights_fleet_rank_applied_version") == {1: v3, 2: v2, 3: v1}
    assert by_rank(samples, "redis_weights_fleet_rank_lag_versions") == {1: 0, 2: v3 - v2, 3: v3 - v1}
    assert by_rank(samples, "redis_weights_fleet_rank_alive") == {1: 1, 2: 1, 3: 0}
    ages = by_rank(samples, "redis_weights_fleet_rank_heartbeat_age_seconds")
    assert set(ages) == {1, 2} and all(age >= 0 for age in ages.values())  # a dead rank has no heartbeat
    assert set(by_rank(samples, "redis_weights_fleet_rank_ack_latency_seconds")) == {1, 2, 3}
    status = {(int(s.labels["rank"]), s.labels["status"]): s.value for s in samples["redis_weights_fleet_rank_status"]}
    assert len(status) == 3 * len(STATUSES)
    assert {key for key, value in status.items() if value == 1} == {(1, "updated"), (2, "pending"), (3, "pending")}


def test_a_scrape_while_redis_is_down_says_so(server_factory, namespace: str) -> None:
    server = server_factory()
    admin = Admin(RedisStore.from_url(server.url, namespace, socket_timeout=2, socket_connect_timeout=2))
    http = serve(admin, 0, "127.0.0.1", cache_seconds=0)
    try:
        assert scrape(http.server_port)["redis_weights_fleet_up"][0].value == 1
        server.close()
        samples = scrape(http.server_port)
        assert samples["redis_weights_fleet_up"][0].value == 0
        assert "redis_weights_fleet_latest_version" not in samples
    finally:
        http.shutdown()
        http.server_close()
        admin.close()


def _wait_for(check, what: str, timeout: float = 60.0, proc: subprocess.Popen | None = None,
              diagnose: Any = None) -> Any:  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s" + (f" ({diagnose()})" if diagnose else ""))
        time.sleep(0.2)


def test_the_cli_command_serves_until_sigterm(fleet, redis_url: str, namespace: str, tmp_path: Path) -> None:
    port = free_port()
    log = open(tmp_path / "exporter.log", "wb")
    with log, running([sys.executable, "-m", "redis_weights", "--url", redis_url, "-n", namespace, "exporter",
                       "--port", str(port), "--address", "127.0.0.1"],
                      signal.SIGKILL, stdout=log, stderr=subprocess.STDOUT) as proc:  # fmt: skip
        samples = _wait_for(lambda: scrape(port), "the exporter's /metrics", proc=proc)
        assert samples["redis_weights_fleet_latest_version"][0].value == fleet["versions"][-1]
        assert stop(proc, signal.SIGTERM, grace=30) == 0
        assert f"on http://127.0.0.1:{port}/metrics" in (tmp_path / "exporter.log").read_text()


def _prometheus_get(port: int, path: str, **params: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with _HTTP.open(url, timeout=10) as response:
        return json.loads(response.read().decode())


def test_a_real_prometheus_scrapes_the_exporter_and_the_in_process_metrics(fleet, exporter: int, namespace: str,
                                                                           tmp_path: Path) -> None:  # fmt: skip
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus binary (Debian's package: scripts/install_prometheus.sh installs it)")
    process_metrics = metrics.serve(0, "127.0.0.1")  # this process's trainer and workers
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        # A scrape may take more than a second on a loaded machine: the timeout is the interval.
        "global": {"scrape_interval": "2s", "scrape_timeout": "2s", "evaluation_interval": "2s"},
        "scrape_configs": [
            {"job_name": "fleet", "static_configs": [{"targets": [f"127.0.0.1:{exporter}"]}]},
            {"job_name": "trainer", "static_configs": [{"targets": [f"127.0.0.1:{process_metrics.server_port}"]}]},
        ],
    }))  # fmt: skip
    log = open(tmp_path / "prometheus.log", "wb")
    proc = spawn([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                  f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        _wait_for(lambda: _prometheus_get(port, "/api/v1/targets")["data"]["activeTargets"], "Prometheus up", proc=proc)

        def query(expr: str) -> list[dict[str, Any]]:
            return _prometheus_get(port, "/api/v1/query", query=expr)["data"]["result"]

        def targets() -> list[tuple[str, str, str]]:  # what Prometheus says of each target, for a failure
            active = _prometheus_get(port, "/api/v1/targets")["data"]["activeTargets"]
            return [(t["scrapePool"], t["health"], t.get("lastError", "")) for t in active]

        latest = _wait_for(lambda: query(f'redis_weights_fleet_latest_version{{namespace="{namespace}"}}'),
                           "the exporter's samples in Prometheus", proc=proc, diagnose=targets)  # fmt: skip
        v1, v2, v3 = fleet["versions"]
        assert float(latest[0]["value"][1]) == v3
        lag = _wait_for(lambda: query(f'redis_weights_fleet_rank_lag_versions{{namespace="{namespace}"}}'), "lag")
        assert {r["metric"]["rank"]: float(r["value"][1]) for r in lag} == {"1": 0, "2": v3 - v2, "3": v3 - v1}
        committed = _wait_for(lambda: query(f'redis_weights_versions_committed_total{{namespace="{namespace}"}}'),
                              "the in-process samples in Prometheus", proc=proc, diagnose=targets)  # fmt: skip
        assert float(committed[0]["value"][1]) == 3
        for title, expr in dashboard_queries():  # every panel's query is valid PromQL here
            answer = _prometheus_get(port, "/api/v1/query", query=expr.replace("$namespace", namespace))
            assert answer["status"] == "success", (title, expr, answer)
    finally:
        stop(proc, grace=30)
        log.close()
        process_metrics.shutdown()
        process_metrics.server_close()
