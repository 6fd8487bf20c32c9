"""``redis-weights demo`` end to end, small: a trainer and 2 worker processes, a few MB, 3 versions."""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import torch

from redis_weights import PushError, RedisWeightUpdater
from redis_weights.errors import ConfigurationError
from redis_weights.tools.demo import DemoOptions
from redis_weights.tools.demo import run_demo as run_demo_in_process
from redis_weights.tools.demo.live import Progress, summary
from redis_weights.tools.demo.model import demo_weights, digest, train_and_push
from redis_weights.tools.demo.roles import claim_rank
from tests import procs
from tests.conftest import REPO_ROOT

DEMO = ["--workers", "2", "--size-mb", "2", "--versions", "3", "--interval", "0"]


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "redis_weights", "demo", *DEMO, *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_demo_on_its_own_private_server(redis_server) -> None:  # noqa: ARG001 - skips without a server binary
    result = run_demo()
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "on a private server" in out
    for version in (1, 2, 3):
        assert f"v{version}: pushed 1.9 MiB to 2 workers" in out
    assert "worker 1: version 3, holds the trainer's weights" in out
    assert "worker 2: version 3, holds the trainer's weights" in out
    assert out.rstrip().endswith("verified: every worker holds the trainer's weights")
    assert "push latency" in out and "MB/s" in out


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_demo_against_a_given_url_cleans_its_namespace(redis_url: str) -> None:
    # In-process (the entry point is covered above), one worker, on a "terminal": the --url path,
    # its clean-up, and the live table.
    out = _Terminal()
    assert run_demo_in_process(DemoOptions(workers=1, size_mb=0.5, versions=2, interval=0, url=redis_url), out) == 0
    text = out.getvalue()
    assert f"on {redis_url}" in text and "verified: every worker holds the trainer's weights" in text
    assert "2/2 pushed" in text and "heartbeat" in text and "updated" in text  # the live table's last frame
    client = redis.Redis.from_url(redis_url)
    try:
        assert list(client.scan_iter(match="rw:{demo-*", count=1000)) == []
    finally:
        client.close()


@dataclass
class _Worker:
    rank: int
    version: int
    seen: str | None

    def wait_digest(self, version: int, timeout: float) -> str | None:
        return self.seen


def test_summary_fails_when_a_worker_holds_other_weights() -> None:
    expected = digest(demo_weights(0.1, seed=1))
    assert expected != digest(demo_weights(0.1, seed=None))
    progress = Progress(total=1, size=100, pushed=1, version=1, latencies=[0.01])
    out = io.StringIO()
    workers = [_Worker(1, 1, expected), _Worker(2, 1, "0000"), _Worker(3, 0, None)]
    assert summary(out, progress, workers, 1, expected) == 1  # type: ignore[arg-type]
    text = out.getvalue()
    assert "worker 1: version 1, holds the trainer's weights" in text
    assert "worker 2: version 1, MISMATCH" in text and "worker 3: version 0, MISMATCH (digest None" in text
    assert "FAILED: 2 worker(s)" in text
    out = io.StringIO()
    assert summary(out, progress, workers[:1], 1, expected) == 0  # type: ignore[arg-type]


def test_the_training_loop_pushes_every_step_and_goes_on_after_a_failed_push(fake_store) -> None:
    """``train_and_push``: the one loop of the in-process demo and of ``--role trainer``."""
    weights = demo_weights(0.1, seed=1)
    bias = weights["layer000.bias"].clone()
    with RedisWeightUpdater(fake_store, weights, num_workers=1, sync=False) as updater:
        pushes = list(train_and_push(updater, weights, versions=2, interval=0))
        assert [(p.step, p.version, p.error) for p in pushes] == [(1, 1, None), (2, 2, None)]
        assert pushes[1].size == updater.registry.read_manifest(2).total_bytes > 0
    assert re.fullmatch(r"v2: pushed [\d.]+ KiB to 3 workers in [\d.]+ ms \(\d+ MB/s\)", pushes[1].describe(3))
    torch.testing.assert_close(weights["layer000.bias"], bias.mul(0.999).add(0.01).mul(0.999).add(0.02))
    # Rank 1 never joins: each sync push fails, is yielded with its error, and the next one still runs.
    with RedisWeightUpdater(fake_store, weights, num_workers=1, sync=True, timeout=0.1) as updater:
        failed = list(train_and_push(updater, weights, versions=2, interval=0))
    assert [p.step for p in failed] == [1, 2] and [p.size for p in failed] == [0, 0]
    assert all(isinstance(p.error, PushError) and "rank 1 never joined" in str(p.error) for p in failed)


def test_replicas_claim_distinct_ranks(real_store) -> None:
    client, keys = real_store.client, real_store.keyspace
    assert [claim_rank(client, keys, ttl=30, workers=3) for _ in range(3)] == [1, 2, 3]
    client.delete(keys.rank_alive(2))  # rank 2's heartbeat expired: a restarted replica takes it over
    assert claim_rank(client, keys, ttl=30, workers=3) == 2
    assert 0 < client.pttl(keys.rank_alive(2)) <= 30_000
    assert claim_rank(client, keys, ttl=30, workers=4) == 4


