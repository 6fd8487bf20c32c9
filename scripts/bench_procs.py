"""The processes of ``scripts/bench.py``: one trainer or one worker of one system.

``python scripts/bench_procs.py worker --system S --size BYTES --rank R ...``
``python scripts/bench_procs.py trainer --system S --size BYTES --workers N ...``

Every process builds the same model (``bench_model``), writes what it measured as
one JSON document to ``--out`` when it ends, and nothing else. Workers record, for
every push they apply, the push's marker (the trainer writes the push index into
the first weight before pushing, so a worker proves it got the new bytes) and the
wall time at which the weights were in place. Memory: RSS right before the first
push (baseline) and the peak RSS of the process (``ru_maxrss``).

Systems (see docs/benchmarks.md):
  rw-sync, rw-async, rw-shm   this project (sync push; async push with a background
                              upload; sync push with the host-local /dev/shm cache)
  raw                         raw redis-py moving the same bytes: no encode, no
                              checksum, no manifest; pipelined chunks; acks via MGET
  naive                       torch.save -> one SET + PUBLISH; GET + torch.load + load_state_dict
  torchrl                     TorchRL's DistributedWeightUpdater over gloo + TCPStore

With ``--workload`` (issue 11) the processes train and push instead: see
``scripts/bench_train.py`` (systems rw-dense, rw-delta, torchrl).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redis_weights.backend.deployment import client_from_url  # noqa: E402
from redis_weights.format.manifest import DEFAULT_CHUNK_SIZE  # noqa: E402
from scripts import bench_train  # noqa: E402
from scripts.bench_train import TRAIN_SYSTEMS, WORKLOADS, add_arguments  # noqa: E402

CHUNK = DEFAULT_CHUNK_SIZE  # the library's default; ``--chunk-size`` changes it for every system but torchrl
PIPELINE_BYTES = 64 << 20
SYSTEMS = ("rw-sync", "rw-async", "rw-shm", "raw", "naive", "torchrl")
RW_SYSTEMS = ("rw-sync", "rw-async", "rw-shm")


# ---------------------------------------------------------------------------------------
# The model: linear layers (a big weight and a small bias each), about ``size`` bytes.
# ---------------------------------------------------------------------------------------
def bench_model(size: int) -> nn.Module:
    """float32 linear layers totalling about ``size`` bytes, zero-filled (no slow random init)."""
    width = 256 if size <= (4 << 20) else 1024 if size <= (256 << 20) else 2048
    per_layer = 4 * (width * width + width)
    layers = max(1, round(size / per_layer))
    model = nn.Sequential(*[nn.Linear(width, width, device="meta") for _ in range(layers)])
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for t in model.state_dict().values():
            t.zero_()
    return model


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def first_weight(model: nn.Module) -> torch.Tensor:
    return next(iter(model.state_dict().values())).view(-1)


STRIDE = 1024  # elements: one stamped element per 4 KiB of float32


def set_marker(model: nn.Module, marker: int) -> None:
    """Write the push index into the first element of the first weight, and into one element
    of every 4 KiB a value unique to (push, position): no chunk of a push then equals a chunk
    of an earlier push or another chunk of the same push, so content-addressed chunks cannot
    dedup the zero-filled model and the sweep measures dense pushes (exact in float32 while
    pushes x model bytes / 4 KiB < 2**24)."""
    with torch.no_grad():
        stamped = [t.view(-1)[::STRIDE] for t in model.state_dict().values()]
        total = sum(s.numel() for s in stamped)
        offset = marker * total
        for s in stamped:
            s.copy_(torch.arange(offset, offset + s.numel(), dtype=torch.float64))
            offset += s.numel()
        first_weight(model)[0] = float(marker)


def get_marker(model: nn.Module) -> int:
    return int(first_weight(model)[0].item())


def rss() -> int:
    """Resident set size of this process now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_json(path: str, doc: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def ready(path: str) -> None:
    Path(path + ".ready").write_text("1")


def wait_for_file(path: str, timeout: float = 600.0) -> None:
    """Block until ``path`` exists: the trainer starts with its workers and pushes once they are ready."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


def chunk_plan(model: nn.Module, chunk: int = CHUNK) -> list[tuple[str, int, int]]:
    """(tensor name, byte begin, byte end) of every raw chunk: tensors cut at ``chunk`` bytes."""
    plan = []
    for name, t in model.state_dict().items():
        nbytes = t.numel() * t.element_size()
        for begin in range(0, nbytes, chunk):
            plan.append((name, begin, min(nbytes, begin + chunk)))
    return plan


def byte_views(model: nn.Module) -> dict[str, np.ndarray]:
    return {n: t.detach().reshape(-1).view(torch.uint8).numpy() for n, t in model.state_dict().items()}


# ---------------------------------------------------------------------------------------
# Hand-written peers over redis-py (raw floor and naive): keys and the ack wait.
# ---------------------------------------------------------------------------------------
def peer_keys(system: str, ns: str) -> dict[str, str]:
    p = f"bench:{{{ns}}}:{system}:"
    return {"updates": p + "updates", "acks": p + "acks", "blob": p + "blob", "latest": p + "latest", "prefix": p}


def ack_key(keys: dict[str, str], rank: int) -> str:
    return f"{keys['prefix']}ack:{rank}"


class AckWaiter:
    """The trainer side of the hand-written peers: subscribed to acks, decides with one MGET."""

    def __init__(self, client: redis.Redis, keys: dict[str, str], ranks: list[int]) -> None:
        self.client = client
        self.names = [ack_key(keys, r) for r in ranks]
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(keys["acks"])

    def wait(self, version: int, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            values = self.client.mget(self.names)
            if all(v is not None and int(v) >= version for v in values):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"acks of {version}: {values}")
            message = self.pubsub.get_message(timeout=0.5)
            while message is not None:
                message = self.pubsub.get_message(timeout=0)


def peer_worker_loop(
    client: redis.Redis, keys: dict[str, str], rank: int, stop: threading.Event, apply: Callable[[int], None],
    on_subscribed: Callable[[], None],
) -> None:
    """Subscribe to ``updates`` (``on_subscribed`` once the server has confirmed it, so that no
    PUBLISH made after it can be missed), then per message: apply the version, ack (SET + PUBLISH)."""
    pubsub = client.pubsub()
    pubsub.subscribe(keys["updates"])
    deadline = time.monotonic() + 60.0
    while (confirmed := pubsub.get_message(timeout=1.0)) is None or confirmed["type"] != "subscribe":
        if time.monotonic() > deadline:
            raise TimeoutError("no confirmation of SUBSCRIBE")
    on_subscribed()
    applied = 0
    while not stop.is_set():
        message = pubsub.get_message(timeout=0.2)
        if message is None or message["type"] != "message":
            continue
        version = int(message["data"])
        if version <= applied:
            continue
        apply(version)
        applied = version
        pipe = client.pipeline(transaction=False)
        pipe.set(ack_key(keys, rank), version)
        pipe.publish(keys["acks"], f"{rank}:{version}")
        pipe.execute()
    pubsub.close()


# ---------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------
def run_worker(args: argparse.Namespace) -> None:
    model = bench_model(args.size)
    applies: list[dict[str, float]] = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def record(_: Any = None) -> None:
        applies.append({"marker": get_marker(model), "t": time.time()})

    baseline = rss()
    if args.system in RW_SYSTEMS:
        from redis_weights import RedisStore, RedisWeightReceiver

        options: dict[str, Any] = {}
        if args.system == "rw-shm":
            options["host_cache"] = args.cache_dir  # one per configuration: never warm from another
        store = RedisStore.from_url(args.url, args.namespace)
        receiver = RedisWeightReceiver(store, args.rank, model, poll_interval=1.0, **options)
        receiver.register_post_hook(record)
        receiver.start()
        ready(args.out)
        stop.wait()
        receiver.close()
    elif args.system == "raw":
        client = client_from_url(args.url)
        keys = peer_keys("raw", args.namespace)
        plan = chunk_plan(model, args.chunk_size)
        views = byte_views(model)

        def apply_raw(version: int) -> None:
            values: list[bytes] = []
            pipe = client.pipeline(transaction=False)
            queued = 0
            for i, (_, b, e) in enumerate(plan):
                pipe.get(f"{keys['prefix']}c:{i}")
                queued += e - b
                if queued >= PIPELINE_BYTES:
                    values.extend(pipe.execute())
                    queued = 0
            values.extend(pipe.execute())
            for (name, b, e), value in zip(plan, values, strict=True):
                views[name][b:e] = np.frombuffer(value, dtype=np.uint8)
            record()

        peer_worker_loop(client, keys, args.rank, stop, apply_raw, lambda: ready(args.out))
    elif args.system == "naive":
        client = redis.Redis.from_url(args.url)  # what a user writes: defaults
        keys = peer_keys("naive", args.namespace)

        def apply_naive(version: int) -> None:
            blob = client.get(keys["blob"])
            state = torch.load(io.BytesIO(blob), weights_only=True)
            model.load_state_dict(state)
            del state, blob
            record()

        peer_worker_loop(client, keys, args.rank, stop, apply_naive, lambda: ready(args.out))
    elif args.system == "torchrl":
        torchrl_worker(args, model, record)
    else:
        raise SystemExit(f"unknown system {args.system}")
    write_json(args.out, {"rank": args.rank, "applies": applies, "rss_baseline": baseline, "rss_peak": peak_rss()})


def torchrl_init(args: argparse.Namespace, rank: int, world: int) -> Any:
    """gloo process group over a TCPStore, as TorchRL's distributed collector sets it up."""
    import datetime

    store = torch.distributed.TCPStore(
        host_name=args.tcp_host,
        port=args.tcp_port,
        world_size=world,
        is_master=rank == 0,
        timeout=datetime.timedelta(seconds=300),
    )
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=world, store=store, timeout=datetime.timedelta(seconds=300)
    )
    return store


