"""Weights <-> safetensors bytes, split into chunks, described by a manifest.

The stream of one version is a valid ``.safetensors`` file: an 8-byte little-endian
header length, the JSON header (padded with spaces to a multiple of 8), then the
tensor data. It is cut into chunks; concatenated in order they give the file back.

Encoding reads the tensors' own memory (memoryviews of CPU tensors): big tensors
become chunks without any copy, only runs of small tensors are gathered into one
chunk. Tensors that are not contiguous CPU tensors (CUDA, strided views) or a
``snapshot`` (async push) go through one reused staging buffer.

Decoding never unpickles and never calls ``torch.load``: the manifest is JSON,
validated field by field, and bytes are copied into the live tensors in place.
"""

from __future__ import annotations

import bisect
import json
import math
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch
import xxhash
from torch import nn

from .errors import CodecError, IntegrityError, WeightMismatchError

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
_HEADER_ALIGN = 8

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}


def checksum(data: Buffer) -> str:
    """Checksum of one chunk, as stored in the manifest (xxh3-64, 16 hex digits)."""
    return xxhash.xxh3_64_hexdigest(data)


# ---------------------------------------------------------------------------------------
# Flattening: nn.Module / TensorDict / (nested) dict -> {name: tensor}
# ---------------------------------------------------------------------------------------
def flatten_weights(weights: Any) -> dict[str, torch.Tensor]:
    """The named tensors of a module, TensorDict or (nested) mapping, keys joined with ".".

    For a module this is ``state_dict(keep_vars=True)``: the live Parameter and
    buffer objects, so a receiver can write into them in place.
    """
    if isinstance(weights, nn.Module):
        items: Iterable[tuple[str, Any]] = weights.state_dict(keep_vars=True).items()
    elif _is_tensordict(weights):
        items = weights.flatten_keys(".").items()
    elif isinstance(weights, Mapping):
        items = _flatten_mapping(weights, "")
    else:
        raise CodecError(
            f"weights must be an nn.Module, a TensorDict or a dict of tensors, got {type(weights).__name__}"
        )
    flat: dict[str, torch.Tensor] = {}
    for name, value in items:
        name = name if isinstance(name, str) else ".".join(name)
        if not isinstance(value, torch.Tensor):
            raise CodecError(f"weight {name!r} is a {type(value).__name__}, not a tensor")
        if value.dtype not in DTYPE_CODES:
            raise CodecError(f"weight {name!r} has dtype {value.dtype}, which safetensors cannot store")
        if value.is_sparse or value.layout != torch.strided:
            raise CodecError(f"weight {name!r} has layout {value.layout}; only dense tensors are supported")
        if value.device.type == "meta":
            raise CodecError(f"weight {name!r} is on the meta device: it has no data to send or receive")
        flat[name] = value
    return flat


def _is_tensordict(obj: Any) -> bool:
    """Without importing tensordict (a second of start-up): no TensorDict exists before it is imported."""
    tensordict = sys.modules.get("tensordict")
    base = getattr(tensordict, "TensorDictBase", None)
    return base is not None and isinstance(obj, base)


def _flatten_mapping(mapping: Mapping[Any, Any], prefix: str) -> Iterable[tuple[str, Any]]:
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise CodecError(f"weight names must be strings, got {key!r}")
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) or _is_tensordict(value):
            yield from _flatten_mapping(dict(flatten_weights(value)), name + ".")
        else:
            yield name, value


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
        return DTYPES[self.dtype]

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "data_offsets": [self.begin, self.end]}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_ITEMSIZE: dict[str, int] = {code: _itemsize(dtype) for code, dtype in DTYPES.items()}


def layout_for(tensors: Mapping[str, torch.Tensor]) -> list[TensorEntry]:
    """Entries for ``tensors``, ordered as safetensors orders them (wider dtypes first, then name),
    so that every tensor starts at an offset aligned to its element size."""
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    entries, offset = [], 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        entries.append(TensorEntry(name, DTYPE_CODES[t.dtype], tuple(t.shape), offset, offset + nbytes))
        offset += nbytes
    return entries


