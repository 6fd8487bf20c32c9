"""Lossless patches between two versions of one chunk: the changed elements only.

A small optimizer step leaves most bf16 weights bit-identical (measured here: 1-3% of
the elements change at lr 1e-6, 8-16% at 1e-5), so a version can be stored as a patch
against its parent: the positions of the changed elements plus their new bits, which
is a few percent of the dense chunk. This module is pure numpy + zstandard (no torch,
no Redis): ``encode_patch`` builds the patch of one chunk, ``apply_patch`` turns the
base chunk into the new one (in place if asked), ``patch_info`` describes a patch for
admin tools. Every malformed patch is refused with a :class:`~redis_weights.errors.PatchError`
before anything is written, and the work and memory of parsing are bounded by the
chunk length the caller already holds.

Elements. A chunk of ``L`` bytes is compared as ``L // itemsize`` elements of
``itemsize`` bytes (the wire dtype's element size: 2 for bf16) starting at the chunk's
first byte; the ``L % itemsize`` bytes after the last whole element (the tail) are
always carried in the patch. Chunk boundaries of a version's stream are multiples of
the chunk size and the safetensors data section starts at a multiple of 8, so elements
line up with the tensors' own elements; where they do not (a header change, a tensor
at an odd offset) the patch is only larger, never wrong.

What a patch stores, per chunk (numbers from 8 MiB chunks of bf16 with realistic AdamW
steps, zstd level 1):

- *positions*, either ``gaps``: for each changed element the number of unchanged
  elements before it since the previous change, as fixed-width unsigned integers of 1,
  2 or 4 bytes (the narrowest that holds the largest gap), stored as byte planes (all
  low bytes, then the next bytes...); or ``bitmap``: one bit per element (bit ``i % 8``
  of byte ``i // 8``), set for the changed ones. Compressed, gaps are smaller below ~17.5%
  density and the bitmap above (at 1.3%: gaps 56 KB, bitmap 90 KB; at 46%: gaps 643 KB,
  bitmap 524 KB), so the density chooses (``BITMAP_FROM``): one zstd pass, not both.
  Varint gaps compress to the same size as byte-plane gaps and cost a serial decode.
- *values*: the changed elements' bits XOR the base's, as byte planes, then the tail's
  bytes XOR the base's. XOR leaves the sign and exponent byte of a small step zero and
  the mantissa byte small: it compresses 2-5x where the new bits themselves compress
  1.2-1.3x (4.2% density: 74 KB against 265 KB of plain new values for 350 KB raw; XOR
  planes beat plain values and wrapping-subtraction values at every density measured).
- each of the two sections is zstd-compressed (level 1 with a small hash table,
  ``ZSTD_PARAMETERS``: as small as levels 2-3 and negative levels here, lz4 1.3-2x
  larger) when that makes it smaller.

Measured sizes relative to the dense chunk: 0.8% at 1% density, 5% at 10%, 18% at 46%,
25% at 70%, 31% at 86%. ``encode_patch`` returns None when the patch would not be
smaller than ``max_ratio`` of the dense chunk (by default: not smaller than the chunk
itself); a chunk of 1 MiB or more is first tried on a 128 KiB sample from its middle, and
stored dense at once when even that sample's patch does not pay (dense fp32 steps). Speed on one core of this machine (8 MiB bf16 chunks, machine otherwise idle):
encode ~2 GB/s at 1% density, ~0.8 GB/s at 10%, ~0.3 GB/s at 70%; apply ~5 GB/s, ~2
GB/s, ~0.3 GB/s. A 500 MB bf16 model at 1% density encodes in about 0.25 s.

A patch does not name its base: whoever stores it (the manifest) records which chunk it
patches, and the new chunk's checksum in the manifest proves the result bit for bit.

Binary format (all integers little-endian), a fixed 52-byte header then the sections::

    offset size field
    0      4    magic b"RWPT"
    4      1    format version (1)
    5      1    positions encoding: 1 = gaps, 2 = bitmap
    6      1    itemsize: 1, 2, 4 or 8
    7      1    flags: bit 0 positions section zstd-compressed, bit 1 values section
                zstd-compressed; other bits 0
    8      1    gap width: 1, 2 or 4 for gaps, 0 for bitmap
    9      3    reserved, 0
    12     8    chunk length L in bytes (at most MAX_CHUNK_SIZE)
    20     8    changed element count C (at most L // itemsize)
    28     8    stored length of the positions section
    36     8    stored length of the values section
    44     8    xxh3-64 of bytes [0, 44) and of every byte after the header
    52     ...  positions section, then values section (nothing after them)

The uncompressed length of each section follows from the header alone (gaps: C *
width; bitmap: ceil((L // itemsize) / 8); values: C * itemsize + L % itemsize), so a
parser checks every length against L before it allocates or decompresses anything; a
compressed section must be one zstd frame that declares exactly that content size and
is smaller than it. The checksum catches a corrupted patch before the base is
touched (a patch is applied in place); it is no defence against a forger, which is
why every field is checked as well. Gaps cannot express a position twice or out of
order; a gap past the last element, a bitmap bit past it or a bitmap whose population
is not C is refused.
"""

