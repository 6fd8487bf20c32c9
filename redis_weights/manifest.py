"""The format of one version, without torch: safetensors header, manifest, checksums.

A version is a ``.safetensors`` stream (an 8-byte little-endian header length, the
JSON header padded with spaces to a multiple of 8, then the tensor data) cut into
chunks, plus a JSON manifest that says how to fetch and verify them. Everything
here is plain Python, so operator tools (the CLI, admin scripts) read and check
versions without paying for a torch import; ``codec`` adds the tensors.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import xxhash

from .errors import CodecError, IntegrityError

if TYPE_CHECKING:
    import torch

Buffer = Union[bytes, bytearray, memoryview]  # noqa: UP007 (a runtime alias on Python 3.10)

MANIFEST_FORMAT = "redis_weights/1"
CHECKSUM_ALGO = "xxh3_64"
DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
MAX_CHUNK_SIZE = 256 * 1024 * 1024  # Redis refuses bulk values > 512 MiB; big ones stall it
MIN_CHUNK_SIZE = 4096
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors limit
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
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
    """Checksum of one chunk, as stored in the manifest (xxh3-64, 16 hex digits)."""
    return xxhash.xxh3_64_hexdigest(data)


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
@dataclass
class Manifest:
    """What a reader needs to fetch, verify and place one version (stored as JSON)."""

    version: int
    header_len: int
    tensors: list[TensorEntry]
    chunk_sizes: list[int]
    checksums: list[str]
    metadata: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    producer: str = ""
    checksum_algo: str = CHECKSUM_ALGO

    @property
    def total_bytes(self) -> int:
        return sum(self.chunk_sizes)

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_sizes)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "version": self.version,
                "header_len": self.header_len,
                "total_bytes": self.total_bytes,
                "tensors": {e.name: e.to_json() for e in self.tensors},
                "metadata": self.metadata,
                "chunk_sizes": self.chunk_sizes,
                "checksum_algo": self.checksum_algo,
                "checksums": self.checksums,
                "created": self.created,
                "producer": self.producer,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: Buffer | str) -> Manifest:
        """Parse and validate; any inconsistency raises ``CodecError`` (never a crash)."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise CodecError(f"manifest of {len(raw)} bytes is larger than {MAX_MANIFEST_BYTES}")
        doc = load_json(bytes(raw) if not isinstance(raw, str) else raw, "manifest")
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            raise CodecError(f"manifest format is not {MANIFEST_FORMAT!r}")
        try:
            version, header_len = doc["version"], doc["header_len"]
            sizes, sums, algo = doc["chunk_sizes"], doc["checksums"], doc["checksum_algo"]
            tensors, metadata = doc["tensors"], doc.get("metadata") or {}
            created, producer = doc.get("created", 0.0), doc.get("producer", "")
        except KeyError as exc:
            raise CodecError(f"manifest lacks field {exc}") from exc
        if not _is_int(version) or version < 1:
            raise CodecError(f"manifest version {version!r} is not a positive integer")
        if not isinstance(sizes, list) or not all(_is_int(s) and 0 < s <= MAX_CHUNK_SIZE for s in sizes):
            raise CodecError("manifest chunk_sizes must be positive integers within the chunk limit")
        if not isinstance(sums, list) or len(sums) != len(sizes) or not all(isinstance(s, str) for s in sums):
            raise CodecError("manifest checksums must be one string per chunk")
        if algo != CHECKSUM_ALGO:
            raise CodecError(f"unsupported checksum algorithm {algo!r}")
        total = sum(sizes)
        if not _is_int(header_len) or not 8 <= header_len <= min(total, 8 + MAX_HEADER_BYTES):
            raise CodecError(f"manifest header_len {header_len!r} out of range")
        if doc.get("total_bytes", total) != total:
            raise CodecError("manifest total_bytes disagrees with its chunk sizes")
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CodecError("manifest metadata must map strings to strings")
        entries = parse_header(tensors, total - header_len)
        return cls(
            version=version,
            header_len=header_len,
            tensors=entries,
            chunk_sizes=sizes,
            checksums=sums,
            metadata=metadata,
            created=float(created) if isinstance(created, float) or (_is_int(created) and abs(created) < 2**63) else 0,
            producer=str(producer),
        )

    def verify_chunk(self, index: int, data: Buffer | None) -> None:
        """Raise ``IntegrityError`` if chunk ``index`` is missing, truncated or corrupted."""
        if data is None:
            raise IntegrityError(f"version {self.version}: chunk {index} is missing")
        if len(data) != self.chunk_sizes[index]:
            raise IntegrityError(
                f"version {self.version}: chunk {index} has {len(data)} bytes, expected {self.chunk_sizes[index]}"
            )
        if checksum(data) != self.checksums[index]:
            raise IntegrityError(f"version {self.version}: chunk {index} fails its checksum")
