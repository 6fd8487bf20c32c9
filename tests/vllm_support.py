"""A tiny Llama that vLLM's CPU backend serves in seconds, and greedy decoding on both sides.

Shared by tests/test_vllm.py and scripts/bench_vllm.py. vLLM runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the ``uni`` executor), without a tokenizer
(token-id prompts). CPU attention needs a head dim of 32 or more.
"""

from __future__ import annotations

import os
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
