"""The CUDA path checked end to end: a push to GPU workers, and the trainer's and worker's costs timed.

``scripts/gpu_check.sh`` runs it (see docs/gpu.md); every subcommand also runs on the CPU
(``--device cpu``), which is how the script is tested where there is no GPU.

``python scripts/gpu_check.py push --device cuda --size 256MB --pushes 3 --json FILE``
    A trainer (this process, fp32 master weights on ``--device``) pushes with
    ``wire_dtype=torch.bfloat16, delta=True, sync=True`` to two worker processes whose
    parameters live on ``--device`` (rank 1 in fp32, rank 2 in bf16). Between pushes a
    small multiplicative step changes a few percent of the bf16 values, so every push
    after the first is a delta. Checked after every push, in each worker: the same
    ``Parameter`` objects with the same ``data_ptr()`` and device (in-place apply), the
    bytes equal to the trainer's weights cast to the wire dtype and then to the worker's
    dtype (bit-exact), and the host memory each process grew by, held against what the
    docs state: the trainer keeps one staging copy and one delta copy of the model in the
    wire dtype, a worker one receive buffer in the wire dtype plus one tensor's bytes while
    it copies to the device. Exit status 1 when any check fails.

``python scripts/gpu_check.py time --devices cpu,cuda --size 1GB --repeats 3 --json FILE``
    In one process, no Redis: the trainer's encode of a delta push (cast to bf16 into the
    staging buffer, chunk hashes, diff against the previous push, the copy the planner
    keeps) with the weights on each device, and the worker's apply (``copy_tensors`` from
    a host buffer into fp32 and bf16 parameters on each device). Medians of ``--repeats``.

``python scripts/gpu_check.py worker ...`` is one worker of ``push`` (not run by hand).

Host memory is the resident set: its peak (``VmHWM``) is reset before each push through
``/proc/self/clear_refs`` and read after it, so the script's own checks (which copy one
tensor at a time to the host) do not count; where the reset is refused, the bound allows
one tensor more.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from redis_weights import RedisStore, RedisWeightReceiver, RedisWeightUpdater  # noqa: E402
from redis_weights.format.codec import Encoder, check_compatible, copy_tensors, flatten_weights  # noqa: E402
from redis_weights.format.delta import DEFAULT_KEYFRAME_FRACTION, DEFAULT_KEYFRAME_INTERVAL, DeltaPlanner  # noqa: E402
from redis_weights.format.manifest import DEFAULT_CHUNK_SIZE  # noqa: E402
from redis_weights.tools.server import LocalRedisServer  # noqa: E402
from scripts.bench import machine, parse_size  # noqa: E402
from scripts.bench_procs import rss  # noqa: E402

WIRE = torch.bfloat16
WORKER_DTYPES = {1: torch.float32, 2: torch.bfloat16}  # rank -> the dtype of its parameters
STEP = 1e-4  # relative size of the step between pushes: changes ~2-4% of the bf16 values
SLACK = 64 << 20  # host bytes allowed beyond the documented buffers (interpreter, client, chunk gather ring)
MiB = float(1 << 20)


# ---------------------------------------------------------------------------------------
# Model, step, digests, memory
# ---------------------------------------------------------------------------------------
def build_model(size: int, device: str, dtype: torch.dtype, seed: int) -> nn.Module:
    """Square linear layers of at least ``size`` bytes in fp32, built on ``device`` (no host copy)."""
    width = 1024 if size < (256 << 20) else 4096
    layers = max(1, math.ceil(size / (4 * width * (width + 1))))
    torch.manual_seed(seed)
    with torch.no_grad():
        return nn.Sequential(*(nn.Linear(width, width, device=device, dtype=dtype) for _ in range(layers)))


def step(model: nn.Module, generator: torch.Generator) -> None:
    """A small multiplicative update of every weight, in place, in blocks (few host bytes on the CPU)."""
    with torch.no_grad():
        for p in model.parameters():
            for block in p.view(-1).split(1 << 20):
                noise = torch.randn(block.shape, device=p.device, dtype=p.dtype, generator=generator)
                block.addcmul_(block, noise, value=STEP)


def digest(tensors: dict[str, torch.Tensor], *casts: torch.dtype) -> str:
    """xxh3-128 of every tensor's bytes after casting it through ``casts`` in turn, in name order,
    one tensor at a time (one tensor's bytes on the host at most)."""
    h = xxhash.xxh3_128()
    for name in sorted(tensors):
        t = tensors[name].detach()
        for dtype in casts:
            t = t.to(dtype)
        h.update(name.encode())
        h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def expected_digests(model: nn.Module) -> dict[str, str]:
    """What each worker dtype must hold after a push of ``model`` through the wire dtype."""
    tensors = flatten_weights(model)
    return {str(dtype).removeprefix("torch."): digest(tensors, WIRE, dtype) for dtype in set(WORKER_DTYPES.values())}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def reset_peak() -> bool:
    """Reset this process's peak resident set (``VmHWM``) to its current size; False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak() -> int:
    return _status("VmHWM")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def warm_up(device: str) -> None:
    """Start the device's context (and its host-side memory) before any baseline is read."""
    if device == "cuda":
        torch.ones(1, device="cuda").add_(1).cpu()
        torch.empty(1, dtype=torch.uint8, pin_memory=True)
        sync(device)


def wire_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the model in the wire dtype, bytes of its largest tensor in the wire dtype)."""
    sizes = [t.numel() * WIRE.itemsize for t in flatten_weights(model).values()]
    return sum(sizes), max(sizes)


# ---------------------------------------------------------------------------------------
# push: trainer here, two worker processes
# ---------------------------------------------------------------------------------------
def run_worker(args: argparse.Namespace) -> int:
    """One worker: apply ``--pushes`` versions, write one JSON line per version to ``--out``."""
    dtype = WORKER_DTYPES[args.rank]
    warm_up(args.device)
    model = build_model(args.size, args.device, dtype, seed=100 + args.rank)  # not the trainer's values
    before = {name: (t, t.data_ptr(), t.device) for name, t in flatten_weights(model).items()}
    store = RedisStore.from_url(args.url, args.namespace)
    receiver = RedisWeightReceiver(store, args.rank, model)
    out = open(args.out, "a")
    out.write(json.dumps({"ready": True, "baseline_rss": rss()}) + "\n")
    out.flush()
    baseline = rss()
    try:
        for version in range(1, args.pushes + 1):
            reset = reset_peak()
            receiver.wait(timeout=args.timeout, min_version=version)
            grown = peak() - baseline
            now = flatten_weights(model)
            report = receiver.last_apply
            record = {
                "rank": args.rank,
                "version": receiver.version,
                "peak_growth": grown,
                "peak_reset": reset,
                "same_objects": now.keys() == before.keys() and all(now[n] is before[n][0] for n in now),
                "same_data_ptr": all(now[n].data_ptr() == before[n][1] for n in now),
                "same_device": all(now[n].device == before[n][2] for n in now),
                "digest": digest(now),
                "fetched_bytes": report.fetched_bytes if report else None,
                "seconds": dict(report.seconds) if report else {},
            }
            out.write(json.dumps(record) + "\n")
            out.flush()
    finally:
        receiver.close()
        store.close()
        out.close()
    return 0


class _Workers:
    """The two worker processes of ``push``, stopped by pid on exit."""

    def __init__(self, args: argparse.Namespace, url: str, namespace: str, folder: Path) -> None:
        self.files = {rank: folder / f"worker{rank}.jsonl" for rank in WORKER_DTYPES}
        self.procs = {
            rank: subprocess.Popen(
                [sys.executable, __file__, "worker", "--rank", str(rank), "--url", url, "--namespace", namespace,
                 "--device", args.device, "--size", str(args.size), "--pushes", str(args.pushes),
                 "--timeout", str(args.timeout), "--out", str(path)],
                stdout=subprocess.DEVNULL, stderr=open(path.with_suffix(".log"), "wb"), cwd=REPO,
            )  # fmt: skip
            for rank, path in self.files.items()
        }

    def records(self, rank: int) -> list[dict[str, Any]]:
        path = self.files[rank]
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def wait_for(self, found: Callable[[dict[str, Any]], bool], timeout: float) -> dict[int, dict[str, Any]]:
        """The first record of each worker for which ``found`` holds; raises on a dead or late worker."""
        deadline = time.monotonic() + timeout
        while True:
            got = {rank: next((r for r in self.records(rank) if found(r)), None) for rank in self.files}
            if all(got.values()):
                return got  # type: ignore[return-value]
            for rank, proc in self.procs.items():
                if proc.poll() is not None and got[rank] is None:
                    raise RuntimeError(f"worker {rank} exited with {proc.returncode}: {self.log(rank)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not done after {timeout}s: {[self.log(r) for r in self.files]}")
            time.sleep(0.02)

    def log(self, rank: int) -> str:
        path = self.files[rank].with_suffix(".log")
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def check_push(args: argparse.Namespace, url: str, folder: Path) -> dict[str, Any]:
    """Run the push check against the server at ``url``; the document of what was checked and measured."""
    warm_up(args.device)
    model = build_model(args.size, args.device, torch.float32, seed=0)
    total_wire, largest_wire = wire_bytes(model)
    generator = torch.Generator(device=args.device).manual_seed(1)
    namespace = f"gpucheck{os.getpid()}"
    store = RedisStore.from_url(url, namespace)
    updater = RedisWeightUpdater(store, model, num_workers=2, sync=True, timeout=args.timeout,
                                 wire_dtype=WIRE, delta=True)  # fmt: skip
    workers = _Workers(args, url, namespace, folder)
    pushes: list[dict[str, Any]] = []
    failures: list[str] = []
    trainer_peaks: list[int] = []
    resets: list[bool] = []
    try:
        workers.wait_for(lambda r: bool(r.get("ready")), args.timeout)
        baseline = rss()
        for index in range(args.pushes):
            if index:
                step(model, generator)
                sync(args.device)
            expected = expected_digests(model)
            resets.append(reset_peak())
            started = time.perf_counter()
            updater.update_weights()
            seconds = time.perf_counter() - started
            trainer_peaks.append(peak() - baseline)
            report = updater.last_push
            applied = workers.wait_for(lambda r, v=updater.version: r.get("version") == v, args.timeout)
            push = {"version": updater.version, "seconds": seconds, "trainer_peak_growth": trainer_peaks[-1],
                    "written_bytes": report.written_bytes if report else None,
                    "phases": dict(report.seconds) if report else {}, "workers": applied}  # fmt: skip
            pushes.append(push)
            for rank, record in applied.items():
                dtype = str(WORKER_DTYPES[rank]).removeprefix("torch.")
                where = f"push {index + 1} (version {push['version']}), rank {rank} ({dtype})"
                for check in ("same_objects", "same_data_ptr", "same_device"):
                    if not record[check]:
                        failures.append(f"{where}: {check} is false (not applied in place)")
                if record["digest"] != expected[dtype]:
                    failures.append(f"{where}: bytes differ from the trainer's weights through {WIRE}")
    finally:
        workers.close()
        updater.close()
        store.close()
    reset_ok = all(resets) and all(r["peak_reset"] for p in pushes for r in p["workers"].values())
    one_tensor = 0 if reset_ok else 2 * largest_wire  # without a reset, the checks' own copies may show
    trainer_bound = 2 * total_wire + SLACK + one_tensor
    worker_bound = total_wire + 2 * largest_wire + SLACK + one_tensor  # fp32 target: tmp of one tensor
    worker_peak = max((r["peak_growth"] for p in pushes for r in p["workers"].values()), default=0)
    # torch's pinned host allocator rounds a block up to a power of two (ATen CachingHostAllocator):
    # the staging buffer of CUDA weights may take up to twice the model in the wire dtype
    pinned = 1 << (total_wire - 1).bit_length() if args.device == "cuda" else 0
    if max(trainer_peaks, default=0) > trainer_bound:
        hint = f"; a pinned staging buffer rounded up to a power of two takes {pinned / MiB:.0f} MiB" if pinned else ""
        failures.append(f"trainer host memory grew {max(trainer_peaks) / MiB:.0f} MiB, over the documented "
                        f"{trainer_bound / MiB:.0f} MiB (staging + delta copy in {WIRE}, + slack){hint}")  # fmt: skip
    if worker_peak > worker_bound:
        failures.append(f"a worker's host memory grew {worker_peak / MiB:.0f} MiB, over the documented "
                        f"{worker_bound / MiB:.0f} MiB (receive buffer in {WIRE} + one tensor, + slack)")  # fmt: skip
    if len(pushes) > 1 and not any(p["written_bytes"] is not None and p["written_bytes"] < total_wire / 2
                                   for p in pushes[1:]):  # fmt: skip
        failures.append("no push after the first was a delta (each wrote half the model or more)")
    return {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "model_fp32_bytes": 2 * total_wire,
        "wire_bytes": total_wire,
        "largest_tensor_wire_bytes": largest_wire,
        "peak_reset": reset_ok,
        "trainer_bound": trainer_bound,
        "pinned_staging_if_rounded": pinned,
        "worker_bound": worker_bound,
        "pushes": pushes,
        "failures": failures,
        "ok": not failures,
    }


def run_push(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        if args.url:
            doc = check_push(args, args.url, Path(tmp))
        else:
            with LocalRedisServer() as server:
                doc = check_push(args, server.url, Path(tmp))
    doc["machine"] = machine_info()
    print(push_summary(doc))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if doc["ok"] else 1


def push_summary(doc: dict[str, Any]) -> str:
    lines = [f"push check on {doc['device']} ({doc['device_name'] or 'host'}): fp32 model "
             f"{doc['model_fp32_bytes'] / MiB:.0f} MiB, wire bf16 {doc['wire_bytes'] / MiB:.0f} MiB, delta=True, "
             "2 workers (rank 1 fp32, rank 2 bf16)"]  # fmt: skip
    for p in doc["pushes"]:
        apply = ", ".join(f"rank {r}: fetch {w['seconds'].get('fetch', 0):.3f} s, apply "
                          f"{w['seconds'].get('apply', 0):.3f} s, host +{w['peak_growth'] / MiB:.0f} MiB"
                          for r, w in p["workers"].items())  # fmt: skip
        lines.append(f"  version {p['version']}: {p['seconds']:.3f} s, wrote {p['written_bytes'] / MiB:.2f} MiB, "
                     f"encode {p['phases'].get('encode', 0):.3f} s, trainer host +{p['trainer_peak_growth'] / MiB:.0f}"
                     f" MiB; {apply}")  # fmt: skip
    lines.append(f"  bounds: trainer {doc['trainer_bound'] / MiB:.0f} MiB, worker {doc['worker_bound'] / MiB:.0f} MiB "
                 f"(peak reset: {doc['peak_reset']})")  # fmt: skip
    lines += [f"  FAILED: {f}" for f in doc["failures"]] or ["  in place, bit-exact, host memory within bounds: OK"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# time: encode and apply per device, in one process
# ---------------------------------------------------------------------------------------
def time_encode(device: str, size: int, repeats: int) -> dict[str, Any]:
    """The trainer's work for a delta push, phase by phase, with fp32 weights on ``device``."""
    model = build_model(size, device, torch.float32, seed=0)
    generator = torch.Generator(device=device).manual_seed(1)
    encoder = Encoder(DEFAULT_CHUNK_SIZE, WIRE)
    planner = DeltaPlanner(DEFAULT_KEYFRAME_INTERVAL, DEFAULT_KEYFRAME_FRACTION)
    encoded = encoder.encode(model)
    previous = encoded.manifest(1, keyframe=1)
    planner.committed(encoded, previous)
    phases: dict[str, list[float]] = {"cast": [], "hash": [], "diff": [], "keep": [], "total": []}
    patched: list[float] = []
    for version in range(2, repeats + 2):
        step(model, generator)
        sync(device)
        t0 = time.perf_counter()
        encoded = encoder.encode(model)  # the cast into the (pinned, for CUDA) staging buffer; synchronizes
        t1 = time.perf_counter()
        ids = encoded.ids
        t2 = time.perf_counter()
        manifest, patches = planner.plan(encoded, version, set(ids) - previous.objects())
        t3 = time.perf_counter()
        planner.committed(encoded, manifest)
        t4 = time.perf_counter()
        for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
            phases[name].append(seconds)
        patched.append(sum(len(p) for p in patches.values()) / encoded.total_bytes)
        previous = manifest
    return {**{k: statistics.median(v) for k, v in phases.items()}, "patch_fraction": statistics.median(patched)}


