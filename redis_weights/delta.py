"""The trainer's side of lossless deltas: which chunks of a push become patches, and when to keyframe.

``DeltaPlanner`` keeps the stream of the last version this trainer committed (one
copy of the model in the wire dtype: the only extra memory deltas cost) and its
manifest. For a new push, per chunk:

* unchanged id: the previous entry again (stored chunk, or the same chain);
* a changed chunk whose bytes Redis already stores (frozen layers, a revert): stored;
* otherwise ``patch.encode_patch(previous, new)``: when the patch is smaller than the
  chunk, a chained entry (the previous entry's base) and a record in this version's
  packs (``packs.py``); else the chunk is stored whole (``encode_patch`` gives up on a
  chunk whose 128 KiB sample already does not pay).

A version is a keyframe (every chunk stored whole) when there is no previous
version of the same layout, every ``keyframe_interval`` versions, when a pack of the
chain is gone from Redis, or sooner when the packs a late joiner would read (the
chain's, this version's included) exceed ``keyframe_fraction`` of the version's
size: diffing stops as soon as they do. Every step is linear in the chunk count:
nothing per chunk looks at the chain behind it. The planner's state moves only when
a commit succeeds (``committed``), and is dropped (``reset``: the next push is a
keyframe) when the chain cannot be trusted.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from .codec import Encoded
from .manifest import DTYPE_SIZES, ChunkEntry, Manifest, Pack, checksum, pack_limit
from .packs import build_packs

DEFAULT_KEYFRAME_INTERVAL = 20
DEFAULT_KEYFRAME_FRACTION = 0.5
DIFF_BYTES = 64 * 1024 * 1024  # the new stream is diffed in regions of about this size (one scratch copy)


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
            or any(c.steps for c in prev.chunks)  # a format-2 chain (never this planner's own)
        ):
            return None
        return prev

    def candidates(self, encoded: Encoded) -> set[str]:
        """The objects whose presence in Redis ``plan`` needs to know: the changed chunks and every
        object of the previous version (the chain bases and packs a patch would extend)."""
        prev = self._compatible(encoded)
        if prev is None:
            return set(encoded.ids)
        changed = {new for new, old in zip(encoded.ids, prev.chunks, strict=True) if new != old.id}
        return changed | prev.objects()  # an unchanged chunk's id is the previous entry's object

    def plan(
        self, encoded: Encoded, version: int, absent: set[str], **fields: Any
    ) -> tuple[Manifest, dict[str, bytes]]:
        """The manifest of ``encoded`` as ``version`` and the new packs it needs ``{id: bytes}``.

        ``absent``: which of ``candidates(encoded)`` Redis lacks (the push checks once, under its
        pending record): a chain whose base is absent is not extended, and a chain with an absent
        pack (whose chunks are unknown without reading it) makes a keyframe."""
        prev = self._compatible(encoded)
        if (
            prev is None
            or prev.depth + 1 >= self.keyframe_interval
            or any(p.id in absent for p in prev.packs)
        ):
            return encoded.manifest(version, keyframe=version, **fields), {}
        budget = self.keyframe_fraction * encoded.total_bytes - sum(p.size for p in prev.packs)
        if self._projected_bytes(encoded, prev, absent) > budget:  # e.g. a dense fp32 step: spare the diffing
            return encoded.manifest(version, keyframe=version, **fields), {}
        planned = self._entries(encoded, prev, absent, budget)
        if planned is None:
            return encoded.manifest(version, keyframe=version, **fields), {}
        entries, records = planned
        if all(e.base is None for e in entries):
            return encoded.manifest(version, keyframe=version, **fields), {}
        packs = {checksum(p): p for p in build_packs(records, pack_limit(encoded.chunk_size))}
        chain = [*prev.packs, *(Pack(version, pack_id, len(data)) for pack_id, data in packs.items())]
        manifest = encoded.manifest(
            version, entries, keyframe=prev.keyframe, parent=prev.version, depth=prev.depth + 1, packs=chain, **fields
        )
        return manifest, packs

    def _entries(
        self, encoded: Encoded, prev: Manifest, absent: set[str], budget: float
    ) -> tuple[list[ChunkEntry], list[tuple[int, str, str, bytes]]] | None:
        """The entries of the new version and its patch records; None when the patches exceed
        ``budget`` (then it is a keyframe: the rest is not diffed)."""
        entries: list[ChunkEntry] = []
        todo: list[int] = []  # changed chunks to diff
        for index, (new_id, old) in enumerate(zip(encoded.ids, prev.chunks, strict=True)):
            base_ok = (old.base or old.id) not in absent
            if new_id == old.id:
                entries.append(old if base_ok else ChunkEntry(new_id))
            elif new_id not in absent or not base_ok:  # stored already, or no chain to extend
                entries.append(ChunkEntry(new_id))
            else:
                entries.append(old)  # replaced below: by its chained entry, or stored when no patch pays
                todo.append(index)
        records: list[tuple[int, str, str, bytes]] = []
        patched = 0
        sizes = encoded.chunk_sizes
        for group in _groups(todo, max(1, DIFF_BYTES // encoded.chunk_size)):
            patches = self._diff(encoded, group[0], group[-1] + 1)
            for index in group:
                patch = patches.get(index)
                if patch is None or len(patch) >= sizes[index]:  # a patch that is not smaller is not used
                    entries[index] = ChunkEntry(encoded.ids[index])
                    continue
                old = prev.chunks[index]
                entries[index] = ChunkEntry(encoded.ids[index], old.base or old.id)
                records.append((index, old.id, encoded.ids[index], patch))
                patched += len(patch)
            if patched > budget:
                return None
        return entries, records

    def _diff(self, encoded: Encoded, first: int, end: int) -> dict[int, bytes | None]:
        """``encode_patch`` of chunks ``first..end-1`` against the previous stream, in one pass:
        the new chunks are gathered into one scratch region of at most ``DIFF_BYTES``."""
        from .patch import encode_patches  # numpy-only; needed by delta pushes alone

        assert self._buffer is not None
        lo = first * encoded.chunk_size
        hi = min(end * encoded.chunk_size, encoded.total_bytes)
        scratch: Any = np.empty(hi - lo, dtype=np.uint8)
        view = memoryview(scratch)
        offset = 0
        for parts in encoded.plan[first:end]:  # the chunks' own parts: nothing gathered twice
            for part in parts:
                view[offset : offset + len(part)] = part
                offset += len(part)
        patches = encode_patches(self._buffer[lo:hi], scratch, encoded.chunk_size, element_size(encoded))
        return {first + i: patch for i, patch in patches.items()}

    def _projected_bytes(self, encoded: Encoded, prev: Manifest, absent: set[str]) -> int:
        """The patch bytes this push would add, from samples of its large changed chunks: a cheap
        upper estimate that spares diffing a whole version that must be a keyframe anyway (chunks
        too small to sample are left to the diffing, which stops at the budget)."""
        from .patch import SAMPLE_FROM, estimate_patch_size

        assert self._buffer is not None
        if encoded.chunk_size < SAMPLE_FROM:
            return 0
        itemsize = element_size(encoded)
        total, offset = 0, 0
        for index, (new_id, old, size) in enumerate(zip(encoded.ids, prev.chunks, encoded.chunk_sizes, strict=True)):
            if new_id != old.id and new_id in absent:  # not stored already (a revert): a patch
                data, _ = encoded.chunk(index)
                total += estimate_patch_size(memoryview(self._buffer[offset : offset + size]), data, itemsize)
            offset += size
        return total

    def committed(self, encoded: Encoded, manifest: Manifest) -> None:
        """``manifest`` (of ``encoded``) is committed: it is the base of the next push."""
        if self._buffer is None or len(self._buffer) != encoded.total_bytes:
            self._buffer = None  # free the old one before allocating its replacement
            self._buffer = np.empty(encoded.total_bytes, dtype=np.uint8)
            held: list[str | None] = [None] * manifest.num_chunks
        else:
            held = list(self._previous.ids) if self._previous is not None else [None] * manifest.num_chunks
        offset = 0
        for index, (new_id, size) in enumerate(zip(encoded.ids, encoded.chunk_sizes, strict=True)):
            if held[index] != new_id:
                data, _ = encoded.chunk(index)
                self._buffer[offset : offset + size] = np.frombuffer(data, dtype=np.uint8)
            offset += size
        self._previous = manifest


def _groups(indices: list[int], span: int) -> list[list[int]]:
    """``indices`` (ascending) in groups whose first and last lie less than ``span`` apart."""
    groups: list[list[int]] = []
    for i in indices:
        if groups and i - groups[-1][0] < span:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
