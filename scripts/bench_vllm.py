"""A vLLM engine's pause per weight update: the ``"redis"`` backend against vLLM's own reload.

A small Llama (``--hidden``, ``--layers``, ``--vocab``) is served by an in-process
``vllm.LLM`` on the CPU with the ``"redis"`` backend. The trainer (transformers, fp32
master weights) takes real AdamW steps on random tokens and pushes each version
(``wire_dtype=bfloat16, delta=True``, a keyframe every ``--keyframe-interval``
versions). ``--train last`` trains the last decoder layer only (the others frozen),
so a delta changes one layer. Each version is staged by the engine's background
thread while it is idle (as it would be while generating); then the pause is timed:
``start_weight_update`` -> ``update_weights`` -> ``finish_weight_update``. Against it:
reloading the same weights from a safetensors file (page cache warm) with vLLM's own
loader (``collective_rpc("reload_weights", weights_path=...)``). Every pushed version
is checked: the engine's greedy tokens equal transformers' on the version's weights.

    .venv-vllm/bin/python scripts/bench_vllm.py [--pushes 12] [--lr 1e-6] [--train all|last] [--hidden 128]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from redis_weights import RedisStore, RedisWeightUpdater  # noqa: E402
from redis_weights.integrations.vllm import OfflineLLMClient, init_engines  # noqa: E402
from redis_weights.tools.admin import Admin  # noqa: E402
from redis_weights.tools.server import LocalRedisServer  # noqa: E402
from tests.vllm_support import engine_attr, hf_greedy, llm_greedy, start_llm, tiny_llama  # noqa: E402


def wait_staged(llm: object, version: int, timeout: float = 60.0) -> float:
    """Seconds until the engine's background thread has staged ``version``."""
    started = time.perf_counter()
    while engine_attr(llm, "receiver")[0].staged_version != version:
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"version {version} not staged in {timeout}s")
        time.sleep(0.002)
    return time.perf_counter() - started


def pause(client: OfflineLLMClient, version: int) -> float:
    started = time.perf_counter()
    client.start_weight_update()
    client.update_weights({"version": version})
    client.finish_weight_update(str(version))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pushes", type=int, default=12)
    parser.add_argument("--keyframe-interval", type=int, default=4)
    parser.add_argument("--train", choices=("all", "last"), default="all")
    parser.add_argument("--reloads", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    try:
        with LocalRedisServer() as server:
            rows = run(server, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


def run(server: LocalRedisServer, work: Path, args: argparse.Namespace) -> list[dict[str, object]]:
    from safetensors.torch import load_file

    model_dir = work / "model"
    trainer = tiny_llama(model_dir, hidden=args.hidden, layers=args.layers, vocab=args.vocab)
    reference = type(trainer)(trainer.config).float().eval()
    if args.train == "last":
        last = f"model.layers.{args.layers - 1}."
        for name, param in trainer.named_parameters():
            param.requires_grad_(name.startswith(last))
    optimizer = torch.optim.AdamW([p for p in trainer.parameters() if p.requires_grad], lr=args.lr)
    store = RedisStore.from_url(server.url, namespace="bench")
    updater = RedisWeightUpdater(store, dict(trainer.named_parameters()), 1, sync=False, wire_dtype=torch.bfloat16,
                                 delta=True, keyframe_interval=args.keyframe_interval)  # fmt: skip
    admin = Admin(RedisStore(store.client, "bench", owns_client=False))
    llm = start_llm(model_dir)
    client = OfflineLLMClient(llm)
    init_engines([client], server.url, "bench")
    rows: list[dict[str, object]] = []
    for _ in range(args.pushes):
        ids = torch.randint(0, args.vocab, (4, 32))
        trainer(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        receiver = engine_attr(llm, "receiver")[0]
        fetched = receiver.fetched_bytes
        updater.update_weights()
        version = updater.version
        staged = wait_staged(llm, version)
        seconds = pause(client, version)
        export = work / f"v{version}.safetensors"
        admin.export(version, export)
        weights = load_file(str(export))
        reference.load_state_dict({k: v.float() for k, v in weights.items()})
        exact = llm_greedy(llm) == hf_greedy(reference)
        keyframe = admin.manifest(version).is_keyframe
        rows.append({"kind": "keyframe" if keyframe else "delta", "version": version, "pause_s": seconds,
                     "stage_s": staged, "pushed_bytes": updater.last_push.written_bytes,
                     "fetched_bytes": receiver.fetched_bytes - fetched, "model_bytes": receiver.last_apply.total_bytes,
                     "loaded_tensors": len(receiver.loaded_names), "tensors": len(weights),
                     "greedy_equal": exact})  # fmt: skip
    # vLLM's own reload of the same (last) weights from a safetensors file, page cache warm
    reload_dir = work / "reload"
    reload_dir.mkdir()
    shutil.copy(export, reload_dir / "model.safetensors")
    for name in ("config.json", "generation_config.json"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, reload_dir / name)
    for _ in range(args.reloads):
        started = time.perf_counter()
        llm.collective_rpc("reload_weights", kwargs={"weights_path": str(reload_dir)})
        rows.append({"kind": "vllm reload", "pause_s": time.perf_counter() - started,
                     "model_bytes": export.stat().st_size})  # fmt: skip
    rows[-1]["greedy_equal"] = llm_greedy(llm) == hf_greedy(reference)
    llm.shutdown_weight_transfer_engine()
    updater.close()
    admin.store.close()
    return rows


def print_table(rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    def median(kind: str, key: str) -> float:
        return statistics.median(float(r[key]) for r in rows if r["kind"] == kind)  # type: ignore[arg-type]

    size = float(rows[0]["model_bytes"]) / 2**20  # type: ignore[arg-type]
    print(f"Llama: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; AdamW lr {args.lr:g}, "
          f"{args.train} layers trained; wire bf16, deltas; {size:.2f} MiB a version")  # fmt: skip
    print("| update | n | pause ms (median) | x vLLM reload | pushed KB | fetched KB | loaded | greedy = HF |")
    print("|---|---|---|---|---|---|---|---|")
    reload_ms = median("vllm reload", "pause_s") * 1000
    for kind in ("keyframe", "delta", "vllm reload"):
        some = [r for r in rows if r["kind"] == kind]
        ms = median(kind, "pause_s") * 1000
        if kind == "vllm reload":
            print(f"| {kind} (safetensors file) | {len(some)} | {ms:.1f} | 1.00 | - | - | all | "
                  f"{some[-1]['greedy_equal']} |")  # fmt: skip
            continue
        if not some:
            continue
        loaded = statistics.median(int(r["loaded_tensors"]) for r in some)
        print(f"| {kind} | {len(some)} | {ms:.1f} | {ms / reload_ms:.2f} | "
              f"{median(kind, 'pushed_bytes') / 1024:.0f} | {median(kind, 'fetched_bytes') / 1024:.0f} | "
              f"{loaded:.0f} of {some[0]['tensors']} tensors | {all(r['greedy_equal'] for r in some)} |")  # fmt: skip


if __name__ == "__main__":
    main()
