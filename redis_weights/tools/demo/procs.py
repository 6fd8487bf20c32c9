"""The in-process demo's worker children: start them, read what they report, stop them.

Each child is ``python -m redis_weights demo --role worker --json-lines`` (see
``roles.run_worker``): one JSON line on stdout when ready, then one per applied version
(version and digest). Closing its stdin tells it to go.

The Redis URL reaches a child through its environment (``REDIS_URL``), never its
command line: any local user can read another's argv (``ps``), and the URL may hold
a password.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from ...errors import ConfigurationError
from ..cli.args import ENV_URL

_READY_TIMEOUT = 120.0  # seconds every child has to report ready (its imports take a few)


class WorkerProcess:
    """A demo worker child and what it has reported (read by a thread from its stdout)."""

    def __init__(self, rank: int, url: str, namespace: str, size_mb: float, log_dir: Path) -> None:
        self.rank = rank
        self.log_path = log_dir / f"worker{rank}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            worker_command(rank, namespace, size_mb), env=worker_environment(url),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
        )  # fmt: skip
        self.ready = threading.Event()
        self.digests: dict[int, str] = {}
        self.version = 0
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            with self._changed:
                if doc.get("ready"):
                    self.ready.set()
                if "version" in doc:
                    self.digests[doc["version"]] = doc["digest"]
                    self.version = max(self.version, doc["version"])
                self._changed.notify_all()

    def wait_digest(self, version: int, timeout: float) -> str | None:
        with self._changed:
            self._changed.wait_for(lambda: version in self.digests or self.proc.poll() is not None, timeout)
            return self.digests.get(version)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip().splitlines()[-1]
        except (OSError, IndexError):
            return "(no output)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                if self.proc.stdin:
                    self.proc.stdin.close()
                self.proc.wait(5)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self._log.close()


def worker_command(rank: int, namespace: str, size_mb: float) -> list[str]:
    """The command line of a demo worker child: everything but the URL (see ``worker_environment``)."""
    return [sys.executable, "-m", "redis_weights", "--namespace", namespace, "demo", "--role", "worker",
            "--rank", str(rank), "--size-mb", str(size_mb), "--json-lines"]  # fmt: skip


def worker_environment(url: str) -> dict[str, str]:
    """This process's environment with ``REDIS_URL`` set to ``url``: how a child learns it, unseen by ``ps``."""
    return {**os.environ, ENV_URL: url}


def wait_ready(workers: list[WorkerProcess], timeout: float = _READY_TIMEOUT) -> None:
    """Return once every child has reported ready; a ``ConfigurationError`` naming the first that did not."""
    deadline = time.monotonic() + timeout
    for w in workers:
        if not w.ready.wait(max(0.0, deadline - time.monotonic())) or w.proc.poll() is not None:
            raise ConfigurationError(f"demo worker {w.rank} did not start: {w.log_tail()}")


def stop_all(workers: list[WorkerProcess]) -> None:
    """Stop every child (each waits for its own exit, then is terminated or killed)."""
    for w in workers:
        w.stop()
