"""``scripts/bench.py``: every system runs at a tiny size with sane, verified rows; the plot is
drawn; ``--report`` re-renders a results file; the committed results, the README and docs/benchmarks.md agree.
The training workloads (issue 11) run with tiny models: real steps, bit-exact proofs."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pytest
import redis
import torch

from scripts import bench, bench_procs, bench_train
from scripts.bench_procs import RW_SYSTEMS, SYSTEMS

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "bench" / "results.json"
WORKLOAD_RESULTS = REPO / "docs" / "bench" / "workloads.json"
BENCHMARKS = REPO / "docs" / "benchmarks.md"
SUMMARY_RUNS = ("classic", "classic-host-cache", "finetune-delta", "finetune-delta-host-cache",  # the README's
                "finetune-1e-5", "finetune-1e-5-host-cache")  # table
TINY = 64 << 10
# torchrl is an optional extra: its peer runs in a test of its own, skipped without it.
CORE_SYSTEMS = tuple(s for s in SYSTEMS if s != "torchrl")


def readme_section(heading: str) -> str:
    """The README from ``heading`` up to the next top-level section."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index(heading):]
    return section[: section.index("\n## ", 1)]


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def run_bench(tmp_path: Path, url: str, systems: tuple[str, ...]) -> tuple[int, dict, Path]:
    out, png = tmp_path / "r.json", tmp_path / "p.png"
    code = bench.main(["--sizes", "64KB", "--workers", "1", "--systems", ",".join(systems), "--repeats", "2",
                       "--url", url, "--out", str(out), "--plot", str(png), "--timeout", "120"])
    return code, json.loads(out.read_text()), png


def check_rows(doc: dict, systems: tuple[str, ...]) -> None:
    """Each row: two timed pushes, every number finite and positive, every push applied by the worker."""
    rows = {r["system"]: r for r in doc["rows"]}
    assert set(rows) == set(systems)
    for system, r in rows.items():
        assert r["error"] is None and r["verified"], (system, r)
        assert (r["size"], r["workers"], r["repeats"]) == (TINY, 1, 2), system
        assert r["model_bytes"] >= TINY, system
        assert len(r["push_s_all"]) == 2 and all(positive(s) for s in r["push_s_all"]), system
        for key in ("push_s", "mb_per_s", "stall_s", "first_apply_s", "last_apply_s"):
            assert positive(r[key]), (system, key, r[key])
        assert len(r["first_apply_s_all"]) == len(r["last_apply_s_all"]) == 2, system
        assert all(a <= b for a, b in zip(r["first_apply_s_all"], r["last_apply_s_all"], strict=True)), system
        assert r["stall_s"] <= r["push_s"], system  # the call returns before (or as) the workers have it
        assert r["trainer_rss_growth"] >= 0 and r["worker_rss_growth"] >= 0, system
        if system == "torchrl":
            assert r["redis_out_per_push"] is None  # gloo, no Redis
        else:
            assert r["redis_out_per_push"] >= r["model_bytes"], system  # the weights went through Redis
    assert doc["machine"]["cores"] and doc["machine"]["redis_server"]


@pytest.mark.server
@pytest.mark.slow
def test_bench_runs_every_system_with_verified_rows_and_a_plot(tmp_path, server_factory, capsys):
    server = server_factory()  # the bench flushes its server: a private one
    code, doc, png = run_bench(tmp_path, server.url, CORE_SYSTEMS)
    assert code == 0
    check_rows(doc, CORE_SYSTEMS)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    for system in CORE_SYSTEMS:
        assert f"| 64 KB | 1 | {system} | " in printed
    # the library's systems are judged against the memory targets, rw-async included
    judged = {t["target"].split(", ")[1].split()[0] for t in doc["targets"] if "RSS growth" in t["target"]}
    assert judged == set(RW_SYSTEMS)

    # --report: the same tables and a fresh plot from the JSON alone, without a server
    png.unlink()
    again = tmp_path / "again.png"
    assert bench.main(["--report", str(tmp_path / "r.json"), "--plot", str(again)]) == 0
    reported = capsys.readouterr().out
    assert bench.table(doc["rows"]) in reported and bench.pivot(doc["rows"]) in reported
    assert again.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not png.exists()


