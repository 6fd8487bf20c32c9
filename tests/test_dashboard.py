"""docker/'s Prometheus and Grafana: the dashboard queries only metrics that exist, wired as compose runs them.

Every metric name a dashboard query uses must be a sample that the library
(``redis_weights.observe.metrics``) or the exporter (``tools/exporter.py``) exposes; the
README documents every one of them with its type and labels; Prometheus scrapes the
ports the compose services serve on. (``test_exporter.py`` sends every query to a real
Prometheus, where one is installed.)
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

import pytest

from redis_weights.observe.metrics import TRAINER_METRICS, WORKER_METRICS
from redis_weights.tools.cli import build_parser
from redis_weights.tools.exporter import FLEET_METRICS
from tests.conftest import REPO_ROOT

yaml = pytest.importorskip("yaml")
DOCKER = REPO_ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "redis_weights.json"
CATALOGUE = TRAINER_METRICS + WORKER_METRICS + FLEET_METRICS
_NAME = re.compile(r"\bredis_weights_[a-z0-9_]+")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` of every query of the dashboard, its variable's included."""
    doc = dashboard()
    queries = [(p["title"], t["expr"]) for p in doc["panels"] for t in p.get("targets", [])]
    for variable in doc["templating"]["list"]:
        match = re.fullmatch(r"label_values\((\w+), *\w+\)", variable["query"]["query"])
        assert match, variable  # Grafana's function, not PromQL: check the metric it names
        queries.append((f"variable {variable['name']}", match.group(1)))
    return queries


def test_every_metric_the_dashboard_queries_is_exported() -> None:
    exported = {sample for spec in CATALOGUE for sample in spec.samples}
    used = {name for _, expr in dashboard_queries() for name in _NAME.findall(expr)}
    assert used and used <= exported, sorted(used - exported)
    labels = {label for spec in CATALOGUE for label in spec.labels} | {"le", "instance", "job"}
    for title, expr in dashboard_queries():
        for by in re.findall(r"by \(([^)]*)\)", expr):
            assert {b.strip() for b in by.split(",")} <= labels, (title, expr)


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    used = {name for _, expr in dashboard_queries() for name in _NAME.findall(expr)}
    for needed in ("redis_weights_push_duration_seconds_bucket", "redis_weights_push_written_bytes_total",
                   "redis_weights_fleet_latest_version", "redis_weights_fleet_rank_lag_versions",
                   "redis_weights_fleet_rank_alive"):  # latency, bytes per push, versions, lag, liveness
        assert needed in used, needed
    doc = dashboard()
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    datasource = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    (source,) = datasource["datasources"]
    for panel in doc["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == source["uid"], panel["title"]
    assert source["url"] == "http://prometheus:9090"


def test_the_manual_documents_every_metric_with_its_type_and_labels() -> None:
    section = (REPO_ROOT / "docs" / "operations" / "metrics.md").read_text()
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `(redis_weights_\w+)` \| (\w+) \| ([^|]*) \|", line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(3).strip())
    for spec in CATALOGUE:
        assert spec.name in rows, f"docs/operations/metrics.md lacks {spec.name}"
        kind, labels = rows[spec.name]
        assert kind == spec.kind, spec.name
        assert re.findall(r"`(\w+)`", labels) == list(spec.labels), spec.name
    assert set(rows) == {spec.name for spec in CATALOGUE}


def test_compose_wires_prometheus_grafana_and_the_metrics_ports() -> None:
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    scrape = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    jobs = {job["job_name"]: job for job in scrape}
    exporter = build_parser().parse_args(services["exporter"]["command"])
    assert jobs["fleet"]["static_configs"][0]["targets"] == [f"exporter:{exporter.port}"]
    for name in ("trainer", "worker"):
        command = [part.replace("${WORKERS:-4}", "4").replace("${MODEL_MB:-16}", "16")
                   for part in services[name]["command"]]  # fmt: skip
        assert build_parser().parse_args(command).metrics_port == 9100, name
    assert jobs["trainer"]["static_configs"][0]["targets"] == ["trainer:9100"]
    (dns,) = jobs["workers"]["dns_sd_configs"]
    assert dns["names"] == ["worker"] and dns["port"] == 9100  # every replica of the worker service
    mounts = services["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    grafana = services["grafana"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/redis_weights.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"/var/lib/grafana/dashboards/{DASHBOARD.name}"
    assert '".[metrics]"' in (DOCKER / "Dockerfile").read_text()  # the image can serve metrics


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("no promtool (Debian's prometheus package: scripts/install_prometheus.sh installs it)")
    done = subprocess.run([promtool, "check", "config", str(DOCKER / "prometheus" / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
