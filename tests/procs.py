"""Start and stop the processes tests run: ``spawn`` / ``stop`` / ``running`` for any command, ``Worker`` and
``workers`` for test workers (``tests/worker_main.py``). Every one is stopped at teardown, its children too;
``stop_all`` and ``wait_ready`` handle several at once, so that their start-up and exit overlap."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.conftest import REPO_ROOT

_GROUPS: set[int] = set()  # pids of the processes ``spawn`` started, each leading a process group of its own


def spawn(args: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(args, **popen)`` in a process group of its own (cwd: the repository), so that
    ``stop`` also reaches the processes it starts (a demo's server, a CLI's workers)."""
    popen.setdefault("cwd", REPO_ROOT)
    proc = subprocess.Popen(list(args), start_new_session=True, **popen)
    _GROUPS.add(proc.pid)
    return proc


def _send(pid: int, sig: int) -> None:
    try:
        if pid in _GROUPS:
            os.killpg(pid, sig)  # the process and its children, even once it has exited
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, grace: float = 10.0) -> int:
    """Stop ``proc`` and, when ``spawn`` started it, its children, by pid: ``sig``, then SIGKILL after
    ``grace`` seconds; reaped. Its exit code (a process that had exited is only reaped)."""
    return stop_all([proc], sig, grace)[0]


def stop_all(procs: Iterable[subprocess.Popen[Any]], sig: int = signal.SIGTERM, grace: float = 10.0) -> list[int]:
    """``stop`` for several processes at once: ``sig`` to every one first, then each reaped (SIGKILL for
    those still running ``grace`` seconds after the signal), so that they wind down side by side."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            _send(proc.pid, sig)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _send(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.pid in _GROUPS:
            _send(proc.pid, signal.SIGKILL)  # children left behind by a leader that exited
            _GROUPS.discard(proc.pid)
    return [proc.returncode for proc in procs]


@contextmanager
def running(args: Sequence[str], sig: int = signal.SIGTERM, **popen: Any) -> Iterator[subprocess.Popen[Any]]:
    """A ``spawn``-ed process, stopped (``stop(proc, sig)``) on exit, even when the test fails."""
    proc = spawn(args, **popen)
    try:
        yield proc
    finally:
        stop(proc, sig)


class Worker:
    """One worker process and the JSON lines it writes."""

    module = "tests.worker_main"  # the script whose ``main()`` runs (``tests/launch.py``); subclasses run others

    def __init__(self, out: Path, args: list[str], prefix: Sequence[str] = ()) -> None:
        self.out = out
        self.proc = spawn(
            [*prefix, sys.executable, "-m", "tests.launch", self.module, "--out", str(out), *args],
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
        """SIGKILL: a crash, as far as Redis and the trainer can tell."""
        stop(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        stop(self.proc)


def wait_ready(*groups: dict[int, Worker]) -> None:
    """Wait until every worker of ``groups`` (``workers(..., ready=False)``) is ready: groups started with
    different arguments then start side by side, not one after the other."""
    for group in groups:
        for worker in group.values():
            worker.wait_ready()


@contextmanager
def workers(
    tmp_path: Path, url: str, namespace: str, ranks: list[int], *extra: str, ready: bool = True,
    prefix: Sequence[str] = (),
) -> Iterator[dict[int, Worker]]:
    """Start one worker process per rank (``prefix``: a command that runs it, e.g. ``unshare``);
    stop them all (side by side) on exit, even when the test fails."""
    started: dict[int, Worker] = {}
    try:
        for rank in ranks:
            started[rank] = Worker(
                tmp_path / f"rank{rank}-{len(started)}-{time.monotonic_ns()}.jsonl",
                ["--url", url, "--namespace", namespace, "--rank", str(rank), *extra], prefix,
            )
        if ready:
            wait_ready(started)
        yield started
    finally:
        stop_all(w.proc for w in started.values())
