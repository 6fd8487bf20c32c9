"""The trainer's side of lossless deltas: which chunks of a push become patches, and when to keyframe.

``DeltaPlanner`` keeps the stream of the last version this trainer committed (one
copy of the model in the wire dtype: the only extra memory deltas cost) and the
manifest entries that reach each of its chunks. For a new push, per chunk:

* unchanged id: the previous entry again (stored chunk, or the same chain);
* a changed chunk whose bytes Redis already stores (frozen layers, a revert): stored;
* otherwise ``patch.encode_patch(previous, new)``: when the patch is smaller than the
  chunk, the previous entry's chain plus one step; else the chunk is stored whole
  (``encode_patch`` gives up on a chunk whose 128 KiB sample already does not pay).
  Diffing stops as soon as the patches exceed ``keyframe_fraction``: a keyframe then.

A version is a keyframe (every chunk stored whole) when there is no previous
version of the same layout, every ``keyframe_interval`` versions, or sooner when the
patches a late joiner would apply exceed ``keyframe_fraction`` of the version's
size. The planner's state moves only when a commit succeeds (``committed``), and is
dropped (``reset``: the next push is a keyframe) when the chain cannot be trusted.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from .codec import Encoded
from .manifest import DTYPE_SIZES, MAX_CHAIN, ChunkEntry, Manifest, Step, checksum

DEFAULT_KEYFRAME_INTERVAL = 20
DEFAULT_KEYFRAME_FRACTION = 0.5


def element_size(encoded: Encoded) -> int:
    """The element size patches compare at: the wire dtype's, else the dtype holding the most bytes."""
    if encoded.wire_dtype is not None:
        return DTYPE_SIZES[encoded.wire_dtype]
    weight: Counter[int] = Counter()
    for entry in encoded.tensors:
        weight[DTYPE_SIZES[entry.dtype]] += entry.nbytes
    return weight.most_common(1)[0][0] if weight else 1


