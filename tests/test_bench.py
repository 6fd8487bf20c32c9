"""A smoke run of ``scripts/bench.py`` at a tiny size: every system measured, rows verified."""

from __future__ import annotations

import importlib.util
import json

import pytest

from scripts import bench


@pytest.mark.server
@pytest.mark.slow
def test_bench_smoke_run_writes_verified_rows(tmp_path, server_factory):
    server = server_factory()  # the bench flushes its server: a private one
    out, png = tmp_path / "r.json", tmp_path / "p.png"
    args = ["--sizes", "64KB", "--workers", "1", "--systems", "rw-sync,rw-async", "--repeats", "2",
            "--url", server.url, "--out", str(out), "--plot", str(png)]
    if importlib.util.find_spec("matplotlib") is None:
        args.append("--no-plot")
    assert bench.main(args) == 0
    doc = json.loads(out.read_text())
    rows = {r["system"]: r for r in doc["rows"]}
    assert set(rows) == {"rw-sync", "rw-async"}
    for row in rows.values():
        assert row["verified"] and row["error"] is None and row["repeats"] == 2
        assert row["push_s"] > 0 and row["first_apply_s"] is not None
        assert row["redis_out_per_push"] >= 64 << 10  # the weights went through Redis
    assert rows["rw-async"]["stall_s"] <= rows["rw-async"]["push_s"]
    assert doc["machine"]["cores"] and doc["machine"]["redis_server"]
    assert png.exists() or "--no-plot" in args
