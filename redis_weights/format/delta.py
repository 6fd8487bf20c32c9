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
size: diffing stops as soon as they do. Whether a push can pay at all is estimated first,
from 16 KiB probes (the middle of each changed chunk's 128 KiB sample) of a few chunks
spread over the model, then of every changed chunk only when those few are not decisive
(an fp32 step that moves every element: no chunk is diffed, and the decision costs 3-5 ms
for the 85 MB policy). After such a density keyframe the planner keeps only the probes of
the version (under 1% of it, and a short last chunk whole) instead of a full copy, so a
run of dense steps costs no copy of the model per push; the first push that the probes
find sparse is a keyframe too (there is nothing to diff it against), and the one after it
is diffed again. Every step is linear in the chunk count: nothing per chunk looks at the
chain behind it. The 64 MiB regions are diffed by ``threads`` threads side by side (numpy and
zstd release the GIL: two threads halve the diff of an idle 2-core machine), their results
taken in order, so the patches and the early stop are the same as with one. The planner's state moves only when
a commit succeeds (``committed``), and is dropped (``reset``: the next push is a
keyframe) when the chain cannot be trusted.
"""

from __future__ import annotations

import contextlib
from collections import Counter, deque
from collections.abc import Generator
from concurrent.futures import Future
from typing import Any

import numpy as np

from ..threads import Threads
from .codec import Encoded
from .manifest import DTYPE_SIZES, ChunkEntry, Manifest, Pack, checksum, pack_limit
from .packs import build_packs
from .parts import gather, within_one

DEFAULT_KEYFRAME_INTERVAL = 20
DEFAULT_KEYFRAME_FRACTION = 0.5
DIFF_BYTES = 64 * 1024 * 1024  # the new stream is diffed in regions of about this size (bounds the diff's scratch)
SPREAD_SAMPLES = 8  # changed chunks estimated first, spread over the model, before the estimate may stop early
SPREAD_MARGIN = 1.25  # ... it stops when those project this many times the patch budget, or this many times less
PROBE_BYTES = 16 * 1024  # bytes of a changed chunk an estimate reads (the middle of its 128 KiB sample): an fp32
# step of the 85 MB policy is found dense in 3-5 ms, not 12-13 ms; sparse bf16 steps are overestimated by 15-50%
# (each probe's patch header and zstd frames, scaled up), which only errs towards a keyframe near the budget


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

    def __init__(self, keyframe_interval: int, keyframe_fraction: float, threads: int | Threads = 1) -> None:
        self.keyframe_interval = keyframe_interval
        self.keyframe_fraction = keyframe_fraction
        self.threads = threads if isinstance(threads, Threads) else Threads(threads, "redis-weights-diff")
        self._previous: Manifest | None = None
        self._buffer: np.ndarray | None = None  # the previous stream (wire dtype), when ``_full``
        self._full = False  # ``_buffer`` holds the previous version (else only its probes, ``_samples``, or nothing)
        self._samples: dict[int, bytes] | None = None  # chunk index -> its probe (``probe_span``; a
        # short last chunk: all of it)
        self._dense = False  # the last plan was a keyframe because its patches could not pay

    def close(self) -> None:
        """Stop the diff threads (a later diff starts them again)."""
        self.threads.close()

    def reset(self) -> None:
        """Forget the previous version: the next push is a keyframe (its chain may be broken)."""
        self._previous = None
        self._full, self._samples = False, None

    def _compatible(self, encoded: Encoded) -> Manifest | None:
        prev = self._previous
        if (
            prev is None
            or not (self._full or self._samples is not None)
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
        self._dense = False
        if (
            prev is None
            or prev.depth + 1 >= self.keyframe_interval
            or any(p.id in absent for p in prev.packs)
        ):
            return encoded.manifest(version, keyframe=version, **fields), {}
        budget = self.keyframe_fraction * encoded.total_bytes - sum(p.size for p in prev.packs)
        if self._projected_bytes(encoded, prev, absent, budget) > budget:  # e.g. a dense fp32 step: no diffing
            self._dense = True
            return encoded.manifest(version, keyframe=version, **fields), {}
        if not self._full:  # only probes of the previous version: nothing to diff against this time
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
        diffs = self._diffs(encoded, _groups(todo, max(1, DIFF_BYTES // encoded.chunk_size)))
        with contextlib.closing(diffs):  # stopping early waits for the diffs still running
            for group, patches in diffs:
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

    def _diffs(
        self, encoded: Encoded, groups: list[list[int]]
    ) -> Generator[tuple[list[int], dict[int, bytes | None]], None, None]:
        """``(group, self._diff of it)`` for each group in order, up to ``threads`` diffed side by side.
        A caller that stops early leaves no diff running: the generator's ``finally`` waits for them
        (they read the previous stream, which the next commit may hand to the encoder)."""
        if self.threads.count <= 1 or len(groups) <= 1:
            for group in groups:
                yield group, self._diff(encoded, group[0], group[-1] + 1)
            return
        pending: deque[tuple[list[int], Future[dict[int, bytes | None]]]] = deque()
        waiting = iter(groups)
        try:
            for group in waiting:
                pending.append((group, self.threads.submit(self._diff, encoded, group[0], group[-1] + 1)))
                if len(pending) >= self.threads.count:
                    break
            while pending:
                group, future = pending.popleft()
                following = next(waiting, None)
                if following is not None:
                    diff = self.threads.submit(self._diff, encoded, following[0], following[-1] + 1)
                    pending.append((following, diff))
                yield group, future.result()
        finally:
            for _, future in pending:
                future.cancel()
            for _, future in pending:
                if not future.cancelled():
                    future.exception()  # waits; its error (if any) is moot once the caller stopped

    def _diff(self, encoded: Encoded, first: int, end: int) -> dict[int, bytes | None]:
        """``encode_patch`` of chunks ``first..end-1`` against the previous stream, in one pass over the
        new stream where it lies: the chunks' parts (the tensors read in place, the header, a cast
        stream's staging buffer) are diffed piece by piece, never gathered into a copy."""
        from .patch import encode_patches  # numpy-only; needed by delta pushes alone

        assert self._buffer is not None
        lo = first * encoded.chunk_size
        hi = min(end * encoded.chunk_size, encoded.total_bytes)
        region = encoded.region(lo, hi)  # one piece: one view
        pieces: Any = region if region is not None else [part for parts in encoded.plan[first:end] for part in parts]
        patches = encode_patches(self._buffer[lo:hi], pieces, encoded.chunk_size, element_size(encoded))
        return {first + i: patch for i, patch in patches.items()}

    def _projected_bytes(self, encoded: Encoded, prev: Manifest, absent: set[str], budget: float) -> float:
        """The patch bytes this push would add, from probes of its large changed chunks (``probe_span``):
        a cheap upper estimate that spares diffing a whole version that must be a keyframe anyway
        (chunks too small to probe are left to the diffing, which stops at the budget; without the
        previous stream, a short last chunk is estimated from its kept bytes). ``SPREAD_SAMPLES``
        chunks spread over the model come first: when they project more than ``SPREAD_MARGIN`` times
        ``budget``, or less than ``budget / SPREAD_MARGIN``, nothing more is estimated; else every
        changed chunk's probe is."""
        from .patch import SAMPLE_FROM, estimate_patch_size

        if encoded.chunk_size < SAMPLE_FROM:
            return 0
        itemsize = element_size(encoded)
        offsets = _offsets(encoded.chunk_sizes)
        changed = [i for i, (new_id, old) in enumerate(zip(encoded.ids, prev.chunks, strict=True))
                   if new_id != old.id and new_id in absent]  # not stored already (a revert): a patch  # fmt: skip
        sampled = [i for i in changed if probe_span(encoded.chunk_sizes[i], itemsize) is not None]
        total = 0.0
        if not self._full:  # a short last chunk is kept whole with the probes: estimated exactly
            assert self._samples is not None
            for i in set(changed) - set(sampled):
                kept, size = self._samples.get(i), encoded.chunk_sizes[i]
                new = _part_slice(encoded.plan[i], 0, size)
                total += size if kept is None or len(kept) != size else estimate_patch_size(kept, new, itemsize)
        step = max(1, len(sampled) // SPREAD_SAMPLES)
        first = sampled[::step][:SPREAD_SAMPLES]
        probed = sum(self._estimate(encoded, i, offsets[i], itemsize) for i in first)
        projected = total + probed * len(sampled) / len(first) if first else total
        if first and not budget / SPREAD_MARGIN <= projected <= SPREAD_MARGIN * budget:
            return projected  # a keyframe for sure, or patches for sure (the diff stops at the budget anyway)
        rest = sorted(set(sampled) - set(first))  # the first ones are estimated already
        return total + probed + sum(self._estimate(encoded, i, offsets[i], itemsize) for i in rest)

    def _estimate(self, encoded: Encoded, index: int, offset: int, itemsize: int) -> int:
        """The estimated patch size of chunk ``index`` (at stream ``offset``) from its probe and the
        previous version's (the full stream's, or the kept probes)."""
        from .patch import estimate_from_sample

        size = encoded.chunk_sizes[index]
        span = probe_span(size, itemsize)
        assert span is not None
        new = _part_slice(encoded.plan[index], *span)
        if self._full:
            assert self._buffer is not None
            old: Any = memoryview(self._buffer[offset + span[0] : offset + span[1]])
        else:
            assert self._samples is not None
            old = self._samples.get(index)
            if old is None or len(old) != len(new):
                return size
        return int(estimate_from_sample(old, new, size, itemsize))

    def committed(self, encoded: Encoded, manifest: Manifest) -> None:
        """``manifest`` (of ``encoded``) is committed: it is the base of the next push. After a
        density keyframe only the probes of its chunks are kept (the next push is most likely
        dense too: no copy of the model); else the stream: the encoder's staging buffer itself when
        it holds all of it (cast or snapshotted weights: the planner's old buffer becomes the next
        staging, nothing copied), else a copy (its changed chunks, when the previous stream is held)."""
        itemsize = element_size(encoded)
        if self._dense and all(probe_span(size, itemsize) for size in encoded.chunk_sizes[:-1]):
            self._samples = {}
            for index, (parts, size) in enumerate(zip(encoded.plan, encoded.chunk_sizes, strict=True)):
                span = probe_span(size, itemsize) or (0, size)  # a short last chunk: kept whole
                self._samples[index] = bytes(_part_slice(parts, *span))
            self._full = False
            self._previous = manifest
            return
        if self._buffer is None or len(self._buffer) != encoded.total_bytes:
            self._buffer = None  # free the old one before allocating its replacement
            self._buffer = _touched(np.empty(encoded.total_bytes, dtype=np.uint8))
            self._full = False
        stream = encoded.take_stream(self._buffer)  # the staging buffer, kept: no copy
        if stream is not None:  # and the encoder stages the next push in the planner's old buffer
            self._buffer, self._full, self._samples = stream, True, None
            self._previous = manifest
            return
        held: list[str | None] = [None] * manifest.num_chunks
        if self._full and self._previous is not None:
            held = list(self._previous.ids)
        offset = 0
        for index, (new_id, size) in enumerate(zip(encoded.ids, encoded.chunk_sizes, strict=True)):
            if held[index] != new_id:
                data, _ = encoded.chunk(index)
                self._buffer[offset : offset + size] = np.frombuffer(data, dtype=np.uint8)
            offset += size
        self._full, self._samples = True, None
        self._previous = manifest


def _touched(buffer: np.ndarray) -> np.ndarray:
    """``buffer`` with every page faulted in now: the first write to fresh memory can cost 10-20x
    a warm copy (0.06-1 s per 520 MB measured on 2-core VMs), paid here, at a keyframe's commit,
    instead of inside the next push's cast."""
    buffer.fill(0)
    return buffer


def probe_span(length: int, itemsize: int) -> tuple[int, int] | None:
    """The bytes ``[start, end)`` of a chunk of ``length`` bytes that the estimate reads: the middle
    ``PROBE_BYTES`` of its sample (``patch.sample_span``, element-aligned); None for a chunk too small
    to be sampled."""
    from .patch import sample_span

    span = sample_span(length, itemsize)
    if span is None:
        return None
    start = span[0] + (span[1] - span[0] - PROBE_BYTES) // 2 // itemsize * itemsize
    return start, start + PROBE_BYTES


def _offsets(sizes: list[int]) -> list[int]:
    """The stream offset of every chunk."""
    out, offset = [], 0
    for size in sizes:
        out.append(offset)
        offset += size
    return out


def _part_slice(parts: list[memoryview], start: int, end: int) -> memoryview:
    """Bytes ``[start, end)`` of a chunk given as its parts: a view when they lie in one part, else
    gathered (only those bytes: never the whole chunk)."""
    view = within_one(parts, start, end)
    if view is not None:
        return view
    out = memoryview(bytearray(end - start))
    gather(parts, out, start, end)
    return out


def _groups(indices: list[int], span: int) -> list[list[int]]:
    """``indices`` (ascending) in groups whose first and last lie less than ``span`` apart."""
    groups: list[list[int]] = []
    for i in indices:
        if groups and i - groups[-1][0] < span:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