def torchrl_worker(
    args: argparse.Namespace, model: nn.Module, record: Callable[[float], None],
    after_ack: Callable[[], None] | None = None,
) -> None:
    """TorchRL's worker loop (torchrl.collectors.distributed.generic._run_collector), minus the env.

    ``record(seconds the recv took)`` runs before the ack, ``after_ack()`` (if given) after it."""
    from tensordict import TensorDict

    ready(args.out)
    store = torchrl_init(args, args.rank, args.workers + 1)
    policy_weights = TensorDict.from_module(model)
    rank = args.rank
    while True:
        instruction = store.get(f"NODE_{rank}_in")
        store.delete_key(f"NODE_{rank}_in")
        if instruction == b"update_weights":
            started = time.perf_counter()
            policy_weights.recv(0)
            record(time.perf_counter() - started)
            store.set(f"NODE_{rank}_out", b"updated")
            if after_ack is not None:
                after_ack()
        elif instruction == b"shutdown":
            store.set(f"NODE_{rank}_out", b"down")
            break
        else:
            raise RuntimeError(f"instruction {instruction!r}")
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------
# Trainers: warm-up push (marker 0 is the zero-filled start, so markers start at 1), then
# ``repeats`` timed pushes. Each returns per push: seconds the call blocked, seconds until
# every worker acked (the same for sync pushes), and the wall time it started.
# ---------------------------------------------------------------------------------------
def run_trainer(args: argparse.Namespace) -> None:
    model = bench_model(args.size)
    ranks = list(range(1, args.workers + 1))
    pushes: list[dict[str, float]] = []
    redis_out: list[int] = []
    info_client = None if args.system == "torchrl" else redis.Redis.from_url(args.url)
    push, finish = make_pusher(args, model, ranks)
    wait_for_file(args.go)
    baseline = rss()
    error = None
    try:
        for index in range(1, args.repeats + 2):  # the first push warms up
            set_marker(model, index)
            out_before = info_client.info("stats")["total_net_output_bytes"] if info_client else 0
            t0 = time.time()
            start = time.perf_counter()
            push()
            stall = time.perf_counter() - start
            finish()
            total = time.perf_counter() - start
            if info_client:
                redis_out.append(info_client.info("stats")["total_net_output_bytes"] - out_before)
            if index > 1:
                report = getattr(getattr(push, "updater", None), "last_push", None)
                phases = dict(report.seconds) if report is not None else {}
                pushes.append({"marker": index, "t0": t0, "stall": stall, "total": total, "phases": phases})
    except Exception as exc:  # reported in the table, not a crash of the whole bench
        error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        close = getattr(push, "close", None)
        if close is not None:
            close()
    write_json(
        args.out,
        {
            "pushes": pushes,
            "model_bytes": model_bytes(model),
            "rss_baseline": baseline,
            "rss_peak": peak_rss(),
            "redis_out": redis_out[1:],
            "error": error,
        },
    )


