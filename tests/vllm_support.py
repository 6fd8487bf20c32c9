"""A tiny Llama that vLLM's CPU backend serves in seconds, and greedy decoding on both sides.

Shared by tests/test_vllm.py and scripts/bench_vllm.py. vLLM runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the ``uni`` executor), without a tokenizer
(token-id prompts). CPU attention needs a head dim of 32 or more.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before vllm is imported: one process

PROMPTS = [[1, 17, 42, 99, 7], [3, 250, 11], [5, 6, 7, 8, 9, 10, 11]]
NEW_TOKENS = 8


def tiny_llama(path: Path, *, hidden: int = 128, layers: int = 2, vocab: int = 256, seed: int = 0) -> Any:
    """Save a random fp32 Llama (safetensors, Hugging Face names) in ``path``; return it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32,
                         max_position_embeddings=256, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(config).float().eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def start_llm(path: Path, **engine: Any) -> Any:
    """An in-process ``vllm.LLM`` on the CPU with the ``"redis"`` weight-transfer backend."""
    from vllm import LLM

    return LLM(model=str(path), skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
               distributed_executor_backend="uni", kv_cache_memory_bytes=32 << 20, max_model_len=128,
               max_num_seqs=4, weight_transfer_config={"backend": "redis"}, **engine)  # fmt: skip


@contextlib.contextmanager
def api_server(path: Path, port: int, log: Path, timeout: float = 300.0, **env: str) -> Iterator[str]:
    """vLLM's OpenAI server for ``path`` with the ``"redis"`` backend and its weight-transfer routes
    (``VLLM_SERVER_DEV_MODE``), ``env`` added to its environment; it starts an engine-core process
    of its own. Yields its base URL; the whole process group is stopped on exit."""
    import requests

    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path), "--host", "127.0.0.1",
            "--port", str(port), "--skip-tokenizer-init", "--enforce-eager", "--dtype", "float32",
            "--kv-cache-memory-bytes", str(32 << 20), "--max-model-len", "128", "--max-num-seqs", "4",
            "--weight-transfer-config", '{"backend": "redis"}']  # fmt: skip
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", **env)
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{base}/health", timeout=1).ok:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vLLM's server did not start (exit {proc.poll()}): see {log}")
            time.sleep(0.5)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def http_greedy(base: str, model: Path, prompts: list[list[int]] = PROMPTS, n: int = NEW_TOKENS) -> list[list[int]]:
    import requests

    out = []
    for prompt in prompts:
        reply = requests.post(f"{base}/v1/completions", timeout=60, json={
            "model": str(model), "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True})  # fmt: skip
        reply.raise_for_status()
        out.append(reply.json()["choices"][0]["token_ids"])
    return out


def llm_greedy(llm: Any, prompts: list[list[int]] = PROMPTS, n: int = NEW_TOKENS) -> list[list[int]]:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


@torch.no_grad()
def hf_greedy(model: Any, prompts: list[list[int]] = PROMPTS, n: int = NEW_TOKENS) -> list[list[int]]:
    """Greedy tokens of a transformers model, no stop token (as ``ignore_eos``)."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        out.append(ids[0, len(prompt) :].tolist())
    return out


def engine_attr(llm: Any, name: str) -> list[Any]:
    """``getattr`` on each worker's weight-transfer engine (in-process workers)."""
    return llm.collective_rpc(lambda worker: getattr(worker.weight_transfer_engine, name))
