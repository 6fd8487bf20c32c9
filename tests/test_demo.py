"""``redis-weights demo`` end to end, small: a trainer and 2 worker processes, a few MB, 3 versions."""

from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import dataclass

import redis

from redis_weights.demo import DemoOptions, Progress, _summary, claim_rank, demo_weights, digest
from redis_weights.demo import run_demo as run_demo_in_process
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
    assert _summary(out, progress, workers, 1, expected) == 1  # type: ignore[arg-type]
    text = out.getvalue()
    assert "worker 1: version 1, holds the trainer's weights" in text
    assert "worker 2: version 1, MISMATCH" in text and "worker 3: version 0, MISMATCH (digest None" in text
    assert "FAILED: 2 worker(s)" in text
    out = io.StringIO()
    assert _summary(out, progress, workers[:1], 1, expected) == 0  # type: ignore[arg-type]


def test_replicas_claim_distinct_ranks(real_store) -> None:
    client, keys = real_store.client, real_store.keyspace
    assert [claim_rank(client, keys, ttl=30) for _ in range(3)] == [1, 2, 3]
    client.delete(keys.rank_alive(2))  # rank 2's heartbeat expired: a restarted replica takes it over
    assert claim_rank(client, keys, ttl=30) == 2
    assert claim_rank(client, keys, ttl=30) == 4
    assert 0 < client.pttl(keys.rank_alive(4)) <= 30_000
