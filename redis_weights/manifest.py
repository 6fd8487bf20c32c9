"""The format of one version, without torch: safetensors header, manifest, checksums.

A version is a ``.safetensors`` stream (an 8-byte little-endian header length, the
JSON header padded with spaces to a multiple of 8, then the tensor data) cut into
fixed-size chunks (chunk i is bytes ``[i*chunk_size, (i+1)*chunk_size)``), plus a
JSON manifest that says how to fetch and verify them. Everything here is plain
Python, so operator tools (the CLI, admin scripts) read and check versions without
paying for a torch import; ``codec`` adds the tensors.

Chunks are content-addressed: a chunk's id is the xxh3-128 digest of its bytes
(32 hex digits), and Redis stores it under that id, once for every version that
holds those bytes. A manifest entry says how to obtain chunk i:

* ``{"id": F}``: the chunk itself is stored (key ``c:{F}``);
* ``{"id": F, "base": B, "steps": [[P1, n1, F1], ..., [Pk, nk, F]]}``: the stored
  chunk ``B``, patched by the stored patches ``P1..Pk`` (``nk`` bytes each, see
  ``patch.py``), gives ``F1``, ..., then ``F``. A worker that already holds any
  of ``B, F1, ...`` starts from there; every result is checked against ``F``.

Format ``redis_weights/1`` (per-version chunk keys) is refused with
``LegacyFormatError``, whose message says what to do.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Union

import xxhash

from .errors import CodecError, IntegrityError, LegacyFormatError

if TYPE_CHECKING:
    import torch

Buffer = Union[bytes, bytearray, memoryview]  # noqa: UP007 (a runtime alias on Python 3.10)

MANIFEST_FORMAT = "redis_weights/2"
LEGACY_FORMAT = "redis_weights/1"
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
_ID_RE = re.compile(r"[0-9a-f]{32}")

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


# ---------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One patch of a chunk's chain: the stored patch ``patch`` (``size`` bytes) yields chunk ``id``."""

    patch: str
    size: int
    id: str


@dataclass(frozen=True)
class ChunkEntry:
    """How to obtain one chunk: stored as ``id``, or stored ``base`` patched by ``steps``."""

    id: str
    base: str | None = None
    steps: tuple[Step, ...] = ()

    @property
    def objects(self) -> list[str]:
        """The stored objects this entry needs (what GC must keep, what a push checks)."""
        return [self.base, *(s.patch for s in self.steps)] if self.base is not None else [self.id]

    @property
    def chain(self) -> list[str]:
        """Ids along the chain, base first, ``id`` last (just ``[id]`` for a stored chunk)."""
        return [self.base, *(s.id for s in self.steps)] if self.base is not None else [self.id]

    def to_json(self) -> dict[str, Any]:
        if self.base is None:
            return {"id": self.id}
        return {"id": self.id, "base": self.base, "steps": [[s.patch, s.size, s.id] for s in self.steps]}


