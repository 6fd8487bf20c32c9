"""Deterministic test models and a digest of their weights (trainer and workers build the same shapes)."""

from __future__ import annotations

import torch
import xxhash
from torch import nn


def make_model(spec: str, seed: int | None = None) -> nn.Module:
    """``"mlp"``: a small MLP with a buffer; ``"mb:<N>"``: about N MB of float32 weights.

    ``seed`` None fills every tensor with zeros (a worker that has applied nothing yet).
    """
    if spec == "mlp":
        model: nn.Module = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4), nn.BatchNorm1d(4))
    elif spec.startswith("mb:"):
        megabytes = float(spec[3:])
        per_layer = 1024 * 1024  # 1M floats = 4 MB per layer
        n_layers = max(1, round(megabytes * 1e6 / 4 / per_layer))
        model = nn.Sequential(*[nn.Linear(1024, 1024, bias=True) for _ in range(n_layers)])
    else:
        raise ValueError(f"unknown model spec {spec!r}")
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed or 0)
        for tensor in model.state_dict().values():
            if seed is None:
                tensor.zero_()
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
            else:
                tensor.fill_(seed)
    return model


def state_digest(model: nn.Module) -> str:
    """A hash of every tensor's name, dtype, shape and bytes, in name order."""
    h = xxhash.xxh3_64()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