class DeltaPlanner:
    """Plans the manifest of each push against the previous committed one (see the module docstring)."""

    def __init__(self, keyframe_interval: int, keyframe_fraction: float) -> None:
        self.keyframe_interval = keyframe_interval
        self.keyframe_fraction = keyframe_fraction
        self._previous: Manifest | None = None
        self._buffer: np.ndarray | None = None  # the previous stream (wire dtype)

    def reset(self) -> None:
        """Forget the previous version: the next push is a keyframe (its chain may be broken)."""
        self._previous = None

    def _compatible(self, encoded: Encoded) -> Manifest | None:
        prev = self._previous
        if (
            prev is None
            or self._buffer is None
            or prev.chunk_size != encoded.chunk_size
            or prev.total_bytes != encoded.total_bytes
            or prev.header_len != encoded.header_len
            or prev.tensors != encoded.tensors
        ):
            return None
        return prev

    def candidates(self, encoded: Encoded) -> set[str]:
        """The objects whose presence in Redis ``plan`` needs to know: the new chunks and every
        object of the previous version (the chains a patch would extend)."""
        prev = self._compatible(encoded)
        return set(encoded.ids) | (prev.objects() if prev is not None else set())

    def plan(
        self, encoded: Encoded, version: int, absent: set[str], **fields: Any
    ) -> tuple[Manifest, dict[str, bytes]]:
        """The manifest of ``encoded`` as ``version`` and the new patches it needs ``{id: bytes}``.

        ``absent``: which of ``candidates(encoded)`` Redis lacks (the push checks once, under its
        pending record): a chain through an absent object is not extended."""
        prev = self._compatible(encoded)
        if prev is None or prev.depth + 1 >= self.keyframe_interval:
            return encoded.manifest(version, keyframe=version, **fields), {}
        ids = encoded.ids
        itemsize = element_size(encoded)
        entries: list[ChunkEntry] = []
        patches: dict[str, bytes] = {}
        assert self._buffer is not None
        offset = 0
        budget = self.keyframe_fraction * encoded.total_bytes  # chain bytes beyond it: a keyframe
        if self._projected_chain_bytes(encoded, prev, itemsize, absent) > budget:  # e.g. a dense fp32 step
            return encoded.manifest(version, keyframe=version, **fields), {}
        chain_bytes = 0
        for index, (new_id, old) in enumerate(zip(ids, prev.chunks, strict=True)):
            if chain_bytes > budget:  # decided already: stop diffing the rest
                return encoded.manifest(version, keyframe=version, **fields), {}
            size = min(encoded.chunk_size, encoded.total_bytes - offset)
            base = self._buffer[offset : offset + size]
            offset += size
            chain_ok = not any(o in absent for o in old.objects)
            if new_id == old.id:
                entries.append(old if chain_ok else ChunkEntry(new_id))
            elif new_id not in absent or not chain_ok:  # stored already, or no chain to extend
                entries.append(ChunkEntry(new_id))
            elif new_id in old.chain:  # back to an earlier state of the chain: cut it there
                entries.append(ChunkEntry(new_id, old.chain[0], old.steps[: old.chain.index(new_id)]))
            elif len(old.steps) >= MAX_CHAIN:
                entries.append(ChunkEntry(new_id))
            else:
                entries.append(self._patched(encoded, index, base, old, itemsize, patches))
            chain_bytes += sum(s.size for s in entries[-1].steps)
        if all(e.base is None for e in entries) or chain_bytes > self.keyframe_fraction * encoded.total_bytes:
            return encoded.manifest(version, keyframe=version, **fields), {}
        manifest = encoded.manifest(
            version, entries, keyframe=prev.keyframe, parent=prev.version, depth=prev.depth + 1, **fields
        )
        return manifest, patches

    def _projected_chain_bytes(self, encoded: Encoded, prev: Manifest, itemsize: int, absent: set[str]) -> int:
        """The chain bytes this push would have, from samples of its changed chunks: a cheap
        upper estimate that spares diffing a whole version that must be a keyframe anyway."""
        from .patch import estimate_patch_size

        assert self._buffer is not None
        total, offset = 0, 0
        for index, (new_id, old) in enumerate(zip(encoded.ids, prev.chunks, strict=True)):
            size = min(encoded.chunk_size, encoded.total_bytes - offset)
            chain = sum(s.size for s in old.steps)
            if new_id != old.id and new_id not in absent:  # Redis stores it already (a revert): no chain
                chain = 0
            elif new_id != old.id:
                data, _ = encoded.chunk(index)
                chain += estimate_patch_size(memoryview(self._buffer[offset : offset + size]), data, itemsize)
            total += chain
            offset += size
        return total

    @staticmethod
    def _patched(
        encoded: Encoded,
        index: int,
        base: np.ndarray,
        old: ChunkEntry,
        itemsize: int,
        patches: dict[str, bytes],
    ) -> ChunkEntry:
        from .patch import encode_patch  # numpy-only; needed by delta pushes alone

        new_id = encoded.ids[index]
        data, _ = encoded.chunk(index)
        patch = encode_patch(memoryview(base), data, itemsize)
        if patch is None or len(patch) >= len(data):  # a patch that is not smaller is not used
            return ChunkEntry(new_id)
        patch_id = checksum(patch)
        patches[patch_id] = patch
        return ChunkEntry(new_id, old.chain[0], (*old.steps, Step(patch_id, len(patch), new_id)))

    def committed(self, encoded: Encoded, manifest: Manifest) -> None:
        """``manifest`` (of ``encoded``) is committed: it is the base of the next push."""
        if self._buffer is None or len(self._buffer) != encoded.total_bytes:
            self._buffer = None  # free the old one before allocating its replacement
            self._buffer = np.empty(encoded.total_bytes, dtype=np.uint8)
            held: list[str | None] = [None] * manifest.num_chunks
        else:
            held = list(self._previous.ids) if self._previous is not None else [None] * manifest.num_chunks
        offset = 0
        for index, (new_id, size) in enumerate(zip(encoded.ids, manifest.chunk_sizes, strict=True)):
            if held[index] != new_id:
                data, _ = encoded.chunk(index)
                self._buffer[offset : offset + size] = np.frombuffer(data, dtype=np.uint8)
            offset += size
        self._previous = manifest
