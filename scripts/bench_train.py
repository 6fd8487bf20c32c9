"""The training workloads of ``scripts/bench.py`` (issue 11): real optimizer steps between pushes.

A trainer process holds fp32 master weights and takes real optimizer steps (a loss and a
backward pass per step, on random token or observation batches) between pushes; worker
processes hold the weights in the wire dtype. After every push each worker hashes every
byte of its weights (xxh3-128 over every tensor's bytes in name order) and the trainer
hashes its own wire-dtype copy, so a row is verified only when every worker held the
trainer's wire-dtype weights bit for bit after every push.

Workloads (``WORKLOADS``):
  finetune  a decoder-only transformer in plain torch (no downloads), AdamW, bf16 wire
  frozen    the same with the first half of the blocks frozen (content addressing alone)
  classic   an fp32 MLP policy trained with Adam at lr 3e-4, fp32 wire (almost every element changes)

Systems (``TRAIN_SYSTEMS``):
  rw-dense  this project, ``wire_dtype`` and ``delta=False`` (content addressing alone)
  rw-delta  this project, ``wire_dtype`` and ``delta=True``
  torchrl   TorchRL's ``DistributedWeightUpdater`` pushing the trainer's wire-dtype copy

The process side lives in ``scripts/bench_procs.py`` (``--workload``); the orchestration,
the table and the targets in ``scripts/bench.py``.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import torch
import xxhash
from torch import nn
from torch.nn import functional as F

TRAIN_SYSTEMS = ("rw-dense", "rw-delta", "torchrl")
RW_TRAIN_SYSTEMS = ("rw-dense", "rw-delta")
SEED = 0


@dataclass(frozen=True)
class Workload:
    """What a trainer trains and how it is pushed."""

    name: str
    model: str  # "transformer" or "mlp"
    runs: tuple[tuple[float, tuple[int, ...]], ...]  # (learning rate, worker counts) run by default
    optimizer: str  # "adamw" or "adam"
    wire: torch.dtype
    systems: tuple[str, ...]  # the peers run by default
    freeze_half: bool = False


# Bytes written do not depend on the worker count, so the second learning rate and the frozen
# model run at the widest fan-out only: the whole default run stays under ~25 min here.
WORKLOADS = {
    "finetune": Workload("finetune", "transformer", ((1e-6, (1, 2, 4)), (1e-5, (4,))), "adamw", torch.bfloat16,
                         TRAIN_SYSTEMS),
    "frozen": Workload("frozen", "transformer", ((1e-6, (4,)),), "adamw", torch.bfloat16, ("rw-dense", "torchrl"),
                       freeze_half=True),
    "classic": Workload("classic", "mlp", ((3e-4, (1, 2, 4)),), "adam", torch.float32, TRAIN_SYSTEMS),
}


# ---------------------------------------------------------------------------------------
# Models (plain torch, no downloads)
# ---------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm decoder block: causal self-attention and a 4x GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, c))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class Decoder(nn.Module):
    """A GPT-style decoder-only language model (untied input and output embeddings)."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def mlp_policy(obs: int, width: int, layers: int, actions: int) -> nn.Sequential:
    """An RL policy MLP: ``layers`` hidden layers of ``width`` with tanh activations."""
    dims = [obs] + [width] * layers
    parts: list[nn.Module] = []
    for a, b in zip(dims, dims[1:], strict=False):
        parts += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*parts, nn.Linear(width, actions))


def build_model(args: argparse.Namespace, workload: Workload, dtype: torch.dtype, init: bool) -> nn.Module:
    """The workload's model in ``dtype``: seeded GPT-2-style init (``init``) or zero-filled
    (workers: their first push overwrites everything), never allocated twice."""
    with torch.device("meta"):
        if workload.model == "transformer":
            model: nn.Module = Decoder(args.vocab, args.width, args.layers, args.heads, args.seq)
        else:
            model = mlp_policy(args.obs, args.mlp_width, args.mlp_layers, args.actions)
    model = model.to(dtype).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if not init:
                t.zero_()
            elif name.endswith("bias"):
                t.zero_()
            elif t.dim() == 1:  # LayerNorm gains
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=generator)
    return model


def frozen_blocks(model: nn.Module) -> int:
    """Freeze the first half of a decoder's blocks (lower layers, as fine-tuning often does)."""
    assert isinstance(model, Decoder)
    half = len(model.blocks) // 2
    for block in model.blocks[:half]:
        block.requires_grad_(False)
    return half