from __future__ import annotations

import itertools
import struct
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash
import zstandard

from ..errors import PatchError
from .header import fed
from .manifest import MAX_CHUNK_SIZE, Buffer
from .parts import gather

MAGIC = b"RWPT"
FORMAT_VERSION = 1
GAPS = 1
BITMAP = 2
ENCODINGS: dict[int, str] = {GAPS: "gaps", BITMAP: "bitmap"}
ITEMSIZES = (1, 2, 4, 8)
GAP_WIDTHS = (1, 2, 4)
# zstd level 1 (measured: as small as levels 2-3 on weight patches and faster; lz4 is 1.3-2x larger) with
# a 64-entry hash table instead of 16384: the XOR values are mostly literals (a mantissa byte of ~3 bits
# of entropy), and a small table wastes less time looking for matches that are not there. Measured on
# consecutive bf16 AdamW steps of the bench's transformer (64 MiB regions, 2 MiB chunks): lr 1e-5
# encode 85 -> 73 ms, apply 33 -> 30 ms, patches 2% smaller; lr 1e-6 2.4% smaller, encode the same.
ZSTD_PARAMETERS = zstandard.ZstdCompressionParameters(
    strategy=zstandard.STRATEGY_FAST, window_log=19, hash_log=6, search_log=1, min_match=7, write_content_size=True
)
_POS_ZSTD = 0x01
_VAL_ZSTD = 0x02

BITMAP_FROM = 0.175  # changed elements per element from which the positions are a bitmap, not gaps
_SAMPLE_BYTES = 128 << 10  # bytes of a large chunk tried first (a multiple of every itemsize)
SAMPLE_FROM = 8 * _SAMPLE_BYTES  # chunks of at least this many bytes are sampled first

_HEADER = struct.Struct("<4sBBBBB3xQQQQQ")
HEADER_SIZE = _HEADER.size  # 52
_SIGNED = HEADER_SIZE - 8  # the checksum covers the header up to itself, then the sections
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@dataclass(frozen=True)
class PatchInfo:
    """What a patch holds, read from its header alone (``show`` and admin tools)."""

    encoding: str  # "gaps" or "bitmap"
    itemsize: int
    chunk_len: int
    changed: int  # elements that differ from the base
    elements: int  # whole elements in the chunk
    size: int  # bytes of the whole patch
    positions_bytes: int  # stored size of the positions section
    values_bytes: int  # stored size of the values section
    positions_compressed: bool
    values_compressed: bool

    @property
    def density(self) -> float:
        """Fraction of the chunk's elements that changed."""
        return self.changed / self.elements if self.elements else 0.0

    @property
    def ratio(self) -> float:
        """Size of the patch relative to the dense chunk."""
        return self.size / self.chunk_len if self.chunk_len else float("inf")


# ---------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------
def encode_patch(base: Buffer, new: Buffer, itemsize: int, *, max_ratio: float = 1.0) -> bytes | None:
    """The patch that turns chunk ``base`` into chunk ``new``, or None when it does not pay.

    ``base`` and ``new`` have the same length; elements of ``itemsize`` bytes are
    compared. None when the patch would not be smaller than ``max_ratio`` times the
    dense chunk (0 < max_ratio <= 1): then the chunk is stored whole.
    """
    if not 0.0 < max_ratio <= 1.0:
        raise PatchError(f"max_ratio must be in (0, 1], got {max_ratio!r}")
    if _sample_says_dense(base, new, itemsize, max_ratio):
        return None
    return _build(base, new, itemsize, max_ratio=max_ratio)