def test_a_claim_waits_for_a_rank_within_the_bound_and_never_goes_above(real_store) -> None:
    client, keys = real_store.client, real_store.keyspace
    assert [claim_rank(client, keys, ttl=30, workers=2) for _ in range(2)] == [1, 2]
    with pytest.raises(ConfigurationError, match=r"every rank of 1\.\.2 has a live worker .*WORKERS"):
        claim_rank(client, keys, ttl=30, workers=2, wait=0.3)
    assert client.exists(keys.rank_alive(3)) == 0  # nothing claimed above the bound
    # Rank 1's heartbeat runs out while the claim waits: it gets rank 1.
    client.pexpire(keys.rank_alive(1), 400)
    started = time.monotonic()
    assert claim_rank(client, keys, ttl=30, workers=2, wait=10) == 1
    assert time.monotonic() - started < 10
    assert client.exists(keys.rank_alive(3)) == 0


# ---------------------------------------------------------------------------------------
# The Docker Compose roles (``--role trainer`` / ``--role worker`` without ``--rank``), as processes
# ---------------------------------------------------------------------------------------
@dataclass
class _Process:
    """A ``python -m redis_weights`` process whose stdout and stderr go to one file."""

    out: Path
    proc: subprocess.Popen[bytes]

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} (exit code {self.proc.poll()}): {self.text()[-2000:]}")
            time.sleep(0.05)
        return match

    def rank(self) -> int:
        return int(self.wait_for(r"rank (\d+): ready on namespace").group(1))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        procs.stop(self.proc, sig)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., _Process]]:
    """Start ``redis-weights`` processes; every one is stopped at teardown, even when the test fails."""
    started: list[_Process] = []

    def start(*args: str) -> _Process:
        out = tmp_path / f"proc{len(started)}.out"
        with open(out, "wb") as f:
            proc = procs.spawn([sys.executable, "-m", "redis_weights", *args],
                               stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)  # fmt: skip
        started.append(_Process(out, proc))
        return started[-1]

    yield start
    procs.stop_all(p.proc for p in started)


def test_docker_roles_trainer_and_workers_without_rank(real_store, redis_url: str, namespace: str, spawn) -> None:
    demo = ("--url", redis_url, "--namespace", namespace, "demo", "--size-mb", "1", "--workers", "2")
    workers = [spawn(*demo, "--role", "worker") for _ in range(2)]
    trainer = spawn(*demo, "--role", "trainer", "--versions", "2", "--interval", "0", "--timeout", "30")
    assert trainer.proc.wait(120) == 0, trainer.text()
    out = trainer.text()
    assert f"waiting up to 30s for ranks 1..2 to join namespace {namespace!r}" in out
    for version in (1, 2):
        assert re.search(rf"^v{version}: pushed 981\.1 KiB to 2 workers in [\d.]+ ms", out, re.M), out
    assert "push failed" not in out and "pushing anyway" not in out
    ranks = [w.rank() for w in workers]
    assert sorted(ranks) == [1, 2]
    pattern = r"rank {}: applied version 2 \(digest (\w+)\)"
    digests = {w.wait_for(pattern.format(r)).group(1) for w, r in zip(workers, ranks, strict=True)}
    assert len(digests) == 1 and digests != {digest(demo_weights(1, seed=None))}  # same, non-zero weights


def test_a_restarted_worker_takes_over_its_dead_rank(real_store, redis_url: str, namespace: str, spawn) -> None:
    worker = ("--url", redis_url, "--namespace", namespace, "demo", "--role", "worker", "--workers", "2",
              "--size-mb", "0.1")  # fmt: skip
    first, second = spawn(*worker), spawn(*worker)
    by_rank = {first.rank(): first, second.rank(): second}
    assert sorted(by_rank) == [1, 2]
    by_rank[1].stop(signal.SIGKILL)  # a crash: rank 1's heartbeat lives on until its TTL runs out
    alive = real_store.keyspace.rank_alive(1)
    assert real_store.client.persist(alive)  # ...held until the new process has found every rank taken
    restarted = spawn(*worker)
    restarted.wait_for(r"ranks 1\.\.2 are all held; waiting up to")
    real_store.client.delete(alive)  # the crashed worker's heartbeat expires
    assert restarted.rank() == 1  # not 3, which the trainer of 2 workers would never wait for
    assert real_store.client.exists(real_store.keyspace.rank_alive(3)) == 0


def test_workers_default_from_the_environment(monkeypatch, capsys) -> None:
    from redis_weights.tools.cli import main
    from redis_weights.tools.cli.args import workers_from_environment

    monkeypatch.delenv("WORKERS", raising=False)
    assert workers_from_environment() == 4
    monkeypatch.setenv("WORKERS", "8")
    assert workers_from_environment() == 8
    monkeypatch.setenv("WORKERS", "-1")
    assert main(["demo", "--role", "worker"]) == 1  # refused before connecting anywhere
    err = capsys.readouterr().err
    assert err == "redis-weights: error: WORKERS='-1': must be at least 1, got -1\n"