@pytest.mark.server
@pytest.mark.slow
def test_bench_runs_the_torchrl_peer(tmp_path, server_factory):
    pytest.importorskip("torchrl")
    server = server_factory()
    code, doc, _ = run_bench(tmp_path, server.url, ("torchrl",))
    assert code == 0
    check_rows(doc, ("torchrl",))


def test_report_of_the_committed_run_judges_the_async_trainer_memory_honestly(capsys):
    assert bench.main(["--report", str(RESULTS), "--no-plot"]) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("- trainer RSS growth, rw-async 100 MB")]
    assert len(lines) == 3  # 1, 2 and 4 workers
    for line in lines:
        assert "NOT met" in line and "staging buffer" in line, line
    assert re.search(r"- trainer RSS growth, rw-sync 100 MB x2 / \(chunk \+ header\): [0-9.]+ \(limit 1.0: met\)",
                     printed)
    assert "| 1 GB | 1 | naive | failed: ConnectionError" in printed


def test_targets_of_synthetic_rows():
    """Ratios and verdicts from medians; the async trainer's full staging copy is reported, not hidden."""
    mb100 = 100 << 20
    base = {"size": mb100, "model_bytes": mb100, "workers": 2, "stall_s": 0.01,
            "trainer_rss_growth": 1 << 20, "worker_rss_growth": mb100}
    rows = [
        {**base, "system": "rw-sync", "push_s": 0.2},
        {**base, "system": "raw", "push_s": 0.1},
        {**base, "system": "rw-async", "push_s": 0.3, "trainer_rss_growth": mb100 + (1 << 20)},
    ]
    found = {t["target"]: t for t in bench.targets(rows)}
    floor = found["sync push 100 MB, 2 workers / raw floor"]
    assert (floor["ratio"], floor["met"]) == (2.0, False)
    assert found["trainer RSS growth, rw-sync 100 MB x2 / (chunk + header)"]["met"]
    async_rss = found["trainer RSS growth, rw-async 100 MB x2 / (chunk + header)"]
    assert not async_rss["met"] and async_rss["ratio"] > 10 and "by design" in async_rss["note"]
    assert found["worker RSS growth, rw-async 100 MB x2 / (model + chunk)"]["met"]
    assert not any("raw" in name and "RSS" in name for name in found)  # memory targets are the library's


def test_readme_shows_the_committed_workload_runs():
    """The README's summary table is ``bench.workload_summary`` of the committed workload runs, not
    hand-copied numbers, and each of those runs is in docs/benchmarks.md whole."""
    runs = [json.loads((REPO / "docs" / "bench" / f"{name}.json").read_text())["workload_rows"] for name in SUMMARY_RUNS]
    assert all(r["verified"] for rows in runs for r in rows)
    assert bench.workload_summary(*runs) in readme_section("\n## Benchmarks")
    docs = BENCHMARKS.read_text()
    for rows in runs:
        assert bench.workload_table(rows) in docs


def test_docs_show_the_committed_results():
    """docs/benchmarks.md's sweep tables and targets are ``bench.py --report docs/bench/results.json``
    output, not hand-copied numbers."""
    doc = json.loads(RESULTS.read_text())
    docs = BENCHMARKS.read_text()
    assert bench.pivot(doc["rows"]) in docs
    assert bench.table(doc["rows"]) in docs


def test_readme_and_docs_show_the_committed_workload_run():
    """The training-workload table and targets in docs/benchmarks.md are ``--report`` output of
    ``docs/bench/workloads.json``, a run at full size where every row is bit-exact."""
    doc = json.loads(WORKLOAD_RESULTS.read_text())
    rows = doc["workload_rows"]
    assert rows and all(r["verified"] for r in rows)
    assert {r["params"] for r in rows if r["workload"] != "classic"} == {260347904}  # >= 250M, bf16 >= 500 MB
    docs = BENCHMARKS.read_text()
    assert bench.workload_table(rows) in docs
    for target in bench.workload_targets(rows):
        assert bench.target_line(target) in docs


# ---------------------------------------------------------------------------------------
# Training workloads (issue 11)
# ---------------------------------------------------------------------------------------
TINY_MODEL = ["--width", "32", "--layers", "4", "--heads", "2", "--vocab", "64", "--seq", "8", "--batch", "1",
              "--mlp-width", "32", "--mlp-layers", "2"]


