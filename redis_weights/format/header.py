"""The safetensors layout of one version, without torch: limits, dtypes, chunk ids, the header.

A version is a ``.safetensors`` stream (an 8-byte little-endian header length, the
JSON header padded with spaces to a multiple of 8, then the tensor data) cut into
fixed-size chunks whose ids are the xxh3-128 digests of their bytes. Plain Python, so
operator tools read and check versions without paying for a torch import.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, Union

import xxhash

from ..errors import CodecError

if TYPE_CHECKING:
    import torch

Buffer = Union[bytes, bytearray, memoryview]  # noqa: UP007 (a runtime alias on Python 3.10)

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
    return checksum(parts[0]) if len(parts) == 1 else fed(xxhash.xxh3_128(), parts).hexdigest()


HashState = TypeVar("HashState", xxhash.xxh3_64, xxhash.xxh3_128)


def fed(state: HashState, parts: Iterable[Buffer]) -> HashState:
    """``state`` after hashing each of ``parts`` in turn (a streaming hash of their concatenation)."""
    for part in parts:
        state.update(part)
    return state


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
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
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