def header_bytes(entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors prefix: u64 length + JSON header padded with spaces to a multiple of 8."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for e in entries:
        header[e.name] = e.to_json()
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % _HEADER_ALIGN)
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
        if dtype not in DTYPES:
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
        if math.prod(shape) * _ITEMSIZE[dtype] != offsets[1] - offsets[0]:
            raise CodecError(f"tensor {name!r}: shape {shape} of {dtype} does not fill {offsets}")
        if math.prod(d for d in shape if d) * _ITEMSIZE[dtype] > MAX_TENSOR_BYTES:
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
            created=float(created) if isinstance(created, float) or (_is_int(created) and abs(created) < 2**63) else 0.0,
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


# ---------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------
Chunk = list[memoryview]  # the parts of one chunk, in order; one part: a zero-copy view


@dataclass
class Encoded:
    """One version, ready to upload: its layout and its chunks, planned but not built.

    A chunk of one part is a view of the weights' (or the staging buffer's) memory;
    a chunk of several small parts is gathered only when ``stream()`` reaches it, into
    one buffer reused from chunk to chunk, so encoding never holds more than one
    chunk of copied bytes. Checksums are computed as the chunks stream by.
    """

    header_len: int
    tensors: list[TensorEntry]
    plan: list[Chunk]
    metadata: dict[str, str]
    checksums: list[str] = field(default_factory=list)

    @property
    def chunk_sizes(self) -> list[int]:
        return [sum(len(p) for p in parts) for parts in self.plan]

    @property
    def total_bytes(self) -> int:
        return sum(self.chunk_sizes)

    @property
    def chunks(self) -> list[Buffer]:
        """Every chunk built at once (gathered ones as fresh ``bytes``): for tests and tools."""
        return [parts[0] if len(parts) == 1 else b"".join(parts) for parts in self.plan]

    def stream(self) -> Iterator[tuple[Buffer, bool]]:
        """Yield ``(chunk, reused)`` in order, recording checksums; a ``reused`` chunk lives in
        the gather buffer and is overwritten when the next chunk is requested."""
        self.checksums = []
        gather: bytearray | None = None
        for parts in self.plan:
            if len(parts) == 1:
                chunk: Buffer = parts[0]
            else:
                size = sum(len(p) for p in parts)
                if gather is None:  # sized for the largest gathered chunk, allocated once
                    gather = bytearray(max(sum(len(p) for p in q) for q in self.plan if len(q) > 1))
                view = memoryview(gather)
                offset = 0
                for p in parts:
                    view[offset : offset + len(p)] = p
                    offset += len(p)
                chunk = view[:size]
            self.checksums.append(checksum(chunk))
            yield chunk, len(parts) > 1

    def manifest(self, version: int, *, created: float, producer: str) -> Manifest:
        """The manifest; checksums come from ``stream()`` if it ran to the end, else are computed."""
        if len(self.checksums) != len(self.plan):
            self.checksums = [checksum(c) for c in self.chunks]
        return Manifest(
            version=version,
            header_len=self.header_len,
            tensors=self.tensors,
            chunk_sizes=self.chunk_sizes,
            checksums=list(self.checksums),
            metadata=self.metadata,
            created=created,
            producer=producer,
        )


