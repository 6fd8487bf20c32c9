"""Test helpers over the codec: whole chunks, decoding into fresh tensors, reading a version back.

The library's receive path checks and copies in separate steps (``check_compatible``
before fetching, chunk ids while assembling, ``check_header`` and ``copy_tensors``
after); these helpers chain them the way a receiver does, for tests that start
from chunks in memory.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from redis_weights.errors import IntegrityError
from redis_weights.format.codec import Encoded, check_compatible, check_header, copy_tensors
from redis_weights.format.manifest import Buffer, Manifest
from redis_weights.protocol.assemble import assemble
from redis_weights.protocol.versions import VersionRegistry


def built_chunks(encoded: Encoded) -> list[bytes]:
    """Every chunk of ``encoded`` as fresh bytes."""
    return [bytes(encoded.chunk(i)[0]) for i in range(len(encoded.plan))]


def apply_chunks(
    chunks: Sequence[Buffer], manifest: Manifest, targets: Mapping[str, torch.Tensor], *, allow_cast: bool = False
) -> None:
    """Verify every chunk, the header and the layout, then copy into ``targets`` (all or nothing)."""
    if len(chunks) != manifest.num_chunks:
        raise IntegrityError(f"version {manifest.version}: got {len(chunks)} chunks, expected {manifest.num_chunks}")
    for index, data in enumerate(chunks):
        manifest.verify_chunk(index, data)
    check_header(chunks, manifest)
    check_compatible(manifest, targets, allow_cast=allow_cast)
    copy_tensors(chunks, manifest, targets)


def decode_to_tensors(chunks: Sequence[Buffer], manifest: Manifest) -> dict[str, torch.Tensor]:
    """New CPU tensors for every entry of a version, verified first."""
    targets = {e.name: torch.empty(e.shape, dtype=e.torch_dtype) for e in manifest.tensors}
    apply_chunks(chunks, manifest, targets)
    return targets


def read_version(registry: VersionRegistry, version: int) -> tuple[Manifest, bytes]:
    """The manifest and the whole (verified) stream of a committed version."""
    manifest = registry.read_manifest(version)
    buffer = np.empty(manifest.total_bytes, dtype=np.uint8)
    assemble(registry.chunks, manifest, memoryview(buffer), [])
    return manifest, buffer.tobytes()


def count_reads(monkeypatch) -> list[int]:
    """Record the bytes every ``ChunkStore`` read asks for (one entry per call), for this test."""
    from redis_weights.protocol.chunkstore import ChunkStore

    seen: list[int] = []
    real_read, real_read_into = ChunkStore.read, ChunkStore.read_into

    def read(self, ids, sizes):
        seen.append(sum(sizes))
        return real_read(self, ids, sizes)

    def read_into(self, ids, sizes, target):
        seen.append(sum(sizes))
        return real_read_into(self, ids, sizes, target)

    monkeypatch.setattr(ChunkStore, "read", read)
    monkeypatch.setattr(ChunkStore, "read_into", read_into)
    return seen


def format2_doc(manifest: Manifest) -> dict[str, Any]:
    """``manifest`` as the previous release stored it (format ``redis_weights/2``, JSON, every chunk
    entry with its own chain): this release still reads it."""
    raw = manifest.to_bytes()
    meta, _ = split_format3(raw)
    del meta["packs"]
    chunks = [
        {"id": c.id} if c.base is None
        else {"id": c.id, "base": c.base, "steps": [[s.patch, s.size, s.id] for s in c.steps]}
        for c in manifest.chunks
    ]  # fmt: skip
    return dict(meta, format="redis_weights/2", chunks=chunks)


def split_format3(raw: bytes) -> tuple[dict[str, Any], bytes]:
    """The JSON meta and the chunk table of a format-3 manifest."""
    (length,) = struct.unpack_from("<I", raw, 4)
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join_format3(meta: dict[str, Any], table: bytes) -> bytes:
    """A format-3 manifest of ``meta`` and ``table`` (the inverse of ``split_format3``)."""
    text = json.dumps(meta).encode()
    return b"RWM3" + struct.pack("<I", len(text)) + text + table