@dataclass
class Manifest:
    """What a reader needs to fetch, verify and place one version (stored as JSON).

    ``keyframe`` is the version whose chunks every chain of this one starts from
    (itself for a keyframe), ``parent`` the version its patches were computed
    against, ``depth`` the versions since the keyframe. ``wire_dtype`` is the dtype
    the trainer cast its floating tensors to (None: no cast); ``cast`` maps each cast
    tensor to the trainer's dtype. ``uploaded_bytes``: what the push really wrote.
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

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    @property
    def chunk_sizes(self) -> list[int]:
        return chunk_sizes(self.total_bytes, self.chunk_size)

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.chunks]

    @property
    def is_keyframe(self) -> bool:
        return all(c.base is None for c in self.chunks)

    def objects(self) -> set[str]:
        """Every stored object (chunk or patch) this version needs."""
        return {o for c in self.chunks for o in c.objects}

    def stored_bytes(self) -> int:
        """Bytes a reader holding nothing downloads for this version (each object once)."""
        sizes: dict[str, int] = {}
        for entry, size in zip(self.chunks, self.chunk_sizes, strict=True):
            sizes[entry.base or entry.id] = size
            for s in entry.steps:
                sizes[s.patch] = s.size
        return sum(sizes.values())

    def renumbered(self, version: int, *, created: float, producer: str) -> Manifest:
        """The same weights committed again as ``version`` (rollback): nothing is uploaded."""
        return replace(self, version=version, created=created, producer=producer, uploaded_bytes=0)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "version": self.version,
                "header_len": self.header_len,
                "total_bytes": self.total_bytes,
                "chunk_size": self.chunk_size,
                "checksum_algo": self.checksum_algo,
                "tensors": {e.name: e.to_json() for e in self.tensors},
                "metadata": self.metadata,
                "chunks": [c.to_json() for c in self.chunks],
                "keyframe": self.keyframe,
                "parent": self.parent,
                "depth": self.depth,
                "wire_dtype": self.wire_dtype,
                "cast": self.cast,
                "uploaded_bytes": self.uploaded_bytes,
                "created": self.created,
                "producer": self.producer,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: Buffer | str, version: int | None = None) -> Manifest:
        """Parse and validate; any inconsistency raises ``CodecError`` (never a crash).

        ``version``: the key it was stored under; a manifest of another version is
        refused (else a worker would apply one version's weights and ack another).
        Work and memory are bounded by ``MAX_MANIFEST_BYTES``: sizes and counts are
        checked before the per-chunk entries are walked.
        """
        where = "manifest"  # the caller names the version it read
        if len(raw) > MAX_MANIFEST_BYTES:
            raise CodecError(f"{where}: {len(raw)} bytes, more than the limit of {MAX_MANIFEST_BYTES}")
        doc = load_json(bytes(raw) if not isinstance(raw, str) else raw, where)
        if isinstance(doc, dict) and doc.get("format") == LEGACY_FORMAT:
            raise LegacyFormatError(
                f"{where} is in format {LEGACY_FORMAT!r} (written by redis_weights 0.1), which this release does "
                "not read: push again from the trainer (a new version supersedes it), or export it with "
                "redis_weights 0.1 and `redis-weights import` the file"
            )
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            raise CodecError(f"{where}: format is not {MANIFEST_FORMAT!r}")
        try:
            number, header_len, total = doc["version"], doc["header_len"], doc["total_bytes"]
            size, algo, raw_chunks = doc["chunk_size"], doc["checksum_algo"], doc["chunks"]
            tensors, metadata = doc["tensors"], doc.get("metadata") or {}
        except KeyError as exc:
            raise CodecError(f"{where} lacks field {exc}") from exc
        if not _is_int(number) or number < 1:
            raise CodecError(f"{where}: version {number!r} is not a positive integer")
        if version is not None and number != version:
            raise CodecError(
                f"the manifest stored as version {version} says it is version {number} "
                "(a manifest copied under another version's key?)"
            )
        where = f"manifest of version {number}"
        if algo != CHECKSUM_ALGO:
            raise CodecError(f"{where}: unsupported checksum algorithm {algo!r}")
        if not _is_int(size) or not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE:
            raise CodecError(f"{where}: chunk_size {size!r} outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
        if not _is_int(total) or not 8 <= total <= MAX_TENSOR_BYTES:
            raise CodecError(f"{where}: total_bytes {total!r} out of range")
        if not isinstance(raw_chunks, list) or len(raw_chunks) != -(-total // size):
            raise CodecError(f"{where}: {total} bytes in chunks of {size} need {-(-total // size)} chunk entries")
        if not _is_int(header_len) or not 8 <= header_len <= min(total, 8 + MAX_HEADER_BYTES):
            raise CodecError(f"{where}: header_len {header_len!r} out of range")
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CodecError(f"{where}: metadata must map strings to strings")
        sizes = chunk_sizes(total, size)
        chunks = [_chunk_entry(e, i, sizes[i], where) for i, e in enumerate(raw_chunks)]
        entries = parse_header(tensors, total - header_len)
        wire, cast = doc.get("wire_dtype"), doc.get("cast") or {}
        if wire is not None and (not isinstance(wire, str) or wire not in DTYPE_SIZES):
            raise CodecError(f"{where}: unknown wire_dtype {wire!r}")
        if not isinstance(cast, dict) or not all(isinstance(v, str) and v in DTYPE_SIZES for v in cast.values()):
            raise CodecError(f"{where}: cast must map tensor names to dtypes")
        keyframe, parent, depth = doc.get("keyframe", number), doc.get("parent"), doc.get("depth", 0)
        uploaded, created, producer = doc.get("uploaded_bytes", 0), doc.get("created", 0.0), doc.get("producer", "")
        if not (_is_int(keyframe) and _is_int(depth) and _is_int(uploaded)) or (parent is not None and not _is_int(parent)):
            raise CodecError(f"{where}: keyframe, parent, depth and uploaded_bytes must be integers")
        return cls(
            version=number,
            header_len=header_len,
            tensors=entries,
            chunk_size=size,
            total_bytes=total,
            chunks=chunks,
            metadata=metadata,
            created=float(created) if isinstance(created, float) or (_is_int(created) and abs(created) < 2**63) else 0,
            producer=str(producer),
            keyframe=keyframe,
            parent=parent,
            depth=depth,
            wire_dtype=wire,
            cast={str(k): v for k, v in cast.items()},
            uploaded_bytes=uploaded,
        )

    def verify_chunk(self, index: int, data: Buffer | None) -> None:
        """Raise ``IntegrityError`` if chunk ``index`` is missing, truncated or not the bytes of its id."""
        if data is None:
            raise IntegrityError(f"version {self.version}: chunk {index} is missing")
        expected = min(self.chunk_size, self.total_bytes - self.chunk_size * index)
        if len(data) != expected:
            raise IntegrityError(f"version {self.version}: chunk {index} has {len(data)} bytes, expected {expected}")
        if checksum(data) != self.chunks[index].id:
            raise IntegrityError(f"version {self.version}: chunk {index} does not match its id (corrupted?)")


def manifest_limit(data_bytes: int, tensors: int) -> int:
    """The largest manifest (bytes) of a policy of ``tensors`` tensors holding ``data_bytes``
    bytes (at 8 bytes per element): a worker refuses a bigger one before downloading it."""
    header = 4096 + tensors * 512  # names, dtypes, shapes, offsets, metadata
    entries = -(-(data_bytes + header) // MIN_CHUNK_SIZE) * (MAX_CHAIN * 96 + 64)
    return min(MAX_MANIFEST_BYTES, 65536 + 2 * header + entries)


def chunk_sizes(total: int, chunk_size: int) -> list[int]:
    """Sizes of the fixed-size chunks of a ``total``-byte stream (the last one may be shorter)."""
    count = -(-total // chunk_size)
    return [chunk_size] * (count - 1) + [total - chunk_size * (count - 1)] if count else []


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def _chunk_entry(raw: Any, index: int, size: int, where: str) -> ChunkEntry:
    """One validated chunk entry: ids are 32 hex digits, a chain is short, acyclic and ends at ``id``,
    and every patch is smaller than the chunk (a patch that is not would never be stored)."""
    if not isinstance(raw, dict) or not _is_id(raw.get("id")):
        raise CodecError(f"{where}: chunk {index}: entry is not an object with a 32-hex-digit id")
    base, steps = raw.get("base"), raw.get("steps")
    if base is None and steps is None:
        return ChunkEntry(raw["id"])
    if not _is_id(base) or not isinstance(steps, list) or not 1 <= len(steps) <= MAX_CHAIN:
        raise CodecError(f"{where}: chunk {index}: a patched chunk needs a base id and 1..{MAX_CHAIN} steps")
    parsed = []
    for step in steps:
        if (
            not isinstance(step, list)
            or len(step) != 3
            or not _is_id(step[0])
            or not _is_int(step[1])
            or not 0 < step[1] < size
            or not _is_id(step[2])
        ):
            raise CodecError(f"{where}: chunk {index}: bad step {str(step)[:120]} (patch id, 1..{size - 1} bytes, id)")
        parsed.append(Step(step[0], step[1], step[2]))
    entry = ChunkEntry(raw["id"], base, tuple(parsed))
    if parsed[-1].id != entry.id:
        raise CodecError(f"{where}: chunk {index}: its chain ends at {parsed[-1].id}, not at its id {entry.id}")
    if len(set(entry.chain)) != len(entry.chain):
        raise CodecError(f"{where}: chunk {index}: its chain has a cycle (an id appears twice)")
    return entry
