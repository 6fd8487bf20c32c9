"""The format of one version, without torch: safetensors header, manifest, checksums.

A version is a ``.safetensors`` stream (an 8-byte little-endian header length, the
JSON header padded with spaces to a multiple of 8, then the tensor data) cut into
fixed-size chunks (chunk i is bytes ``[i*chunk_size, (i+1)*chunk_size)``), plus a
manifest that says how to fetch and verify them. Everything here is plain
Python, so operator tools (the CLI, admin scripts) read and check versions without
paying for a torch import; ``codec`` adds the tensors.

Chunks are content-addressed: a chunk's id is the xxh3-128 digest of its bytes
(32 hex digits), and Redis stores it under that id, once for every version that
holds those bytes. A manifest entry says how to obtain chunk i:

* stored (``ChunkEntry(F)``): the chunk itself is stored (key ``c:{F}``);
* chained (``ChunkEntry(F, base=B)``): the stored chunk ``B``, patched by the
  records for chunk i in the manifest's packs (``packs.py``: each version of a
  delta chain adds a few packs holding the patches of the chunks it changed), gives
  ``F``. A worker that holds an id along the way starts from there, so a worker one
  version behind reads only the newest version's packs; every result is checked
  against ``F``.

The manifest lists the packs of its whole chain (a few per version), not the
patches of each chunk, so its size grows with the chunk count only, not with chain
depth x chunk count; and it names every object the version needs (``objects()``:
GC and the pending record of a push need nothing else). The stored form and what
reads the previous formats: ``manifest_format.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..errors import CodecError, IntegrityError
from .header import (
    CHECKSUM_ALGO,
    DEFAULT_CHUNK_SIZE,
    DTYPE_ATTRS,
    DTYPE_SIZES,
    HEADER_ALIGN,
    MAX_CHUNK_SIZE,
    MAX_DIMS,
    MAX_HEADER_BYTES,
    MAX_TENSOR_BYTES,
    MIN_CHUNK_SIZE,
    Buffer,
    TensorEntry,
    _is_int,
    checksum,
    checksum_parts,
    header_bytes,
    load_json,
    parse_header,
    parse_header_bytes,
)
from .manifest_format import (
    FORMAT as MANIFEST_FORMAT,
)
from .manifest_format import (
    MAX_CHAIN,
    MAX_MANIFEST_BYTES,
    PACK_HEAD_SIZE,
    PACK_RECORD_SIZE,
    ChunkEntry,
    Pack,
    Step,
    chunk_sizes,
    decode,
    encode,
    pack_limit,
)

__all__ = [
    "CHECKSUM_ALGO", "DEFAULT_CHUNK_SIZE", "DTYPE_ATTRS", "DTYPE_SIZES", "ENTRY_LIMIT", "HEADER_ALIGN",
    "MANIFEST_FORMAT",
    "MAX_CHAIN", "MAX_CHUNK_SIZE", "MAX_DIMS", "MAX_HEADER_BYTES", "MAX_MANIFEST_BYTES", "MAX_TENSOR_BYTES",
    "MIN_CHUNK_SIZE", "PACK_HEAD_SIZE", "PACK_RECORD_SIZE", "Buffer", "ChunkEntry", "Manifest", "ManifestTooLargeError",
    "Pack", "Step", "TensorEntry", "_is_int", "checksum", "checksum_parts", "chunk_sizes", "header_bytes", "load_json",
    "manifest_limit", "pack_limit", "parse_header", "parse_header_bytes",
]  # fmt: skip


@dataclass
class Manifest:
    """What a reader needs to fetch, verify and place one version (stored in format 3, see the
    module docstring).

    ``keyframe`` is the version whose chunks every chain of this one starts from
    (itself for a keyframe), ``parent`` the version its patches were computed
    against, ``depth`` the versions since the keyframe. ``packs``: every pack of the
    chain, oldest first. ``wire_dtype`` is the dtype the trainer cast its floating
    tensors to (None: no cast); ``cast`` maps each cast tensor to the trainer's dtype.
    ``uploaded_bytes``: what the push really wrote.
    """

    version: int
    header_len: int
    tensors: list[TensorEntry]
    chunk_size: int
    total_bytes: int
    chunks: list[ChunkEntry]
    metadata: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    producer: str = ""
    keyframe: int = 0
    parent: int | None = None
    depth: int = 0
    wire_dtype: str | None = None
    cast: dict[str, str] = field(default_factory=dict)
    uploaded_bytes: int = 0
    checksum_algo: str = CHECKSUM_ALGO
    packs: list[Pack] = field(default_factory=list)

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    @property
    def chunk_sizes(self) -> list[int]:
        """Size of every chunk (computed once: readers ask for it per chunk)."""
        cached: list[int] | None = self.__dict__.get("_chunk_sizes")
        if cached is None or len(cached) != len(self.chunks):
            cached = self.__dict__["_chunk_sizes"] = chunk_sizes(self.total_bytes, self.chunk_size)
        return cached

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.chunks]

    @property
    def is_keyframe(self) -> bool:
        return all(c.base is None for c in self.chunks)

    def objects(self) -> set[str]:
        """Every stored object (chunk, pack, format-2 patch) this version needs."""
        found = {o for c in self.chunks for o in c.objects}
        found.update(p.id for p in self.packs)
        return found

    def stored_bytes(self) -> int:
        """Bytes a reader holding nothing downloads for this version (each object once)."""
        sizes: dict[str, int] = {}
        for entry, size in zip(self.chunks, self.chunk_sizes, strict=True):
            sizes[entry.base or entry.id] = size
            for s in entry.steps:
                sizes[s.patch] = s.size
        sizes.update((p.id, p.size) for p in self.packs)
        return sum(sizes.values())

    def renumbered(self, version: int, *, created: float, producer: str) -> Manifest:
        """The same weights committed again as ``version`` (rollback): nothing is uploaded."""
        return replace(self, version=version, created=created, producer=producer, uploaded_bytes=0)

    def limit(self) -> int:
        """The largest manifest a worker with this version's tensors accepts (``manifest_limit``)."""
        return manifest_limit(8 * sum(math.prod(t.shape) for t in self.tensors), len(self.tensors))

    def to_bytes(self) -> bytes:
        """The stored form (format 3). Raises ``ManifestTooLargeError`` when it is larger than
        what a worker of this model accepts (``limit``): never commit what readers must refuse."""
        raw = encode(self)
        if len(raw) > self.limit():
            raise ManifestTooLargeError(
                f"the manifest of version {self.version} takes {len(raw)} bytes, more than the {self.limit()} "
                f"a worker of this model accepts ({self.num_chunks} chunks of {self.chunk_size} bytes): "
                "use a larger chunk_size"
            )
        return raw

    @classmethod
    def from_bytes(cls, raw: Buffer | str, version: int | None = None) -> Manifest:
        """Parse and validate a stored manifest (format 3, or format 2's JSON); any inconsistency
        raises ``CodecError`` (never a crash).

        ``version``: the key it was stored under; a manifest of another version is
        refused (else a worker would apply one version's weights and ack another).
        Work and memory are bounded by ``MAX_MANIFEST_BYTES``: sizes and counts are
        checked before the per-chunk entries are walked.
        """
        return cls(**decode(raw, version))

    # The names of format 2, when the stored form was JSON (kept for callers written then).
    to_json = to_bytes
    from_json = from_bytes

    def verify_chunk(self, index: int, data: Buffer | None) -> None:
        """Raise ``IntegrityError`` if chunk ``index`` is missing, truncated or not the bytes of its id."""
        if data is None:
            raise IntegrityError(f"version {self.version}: chunk {index} is missing")
        expected = min(self.chunk_size, self.total_bytes - self.chunk_size * index)
        if len(data) != expected:
            raise IntegrityError(f"version {self.version}: chunk {index} has {len(data)} bytes, expected {expected}")
        if checksum(data) != self.chunks[index].id:
            raise IntegrityError(f"version {self.version}: chunk {index} does not match its id (corrupted?)")


class ManifestTooLargeError(CodecError):
    """A manifest larger than what the workers of its model accept (see ``manifest_limit``)."""


# Bytes of a format-3 manifest per chunk at most: the largest entry (a chained chunk: kind, id,
# base: 33) plus the chunk's share of the pack list (a 4 KiB-chunk model's patches fill a pack
# per 512 chunks per version at worst, ~60 JSON bytes each, up to 64 versions: ~8).
ENTRY_LIMIT = 48


def manifest_limit(data_bytes: int, tensors: int) -> int:
    """The largest manifest (bytes) of a policy of ``tensors`` tensors holding ``data_bytes``
    bytes (at 8 bytes per element): a worker refuses a bigger one before downloading it, and the
    trainer refuses to commit one (``Manifest.to_bytes``). It grows with the model: its chunk
    count at ``MIN_CHUNK_SIZE`` times ``ENTRY_LIMIT``, capped at ``MAX_MANIFEST_BYTES``."""
    header = 4096 + tensors * 512  # names, dtypes, shapes, offsets, metadata
    entries = -(-(data_bytes + header) // MIN_CHUNK_SIZE) * ENTRY_LIMIT
    return min(MAX_MANIFEST_BYTES, 65536 + 2 * header + entries)


