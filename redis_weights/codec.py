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
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import CodecError, IntegrityError, WeightMismatchError
from .manifest import (
    DEFAULT_CHUNK_SIZE,
    DTYPE_ATTRS,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    Buffer,
    Manifest,
    TensorEntry,
    checksum,
    header_bytes,
    parse_header_bytes,
)

DTYPES: dict[str, torch.dtype] = {code: getattr(torch, attr) for code, attr in DTYPE_ATTRS.items()}
DTYPE_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}


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
# Layout: where each tensor goes in the safetensors stream
# ---------------------------------------------------------------------------------------
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


def check_header(stream: _ChunkedStream, manifest: Manifest) -> None:
    """Raise ``IntegrityError`` unless the safetensors header at the start of the (verified)
    chunks describes exactly the manifest's tensors.

    The checksums vouch for the chunks, not for the manifest's tensor table: without
    this check a manifest edited after the commit (two same-shape tensors swapped)
    would put verified bytes into the wrong tensors. One parse of the header, which
    usually lies in chunk 0.
    """
    head = np.empty(manifest.header_len, dtype=np.uint8)
    stream.copy_range(0, manifest.header_len, head)
    where = f"version {manifest.version}"
    try:
        start, entries = parse_header_bytes(head.data, manifest.total_bytes)
    except CodecError as exc:
        raise IntegrityError(f"{where}: the safetensors header in its chunks is invalid: {exc}") from exc
    if start != manifest.header_len:
        raise IntegrityError(f"{where}: header_len {manifest.header_len} in the manifest, {start} in the chunks")
    header = {e.name: e for e in entries}
    listed = {e.name: e for e in manifest.tensors}
    if header != listed:
        name = next(n for n in sorted(header.keys() | listed.keys()) if header.get(n) != listed.get(n))
        raise IntegrityError(
            f"{where}: the manifest does not match the safetensors header in its chunks "
            f"(tensor {name!r} differs; was the manifest edited?)"
        )


def apply_chunks(
    chunks: Sequence[Buffer],
    manifest: Manifest,
    targets: Mapping[str, torch.Tensor],
    *,
    allow_cast: bool = False,
) -> None:
    """Verify every chunk and the header inside them, check the layout against ``targets``,
    then copy in place.

    Nothing is written into ``targets`` unless every check passes, so a failure
    leaves the old weights whole. The target tensors keep their identity, device
    and dtype (``data_ptr`` unchanged).
    """
    if len(chunks) != manifest.num_chunks:
        raise IntegrityError(f"version {manifest.version}: got {len(chunks)} chunks, expected {manifest.num_chunks}")
    for index, data in enumerate(chunks):
        manifest.verify_chunk(index, data)
    stream = _ChunkedStream(chunks)
    check_header(stream, manifest)
    check_compatible(manifest.tensors, targets, allow_cast=allow_cast)
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
