"""The demo's model and its training loop: the same shapes in the trainer and every worker.

``demo_weights`` builds the weights (random for the trainer, zeros for a worker),
``digest`` proves that two copies hold the same bytes, and ``train_and_push`` is the one
training loop that both the in-process demo and ``--role trainer`` run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import xxhash

from ...errors import PushError
from ...format.codec import flatten_weights
from ...units import human_bytes

if TYPE_CHECKING:
    from ...trainer.updater import RedisWeightUpdater

_COLUMNS = 1024  # every demo tensor is a (rows, 1024) float32 matrix plus a bias


def demo_weights(size_mb: float, seed: int | None) -> dict[str, torch.Tensor]:
    """About ``size_mb`` MB of float32 layers of at most 4 MiB each; zeros when ``seed`` is None.

    Also runs the codec once over them, so that its slow first imports (tensordict, ~1 s)
    happen here: not inside the first timed push, nor while a worker holds a claimed rank.
    """
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
    flatten_weights(weights)
    return weights


def digest(weights: dict[str, torch.Tensor]) -> str:
    """A hash of every tensor's name, shape and bytes, in name order."""
    h = xxhash.xxh3_64()
    for name in sorted(weights):
        t = weights[name].detach().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


@dataclass(frozen=True)
class Push:
    """One push of the training loop: how long it took and how many bytes, or the ``PushError`` it ended with."""

    step: int  # pushes so far, this one included
    version: int
    seconds: float
    size: int = 0  # bytes of the version (0 when the push failed)
    error: PushError | None = None

    @property
    def rate(self) -> float:
        """Bytes per second of the push."""
        return self.size / self.seconds if self.seconds > 0 else 0.0

    def describe(self, workers: int) -> str:
        """``v3: pushed 1.9 MiB to 2 workers in 12.3 ms (160 MB/s)``."""
        return (f"v{self.version}: pushed {human_bytes(self.size)} to {workers} workers in "
                f"{self.seconds * 1000:.1f} ms ({self.rate / 1e6:.0f} MB/s)")  # fmt: skip


def train_and_push(
    updater: RedisWeightUpdater, weights: dict[str, torch.Tensor], versions: int, interval: float
) -> Iterator[Push]:
    """A "training" step on ``weights``, then ``updater.update_weights()``; ``versions`` times (0: forever).

    Yields each push before sleeping ``interval`` seconds until the next. A push that
    fails with a ``PushError`` is yielded with its error and the loop goes on: the
    trainer role reports it, the in-process demo raises it.
    """
    step = 0
    while versions == 0 or step < versions:
        with torch.no_grad():
            for tensor in weights.values():
                tensor.mul_(0.999).add_(0.01 * (step + 1))  # "training"
        started = time.perf_counter()
        try:
            updater.update_weights()
        except PushError as exc:
            push = Push(step + 1, updater.version, time.perf_counter() - started, error=exc)
        else:
            seconds = time.perf_counter() - started
            push = Push(step + 1, updater.version, seconds, updater.registry.read_manifest(updater.version).total_bytes)
        yield push
        step += 1
        if interval > 0 and (versions == 0 or step < versions):
            time.sleep(interval)