def time_apply(device: str, size: int, repeats: int) -> dict[str, float]:
    """The worker's copy of a verified version (host buffer) into fp32 and bf16 parameters on ``device``."""
    source = build_model(size, "cpu", torch.float32, seed=0)
    encoded = Encoder(DEFAULT_CHUNK_SIZE, WIRE).encode(source)
    manifest = encoded.manifest(1, keyframe=1)
    stream = bytearray(sum(len(p) for parts in encoded.plan for p in parts))
    view, offset = memoryview(stream), 0
    chunks = []
    for index in range(len(encoded.plan)):
        data, _ = encoded.chunk(index)
        view[offset : offset + len(data)] = data
        chunks.append(view[offset : offset + len(data)])
        offset += len(data)
    del source, encoded
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        targets = flatten_weights(build_model(size, device, dtype, seed=2))
        check_compatible(manifest, targets)
        times = []
        for _ in range(repeats):
            sync(device)
            started = time.perf_counter()
            copy_tensors(chunks, manifest, targets)
            sync(device)
            times.append(time.perf_counter() - started)
        result[str(dtype).removeprefix("torch.")] = statistics.median(times)
        del targets
    return result


def run_time(args: argparse.Namespace) -> int:
    devices = [d for d in args.devices.split(",") if d]
    doc: dict[str, Any] = {"machine": machine_info(), "size": args.size, "repeats": args.repeats,
                           "wire_dtype": "bfloat16", "encode": {}, "apply": {}}  # fmt: skip
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("time: no CUDA device: the GPU timings are skipped")
            continue
        warm_up(device)
        doc["encode"][device] = time_encode(device, args.size, args.repeats)
        doc["apply"][device] = time_apply(device, args.size, args.repeats)
    print(time_summary(doc))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def time_summary(doc: dict[str, Any]) -> str:
    lines = [f"timings, fp32 model of {doc['size'] / MiB:.0f} MiB, wire bf16, medians of {doc['repeats']} "
             f"({doc['machine'].get('gpu') or 'no GPU'}; {doc['machine']['cores']} cores)",
             "  trainer encode of a delta push, s: device | cast | hash | diff | keep | total | patches"]  # fmt: skip
    for device, e in doc["encode"].items():
        lines.append(f"    {device:4} | {e['cast']:.3f} | {e['hash']:.3f} | {e['diff']:.3f} | {e['keep']:.3f} | "
                     f"{e['total']:.3f} | {100 * e['patch_fraction']:.1f}% of the stream")  # fmt: skip
    lines.append("  worker apply (copy into the parameters), s: device | fp32 | bf16")
    for device, a in doc["apply"].items():
        lines.append(f"    {device:4} | {a['float32']:.3f} | {a['bfloat16']:.3f}")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    info = machine()
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    info["cuda"] = torch.version.cuda
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    push = sub.add_parser("push", help="push CUDA (or --device cpu) weights to two worker processes and check them")
    push.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    push.add_argument("--size", type=parse_size, default=parse_size("256MB"), help="fp32 model size (e.g. 256MB)")
    push.add_argument("--pushes", type=int, default=3)
    push.add_argument("--url", help="a Redis to use (default: start a local redis-server/valkey-server)")
    push.add_argument("--timeout", type=float, default=120.0)
    push.add_argument("--json", help="write the results here")
    timing = sub.add_parser("time", help="time the trainer's encode and the worker's apply per device")
    timing.add_argument("--devices", default="cpu,cuda")
    timing.add_argument("--size", type=parse_size, default=parse_size("1GB"), help="fp32 model size (e.g. 1GB)")
    timing.add_argument("--repeats", type=int, default=3)
    timing.add_argument("--json", help="write the results here")
    worker = sub.add_parser("worker", help="one worker of 'push' (started by it)")
    worker.add_argument("--rank", type=int, choices=sorted(WORKER_DTYPES), required=True)
    worker.add_argument("--url", required=True)
    worker.add_argument("--namespace", required=True)
    worker.add_argument("--device", required=True)
    worker.add_argument("--size", type=int, required=True)
    worker.add_argument("--pushes", type=int, required=True)
    worker.add_argument("--timeout", type=float, required=True)
    worker.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if getattr(args, "device", "cpu") == "cuda" and not torch.cuda.is_available():
        print(f"{args.command}: --device cuda, but torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return 2
    return {"push": run_push, "time": run_time, "worker": run_worker}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
