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

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NamedTuple, Union

import xxhash

from .errors import CodecError, IntegrityError

if TYPE_CHECKING:
    import torch

Buffer = Union[bytes, bytearray, memoryview]  # noqa: UP007 (a runtime alias on Python 3.10)

MANIFEST_FORMAT = "redis_weights/3"  # the stored form: manifest_format.py
CHECKSUM_ALGO = "xxh3_128"  # chunk ids: ~27 GB/s here (blake3: 1.7 GB/s, 4.3 threaded)
DEFAULT_CHUNK_SIZE = 2 * 1024 * 1024  # a GET of one holds Redis ~0.2 ms (8 MiB: ~4.5 ms on Redis 7); docs/benchmarks.md
MAX_CHUNK_SIZE = 256 * 1024 * 1024  # Redis refuses bulk values > 512 MiB; big ones stall it
MIN_CHUNK_SIZE = 4096
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors limit
MAX_MANIFEST_BYTES = 32 * 1024 * 1024  # refused before download (STRLEN) and before parsing
MAX_CHAIN = 64  # patches per chunk since its stored base (keyframe_interval is capped below it)
MAX_TENSOR_BYTES = 2**62  # shapes beyond this overflow torch's size arithmetic
MAX_DIMS = 64
HEADER_ALIGN = 8

# safetensors dtype code -> (torch attribute, bytes per element); torch >= 2.3 has them all.
_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "C64": ("complex64", 8),
}
DTYPE_ATTRS: dict[str, str] = {code: attr for code, (attr, _) in _DTYPES.items()}
DTYPE_SIZES: dict[str, int] = {code: size for code, (_, size) in _DTYPES.items()}


def checksum(data: Buffer) -> str:
    """The id of a chunk (or patch): xxh3-128 of its bytes, 32 hex digits."""
    return xxhash.xxh3_128_hexdigest(data)


def checksum_parts(parts: Sequence[Buffer]) -> str:
    """``checksum`` of the concatenation of ``parts``, without concatenating them."""
    if len(parts) == 1:
        return checksum(parts[0])
    state = xxhash.xxh3_128()
    for part in parts:
        state.update(part)
    return state.hexdigest()


# ---------------------------------------------------------------------------------------
# Layout: the safetensors header of a set of tensors
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a version: dtype code, shape and [begin, end) offsets in the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch  # only code that builds tensors needs torch; the CLI does not

        dtype: torch.dtype = getattr(torch, DTYPE_ATTRS[self.dtype])
        return dtype

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "data_offsets": [self.begin, self.end]}


def header_bytes(entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors prefix: u64 length + JSON header padded with spaces to a multiple of 8."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for e in entries:
        header[e.name] = e.to_json()
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % HEADER_ALIGN)
    return struct.pack("<Q", len(raw)) + raw


def parse_header(header: Any, data_size: int) -> list[TensorEntry]:
    """Validate a safetensors header dict against ``data_size``; entries ordered by offset.

    Refuses unknown dtypes, negative or non-integer shapes, offsets outside the data,
    sizes that disagree with the shape (computed without overflow), gaps and overlaps.
    """
    if not isinstance(header, dict):
        raise CodecError("safetensors header is not a JSON object")
    entries = []
    for name, spec in header.items():
        if name == "__metadata__":
            if not isinstance(spec, dict) or not all(isinstance(v, str) for v in spec.values()):
                raise CodecError("__metadata__ must map strings to strings")
            continue
        if not isinstance(spec, dict):
            raise CodecError(f"tensor {name!r}: entry is not an object")
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise CodecError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) and d >= 0 for d in shape):
            raise CodecError(f"tensor {name!r}: bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise CodecError(f"tensor {name!r}: data_offsets {offsets!r} outside 0..{data_size}")
        if math.prod(shape) * DTYPE_SIZES[dtype] != offsets[1] - offsets[0]:
            raise CodecError(f"tensor {name!r}: shape {shape} of {dtype} does not fill {offsets}")
        if math.prod(d for d in shape if d) * DTYPE_SIZES[dtype] > MAX_TENSOR_BYTES:
            # an empty tensor may still have a dimension no allocator can represent
            raise CodecError(f"tensor {name!r}: shape {shape!r} is too large to allocate")
        entries.append(TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1]))
    entries.sort(key=lambda e: (e.begin, e.end))
    position = 0
    for e in entries:
        if e.begin != position:
            raise CodecError(f"tensor {e.name!r}: data_offsets leave a gap or overlap at byte {position}")
        position = e.end
    if position != data_size:
        raise CodecError(f"header describes {position} bytes of data, the stream has {data_size}")
    return entries


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def load_json(raw: bytes | str, what: str) -> Any:
    """``json.loads`` whose every failure is a ``CodecError`` naming ``what``.

    Besides malformed JSON that covers bytes that are not UTF-8, integers too long
    to convert (``ValueError``) and nesting too deep to parse (``RecursionError``).
    """
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CodecError(f"{what} is not JSON: {str(exc)[:200]}") from exc