def encode_patches(base: Any, new: Any, chunk_size: int, itemsize: int) -> dict[int, bytes | None]:
    """``encode_patch(base chunk i, new chunk i, itemsize)`` for every chunk ``i`` (bytes
    ``[i * chunk_size, (i + 1) * chunk_size)``) of two regions of equal length whose bytes differ,
    byte for byte the same patches, from one diff of the whole regions.

    ``new`` is one buffer, or the pieces that tile the new region in order (the tensors of a
    stream read in place): each piece is diffed where it lies, with no gathered copy of the
    region, when every piece holds whole elements.

    A sparse step changes a few elements of every chunk of a big model: diffing chunk by chunk
    costs ~20 numpy calls per chunk (most of a 70,000-chunk push); here a chunk of few changes
    is built from the positions of the regions' diff with plain Python, and only the others
    go through ``encode_patch``."""
    _check_itemsize(itemsize)
    b: Any = _byte_view(base, "base")
    views = [_byte_view(p, "new") for p in new] if isinstance(new, (list, tuple)) else [_byte_view(new, "new")]
    if sum(len(v) for v in views) != len(b):
        raise PatchError(f"base and new differ in length ({len(b)} and {sum(len(v) for v in views)} bytes)")
    aligned = chunk_size % itemsize == 0 and chunk_size <= MAX_CHUNK_SIZE
    if len(views) > 1 and not (aligned and all(len(v) % itemsize == 0 for v in views)):
        views = [_joined(views, len(b))]
    count = -(-len(b) // chunk_size)
    if not aligned:
        nw = views[0]
        return {i: encode_patch(b[i * chunk_size : (i + 1) * chunk_size], nw[i * chunk_size : (i + 1) * chunk_size],
                                itemsize)
                for i in range(count) if not np.array_equal(b[i * chunk_size : (i + 1) * chunk_size],
                                                            nw[i * chunk_size : (i + 1) * chunk_size])}  # fmt: skip
    whole = len(b) // itemsize * itemsize
    old_elems = b[:whole].view(_UINT[itemsize])
    where, values, mask = _changes(old_elems, [v[: len(v) // itemsize * itemsize].view(_UINT[itemsize]) for v in views])
    per = chunk_size // itemsize
    bounds = np.searchsorted(where, np.arange(count + 1, dtype=np.int64) * per)  # ``where`` is sorted: no np.unique
    counts = np.diff(bounds)
    chunks = np.flatnonzero(counts)
    out: dict[int, bytes | None] = {}
    for i, start, changed in zip(chunks.tolist(), bounds[chunks].tolist(), counts[chunks].tolist(), strict=True):
        lo, hi = i * chunk_size, min((i + 1) * chunk_size, len(b))
        if (hi - lo) % itemsize:  # the last chunk, with a tail of bytes after its last element (one view)
            out[i] = encode_patch(b[lo:hi], views[0][lo:hi], itemsize)
        elif changed <= _SMALL_COUNT and 8 * changed < (hi - lo) // itemsize // 8:
            local = (where[start : start + changed] - i * per).tolist()
            out[i] = _small_patch(local, values[start : start + changed].tolist(), hi - lo, itemsize)
        else:  # what ``encode_patch`` makes of it, from the region's diff (not diffed again)
            local_where = where[start : start + changed] - i * per
            out[i] = _known_patch(local_where, values[start : start + changed], hi - lo, itemsize,
                                  mask[i * per : i * per + (hi - lo) // itemsize])
    if len(b) % itemsize and (count - 1) not in out and not np.array_equal(b[whole:], views[0][whole:]):
        lo = (count - 1) * chunk_size  # the last chunk, changed in its tail only
        out[count - 1] = encode_patch(b[lo:], views[0][lo:], itemsize)
    return out


def _changes(old: np.ndarray, pieces: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The positions (ascending) where ``old`` differs from the concatenation of ``pieces``, the XOR
    of the two there, and the changed flags (a reused scratch): one comparison pass, each piece
    where it lies."""
    mask = _scratch("mask", len(old), np.bool_)  # the changed flags, no XOR of every element:
    offset = 0  # ... memory-bound, 40% fewer bytes moved
    for piece in pieces:
        np.not_equal(old[offset : offset + len(piece)], piece, out=mask[offset : offset + len(piece)])
        offset += len(piece)
    where = np.flatnonzero(mask)  # nonzero of a bool array: 3x faster than of the integers
    values = old[where]
    offset = 0
    for piece in pieces:
        first, last = np.searchsorted(where, (offset, offset + len(piece)))
        values[first:last] ^= piece[where[first:last] - offset]
        offset += len(piece)
    return where, values, mask


def _joined(views: list[np.ndarray], size: int) -> np.ndarray:
    """The concatenation of ``views`` in a reused scratch buffer (pieces that split elements)."""
    out = _scratch("joined", size, np.uint8)
    gather(views, out)
    return out


def _known_patch(
    where: np.ndarray, values: np.ndarray, chunk_len: int, itemsize: int, mask: np.ndarray
) -> bytes | None:
    """``encode_patch`` of a chunk of whole elements whose changes are known: the positions ``where``
    (ascending), the XOR ``values`` and the changed flags ``mask``; its sample is tried first, as
    ``encode_patch`` tries it, unless it holds too few changes to make a patch of the sample's size
    (then it cannot say "dense")."""
    span = sample_span(chunk_len, itemsize)
    if span is not None:
        first, last = span[0] // itemsize, span[1] // itemsize
        a, z = np.searchsorted(where, (first, last))
        if HEADER_SIZE + (z - a) * (itemsize + max(GAP_WIDTHS)) >= _SAMPLE_BYTES:  # else it cannot say "dense"
            sample = _compose(where[a:z] - first, values[a:z], b"", _SAMPLE_BYTES, itemsize, mask=mask[first:last])
            if sample is not None and len(sample) >= _SAMPLE_BYTES:
                return None
    return _compose(where, values, b"", chunk_len, itemsize, max_ratio=1.0, mask=mask)


_SCRATCH = threading.local()  # reused diff buffers: fresh pages for every region cost more than the diff


def _scratch(name: str, count: int, dtype: Any) -> np.ndarray:
    """A reused array of ``count`` elements of ``dtype`` for this thread (contents undefined)."""
    held: np.ndarray | None = getattr(_SCRATCH, name, None)
    if held is None or held.dtype != dtype or len(held) < count:
        held = np.empty(count, dtype=dtype)
        setattr(_SCRATCH, name, held)
    return held[:count]


_SMALL_COUNT = 32  # changes in a chunk up to which ``encode_patches`` builds its patch in plain Python


def _small_patch(where: list[int], values: list[int], chunk_len: int, itemsize: int) -> bytes | None:
    """What ``_build`` makes of a chunk with these few changes (gaps only: the bitmap, at least
    8x larger, is not tried), without numpy."""
    gaps = [where[0], *(b - a - 1 for a, b in zip(where, where[1:], strict=False))]
    width = _gap_width(max(gaps))
    val_section, val_z = _maybe_compress(_int_planes(values, itemsize), True)
    room = chunk_len - HEADER_SIZE - len(val_section)
    if room <= 0:
        return None
    pos_section, pos_z = _maybe_compress(_int_planes(gaps, width), True)
    if len(pos_section) >= room:
        return None
    return _framed(GAPS, itemsize, width, chunk_len, len(values), (pos_section, pos_z), (val_section, val_z))


_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


def _int_unplanes(raw: Buffer, count: int, width: int) -> list[int]:
    """The inverse of ``_int_planes``: ``count`` unsigned integers of ``width`` bytes."""
    data = bytes(raw[: count * width])
    if width > 1:
        data = bytes(b for k in range(count) for b in data[k::count])  # planes -> little-endian integers
    return list(struct.unpack(f"<{count}{_CODES[width]}", data))


def _int_planes(values: list[int], width: int) -> bytes:
    """``_planes`` of unsigned integers of ``width`` bytes given as Python ints."""
    raw = struct.pack(f"<{len(values)}{_CODES[width]}", *values)
    return raw if width == 1 else b"".join(raw[j::width] for j in range(width))


def estimate_patch_size(base: Buffer, new: Buffer, itemsize: int) -> int:
    """About how many bytes ``encode_patch(base, new, itemsize)`` would take: exact for a chunk
    under 1 MiB, else scaled from a 128 KiB sample of its middle (the chunk's length when no
    patch would pay). Lets a planner see that a push must be a keyframe before diffing it all."""
    b, nw = _byte_view(base, "base"), _byte_view(new, "new")
    span = sample_span(len(b), itemsize)
    if len(b) != len(nw) or span is None:
        patch = _build(b, nw, itemsize, max_ratio=1.0) if len(b) == len(nw) else None
        return len(b) if patch is None else len(patch)
    return estimate_from_sample(b[span[0] : span[1]], nw[span[0] : span[1]], len(b), itemsize)


def sample_span(length: int, itemsize: int) -> tuple[int, int] | None:
    """The bytes ``[start, end)`` of a chunk of ``length`` bytes that stand for it in an estimate
    (128 KiB from its middle, element-aligned); None for a chunk under 1 MiB (estimated whole)."""
    if length < SAMPLE_FROM:
        return None
    start = (length - _SAMPLE_BYTES) // 2 // itemsize * itemsize
    return start, start + _SAMPLE_BYTES


def estimate_from_sample(base_sample: Buffer, new_sample: Buffer, length: int, itemsize: int) -> int:
    """``estimate_patch_size`` of a chunk of ``length`` bytes from its two samples alone (``sample_span``,
    or a shorter span of it: the estimate scales by the samples' length): a planner that kept only the
    previous version's samples still sees a push that must be a keyframe."""
    sample = _build(base_sample, new_sample, itemsize, max_ratio=1.0)
    size = len(_byte_view(new_sample, "new"))
    return length if sample is None or not size else min(length, len(sample) * length // size)


def _sample_says_dense(base: Buffer, new: Buffer, itemsize: int, max_ratio: float) -> bool:
    """Whether a patch of a sample from the middle of a large chunk is already not smaller
    than ``max_ratio`` of that sample: then the whole chunk is stored dense without
    diffing and compressing all of it (an fp32 step that moves every element costs the
    full patch attempt otherwise: ~0.4 s per 85 MB here, for nothing). Only ever says
    "dense": a chunk the sample finds sparse is still decided by the full patch."""
    b, nw = _byte_view(base, "base"), _byte_view(new, "new")
    span = sample_span(len(b), itemsize)
    if len(b) != len(nw) or span is None:
        return False  # small chunks (and the length error) go straight to ``_build``
    start, end = span
    sample = _build(b[start:end], nw[start:end], itemsize)
    return sample is not None and len(sample) >= max_ratio * _SAMPLE_BYTES


def _build(
    base: Buffer,
    new: Buffer,
    itemsize: int,
    *,
    max_ratio: float | None = None,
    encoding: int | None = None,
    compress: bool = True,
) -> bytes | None:
    """The smallest patch, or None as soon as it is known not to be smaller than
    ``max_ratio`` of the chunk (no limit when None).

    ``encoding`` forces the positions encoding and ``compress=False`` stores both
    sections raw: the tests reach every form of the format through them.
    """
    if encoding is not None and encoding not in ENCODINGS:
        raise PatchError(f"unknown positions encoding {encoding!r}")
    _check_itemsize(itemsize)
    b, nw = _byte_view(base, "base"), _byte_view(new, "new")
    if len(b) != len(nw):
        raise PatchError(f"base and new differ in length ({len(b)} and {len(nw)} bytes)")
    if len(b) > MAX_CHUNK_SIZE:
        raise PatchError(f"chunk of {len(b)} bytes is larger than MAX_CHUNK_SIZE ({MAX_CHUNK_SIZE})")
    whole = len(b) // itemsize * itemsize
    diff = b[:whole].view(_UINT[itemsize]) ^ nw[:whole].view(_UINT[itemsize])
    mask = diff != 0
    where = np.flatnonzero(mask)
    changed = diff[where]  # a gather by index: 3x faster than diff[mask] at high density
    tail = (b[whole:] ^ nw[whole:]).tobytes()
    return _compose(where, changed, tail, len(b), itemsize, max_ratio=max_ratio, encoding=encoding, compress=compress,
                    mask=mask)  # fmt: skip


def _compose(
    where: np.ndarray,
    changed: np.ndarray,
    tail: bytes,
    chunk_len: int,
    itemsize: int,
    *,
    max_ratio: float | None = None,
    encoding: int | None = None,
    compress: bool = True,
    mask: np.ndarray | None = None,
) -> bytes | None:
    """The patch of a chunk of ``chunk_len`` bytes from its changes: positions ``where``, XOR values
    ``changed``, the XOR of its ``tail`` (and ``mask``, the changed flags, when the caller has them);
    None when it would not be smaller than ``max_ratio`` of the chunk (see ``_build``)."""
    limit = float("inf") if max_ratio is None else max_ratio * chunk_len
    if HEADER_SIZE >= limit:
        return None
    val_section, val_z = _maybe_compress(_planes(changed) + tail, compress)
    room = limit - HEADER_SIZE - len(val_section)
    if room <= 0:
        return None
    pos_section, pos_z, kind, width = _positions(where, chunk_len // itemsize, encoding, compress, mask)
    if len(pos_section) >= room:
        return None
    return _framed(kind, itemsize, width, chunk_len, len(changed), (pos_section, pos_z), (val_section, val_z))


def _positions(
    where: np.ndarray, elements: int, encoding: int | None, compress: bool, mask: np.ndarray | None = None
) -> tuple[bytes, bool, int, int]:
    """The positions section ``(stored, compressed, encoding, gap width)``.

    ``where`` are the indices of the changed elements among ``elements``; ``mask`` flags them
    (built from ``where`` when the bitmap is chosen and the caller has none).

    Unforced, the density decides: gaps below ``BITMAP_FROM`` of the elements changed, the
    bitmap from there on. Compressed, the two are within 3% of each other from 10% to 25%
    (measured on bf16 AdamW steps and random masks: gaps 3% smaller at 13%, equal at ~17.5%,
    the bitmap 2% smaller at 25%, 54% at 70%), so one zstd pass replaces two.
    """
    if encoding is None:
        encoding = GAPS if len(where) < BITMAP_FROM * elements else BITMAP
    if encoding == GAPS:
        gaps = np.empty_like(where)  # the unchanged elements before each change (np.diff's prepend costs more)
        if len(where):
            gaps[0] = where[0]
            np.subtract(where[1:], where[:-1] + 1, out=gaps[1:])
        width = _gap_width(int(gaps.max()) if len(where) else 0)
        return (*_maybe_compress(_planes(gaps.astype(_UINT[width])), compress), GAPS, width)
    if mask is None:
        mask = np.zeros(elements, dtype=np.bool_)
        mask[where] = True
    return (*_maybe_compress(np.packbits(mask, bitorder="little").tobytes(), compress), BITMAP, 0)


def _gap_width(largest: int) -> int:
    """The narrowest of 1, 2, 4 bytes that holds ``largest``."""
    return next(w for w in GAP_WIDTHS if largest < 1 << (8 * w))


def _planes(values: np.ndarray) -> bytes:
    """The bytes of ``values`` as byte planes: every element's byte 0, then byte 1, ..."""
    if values.itemsize == 1:
        return values.tobytes()
    columns = values.view(np.uint8).reshape(-1, values.itemsize)
    planes = np.empty((values.itemsize, len(values)), dtype=np.uint8)
    for j in range(values.itemsize):  # column by column: 10x faster than a transposed copy
        planes[j] = columns[:, j]
    return planes.tobytes()


def _unplanes(raw: Buffer, count: int, itemsize: int) -> np.ndarray:
    """The inverse of ``_planes``: ``count`` unsigned elements of ``itemsize`` bytes."""
    planes = np.frombuffer(raw, dtype=np.uint8, count=count * itemsize)
    if itemsize == 1:
        return planes
    planes = planes.reshape(itemsize, count)
    if itemsize <= 4:  # the most significant plane, the others shifted in: 2x faster for 2 bytes
        out = planes[itemsize - 1].astype(_UINT[itemsize])
        for j in range(itemsize - 2, -1, -1):
            out <<= 8
            out |= planes[j]
        return out
    columns = np.empty((count, itemsize), dtype=np.uint8)  # 8 bytes: interleaved column by column
    for j in range(itemsize):
        columns[:, j] = planes[j]
    return columns.view(_UINT[itemsize]).reshape(count)


_MIN_COMPRESS = 32  # shorter sections are stored raw: a zstd frame alone takes 10+ bytes
_LOCAL = threading.local()  # one compressor per thread: building one costs more than a small patch


def _compressor() -> zstandard.ZstdCompressor:
    found: zstandard.ZstdCompressor | None = getattr(_LOCAL, "compressor", None)
    if found is None:
        found = _LOCAL.compressor = zstandard.ZstdCompressor(compression_params=ZSTD_PARAMETERS)
    return found


def _decompressor() -> zstandard.ZstdDecompressor:
    found: zstandard.ZstdDecompressor | None = getattr(_LOCAL, "decompressor", None)
    if found is None:  # one per thread, as the compressor: a fresh one costs ~11 us a section (~5 ms a version)
        found = _LOCAL.decompressor = zstandard.ZstdDecompressor()
    return found


def _maybe_compress(raw: bytes, compress: bool) -> tuple[bytes, bool]:
    """``raw`` zstd-compressed when that is smaller, and whether it is."""
    if compress and len(raw) >= _MIN_COMPRESS:
        packed = _compressor().compress(raw)
        if len(packed) < len(raw):
            return packed, True
    return raw, False


def _framed(kind: int, itemsize: int, width: int, chunk_len: int, count: int,
            positions: tuple[bytes, bool], values: tuple[bytes, bool]) -> bytes:  # fmt: skip
    """A patch: the signed header, its digest, then the sections (each with whether it is zstd)."""
    (pos_section, pos_z), (val_section, val_z) = positions, values
    flags = (_POS_ZSTD if pos_z else 0) | (_VAL_ZSTD if val_z else 0)
    head = _HEADER.pack(
        MAGIC, FORMAT_VERSION, kind, itemsize, flags, width, chunk_len, count, len(pos_section), len(val_section), 0,
    )[:_SIGNED]  # fmt: skip
    digest = struct.pack("<Q", _digest(head, pos_section, val_section))
    return b"".join((head, digest, pos_section, val_section))


def _digest(head: bytes | memoryview, *sections: bytes | memoryview) -> int:
    """The patch's own check: xxh3-64 of its signed header and its sections."""
    return fed(xxhash.xxh3_64(head), sections).intdigest()


# ---------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Header:
    kind: int
    itemsize: int
    flags: int
    width: int
    chunk_len: int
    count: int
    pos_len: int
    val_len: int
    digest: int

    @property
    def elements(self) -> int:
        return self.chunk_len // self.itemsize

    @property
    def pos_raw(self) -> int:
        return self.count * self.width if self.kind == GAPS else (self.elements + 7) // 8

    @property
    def val_raw(self) -> int:
        return self.count * self.itemsize + self.chunk_len % self.itemsize


def _parse_header(patch: memoryview) -> _Header:
    """The header of ``patch``, every field checked against the others and the patch length."""
    if len(patch) < HEADER_SIZE:
        raise PatchError(f"patch of {len(patch)} bytes is shorter than its {HEADER_SIZE}-byte header")
    magic, version, kind, itemsize, flags, width, chunk_len, count, pos_len, val_len, digest = _HEADER.unpack_from(
        patch
    )
    if magic != MAGIC:
        raise PatchError(f"not a patch: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise PatchError(f"patch format version {version} is not supported (this library reads {FORMAT_VERSION})")
    if kind not in ENCODINGS:
        raise PatchError(f"unknown positions encoding {kind}")
    if itemsize not in ITEMSIZES:
        raise PatchError(f"patch itemsize {itemsize} is not one of {ITEMSIZES}")
    if flags & ~(_POS_ZSTD | _VAL_ZSTD):
        raise PatchError(f"patch has unknown flags 0x{flags:02x}")
    if bytes(patch[9:12]) != b"\0\0\0":
        raise PatchError("patch header's reserved bytes are not zero")
    if (kind == GAPS) != (width in GAP_WIDTHS) or (kind == BITMAP and width != 0):
        raise PatchError(f"gap width {width} does not fit the {ENCODINGS[kind]} encoding")
    if chunk_len > MAX_CHUNK_SIZE:
        raise PatchError(f"patch for a chunk of {chunk_len} bytes: larger than MAX_CHUNK_SIZE ({MAX_CHUNK_SIZE})")
    head = _Header(kind, itemsize, flags, width, chunk_len, count, pos_len, val_len, digest)
    if count > head.elements:
        raise PatchError(f"patch changes {count} elements of a chunk that has {head.elements}")
    for name, stored, raw, bit in (
        ("positions", pos_len, head.pos_raw, _POS_ZSTD),
        ("values", val_len, head.val_raw, _VAL_ZSTD),
    ):
        if flags & bit and not 0 < stored < raw:
            raise PatchError(f"compressed {name} section of {stored} bytes for {raw} bytes of content")
        if not flags & bit and stored != raw:
            raise PatchError(f"{name} section of {stored} bytes, expected {raw}")
    if HEADER_SIZE + pos_len + val_len != len(patch):
        raise PatchError(
            f"patch of {len(patch)} bytes, its header announces {HEADER_SIZE + pos_len + val_len} (truncated or padded)"
        )
    return head


def patch_info(patch: Buffer) -> PatchInfo:
    """What ``patch`` holds, from its header (checked, not decompressed)."""
    view = _flat(patch, "patch")
    head = _parse_header(view)
    return PatchInfo(
        encoding=ENCODINGS[head.kind],
        itemsize=head.itemsize,
        chunk_len=head.chunk_len,
        changed=head.count,
        elements=head.elements,
        size=len(view),
        positions_bytes=head.pos_len,
        values_bytes=head.val_len,
        positions_compressed=bool(head.flags & _POS_ZSTD),
        values_compressed=bool(head.flags & _VAL_ZSTD),
    )


def apply_patch(base: Buffer, patch: Buffer, out: Any) -> None:
    """Write into ``out`` the chunk that ``patch`` makes of ``base``.

    ``out`` is a writable buffer of the chunk's length; it may be ``base`` itself (in
    place). The whole patch is checked before the first byte of ``out`` is written: on
    a PatchError ``out`` (and so an in-place ``base``) is untouched.
    """
    view = _flat(patch, "patch")
    head = _parse_header(view)
    b = _byte_view(base, "base")
    o = _byte_view(out, "out", writable=True)
    if len(b) != head.chunk_len or len(o) != head.chunk_len:
        raise PatchError(
            f"patch is for a chunk of {head.chunk_len} bytes, got base of {len(b)} and out of {len(o)} bytes"
        )
    pos_stored = view[HEADER_SIZE : HEADER_SIZE + head.pos_len]
    val_stored = view[HEADER_SIZE + head.pos_len :]
    if _digest(view[:_SIGNED], pos_stored, val_stored) != head.digest:
        raise PatchError("patch checksum mismatch: the patch is corrupted")
    pos_raw = _section(pos_stored, head.pos_raw, bool(head.flags & _POS_ZSTD), "positions")
    val_raw = _section(val_stored, head.val_raw, bool(head.flags & _VAL_ZSTD), "values")
    n, itemsize = head.elements, head.itemsize
    where: Any
    values: Any
    if head.kind == GAPS and head.count <= _SMALL_COUNT:  # a few changes: decoded without numpy
        where = list(itertools.accumulate(g + 1 for g in _int_unplanes(pos_raw, head.count, head.width)))
        where = [w - 1 for w in where]
        values = np.array(_int_unplanes(val_raw, head.count, itemsize), dtype=_UINT[itemsize])
        if head.count and where[-1] >= n:
            raise PatchError(f"patch position {where[-1]} is beyond the chunk's {n} elements")
    elif head.kind == GAPS:
        gaps = _unplanes(pos_raw, head.count, head.width)
        where = gaps.astype(np.int64)  # position k = gaps[0] + ... + gaps[k] + k: in place, no temporaries
        where += 1
        np.cumsum(where, out=where)
        where -= 1
        if head.count and where[-1] >= n:
            raise PatchError(f"patch position {int(where[-1])} is beyond the chunk's {n} elements")
    else:
        bits = np.unpackbits(np.frombuffer(pos_raw, dtype=np.uint8), bitorder="little")
        if bits[n:].any():
            raise PatchError(f"patch bitmap marks positions beyond the chunk's {n} elements")
        where = np.flatnonzero(bits[:n].view(np.bool_))  # a bool view: nonzero on uint8 is 5x slower
        if len(where) != head.count:
            raise PatchError(f"patch bitmap marks {len(where)} elements, its header says {head.count}")
    if head.kind != GAPS or head.count > _SMALL_COUNT:
        values = _unplanes(val_raw, head.count, itemsize)
    whole = n * itemsize
    tail = np.frombuffer(val_raw, dtype=np.uint8)[head.count * itemsize :]
    # Everything is checked: from here on, only writes.
    if base is not out and not _same_memory(b, o):
        np.copyto(o, b)
    elems = o[:whole].view(_UINT[itemsize])
    elems[where] ^= values
    o[whole:] ^= tail


def _section(stored: memoryview, raw_len: int, compressed: bool, name: str) -> Buffer:
    """The content of one section: ``stored`` itself, or its one zstd frame of ``raw_len`` bytes."""
    if not compressed:
        return stored
    try:
        declared = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as exc:
        raise PatchError(f"patch {name} section is not a zstd frame: {exc}") from None
    if declared != raw_len:
        raise PatchError(f"patch {name} section declares {declared} bytes of content, expected {raw_len}")
    try:
        raw = _decompressor().decompress(stored, max_output_size=raw_len, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise PatchError(f"patch {name} section does not decompress: {exc}") from None
    if len(raw) != raw_len:
        raise PatchError(f"patch {name} section decompressed to {len(raw)} bytes, expected {raw_len}")
    return raw


# ---------------------------------------------------------------------------------------
# Buffers
# ---------------------------------------------------------------------------------------
def _flat(buf: Any, name: str) -> memoryview:
    """A flat memoryview of the bytes of a buffer (no copy)."""
    try:
        mv = memoryview(buf)
    except TypeError:
        raise PatchError(f"{name} must be a bytes-like buffer, got {type(buf).__name__}") from None
    if not mv.c_contiguous:
        raise PatchError(f"{name} must be a contiguous buffer")
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def _byte_view(buf: Any, name: str, *, writable: bool = False) -> np.ndarray:
    """A flat uint8 numpy view of a buffer (no copy)."""
    mv = _flat(buf, name)
    if writable and mv.readonly:
        raise PatchError(f"{name} must be a writable buffer (bytearray, memoryview of one, numpy array)")
    return np.frombuffer(mv, dtype=np.uint8)


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    """True when ``a`` and ``b`` are the same bytes; a partial overlap is refused."""
    if a.ctypes.data == b.ctypes.data and a.nbytes == b.nbytes:
        return True
    if np.may_share_memory(a, b):
        raise PatchError("out overlaps base without being base: apply in place (out=base) or into separate memory")
    return False


def _check_itemsize(itemsize: int) -> None:
    if itemsize not in ITEMSIZES:
        raise PatchError(f"itemsize must be one of {ITEMSIZES}, got {itemsize!r}")