def _byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying."""
    array: Any = t.detach().reshape(-1).view(torch.uint8).numpy()
    return memoryview(array).cast("B")


class Encoder:
    """Encodes weights into chunks; owns a staging buffer reused from push to push.

    ``snapshot=True`` copies every tensor into the staging buffer (so the caller may
    modify its weights while the chunks upload); otherwise only tensors that are not
    contiguous CPU tensors are copied there and the rest are read in place. Tensors
    copied into the staging buffer lie back to back in stream order, so their bytes
    are sent as one run of zero-copy chunks.
    """

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be within {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes")
        self.chunk_size = chunk_size
        self._staging: torch.Tensor | None = None

    def _staging_buffer(self, nbytes: int, pin: bool) -> torch.Tensor:
        if self._staging is None or self._staging.numel() < nbytes or (pin and not self._staging.is_pinned()):
            self._staging = None  # free the old one before allocating its replacement
            self._staging = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        return self._staging

    def encode(
        self,
        weights: Any,
        *,
        snapshot: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> Encoded:
        tensors = flatten_weights(weights)
        entries = layout_for(tensors)
        head = header_bytes(entries, metadata)
        data_size = entries[-1].end if entries else 0
        needs_copy = [
            snapshot or t.device.type != "cpu" or not t.is_contiguous() for t in (tensors[e.name] for e in entries)
        ]
        staging = None
        if any(needs_copy):
            pin = any(tensors[e.name].device.type == "cuda" for e in entries) and torch.cuda.is_available()
            staging = self._staging_buffer(data_size, pin)
        # pieces: bytes, or (begin, end) runs of the staging buffer, merged when adjacent
        pieces: list[Buffer | tuple[int, int]] = [head]
        for entry, copy in zip(entries, needs_copy, strict=True):
            if entry.nbytes == 0:
                continue
            t = tensors[entry.name].detach()
            if copy:
                assert staging is not None
                region = staging[entry.begin : entry.end]
                if t.device.type == "cpu":  # one memcpy; torch's threaded copy stalls on a busy machine
                    np.copyto(region.numpy(), np.frombuffer(_byte_view(t.contiguous()), dtype=np.uint8))
                else:
                    region.copy_(t.contiguous().reshape(-1).view(torch.uint8), non_blocking=True)
                last = pieces[-1]
                if isinstance(last, tuple) and last[1] == entry.begin:
                    pieces[-1] = (last[0], entry.end)
                else:
                    pieces.append((entry.begin, entry.end))
            else:
                pieces.append(_byte_view(t))
        if staging is not None and staging.is_pinned():
            torch.cuda.synchronize()
        views = [_byte_view(staging[p[0] : p[1]]) if isinstance(p, tuple) else p for p in pieces]  # type: ignore[index]
        return Encoded(len(head), entries, plan_chunks(views, self.chunk_size), dict(metadata or {}))


def plan_chunks(pieces: Sequence[Buffer], chunk_size: int) -> list[Chunk]:
    """Cut a stream given as pieces into chunks of at most ``chunk_size`` bytes, order kept.

    Pieces of at least half a chunk become chunks of their own (zero-copy views);
    runs of smaller pieces are grouped into one chunk, to be gathered when sent.
    """
    chunks: list[Chunk] = []
    group: Chunk = []
    grouped = 0
    for piece in pieces:
        view = memoryview(piece).cast("B") if not isinstance(piece, memoryview) else piece
        for start in range(0, len(view), chunk_size):
            part = view[start : start + chunk_size]
            if len(part) >= chunk_size // 2 or grouped + len(part) > chunk_size:
                if group:
                    chunks.append(group)
                group, grouped = [], 0
            if len(part) >= chunk_size // 2:
                chunks.append([part])
            else:
                group.append(part)
                grouped += len(part)
    if group:
        chunks.append(group)
    return chunks


def chunk_pieces(pieces: Sequence[Buffer], chunk_size: int) -> list[Buffer]:
    """``plan_chunks``, with every chunk built (gathered ones joined into fresh bytes)."""
    return [parts[0] if len(parts) == 1 else b"".join(parts) for parts in plan_chunks(pieces, chunk_size)]


# ---------------------------------------------------------------------------------------
# Decoding into live tensors
# ---------------------------------------------------------------------------------------
def check_compatible(
    entries: Sequence[TensorEntry], targets: Mapping[str, torch.Tensor], *, allow_cast: bool = False
) -> None:
    """Raise ``WeightMismatchError`` naming the first key whose presence, shape or dtype differs."""
    incoming = {e.name: e for e in entries}
    missing = sorted(set(targets) - set(incoming))
    if missing:
        raise WeightMismatchError(f"key {missing[0]!r} is missing from the pushed weights ({len(missing)} missing)")
    unexpected = sorted(set(incoming) - set(targets))
    if unexpected:
        raise WeightMismatchError(f"unexpected key {unexpected[0]!r} in the pushed weights ({len(unexpected)} extra)")
    for name, target in targets.items():
        entry = incoming[name]
        if tuple(target.shape) != entry.shape:
            raise WeightMismatchError(
                f"key {name!r}: shape {list(entry.shape)} pushed, the policy has {list(target.shape)}"
            )
        if target.dtype != entry.torch_dtype and not allow_cast:
            raise WeightMismatchError(f"key {name!r}: dtype {entry.torch_dtype} pushed, the policy has {target.dtype}")


class _ChunkedStream:
    """Random access to byte ranges of a stream held as a list of chunks."""

    def __init__(self, chunks: Sequence[Buffer]) -> None:
        self.arrays = [np.frombuffer(c, dtype=np.uint8) for c in chunks]
        self.starts = [0]
        for a in self.arrays:
            self.starts.append(self.starts[-1] + a.size)

    def copy_range(self, begin: int, end: int, out: np.ndarray) -> None:
        """Copy stream[begin:end] into ``out`` (a uint8 array of end - begin bytes)."""
        i = bisect.bisect_right(self.starts, begin) - 1
        written = 0
        while begin < end:
            chunk, chunk_start = self.arrays[i], self.starts[i]
            take = min(end, self.starts[i + 1]) - begin
            out[written : written + take] = chunk[begin - chunk_start : begin - chunk_start + take]
            written += take
            begin += take
            i += 1


def apply_chunks(
    chunks: Sequence[Buffer],
    manifest: Manifest,
    targets: Mapping[str, torch.Tensor],
    *,
    allow_cast: bool = False,
) -> None:
    """Verify every chunk, check the layout against ``targets``, then copy in place.

    Nothing is written into ``targets`` unless every check passes, so a failure
    leaves the old weights whole. The target tensors keep their identity, device
    and dtype (``data_ptr`` unchanged).
    """
    if len(chunks) != manifest.num_chunks:
        raise IntegrityError(f"version {manifest.version}: got {len(chunks)} chunks, expected {manifest.num_chunks}")
    for index, data in enumerate(chunks):
        manifest.verify_chunk(index, data)
    check_compatible(manifest.tensors, targets, allow_cast=allow_cast)
    stream = _ChunkedStream(chunks)
    base = manifest.header_len
    with torch.no_grad():
        for entry in manifest.tensors:
            if entry.nbytes == 0:
                continue
            target = targets[entry.name]
            direct = target.device.type == "cpu" and target.is_contiguous() and target.dtype == entry.torch_dtype
            if direct:
                out = target.detach().reshape(-1).view(torch.uint8).numpy()
                stream.copy_range(base + entry.begin, base + entry.end, out)
            else:
                tmp = torch.empty(entry.nbytes, dtype=torch.uint8)
                stream.copy_range(base + entry.begin, base + entry.end, tmp.numpy())
                target.copy_(tmp.view(entry.torch_dtype).view(entry.shape))


def decode_to_tensors(chunks: Sequence[Buffer], manifest: Manifest) -> dict[str, torch.Tensor]:
    """New CPU tensors for every entry of a version, verified first (admin tools, tests)."""
    targets = {e.name: torch.empty(e.shape, dtype=e.torch_dtype) for e in manifest.tensors}
    apply_chunks(chunks, manifest, targets)
    return targets