def parse_header_bytes(prefix: Buffer, total_size: int) -> tuple[int, list[TensorEntry]]:
    """Parse the start of a safetensors stream of ``total_size`` bytes: (data start, entries)."""
    if len(prefix) < 8:
        raise CodecError("stream shorter than the 8-byte header length")
    (length,) = struct.unpack_from("<Q", prefix, 0)
    if length > MAX_HEADER_BYTES or 8 + length > total_size:
        raise CodecError(f"header length {length} is out of range for a {total_size}-byte stream")
    if len(prefix) < 8 + length:
        raise CodecError("the header is longer than the bytes given")
    header = load_json(bytes(prefix[8 : 8 + length]), "safetensors header")
    return 8 + length, parse_header(header, total_size - 8 - length)


# Manifest
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Step:
    """One patch of a format-2 chain: the stored patch ``patch`` (``size`` bytes) yields chunk ``id``."""

    patch: str
    size: int
    id: str


@dataclass(frozen=True, slots=True)
class Pack:
    """One stored pack of patches (``packs.py``) that ``version`` added to the chain."""

    version: int
    id: str
    size: int


class ChunkEntry(NamedTuple):
    """How to obtain one chunk: stored as ``id`` (``base`` None); or the stored ``base``
    patched by the records of the manifest's packs that lead to ``id``; or (format 2 only)
    ``base`` patched by its own ``steps``. (A named tuple: a big model's manifest holds
    70,000 of them, built on every push and every read.)"""

    id: str
    base: str | None = None
    steps: tuple[Step, ...] = ()

    @property
    def objects(self) -> list[str]:
        """The stored objects of this entry itself (what GC must keep, what a push checks;
        the packs are the manifest's)."""
        return [self.base, *(s.patch for s in self.steps)] if self.base is not None else [self.id]

    @property
    def chain(self) -> list[str]:
        """Ids along a format-2 chain, base first, ``id`` last (``[id]`` for a stored chunk;
        ``[base, id]`` for a chain in packs, whose middle only the packs know)."""
        if self.base is None:
            return [self.id]
        return [self.base, *(s.id for s in self.steps)] if self.steps else [self.base, self.id]


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
        from .manifest_format import encode  # noqa: PLC0415 (the format module imports this one)

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
        from .manifest_format import decode  # noqa: PLC0415

        return decode(raw, version)

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


def pack_limit(chunk_size: int) -> int:
    """The most bytes one pack holds (``packs.py``): a default chunk's worth, or one chunk of a
    model with bigger ones (a single record always fits: a patch is shorter than its chunk)."""
    return max(chunk_size, DEFAULT_CHUNK_SIZE) + PACK_HEAD_SIZE + PACK_RECORD_SIZE


PACK_HEAD_SIZE = 8
PACK_RECORD_SIZE = 40


def chunk_sizes(total: int, chunk_size: int) -> list[int]:
    """Sizes of the fixed-size chunks of a ``total``-byte stream (the last one may be shorter)."""
    count = -(-total // chunk_size)
    return [chunk_size] * (count - 1) + [total - chunk_size * (count - 1)] if count else []