class Trainer:
    """fp32 master weights, the optimizer, and one real loss + backward + step per ``step()``."""

    def __init__(self, args: argparse.Namespace, workload: Workload) -> None:
        self.args = args
        self.workload = workload
        self.model = build_model(args, workload, torch.float32, init=True)
        if workload.freeze_half:
            frozen_blocks(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        cls = torch.optim.AdamW if workload.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = cls(params, lr=args.lr, fused=True)  # one kernel per tensor: ~3x faster on CPU here
        self.data = torch.Generator().manual_seed(SEED + 1)

    def step(self) -> float:
        """One optimizer step on a random batch; returns the loss."""
        a = self.args
        if self.workload.model == "transformer":
            tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=self.data)
            logits = self.model(tokens[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, a.vocab), tokens[:, 1:].reshape(-1))
        else:  # behaviour cloning on random observations and target actions
            obs = torch.randn(a.batch * a.seq, a.obs, generator=self.data)
            target = torch.randn(a.batch * a.seq, a.actions, generator=self.data)
            loss = F.mse_loss(self.model(obs), target)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)  # reuse the gradient buffers: no 1 GB of page faults a step
        return loss.detach().item()


# ---------------------------------------------------------------------------------------
# Proof of bytes and the fraction of changed elements
# ---------------------------------------------------------------------------------------
def named_bytes(model: nn.Module) -> Iterator[tuple[str, memoryview]]:
    """Every tensor of the state dict as raw bytes, in name order."""
    state = model.state_dict()
    for name in sorted(state):
        yield name, memoryview(state[name].detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def digest(model: nn.Module) -> str:
    """xxh3-128 over every tensor's name and bytes in name order: equal digests, equal weights."""
    h = xxhash.xxh3_128()
    for name, data in named_bytes(model):
        h.update(name.encode())
        h.update(data)
    return h.hexdigest()


class WireCopy:
    """The trainer's wire-dtype copy of its master weights, and the previous push's copy.

    ``refresh()`` casts the master weights into the copy (what TorchRL pushes; the digest
    and the changed fraction are computed from it) and counts the elements whose wire
    bytes differ from the previous push's.
    """

    def __init__(self, args: argparse.Namespace, workload: Workload, master: nn.Module) -> None:
        self.master = master
        self.model = build_model(args, workload, workload.wire, init=False)
        self._copy()
        self.previous = [t.detach().clone() for t in self.model.state_dict().values()]

    def _copy(self) -> None:
        with torch.no_grad():
            for dst, src in zip(self.model.state_dict().values(), self.master.state_dict().values(), strict=True):
                dst.copy_(src)

    def refresh(self) -> tuple[float, float, float]:
        """Cast the master weights into the copy; (seconds the cast took, CPU seconds it took,
        fraction of changed elements)."""
        start, cpu = time.perf_counter(), time.process_time()
        self._copy()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        changed = total = 0
        for new, old in zip(self.model.state_dict().values(), self.previous, strict=True):
            a, b = as_words(new), as_words(old)
            changed += int((a != b).sum())
            total += a.numel()
            old.copy_(new)
        return seconds, cpu, changed / total


def as_words(t: torch.Tensor) -> torch.Tensor:
    """An integer view of ``t``'s elements: compares bit patterns (NaN == NaN, -0 != +0)."""
    words = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().reshape(-1).view(words)


def wire_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# ---------------------------------------------------------------------------------------
# The push, per system
# ---------------------------------------------------------------------------------------
@dataclass
class Pusher:
    """``push()`` blocks until every worker acked; ``encode_seconds()`` is the last push's encode."""

    push: Callable[[], None]
    encode_seconds: Callable[[], float | None]
    close: Callable[[], None]


def rw_pusher(args: argparse.Namespace, system: str, trainer: Trainer, ranks: list[int]) -> Pusher:
    """This project: the fp32 master weights, cast by the updater to the workload's wire dtype."""
    from redis_weights import RedisStore, RedisWeightUpdater

    store = RedisStore.from_url(args.url, args.namespace)
    wire_dtype = None if trainer.workload.wire == torch.float32 else trainer.workload.wire
    updater = RedisWeightUpdater(store, trainer.model, len(ranks), sync=True, retention=1, timeout=600,
                                 wire_dtype=wire_dtype, delta=system == "rw-delta")  # fmt: skip
    encode = PhaseTimer(updater)
    return Pusher(updater.update_weights, encode.take, updater.close)


class PhaseTimer:
    """Seconds the updater's last push spent encoding: the encoder (cast to the wire dtype,
    chunk ids) and, with ``delta=True``, the delta planner (diffing and patch encoding).

    Timed from the outside (the library records no per-phase timings) by wrapping the
    methods the updater calls; None when this checkout's updater has neither."""

    PHASES = (("_encoder", "encode"), ("_delta", "plan"))

    def __init__(self, updater: Any) -> None:
        self.seconds: float | None = None
        for owner, method in self.PHASES:
            target = getattr(updater, owner, None)
            if target is not None and callable(getattr(target, method, None)):
                setattr(target, method, self._timed(getattr(target, method)))

    def _timed(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                self.seconds = (self.seconds or 0.0) + time.perf_counter() - start

        return timed

    def take(self) -> float | None:
        """The seconds since the last ``take()``, and start counting again."""
        seconds, self.seconds = self.seconds, None
        return seconds


def torchrl_pusher(args: argparse.Namespace, wire: WireCopy, ranks: list[int]) -> Pusher:
    """TorchRL's updater sending the trainer's wire-dtype copy (its encode: the cast, timed by the caller)."""
    from scripts.bench_procs import torchrl_trainer

    push, shutdown = torchrl_trainer(args, wire.model, ranks)
    return Pusher(push, lambda: None, shutdown)


# ---------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------
def signal_path(args: argparse.Namespace, name: str) -> Path:
    return Path(args.signals) / name


def wait_signal(path: Path, stop: threading.Event | None = None, timeout: float = 1200.0) -> bool:
    """Block until ``path`` exists (True) or ``stop`` is set (False)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if stop is not None and stop.is_set():
            return False
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.005)
    return True


def run_trainer(args: argparse.Namespace) -> None:
    """Train, push after every step, prove every worker holds the pushed bytes; write the JSON."""
    from scripts.bench_procs import peak_rss, rss, wait_for_file, write_json

    workload = WORKLOADS[args.workload]
    torch.set_num_threads(args.threads)
    trainer = Trainer(args, workload)
    wire = WireCopy(args, workload, trainer.model)
    ranks = list(range(1, args.workers + 1))
    pusher = torchrl_pusher(args, wire, ranks) if args.system == "torchrl" else rw_pusher(
        args, args.system, trainer, ranks)
    info = None if args.system == "torchrl" else redis.Redis.from_url(args.url)
    pushes: list[dict[str, Any]] = []
    wait_for_file(args.go)
    baseline = rss()
    error = None
    try:
        for index in range(1, args.repeats + 2):  # the first push is the warm-up (and the keyframe)
            started = time.perf_counter()
            loss = trainer.step()
            train_s = time.perf_counter() - started
            cast_s, cast_cpu_s, changed = wire.refresh()
            before = redis_counters(info) if info else None
            t0 = time.time()
            started, cpu = time.perf_counter(), time.process_time()
            pusher.push()
            push_s, cpu = time.perf_counter() - started, time.process_time() - cpu
            after = redis_counters(info) if info else None
            expected = digest(wire.model)
            signal_path(args, f"pushed.{index}").write_text(expected)
            for rank in ranks:  # the workers hash their weights only now: never inside a timed push
                wait_signal(signal_path(args, f"w{rank}.digest.{index}"))
            torchrl = args.system == "torchrl"  # its cast to the wire dtype runs before the push: counted here
            encode_s = cast_s if torchrl else pusher.encode_seconds()
            spent = {k: after[k] - before[k] for k in after} if info else {}
            pushes.append({
                "index": index, "t0": t0, "loss": loss, "train_s": train_s, "changed": changed,
                "encode_s": encode_s, "push_s": push_s, "digest": expected,
                "trainer_cpu_s": cpu + (cast_cpu_s if torchrl else 0.0),
                "redis_cpu_s": spent.get("cpu_s"),
                "bytes_in": spent.get("bytes_in"), "bytes_out": spent.get("bytes_out"),
            })  # fmt: skip
    except Exception as exc:  # reported in the table, not a crash of the whole bench
        error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        pusher.close()
    write_json(args.out, {
        "pushes": pushes, "wire_bytes": wire_bytes(wire.model),
        "params": sum(t.numel() for t in trainer.model.state_dict().values()),
        "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "rss_baseline": baseline, "rss_peak": peak_rss(), "error": error,
    })  # fmt: skip


def redis_counters(client: redis.Redis) -> dict[str, float]:
    """The server's network bytes in and out and its CPU seconds (all threads, user + system),
    read in one INFO call: the differences across a push are what the push cost Redis."""
    info = client.execute_command("INFO", "stats", "cpu")
    return {"bytes_in": info["total_net_input_bytes"], "bytes_out": info["total_net_output_bytes"],
            "cpu_s": info["used_cpu_user"] + info["used_cpu_sys"]}


class ApplyClock:
    """When this worker learnt of each version (the updates channel) and when it was applied.

    Apply seconds = applied - notified: fetch, patch, verify and copy, as the worker sees it."""

    def __init__(self, url: str, channel: str) -> None:
        self.notified: dict[int, float] = {}
        self.applied: dict[int, float] = {}
        self._client = redis.Redis.from_url(url)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(channel)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.2)
            if message is not None and message["data"].isdigit():  # not a push's plan hint ("plan:<N>")
                self.notified.setdefault(int(message["data"]), time.perf_counter())

    def hook(self, version: int) -> None:
        self.applied[version] = time.perf_counter()

    def seconds(self, version: int) -> float | None:
        if version in self.applied and version in self.notified:
            return self.applied[version] - self.notified[version]
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._pubsub.close()
        self._client.close()


def run_worker(args: argparse.Namespace) -> None:
    """Receive every push; after each, hash the weights once the trainer says the push is done."""
    import signal

    from scripts.bench_procs import peak_rss, ready, rss, torchrl_worker, write_json

    workload = WORKLOADS[args.workload]
    model = build_model(args, workload, workload.wire, init=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    proofs: list[dict[str, Any]] = []
    cpu_since = time.process_time()  # CPU seconds after the last proof: hashing for proofs is not counted

    def prove(index: int, apply_s: float | None) -> None:
        nonlocal cpu_since
        cpu_s = time.process_time() - cpu_since  # this push's CPU: the receive, apply and ack, all threads
        proofs.append({"index": index, "digest": digest(model), "apply_s": apply_s, "cpu_s": cpu_s})
        signal_path(args, f"w{args.rank}.digest.{index}").write_text(proofs[-1]["digest"])
        cpu_since = time.process_time()

    baseline = rss()
    if args.system in RW_TRAIN_SYSTEMS:
        from redis_weights import RedisStore, RedisWeightReceiver

        store = RedisStore.from_url(args.url, args.namespace)
        clock = ApplyClock(args.url, store.keyspace.updates_channel)
        receiver = RedisWeightReceiver(store, args.rank, model, poll_interval=1.0,
                                       host_cache=args.cache_dir if args.host_cache else False)
        receiver.register_post_hook(clock.hook)
        receiver.start()
        ready(args.out)
        index = 1
        while wait_signal(signal_path(args, f"pushed.{index}"), stop):
            with receiver.lock:
                prove(index, clock.seconds(receiver.version))
            index += 1
        receiver.close()
        clock.close()
    elif args.system == "torchrl":
        recv_seconds: list[float] = []

        def after_ack() -> None:
            index = len(recv_seconds)
            if wait_signal(signal_path(args, f"pushed.{index}"), stop):
                prove(index, recv_seconds[-1])

        torchrl_worker(args, model, recv_seconds.append, after_ack)
    else:
        raise SystemExit(f"unknown training system {args.system}")
    write_json(args.out, {"rank": args.rank, "proofs": proofs, "rss_baseline": baseline, "rss_peak": peak_rss()})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload flags, shared by ``bench.py`` (forwarded) and ``bench_procs.py``."""
    group = parser.add_argument_group("training workloads (issue 11)")
    group.add_argument("--width", type=int, default=1024, help="transformer width")
    group.add_argument("--layers", type=int, default=20, help="transformer blocks")
    group.add_argument("--heads", type=int, default=16, help="attention heads")
    group.add_argument("--vocab", type=int, default=4096, help="vocabulary (random tokens)")
    group.add_argument("--seq", type=int, default=32, help="tokens per sequence (MLP: samples = batch x seq)")
    group.add_argument("--batch", type=int, default=1, help="sequences per optimizer step")
    group.add_argument("--host-cache", action="store_true", help="rw workers share each version through "
                       "--cache-dir (the workers of one host)")
    group.add_argument("--threads", type=int, default=1, help="torch threads of the trainer (1: on a shared 2-core "
                       "machine two OpenMP threads trained 2-4x slower than one)")
    group.add_argument("--mlp-width", type=int, default=2048, help="classic: hidden width of the MLP policy")
    group.add_argument("--mlp-layers", type=int, default=6, help="classic: hidden layers of the MLP policy")
    group.add_argument("--obs", type=int, default=128, help="classic: observation size")
    group.add_argument("--actions", type=int, default=32, help="classic: action size")


MODEL_FLAGS = ("width", "layers", "heads", "vocab", "seq", "batch", "threads", "mlp_width", "mlp_layers", "obs",
               "actions")


def model_flags(args: argparse.Namespace) -> list[str]:
    """The workload flags of ``args`` as a command line for ``bench_procs.py`` (``--host-cache`` included)."""
    flags = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in MODEL_FLAGS]
    return [*flags, "--host-cache"] if getattr(args, "host_cache", False) else flags
