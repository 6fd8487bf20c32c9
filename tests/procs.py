"""Start and stop test worker processes (``tests/worker_main.py``); every one is stopped at teardown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.conftest import REPO_ROOT


class Worker:
    """One worker process and the JSON lines it writes."""

    module = "tests.worker_main"  # the script ``python -m`` runs; subclasses run others

    def __init__(self, out: Path, args: list[str], prefix: Sequence[str] = ()) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", self.module, "--out", str(out), *args],
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=open(out.with_suffix(".log"), "wb"),
        )

    def records(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]

    def applied(self) -> dict[int, str]:
        return {r["version"]: r["digest"] for r in self.records() if "version" in r}

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(r.get("ready") for r in self.records()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker not ready after {timeout}s: {self.log()}")
            time.sleep(0.05)

    def wait_version(self, version: int, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while version not in self.applied():
            if time.monotonic() > deadline:
                raise TimeoutError(f"version {version} not applied after {timeout}s: {self.log()}")
            time.sleep(0.05)
        return self.applied()[version]

    def log(self) -> str:
        path = self.out.with_suffix(".log")
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def workers(
    tmp_path: Path, url: str, namespace: str, ranks: list[int], *extra: str, ready: bool = True,
    prefix: Sequence[str] = (),
) -> Iterator[dict[int, Worker]]:
    """Start one worker process per rank (``prefix``: a command that runs it, e.g. ``unshare``);
    stop them all on exit, even when the test fails."""
    started: dict[int, Worker] = {}
    try:
        for rank in ranks:
            started[rank] = Worker(
                tmp_path / f"rank{rank}-{len(started)}-{time.monotonic_ns()}.jsonl",
                ["--url", url, "--namespace", namespace, "--rank", str(rank), *extra], prefix,
            )
        if ready:
            for w in started.values():
                w.wait_ready()
        yield started
    finally:
        for w in started.values():
            w.stop()
