"""Bytes a push really moves through Redis: dense vs wire dtype vs wire dtype + deltas.

A small transformer is trained with real AdamW steps (random tokens, real backward
passes); after each step the trainer pushes and one worker applies. Redis's own
counters (``INFO stats``: ``total_net_input_bytes``, ``total_net_output_bytes``) give
what was written into and read out of Redis per push. Every worker apply is checked
bit-exact against the trainer's weights in the wire dtype.

    python scripts/push_bytes.py [--steps 8] [--lr 1e-6] [--layers 4] [--width 256]
"""

from __future__ import annotations

import argparse
import uuid

import redis
import torch
from torch import nn

from redis_weights import RedisStore, RedisWeightReceiver, RedisWeightUpdater
from redis_weights.tools.server import LocalRedisServer


def model(layers: int, width: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width, batch_first=True)
    return nn.Sequential(nn.Embedding(1000, width), nn.TransformerEncoder(layer, layers), nn.Linear(width, 1000))


def run(server: LocalRedisServer, args: argparse.Namespace, **options: object) -> list[tuple[int, int, bool]]:
    """Per push: (bytes into Redis, bytes out of Redis, the worker's weights bit-exact)."""
    namespace = f"m{uuid.uuid4().hex[:8]}"
    trainer = model(args.layers, args.width)
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=args.lr)
    updater = RedisWeightUpdater(RedisStore.from_url(server.url, namespace), trainer, 1, sync=False, **options)
    worker = RedisWeightReceiver(RedisStore.from_url(server.url, namespace), 1, model(args.layers, args.width, 1))
    stats = redis.Redis(port=server.port)
    wire = options.get("wire_dtype")
    rows = []
    for _ in range(args.steps):
        tokens = torch.randint(0, 1000, (8, 64))
        loss = nn.functional.cross_entropy(trainer(tokens).reshape(-1, 1000), tokens.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        before = stats.info("stats")
        updater.update_weights()
        worker.poll()
        after = stats.info("stats")
        expected = {k: (v.detach().to(wire).float() if wire and v.is_floating_point() else v.detach())
                    for k, v in trainer.state_dict().items()}  # fmt: skip
        exact = all(torch.equal(t, expected[n]) for n, t in worker.policy.state_dict().items())
        rows.append((after["total_net_input_bytes"] - before["total_net_input_bytes"],
                     after["total_net_output_bytes"] - before["total_net_output_bytes"], exact))  # fmt: skip
    worker.close()
    updater.close()
    stats.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args()
    size = sum(p.numel() for p in model(args.layers, args.width).parameters())
    print(f"model: {size / 1e6:.1f}M parameters ({size * 4 / 2**20:.1f} MiB fp32), AdamW lr {args.lr}")
    configs = {
        "dense fp32": {},
        "wire bf16": {"wire_dtype": torch.bfloat16},
        "wire bf16 + delta": {"wire_dtype": torch.bfloat16, "delta": True},
    }
    with LocalRedisServer() as server:
        for name, options in configs.items():
            rows = run(server, args, **options)
            steady = rows[1:]  # the first push is a keyframe everywhere
            into = sum(r[0] for r in steady) / len(steady)
            out = sum(r[1] for r in steady) / len(steady)
            print(f"{name:18s} first push {rows[0][0] / 2**20:7.2f} MiB in; then per push "
                  f"{into / 2**20:7.3f} MiB in, {out / 2**20:7.3f} MiB out; every apply bit-exact: "
                  f"{all(r[2] for r in rows)}")  # fmt: skip


if __name__ == "__main__":
    main()
