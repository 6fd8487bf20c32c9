"""What the in-process demo shows: its progress, the live table on a terminal, and the final summary.

The summary is the demo's verdict: every worker's digest of the last version must be
the trainer's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

import redis

from ...protocol.ranks import RankState
from ...units import human_bytes
from .model import Push
from .procs import WorkerProcess

_FINAL_LINE_TIMEOUT = 10.0  # seconds a worker has to report the last version's digest
_STATES_REFRESH = 0.25  # seconds between reads of the ranks' states for the live view


@dataclass
class Progress:
    """What the live view shows."""

    total: int
    size: int = 0
    pushed: int = 0
    version: int = 0
    latencies: list[float] = field(default_factory=list)
    states: list[RankState] = field(default_factory=list)

    @property
    def last_rate(self) -> float:
        return self.size / self.latencies[-1] if self.latencies else 0.0

    def record(self, push: Push) -> None:
        """Count a successful push."""
        self.latencies.append(push.seconds)
        self.size, self.version, self.pushed = push.size, push.version, push.step


def _bar(total: int, completed: int, width: int) -> Any:
    from rich.progress_bar import ProgressBar

    return ProgressBar(total=total, completed=completed, width=width, complete_style="cyan", finished_style="green")


def _render(progress: Progress, workers: list[WorkerProcess]) -> Any:
    from rich.console import Group
    from rich.table import Table

    head = Table.grid(padding=(0, 2))
    head.add_row(
        "[bold]trainer[/]", _bar(progress.total, progress.pushed, 24),
        f"{progress.pushed}/{progress.total} pushed",
        f"last: {progress.latencies[-1] * 1000:.1f} ms, {progress.last_rate / 1e6:.0f} MB/s"
        if progress.latencies else "",
    )  # fmt: skip
    table = Table(header_style="bold")
    for column in ("rank", "applied", "progress", "status", "heartbeat"):
        table.add_column(column)
    states = {s.rank: s for s in progress.states}
    for w in workers:
        s = states.get(w.rank)
        table.add_row(
            str(w.rank), f"v{w.version}", _bar(progress.version or 1, w.version, 20),
            (s.status or "-") if s else "starting", f"{s.heartbeat_age:.1f}s" if s and s.heartbeat_age is not None
            else "-",
        )  # fmt: skip
    return Group(head, table)


@contextmanager
def live_view(
    out: IO[str], progress: Progress, workers: list[WorkerProcess], poll_states: Callable[[], list[RankState]]
) -> Iterator[Any]:
    """A rich ``Live`` table on a terminal (None when piped: the caller prints lines).

    The ranks' status and heartbeats are re-read a few times a second, so a long
    push shows who has acked so far.
    """
    if not out.isatty():
        yield None
        return
    from rich.console import Console
    from rich.live import Live

    last_read = [0.0]

    def renderable() -> Any:
        if time.monotonic() - last_read[0] >= _STATES_REFRESH:
            last_read[0] = time.monotonic()
            try:
                progress.states = poll_states()
            except redis.exceptions.RedisError:
                pass  # the push itself reports Redis failures
        return _render(progress, workers)

    with Live(console=Console(file=out), refresh_per_second=10, get_renderable=renderable) as live:
        yield live


def summary(out: IO[str], progress: Progress, workers: list[WorkerProcess], final: int, expected: str) -> int:
    """Print the push latencies and each worker's verdict; 0 when every one holds the digest ``expected``."""
    lat = sorted(progress.latencies)
    mean = statistics.fmean(lat)
    out.write(
        f"\npushed {progress.pushed} versions of {human_bytes(progress.size)}: push latency (sync, all acks) "
        f"mean {mean * 1000:.1f} ms, median {statistics.median(lat) * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms; "
        f"{progress.size / mean / 1e6:.0f} MB/s per push\n"
    )
    failures = 0
    for w in workers:
        got = w.wait_digest(final, _FINAL_LINE_TIMEOUT)
        ok = got == expected
        failures += not ok
        verdict = "holds the trainer's weights" if ok else f"MISMATCH (digest {got}, expected {expected})"
        out.write(f"  worker {w.rank}: version {w.version}, {verdict}\n")
    out.write("verified: every worker holds the trainer's weights\n" if not failures
              else f"FAILED: {failures} worker(s) do not hold the trainer's weights\n")  # fmt: skip
    out.flush()
    return 0 if not failures else 1
