"""Helpers shared by the fault, bad-input and security suites."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from redis_weights.backend.index import NamespaceIndex
from redis_weights.backend.keys import Keys


def perturb(model: nn.Module, seed: int) -> None:
    """A deterministic "training step": add noise to every floating-point tensor."""
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator))


def eventually(predicate: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:g}s")
        time.sleep(0.02)


def chunk_key(store, version: int, index: int) -> str:
    """The Redis key of the object behind chunk ``index`` of ``version`` (its stored base if patched)."""
    from redis_weights import VersionRegistry

    entry = VersionRegistry(store.deployment, store.keyspace).read_manifest(version).chunks[index]
    return store.keyspace.chunk(entry.base or entry.id)


def stored_objects(client, keyspace: Keys) -> set[str]:  # type: ignore[no-untyped-def]
    """The objects really in Redis (a SCAN of the test's own server or cluster), checked against the
    namespace's index: it must list every object that exists."""
    stored = {keyspace.chunk_id_of(n) for n in client.scan_iter(match=keyspace.chunk_pattern)} - {None}
    assert stored <= NamespaceIndex(client, keyspace).objects(), "the index must list every object that exists"
    return stored  # type: ignore[return-value]
