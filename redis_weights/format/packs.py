"""Packs: the patches of one version, bundled into a few objects instead of one object per chunk.

A delta version changes many chunks by a little (a sparse step touches every 2 MiB
chunk of a big model), so one stored object per patch would cost one SET per changed
chunk on the trainer and one GET per changed chunk on every worker, and a manifest
that lists every patch of every chunk's chain. A pack holds the patches of many
chunks of one version, each as a *record*: the chunk's index, the id it patches
(``source``), the id it yields (``target``) and the patch (``patch.py``). Packs are
content-addressed objects like chunks (``c:{<xxh3-128 of the pack>}``), filled up to
``pack_limit(chunk_size)`` bytes, and the manifest lists the packs of its chain, so
its size does not grow with chain depth x chunk count (see ``manifest.py``).

Binary format (little-endian)::

    offset      size     field
    0           4        magic b"RWPK"
    4           4        record count R (at least 1)
    8           40 * R   records: u32 chunk index, 16 B source id, 16 B target id, u32 patch length
    8 + 40 R    ...      the patches, in record order, nothing after them

A parser checks every length against the pack's size and the manifest's chunks
before it slices anything: indices strictly increasing and inside the version,
each patch shorter than its chunk, the lengths adding up to the rest of the pack.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import CodecError
from .header import Buffer
from .manifest_format import PACK_HEAD_SIZE, PACK_RECORD_SIZE, pack_limit

__all__ = ["MAGIC", "Record", "build_packs", "pack_limit", "parse_pack"]

MAGIC = b"RWPK"
_HEAD = struct.Struct("<4sI")
_RECORD = struct.Struct("<I16s16sI")
RECORD_SIZE = _RECORD.size
assert _HEAD.size == PACK_HEAD_SIZE and RECORD_SIZE == PACK_RECORD_SIZE


@dataclass(frozen=True, slots=True)
class Record:
    """One patch of a pack: chunk ``index`` goes from id ``source`` to ``target`` with the
    ``length`` bytes at ``offset`` of the pack."""

    index: int
    source: str
    target: str
    offset: int
    length: int


def build_packs(records: Iterable[tuple[int, str, str, bytes]], limit: int) -> list[bytes]:
    """Packs of ``(index, source id, target id, patch)`` records (ascending indices), each at most
    ``limit`` bytes."""
    packs: list[bytes] = []
    heads: list[bytes] = []
    bodies: list[bytes] = []
    size = _HEAD.size

    def close() -> None:
        packs.append(b"".join([_HEAD.pack(MAGIC, len(heads)), *heads, *bodies]))

    for index, source, target, patch in records:
        if heads and size + RECORD_SIZE + len(patch) > limit:
            close()
            heads, bodies, size = [], [], _HEAD.size
        heads.append(_RECORD.pack(index, bytes.fromhex(source), bytes.fromhex(target), len(patch)))
        bodies.append(patch)
        size += RECORD_SIZE + len(patch)
    if heads:
        close()
    return packs


def parse_pack(data: Buffer, sizes: Sequence[int], where: str) -> list[Record]:
    """The records of a pack, checked against the chunk ``sizes`` of the version it serves;
    ``CodecError`` (naming ``where``) for anything malformed."""
    view = memoryview(data).cast("B")
    if len(view) < _HEAD.size:
        raise CodecError(f"{where}: {len(view)} bytes, shorter than a pack header")
    magic, count = _HEAD.unpack_from(view, 0)
    if magic != MAGIC or count < 1 or _HEAD.size + count * RECORD_SIZE > len(view):
        raise CodecError(f"{where}: not a pack (magic {bytes(magic)!r}, {count} records in {len(view)} bytes)")
    offset = _HEAD.size + count * RECORD_SIZE
    records: list[Record] = []
    previous = -1
    for index, source, target, length in _RECORD.iter_unpack(view[_HEAD.size : offset]):
        if not previous < index < len(sizes) or not 0 < length < sizes[index] or offset + length > len(view):
            raise CodecError(f"{where}: bad record (chunk {index} after {previous}, {length} bytes at {offset})")
        records.append(Record(index, source.hex(), target.hex(), offset, length))
        previous = index
        offset += length
    if offset != len(view):
        raise CodecError(f"{where}: {len(view) - offset} bytes after the last patch")
    return records