def torchrl_trainer(
    args: argparse.Namespace, model: nn.Module, ranks: list[int]
) -> tuple[Callable[[], None], Callable[[], None]]:
    """TorchRL's trainer side: a ``DistributedWeightUpdater`` (sync) over gloo sending
    ``model``'s weights to ``ranks``; (push, shutdown the workers and the process group)."""
    import warnings

    from tensordict import TensorDict

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from torchrl.collectors.distributed.generic import DistributedWeightUpdater

    store = torchrl_init(args, 0, len(ranks) + 1)
    weights = TensorDict.from_module(model)
    updater = DistributedWeightUpdater(store, weights, num_workers=len(ranks), sync=True)

    def push() -> None:
        updater.push_weights(weights)

    def shutdown() -> None:
        for rank in ranks:
            store.set(f"NODE_{rank}_in", b"shutdown")
        for rank in ranks:
            store.get(f"NODE_{rank}_out")
        torch.distributed.destroy_process_group()

    return push, shutdown


def make_pusher(args: argparse.Namespace, model: nn.Module, ranks: list[int]) -> tuple[Any, Callable[[], None]]:
    """(push, finish): ``push()`` is what the trainer blocks on, ``finish()`` waits for every ack."""
    nothing: Callable[[], None] = lambda: None  # noqa: E731
    if args.system in RW_SYSTEMS:
        from redis_weights import RedisStore, RedisWeightUpdater

        store = RedisStore.from_url(args.url, args.namespace)
        background = args.system == "rw-async"
        options: dict[str, Any] = {"background": True} if background else {}
        updater = RedisWeightUpdater(
            store, model, len(ranks), sync=not background, retention=1, timeout=300,
            chunk_size=args.chunk_size, **options
        )

        def push_rw() -> None:
            updater.update_weights()

        push_rw.close = updater.close  # type: ignore[attr-defined]
        push_rw.updater = updater  # type: ignore[attr-defined]  (its last_push: the phases of each push)
        return push_rw, (updater.wait if background else nothing)
    if args.system == "raw":
        client = client_from_url(args.url)
        keys = peer_keys("raw", args.namespace)
        plan = chunk_plan(model, args.chunk_size)
        views = byte_views(model)
        pieces = [memoryview(views[name][b:e]) for name, b, e in plan]  # pre-serialized: the tensors' bytes
        waiter = AckWaiter(client, keys, ranks)
        version = [0]

        def push_raw() -> None:
            version[0] += 1
            pipe = client.pipeline(transaction=False)
            queued = 0
            for i, piece in enumerate(pieces):
                pipe.set(f"{keys['prefix']}c:{i}", piece)
                queued += len(piece)
                if queued >= PIPELINE_BYTES:
                    pipe.execute()
                    queued = 0
            pipe.set(keys["latest"], version[0])
            pipe.publish(keys["updates"], version[0])
            pipe.execute()
            waiter.wait(version[0])

        return push_raw, nothing
    if args.system == "naive":
        client = redis.Redis.from_url(args.url)
        keys = peer_keys("naive", args.namespace)
        waiter = AckWaiter(client, keys, ranks)
        version = [0]

        def push_naive() -> None:
            version[0] += 1
            buffer = io.BytesIO()
            torch.save(model.state_dict(), buffer)
            client.set(keys["blob"], buffer.getvalue())
            client.publish(keys["updates"], version[0])
            waiter.wait(version[0])

        return push_naive, nothing
    if args.system == "torchrl":
        push_torchrl, shutdown = torchrl_trainer(args, model, ranks)
        push_torchrl.close = shutdown  # type: ignore[attr-defined]
        return push_torchrl, nothing
    raise SystemExit(f"unknown system {args.system}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=["worker", "trainer"])
    parser.add_argument("--system", choices=SYSTEMS + TRAIN_SYSTEMS, required=True)
    parser.add_argument("--size", type=int, default=0, help="model bytes (the size sweep)")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), help="a training workload instead of --size")
    parser.add_argument("--lr", type=float, default=1e-6, help="the workload's learning rate")
    parser.add_argument("--signals", help="workloads: the folder of the per-push hand-over files")
    parser.add_argument("--url", default="")
    parser.add_argument("--namespace", default="bench")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tcp-port", type=int, default=0)
    parser.add_argument("--tcp-host", default="127.0.0.1", help="torchrl: the trainer's address (TCPStore)")
    parser.add_argument("--chunk-size", type=int, default=CHUNK, help="bytes per chunk (rw systems and raw)")
    parser.add_argument("--cache-dir", default="/dev/shm/redis_weights", help="rw-shm: the host cache directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--go", help="trainer: push only once this file exists (every worker is ready)")
    add_arguments(parser)
    args = parser.parse_args()
    if args.role == "trainer" and not args.go:
        parser.error("the trainer needs --go")
    if args.workload:
        if not args.signals:
            parser.error("a workload needs --signals")
        (bench_train.run_worker if args.role == "worker" else bench_train.run_trainer)(args)
    elif args.size <= 0:
        parser.error("give --size or --workload")
    else:
        (run_worker if args.role == "worker" else run_trainer)(args)


if __name__ == "__main__":
    # What is imported by now lives until exit: frozen, the interpreter's last garbage collection
    # skips it (torch's objects: ~0.5 s of every stop).
    gc.freeze()
    main()
