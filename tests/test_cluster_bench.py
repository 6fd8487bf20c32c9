"""``scripts/bench_cluster.py`` (issue 15): it runs, small, with sane and bit-exact results, and the
manual's cluster table (docs/operations/cluster.md) is its ``--report`` of ``docs/bench/cluster.json``, not
hand-copied numbers."""

from __future__ import annotations

import json

import pytest

from scripts import bench_cluster
from tests.conftest import REPO_ROOT, _need_server

RESULTS = REPO_ROOT / "docs" / "bench" / "cluster.json"


@pytest.mark.server
def test_the_cluster_bench_runs_small_with_bit_exact_fetches(tmp_path, capsys):
    _need_server()
    out = tmp_path / "cluster.json"
    assert bench_cluster.main(["--size", "16MB", "--repeats", "1", "--no-failover", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    pushes, fetches = doc["pushes"], doc["fetches"]
    assert set(pushes["push_median_s"]) == {"standalone", "cluster", "cluster, no replicas"}
    assert len(pushes["bytes_per_master"]) == 3
    assert sum(pushes["bytes_per_master"].values()) == pushes["total_bytes"]
    assert all(row["bit_exact"] for row in fetches.values())
    total = pushes["total_bytes"]
    assert fetches["primaries"]["primaries_out"] >= total and fetches["primaries"]["replicas_out"] < total // 4
    assert fetches["replica_reads"]["replicas_out"] >= total and fetches["replica_reads"]["primaries_out"] < total // 4
    assert bench_cluster.report(doc) in capsys.readouterr().out


def test_the_manual_cluster_table_is_the_report_of_the_recorded_run():
    doc = json.loads(RESULTS.read_text())
    page = (REPO_ROOT / "docs" / "operations" / "cluster.md").read_text()
    assert bench_cluster.report(doc) in page
    assert doc["size_mb"] >= 1000 and doc["failover"] is not None, "the recorded run is the 1 GB one, failover included"