def tiny_args(**overrides: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    args = parser.parse_args(TINY_MODEL)
    args.lr = 1e-6
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


def test_a_training_step_moves_the_master_weights_and_the_wire_copy_counts_what_changed():
    args = tiny_args()
    trainer = bench_train.Trainer(args, bench_train.WORKLOADS["finetune"])
    wire = bench_train.WireCopy(args, bench_train.WORKLOADS["finetune"], trainer.model)
    assert all(t.dtype == torch.bfloat16 for t in wire.model.state_dict().values())
    assert wire.refresh()[2] == 0.0  # nothing trained yet
    before = bench_train.digest(wire.model)
    trainer.step()
    _, _, changed = wire.refresh()
    assert 0 < changed < 0.5  # lr 1e-6: a few bf16 elements move, most do not
    assert bench_train.digest(wire.model) != before
    assert wire.refresh()[2] == 0.0  # compared with the previous refresh, not the start


def test_the_digest_sees_every_bit_and_the_frozen_half_stays_put():
    args = tiny_args()
    frozen = bench_train.Trainer(args, bench_train.WORKLOADS["frozen"])
    start = {n: t.clone() for n, t in frozen.model.state_dict().items()}
    frozen.step()
    moved = {n for n, t in frozen.model.state_dict().items() if not torch.equal(t, start[n])}
    assert moved and not any(n.startswith(("blocks.0.", "blocks.1.")) for n in moved)
    assert any(n.startswith(("blocks.2.", "blocks.3.")) for n in moved)
    model = bench_train.build_model(args, bench_train.WORKLOADS["finetune"], torch.bfloat16, init=True)
    before = bench_train.digest(model)
    last = list(model.state_dict().values())[-1]
    last.view(-1).view(torch.int16)[-1] ^= 1  # the lowest bit of the last element
    assert bench_train.digest(model) != before


def proofs(digests: list[str]) -> dict:
    return {"proofs": [{"index": i, "digest": d, "apply_s": 0.1} for i, d in enumerate(digests, 1)],
            "rss_baseline": 0, "rss_peak": 1}


def test_a_worker_that_missed_a_push_fails_verification():
    pushes = [{"index": i, "digest": f"d{i}", "changed": 0.01, "push_s": 1.0, "encode_s": 0.1, "train_s": 1.0,
               "bytes_in": 10, "bytes_out": 20} for i in (1, 2, 3)]
    trainer = {"pushes": pushes, "params": 5, "trainable": 5, "wire_bytes": 1000, "rss_baseline": 0, "rss_peak": 1}
    ident = {"workload": "finetune", "lr": 1e-6, "system": "rw-delta", "workers": 2}
    good = bench.summarize_workload(ident, trainer, [proofs(["d1", "d2", "d3"])] * 2)
    assert good["verified"] and good["repeats"] == 2 and good["bytes_in"] == 10 and good["apply_s"] == 0.1
    stale = bench.summarize_workload(ident, trainer, [proofs(["d1", "d2", "d3"]), proofs(["d1", "d2", "d2"])])
    assert not stale["verified"]
    assert not bench.summarize_workload(ident, trainer, [proofs(["d1", "d2", "d3"])])["verified"]  # a worker short


def test_cpu_per_push_sums_the_workers_and_shows_only_in_runs_that_measured_it():
    pushes = [{"index": i, "digest": f"d{i}", "changed": 0.01, "push_s": 1.0, "encode_s": 0.1, "train_s": 1.0,
               "bytes_in": 10, "bytes_out": 20, "trainer_cpu_s": 0.5 + i, "redis_cpu_s": 0.01 * i}
              for i in (1, 2, 3, 4)]
    trainer = {"pushes": pushes, "params": 5, "trainable": 5, "wire_bytes": 1000, "rss_baseline": 0, "rss_peak": 1}
    ident = {"workload": "finetune", "lr": 1e-6, "system": "rw-delta", "workers": 2}
    workers = [proofs(["d1", "d2", "d3", "d4"]) for _ in range(2)]
    for w, scale in zip(workers, (1.0, 3.0), strict=True):
        for proof in w["proofs"]:
            proof["cpu_s"] = scale * proof["index"]
    row = bench.summarize_workload(ident, trainer, workers)
    # medians over the pushes after the first (2, 3, 4); the workers' CPU is their sum per push
    assert (row["trainer_cpu_s"], row["workers_cpu_s"], row["redis_cpu_s"]) == (3.5, 12.0, 0.03)
    table = bench.workload_table([{**row, "host_cache": False}])
    assert "CPU s: trainer / workers / Redis" in table and "| 3.5 / 12 / 0.03 |" in table
    assert all(line.count("|") == 15 for line in table.splitlines())
    earlier = {k: v for k, v in row.items() if not k.endswith("_cpu_s")}  # a JSON file from before CPU was measured
    assert "CPU" not in bench.workload_table([earlier])
    workers[1]["proofs"][1].pop("cpu_s")  # one worker did not measure push 2: no sum for it
    assert bench.summarize_workload(ident, trainer, workers)["workers_cpu_s"] == (12 + 16) / 2  # pushes 3 and 4


def test_workload_targets_of_synthetic_rows():
    base = {"wire_bytes": 1000, "bytes_in": 40, "verified": True}
    rows = [
        {**base, "workload": "finetune", "lr": 1e-6, "system": "rw-delta", "workers": 4, "push_s": 0.5},
        {**base, "workload": "finetune", "lr": 1e-6, "system": "torchrl", "workers": 4, "push_s": 2.0,
         "bytes_in": None},
        {**base, "workload": "finetune", "lr": 1e-5, "system": "rw-delta", "workers": 4, "push_s": 0.5,
         "bytes_in": 300},
        {**base, "workload": "frozen", "lr": 1e-6, "system": "rw-dense", "workers": 4, "push_s": 1.0,
         "bytes_in": 520},
        {**base, "workload": "classic", "lr": 3e-4, "system": "rw-delta", "workers": 4, "push_s": 1.02},
        {**base, "workload": "classic", "lr": 3e-4, "system": "rw-dense", "workers": 4, "push_s": 1.0,
         "verified": False},
        {"workload": "classic", "lr": 3e-4, "system": "torchrl", "workers": 4, "error": "ConnectionError: x; logs"},
    ]
    found = {t["target"].split(":")[0]: t for t in bench.workload_targets(rows)}
    assert (found["finetune lr 1e-06 rw-delta x4"]["ratio"], found["finetune lr 1e-06 rw-delta x4"]["met"]) == (
        0.04, True)
    assert (found["finetune lr 1e-05 rw-delta x4"]["ratio"], found["finetune lr 1e-05 rw-delta x4"]["met"]) == (
        0.3, False)
    assert found["frozen lr 1e-06 rw-dense x4"]["met"]
    assert found["finetune lr 1e-06, 4 workers, sync"]["ratio"] == 0.25 and not found[
        "finetune lr 1e-06, 4 workers, sync"]["met"]
    assert found["classic x4"]["met"]
    unverified = next(t for t in found.values() if t["target"].startswith("rows where"))
    assert (unverified["ratio"], unverified["met"]) == (1, False)
    table = bench.workload_table(rows)
    assert "| classic | 0.0003 | 4 | torchrl | failed: ConnectionError: x |" in table and "| NO |" in table


@pytest.mark.server
@pytest.mark.slow
def test_workloads_train_between_pushes_and_every_worker_proves_the_bytes(tmp_path, server_factory, capsys):
    server = server_factory()
    out = tmp_path / "w.json"
    code = bench.main(["--workloads", "finetune,frozen,classic", "--lrs", "1e-6", "--workers", "1",
                       "--systems", "rw-delta", "--repeats-train", "2", "--url", server.url,
                       "--out", str(out), "--timeout", "120", *TINY_MODEL])
    assert code == 0
    doc = json.loads(out.read_text())
    rows = {r["workload"]: r for r in doc["workload_rows"]}
    assert set(rows) == {"finetune", "frozen", "classic"} and {r["system"] for r in rows.values()} == {"rw-delta"}
    assert doc["rows"] == []  # workloads only: no size sweep
    for name, r in rows.items():
        assert r["error"] is None and r["verified"], (name, r)
        assert r["repeats"] == 2 and len(r["push_s_all"]) == 2, name
        for key in ("push_s", "apply_s", "train_s", "encode_s", "bytes_in", "bytes_out", "changed", "wire_bytes",
                    "trainer_cpu_s", "workers_cpu_s", "redis_cpu_s"):
            assert positive(r[key]), (name, key, r[key])
        assert r["changed"] <= 1 and r["bytes_in"] <= 2 * r["first_bytes_in"], name
    assert rows["classic"]["changed"] > 0.9  # fp32 Adam at lr 3e-4: almost every element
    assert rows["finetune"]["changed"] < 0.5
    assert rows["finetune"]["wire_bytes"] * 2 == 4 * rows["finetune"]["params"]  # bf16 on the wire, fp32 master
    frozen = rows["frozen"]
    assert frozen["trainable"] < frozen["params"] and frozen["changed"] < rows["finetune"]["changed"]
    printed = capsys.readouterr().out
    assert bench.workload_table(doc["workload_rows"]) in printed
    assert "rows where a worker did not hold the trainer's wire bytes after a push (3 rows ran): 0" in printed


@pytest.mark.server
@pytest.mark.slow
def test_the_dense_and_torchrl_peers_push_the_same_trajectory(tmp_path, server_factory):
    pytest.importorskip("torchrl")
    server = server_factory()
    out = tmp_path / "w.json"
    code = bench.main(["--workloads", "finetune", "--lrs", "1e-6", "--workers", "2", "--systems", "rw-dense,torchrl",
                       "--repeats-train", "2", "--url", server.url, "--out", str(out), "--timeout", "120",
                       *TINY_MODEL])
    assert code == 0
    dense, peer = json.loads(out.read_text())["workload_rows"]
    assert (dense["system"], peer["system"]) == ("rw-dense", "torchrl")
    assert dense["verified"] and peer["verified"]
    assert dense["changed"] == peer["changed"]  # the same seed: the same weights pushed, push by push
    assert peer["bytes_in"] is None and positive(peer["push_s"]) and positive(peer["apply_s"])
    assert positive(peer["encode_s"])  # the cast to the wire dtype
    assert dense["bytes_out"] >= 2 * dense["bytes_in"] * 0.9  # both workers read what was written


def test_the_sweep_stamps_every_4_kib_so_no_chunk_repeats():
    """Content-addressed chunks must not dedup the sweep's zero-filled model: it measures dense pushes."""
    model = bench_procs.bench_model(1 << 20)
    seen: set[bytes] = set()
    for marker in (1, 2):
        bench_procs.set_marker(model, marker)
        assert bench_procs.get_marker(model) == marker
        blob = b"".join(t.numpy().tobytes() for t in model.state_dict().values())
        pieces = [blob[i:i + 8192] for i in range(0, len(blob) - 8191, 8192)]
        assert len(set(pieces)) == len(pieces) and not seen & set(pieces)
        seen |= set(pieces)


# ---------------------------------------------------------------------------------------
# Good neighbour (issue 14)
# ---------------------------------------------------------------------------------------
@pytest.mark.server
@pytest.mark.slow
def test_the_neighbour_measure_reads_the_slowlog_and_another_clients_pings(tmp_path, server_factory, capsys):
    server = server_factory()
    client = redis.Redis.from_url(server.url)
    before = client.config_get("slowlog-*")
    out = tmp_path / "n.json"
    code = bench.main(["--neighbour", "64KB", "--chunk-sizes", "16KB,32KB", "--repeats", "2", "--url", server.url,
                       "--out", str(out), "--no-plot", "--timeout", "120"])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["rows"] == [] and [r["chunk_size"] for r in doc["neighbour_rows"]] == [16 << 10, 32 << 10]
    for r in doc["neighbour_rows"]:
        assert r["verified"] and r["error"] is None and positive(r["push_s"]), r
        assert r["server"].startswith(("redis ", "valkey ")) and "io-threads" in r["server"]
        assert r["slowlog"]["count"] == sum(c["count"] for c in r["slowlog"]["commands"].values())
        for stats in (r["ping_idle"], r["ping_push"]):
            assert stats["count"] > 0 and 0 < stats["p50_ms"] <= stats["p99_ms"] <= stats["max_ms"], stats
    assert client.config_get("slowlog-*") == before  # the server's settings are given back
    client.close()
    printed = capsys.readouterr().out
    assert bench.neighbour_table(doc["neighbour_rows"]) in printed
    assert "slowest library command / 2 ms" in printed


@pytest.mark.server
def test_library_slowlog_counts_real_entries_and_leaves_out_the_benchs_own(server_factory):
    """Real SLOWLOG entries (bytes): a ~5 ms script is the library's kind of command, INFO is the bench's."""
    client = redis.Redis.from_url(server_factory().url)
    client.config_set("slowlog-log-slower-than", 0)
    client.slowlog_reset()
    busy = "local t = redis.call('TIME'); local s = t[1] * 1e6 + t[2]; local n = s " \
           "while n - s < 5000 do t = redis.call('TIME'); n = t[1] * 1e6 + t[2] end return 1"
    client.eval(busy, 0)
    client.info("stats")
    client.set("k", "v")
    found = bench.library_slowlog(client.slowlog_get(100))
    client.close()
    assert set(found["commands"]) >= {"EVAL", "SET"} and "INFO" not in found["commands"]
    assert found["commands"]["EVAL"]["count"] == 1 and found["max_ms"] >= 5.0
    assert found["max_ms"] == found["commands"]["EVAL"]["max_ms"]


def test_ping_stats_and_neighbour_targets_of_synthetic_values():
    stats = bench.ping_stats([0.001] * 98 + [0.010, 0.050])
    assert stats == {"count": 100, "p50_ms": 1.0, "p99_ms": 50.0, "max_ms": 50.0}
    assert bench.ping_stats([])["p99_ms"] is None
    row = {"system": "rw-sync", "size": 1 << 30, "workers": 1, "chunk_size": 2 << 20, "push_s": 1.0,
           "server": "redis 7.0.15, io-threads 1", "slowlog": {"count": 3, "max_ms": 2.5, "commands": {}}}
    (target,) = bench.neighbour_targets([row, {**row, "push_s": None}])
    assert (target["ratio"], target["met"]) == (1.25, False) and "chunk 2 MB" in target["target"]


def test_the_host_cache_rows_report_redis_egress_per_host():
    mb = 100 << 20
    rows = [{"system": "rw-shm", "size": mb, "model_bytes": mb, "workers": n, "push_s": 0.2, "stall_s": 0.2,
             "redis_out_per_push": mb * 1.02, "trainer_rss_growth": 0, "worker_rss_growth": 0} for n in (1, 8)]
    found = [t for t in bench.targets(rows) if t["target"].startswith("Redis egress per host")]
    assert [t["ratio"] for t in found] == [1.02, 1.02] and found[1]["target"].endswith("x8")


def test_docs_show_the_committed_neighbour_run():
    """The good-neighbour tables are ``--report`` output of docs/bench/neighbour.json: a 1 GB run of
    the library's defaults (2 MiB chunks among the compared sizes), every row verified."""
    doc = json.loads((REPO / "docs" / "bench" / "neighbour.json").read_text())
    rows = doc["neighbour_rows"]
    assert rows and all(r["verified"] and r["size"] == 1 << 30 for r in rows)
    assert bench.CHUNK in {r["chunk_size"] for r in rows}
    docs = BENCHMARKS.read_text()
    assert bench.neighbour_table(rows) in docs
    valkey = json.loads((REPO / "docs" / "bench" / "neighbour-valkey.json").read_text())["neighbour_rows"]
    assert valkey and all(r["verified"] and r["server"].startswith("valkey ") for r in valkey)
    assert bench.neighbour_table(valkey) in docs


def test_the_default_run_is_the_sweep_then_the_classic_policy_without_and_with_the_host_cache():
    """``bench.py`` with no selection also runs the seed's own user (``classic`` at 1, 2, 4 workers),
    without and with the host cache; any selection runs only what it names."""
    def plan(sizes=None, host_cache=False, workloads=(), neighbour=()):
        args = argparse.Namespace(sizes=sizes, host_cache=host_cache)
        return bench.workload_plan(args, list(workloads), list(neighbour))

    assert plan() == (["classic"], [False, True])
    assert plan(host_cache=True) == (["classic"], [True])
    assert plan(sizes="100MB") == ([], [False])
    assert plan(workloads=["finetune"]) == (["finetune"], [False])
    assert plan(host_cache=True, workloads=["finetune"]) == (["finetune"], [True])
    assert plan(neighbour=[1 << 20]) == ([], [False])
    assert bench.WORKLOADS["classic"].runs == ((3e-4, (1, 2, 4)),)


def test_the_workload_flags_forward_the_host_cache_to_the_processes():
    """``bench.py --workloads classic --host-cache``: the workers share each version (the flag once stayed behind)."""
    assert "--host-cache" not in bench_train.model_flags(tiny_args())
    flags = bench_train.model_flags(tiny_args(host_cache=True))
    assert "--host-cache" in flags
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    assert parser.parse_args(flags).host_cache
