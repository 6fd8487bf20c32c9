"""scripts/version_report.py and scripts/export_latest.py against a real server."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file

from redis_weights import RedisStore, RedisWeightReceiver, RedisWeightUpdater
from tests.conftest import REPO_ROOT

SCRIPTS = REPO_ROOT / "scripts"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(16, 8, generator=g), "b": torch.randn(8, generator=g)}


@pytest.fixture
def fleet(real_store: RedisStore) -> dict[str, object]:
    """Versions 1..4; rank 1 on v4, rank 2 stuck on v1 (alive), rank 3 dead on v1."""
    store = RedisStore(real_store.client, real_store.namespace, owns_client=False)
    updater = RedisWeightUpdater(store, None, 3, sync=False, retention=10)
    receivers = {r: RedisWeightReceiver(store, r, {k: torch.zeros_like(v) for k, v in weights(0).items()},
                                        heartbeat_ttl=60 if r < 3 else 0.3) for r in (1, 2, 3)}  # fmt: skip
    for seed in (1, 2, 3, 4):
        updater.update_weights(weights(seed))
        for rank, receiver in receivers.items():
            if seed == 1 or rank == 1:
                receiver.poll()
    receivers[2].heartbeat()
    receivers[3].close()  # rank 3's process is gone: no more beats
    time.sleep(0.4)
    return {"receivers": receivers}


def test_version_report_flags_lag_errors_and_dead_ranks(fleet, redis_url: str, namespace: str, capsys) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "version_report.py"), "--url", redis_url, "-n", namespace, "--max-lag", "2",
         "--fail-on-dead"], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "4 (latest)" in result.stdout and "DEAD" in result.stdout
    assert "PROBLEM: rank 2 lags 3 versions (applied 1)" in result.stdout
    assert "PROBLEM: rank 3 is dead (last applied version 1)" in result.stdout
    assert "rank 1" not in result.stdout.split("PROBLEM", 1)[1]

    script = load("version_report")
    assert script.main(["--url", redis_url, "-n", namespace, "--max-lag", "3"]) == 0  # within bounds, dead ignored
    assert "OK: no problem found" in capsys.readouterr().out
    assert script.main(["--url", redis_url, "-n", namespace, "--json", "--max-lag", "1"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["latest"] == 4 and [v["version"] for v in doc["versions"]] == [1, 2, 3, 4]
    assert doc["problems"] == ["rank 2 lags 3 versions (applied 1)"]
    # A worker that refused a version is a problem whatever the lag.
    fleet["receivers"][1].store["rank:1:status"] = "error: bad"
    assert script.main(["--url", redis_url, "-n", namespace]) == 1
    assert "PROBLEM: rank 1 reports 'error: bad'" in capsys.readouterr().out


def test_export_latest_writes_once_and_prunes(fleet, redis_url: str, namespace: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "backups"
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "export_latest.py"), "--url", redis_url, "-n", namespace, "--dir", str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    target = out / f"{namespace}-v4.safetensors"
    assert str(target) in result.stdout
    loaded = load_file(str(target))
    assert all(torch.equal(loaded[k], v) for k, v in weights(4).items())

    script = load("export_latest")
    assert script.main(["--url", redis_url, "-n", namespace, "--dir", str(out)]) == 0
    assert "already exported" in capsys.readouterr().out
    (out / f"{namespace}-v2.safetensors").write_bytes(b"old")
    (out / f"{namespace}-v3.safetensors").write_bytes(b"old")
    (out / "other-v1.safetensors").write_bytes(b"another namespace")
    assert script.main(["--url", redis_url, "-n", namespace, "--dir", str(out), "--keep", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{namespace}-v3.safetensors", f"{namespace}-v4.safetensors", "other-v1.safetensors"]
    )
    # Errors: one line, exit code 1.
    assert script.main(["--url", redis_url, "-n", namespace + "-empty", "--dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("export_latest: error: ") and "no committed version" in err and err.count("\n") == 1


@pytest.mark.parametrize(("name", "option"), [("export_latest", "--keep"), ("version_report", "--max-lag")])
def test_negative_counts_are_usage_errors(name: str, option: str, tmp_path: Path, capsys) -> None:
    script = load(name)
    extra = ["--dir", str(tmp_path)] if name == "export_latest" else []
    kept = tmp_path / "policy-v1.safetensors"
    kept.write_bytes(b"an export")
    for value, why in (("-2", "must be at least 0, got -2"), ("x", "not an integer: 'x'")):
        with pytest.raises(SystemExit) as exc:  # refused by argparse, before anything connects or deletes
            script.main(["--url", "redis://127.0.0.1:1/0", *extra, option, value])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {option}: {why}" in err
    assert kept.read_bytes() == b"an export"
