"""Weights <-> safetensors bytes, split into chunks, described by a manifest.

The stream of one version is a valid ``.safetensors`` file: an 8-byte little-endian
header length, the JSON header (padded with spaces to a multiple of 8), then the
tensor data. It is cut into fixed-size chunks by stream offset, so a region that
did not change gives the same chunk (and chunk id) from version to version;
concatenated in order they give the file back.

Encoding reads the tensors' own memory (memoryviews of CPU tensors): a chunk that
lies inside one tensor is sent without any copy, a chunk that spans several is
gathered into one reused buffer when it is needed. Tensors that are not contiguous
CPU tensors (CUDA, strided views), a ``snapshot`` (async push) and tensors cast to a
``wire_dtype`` go through one reused staging buffer.

Decoding never unpickles and never calls ``torch.load``: the manifest is JSON,
validated field by field, and bytes are copied into the live tensors in place.
"""

from __future__ import annotations

import bisect
import functools
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CodecError, IntegrityError, WeightMismatchError
from ..threads import INLINE, Threads
from .manifest import (
    DEFAULT_CHUNK_SIZE,
    DTYPE_ATTRS,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    Buffer,
    ChunkEntry,
    Manifest,
    TensorEntry,
    checksum_parts,
    header_bytes,
    parse_header_bytes,
)
from .parts import gather

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
WIRE_DTYPES = (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2)


def wire_dtype_of(tensor: torch.Tensor, wire: torch.dtype | None) -> torch.dtype:
    """The dtype ``tensor`` is sent in: ``wire`` for floating tensors when one is set, else its own."""
    return wire if wire is not None and tensor.dtype.is_floating_point else tensor.dtype


def layout_for(tensors: Mapping[str, torch.Tensor], wire: torch.dtype | None = None) -> list[TensorEntry]:
    """Entries for ``tensors`` (floating ones in ``wire``), ordered as safetensors orders them
    (wider dtypes first, then name), so that every tensor starts at an offset aligned to its element size."""
    dtypes = {name: wire_dtype_of(t, wire) for name, t in tensors.items()}
    order = sorted(tensors, key=lambda n: (-dtypes[n].itemsize, n))
    entries, offset = [], 0
    for name in order:
        nbytes = tensors[name].numel() * dtypes[name].itemsize
        entries.append(TensorEntry(name, DTYPE_CODES[dtypes[name]], tuple(tensors[name].shape), offset, offset + nbytes))
        offset += nbytes
    return entries


# ---------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------
Chunk = list[memoryview]  # the parts of one chunk, in order; one part: a zero-copy view
# Bytes of gathered chunks before an upload must send what it queued: one default chunk, so a
# gathered chunk is sent before the next is gathered (trainer memory: one chunk plus the header).
# Measured (100 MB of 1024x1024 linear layers, 2 MiB chunks, 6 pushes each, alternating): the
# same push time as a 64 MiB ring (0.096-0.101 s against 0.095-0.098 s), 4.4 MB of peak RSS
# growth instead of 52.7 MB.
GATHER_BYTES = 2 * 1024 * 1024


@dataclass
class Encoded:
    """One version, ready to upload: its layout and its fixed-size chunks, planned but not built.

    A chunk of one part is a view of the weights' (or the staging buffer's) memory;
    a chunk of several parts is gathered only when ``chunk()`` is asked for it, into a
    ring of reused buffers, so encoding never holds more than ``GATHER_BYTES`` of copied
    bytes (views of the weights still go ~64 MiB per round trip). ``ids`` (content hashes)
    are computed from the parts, without gathering.
    """

    header_len: int
    tensors: list[TensorEntry]
    chunk_size: int
    plan: list[Chunk]
    metadata: dict[str, str]
    wire_dtype: str | None = None
    cast: dict[str, str] = field(default_factory=dict)
    _ids: list[str] | None = None
    _sizes: list[int] | None = None
    _total: int | None = None
    _gather: list[bytearray] = field(default_factory=list)
    _slot: int = 0
    _pieces: list[tuple[int, memoryview]] = field(default_factory=list)  # (stream offset, bytes) of each piece
    _trade: Callable[[np.ndarray | None], np.ndarray | None] | None = None  # see ``take_stream``

    @property
    def chunk_sizes(self) -> list[int]:
        """The size of every chunk, computed once (planners read it per chunk)."""
        if self._sizes is None:
            self._sizes = [sum(len(p) for p in parts) for parts in self.plan]
        return self._sizes

    @property
    def total_bytes(self) -> int:
        if self._total is None:
            self._total = sum(self.chunk_sizes)
        return self._total

    @property
    def ids(self) -> list[str]:
        """The id (xxh3-128) of every chunk, computed once."""
        if self._ids is None:
            self._ids = [checksum_parts(parts) for parts in self.plan]  # xxhash holds the GIL: no threads
        return self._ids

    def region(self, begin: int, end: int) -> memoryview | None:
        """Bytes ``[begin, end)`` of the stream as one view of the memory that holds them (no copy),
        or None when they span several pieces (tensors read in place, the header)."""
        at = bisect.bisect_right([start for start, _ in self._pieces], begin) - 1
        if at < 0:
            return None
        start, piece = self._pieces[at]
        return piece[begin - start : end - start] if end - start <= len(piece) else None

    def take_stream(self, replacement: np.ndarray | None) -> np.ndarray | None:
        """The whole stream as one buffer the caller may keep, when the encoder wrote all of it
        into its staging buffer (every tensor cast or snapshotted) and has not reused it since;
        the encoder takes ``replacement`` (or a fresh buffer, when None or too small) as its next
        staging. None, and nothing traded, otherwise.

        The delta planner keeps the committed stream as the next push's base this way instead
        of copying it: the two buffers alternate between encoder and planner."""
        return self._trade(replacement) if self._trade is not None else None

    def chunk(self, index: int) -> tuple[Buffer, bool]:
        """``(bytes of chunk index, reused)``. A chunk of several parts is gathered into the next
        slot of a small ring of buffers (up to ``GATHER_BYTES``, allocated as needed); ``reused``
        marks the last slot of the ring: the next gathered chunk overwrites the ring's first, so
        a writer must send what it queued before asking for more (``ChunkStore.write`` does)."""
        parts = self.plan[index]
        if len(parts) == 1:
            return parts[0], False
        slots = max(1, GATHER_BYTES // self.chunk_size)
        if len(self._gather) < slots and len(self._gather) <= self._slot:
            self._gather.append(bytearray(self.chunk_size))
        slot = self._slot % slots
        self._slot = slot + 1
        view = memoryview(self._gather[slot])
        return view[: gather(parts, view)], slot == slots - 1

    def manifest(self, version: int, chunks: list[ChunkEntry] | None = None, **fields: Any) -> Manifest:
        """The manifest of this stream as ``version``; ``chunks`` default to every chunk stored whole."""
        return Manifest(
            version=version,
            header_len=self.header_len,
            tensors=self.tensors,
            chunk_size=self.chunk_size,
            total_bytes=self.total_bytes,
            chunks=chunks if chunks is not None else [ChunkEntry(i) for i in self.ids],
            metadata=self.metadata,
            wire_dtype=self.wire_dtype,
            cast=self.cast,
            **fields,
        )


def _byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying."""
    array: Any = t.detach().reshape(-1).view(torch.uint8).numpy()
    return memoryview(array).cast("B")


class Encoder:
    """Encodes weights into chunks; owns a staging buffer reused from push to push.

    ``snapshot=True`` copies every tensor into the staging buffer (so the caller may
    modify its weights while the chunks upload); otherwise only tensors that are not
    contiguous CPU tensors, or that are cast to ``wire_dtype``, are copied there and
    the rest are read in place.
    """

    def __init__(
        self,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        wire_dtype: torch.dtype | None = None,
        threads: Threads | None = None,
    ) -> None:
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be within {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes")
        if wire_dtype is not None and wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {', '.join(map(str, WIRE_DTYPES))}, got {wire_dtype}")
        self.chunk_size = chunk_size
        self.wire_dtype = wire_dtype
        self.threads = threads or INLINE  # the casts and copies of CPU tensors, side by side
        self._staging: torch.Tensor | None = None
        self._generation = 0  # encodes so far: a stream may be traded away only until the next one
        self._gather: list[bytearray] = []  # the gather ring, kept from push to push (fresh pages are slow)

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
        entries = layout_for(tensors, self.wire_dtype)
        cast = {
            e.name: DTYPE_CODES[tensors[e.name].dtype] for e in entries if DTYPE_CODES[tensors[e.name].dtype] != e.dtype
        }
        head = header_bytes(entries, metadata)
        data_size = entries[-1].end if entries else 0
        needs_copy = [
            snapshot or e.name in cast or t.device.type != "cpu" or not t.is_contiguous()
            for e, t in ((e, tensors[e.name]) for e in entries)
        ]
        self._generation += 1
        staging = None
        whole = all(needs_copy)  # the staging buffer holds the whole stream, the header first
        at = len(head)  # the staging buffer is laid out as the stream: the data after the header's room
        if any(needs_copy):
            pin = any(tensors[e.name].device.type == "cuda" for e in entries) and torch.cuda.is_available()
            staging = self._staging_buffer(at + data_size, pin)
        # pieces: bytes, or (begin, end) runs of the staging buffer, merged when adjacent
        pieces: list[Buffer | tuple[int, int]] = [head]
        if whole and staging is not None:  # the header staged too: the stream is one run
            staging[:at].numpy()[:] = np.frombuffer(head, dtype=np.uint8)
            pieces[0] = (0, at)
        copies: list[tuple[TensorEntry, torch.Tensor, torch.Tensor]] = []  # (entry, tensor, its staging region)
        for entry, copy in zip(entries, needs_copy, strict=True):
            if entry.nbytes == 0:
                continue
            t = tensors[entry.name].detach()
            if copy:
                assert staging is not None
                copies.append((entry, t, staging[at + entry.begin : at + entry.end]))
                last = pieces[-1]
                if isinstance(last, tuple) and last[1] == at + entry.begin:
                    pieces[-1] = (last[0], at + entry.end)
                else:
                    pieces.append((at + entry.begin, at + entry.end))
            else:
                pieces.append(_byte_view(t))
        if any(t.device.type != "cpu" for _, t, _ in copies):  # queued on the device's stream, in order
            for job in copies:
                _stage_tensor(job, cast)
        else:  # the copies release the GIL
            self.threads.spread(functools.partial(_stage_tensor, cast=cast), copies, lambda job: job[0].nbytes)
        if staging is not None and staging.is_pinned():
            torch.cuda.synchronize()
        views = [_byte_view(staging[p[0] : p[1]]) if isinstance(p, tuple) else memoryview(p)  # type: ignore[index]
                 for p in pieces]
        wire = DTYPE_CODES[self.wire_dtype] if self.wire_dtype is not None else None
        spans, offset = [], 0
        for view in views:
            spans.append((offset, view))
            offset += len(view)
        trade = None
        if whole and staging is not None:
            trade = functools.partial(self._trade, self._generation, staging[: at + data_size])
        return Encoded(len(head), entries, self.chunk_size, plan_chunks(views, self.chunk_size), dict(metadata or {}),
                       wire, cast, _gather=self._gather, _pieces=spans, _trade=trade)  # fmt: skip

    def _trade(self, generation: int, stream: torch.Tensor, replacement: np.ndarray | None) -> np.ndarray | None:
        """``Encoded.take_stream``: hand over ``stream`` (a slice of the staging buffer written by encode
        number ``generation``) and stage the next encode in ``replacement``."""
        if generation != self._generation:
            return None  # encoded (or traded) again since: the staging buffer is not that stream's now
        self._generation += 1  # traded once
        self._staging = torch.from_numpy(replacement) if replacement is not None else None
        return stream.numpy()


def _stage_tensor(job: tuple[TensorEntry, torch.Tensor, torch.Tensor], cast: Mapping[str, str]) -> None:
    """Copy (or cast, for a name in ``cast``) one tensor into its region of the staging buffer."""
    entry, t, region = job
    if entry.name in cast:  # a cast is a copy anyway
        region.view(entry.torch_dtype).copy_(t.reshape(-1), non_blocking=t.device.type == "cuda")
    elif t.device.type == "cpu":  # one memcpy; torch's threaded copy stalls on a busy machine
        np.copyto(region.numpy(), np.frombuffer(_byte_view(t.contiguous()), dtype=np.uint8))
    else:
        region.copy_(t.contiguous().reshape(-1).view(torch.uint8), non_blocking=True)


def plan_chunks(pieces: Sequence[Buffer], chunk_size: int) -> list[Chunk]:
    """Cut a stream given as pieces into chunks of exactly ``chunk_size`` bytes (the last one
    may be shorter), at fixed stream offsets: chunk i is bytes ``[i*chunk_size, (i+1)*chunk_size)``.
    Each chunk is the list of views of the pieces it spans, order kept."""
    chunks: list[Chunk] = []
    current: Chunk = []
    room = chunk_size
    for piece in pieces:
        view = piece if isinstance(piece, memoryview) else memoryview(piece)
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        position = 0
        while position < len(view):
            take = min(room, len(view) - position)
            current.append(view[position : position + take])
            position += take
            room -= take
            if room == 0:
                chunks.append(current)
                current, room = [], chunk_size
    if current:
        chunks.append(current)
    return chunks


# ---------------------------------------------------------------------------------------
# Decoding into live tensors
# ---------------------------------------------------------------------------------------
def check_compatible(manifest: Manifest, targets: Mapping[str, torch.Tensor], *, allow_cast: bool = False) -> None:
    """Raise ``WeightMismatchError`` naming the first key whose presence, shape or dtype differs.

    A dtype that differs is accepted with ``allow_cast``, and for a floating target
    when the trainer chose the cast explicitly (``wire_dtype``: the tensor is in the
    manifest's ``cast`` table).
    """
    incoming = {e.name: e for e in manifest.tensors}
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
        if target.dtype == entry.torch_dtype or allow_cast:
            continue
        if name in manifest.cast and target.dtype.is_floating_point:
            continue  # the trainer chose this cast (wire_dtype)
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


def check_header(chunks: Sequence[Buffer], manifest: Manifest) -> None:
    """Raise ``IntegrityError`` unless the safetensors header at the start of the (verified)
    chunks describes exactly the manifest's tensors.

    The chunk ids vouch for the chunks, not for the manifest's tensor table: without
    this check a manifest edited after the commit (two same-shape tensors swapped)
    would put verified bytes into the wrong tensors. One parse of the header, which
    usually lies in chunk 0.
    """
    head = np.empty(manifest.header_len, dtype=np.uint8)
    _ChunkedStream(chunks).copy_range(0, manifest.header_len, head)
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


def tensors_in_chunks(manifest: Manifest, indices: Iterable[int]) -> set[str]:
    """Names of the tensors whose bytes overlap any of the chunks ``indices``."""
    changed = sorted(set(indices))
    names = set()
    for entry in manifest.tensors:
        if entry.nbytes == 0:
            continue
        first = (manifest.header_len + entry.begin) // manifest.chunk_size
        last = (manifest.header_len + entry.end - 1) // manifest.chunk_size
        at = bisect.bisect_left(changed, first)
        if at < len(changed) and changed[at] <= last:
            names.add(entry.name)
    return names


def copy_tensors(
    chunks: Sequence[Buffer],
    manifest: Manifest,
    targets: Mapping[str, torch.Tensor],
    names: set[str] | None = None,
    threads: Threads | None = None,
) -> None:
    """Copy the verified chunks of a version into ``targets`` in place (all tensors, or ``names``),
    on ``threads``: one run of tensors of about equal bytes each (the copies release the GIL).

    The caller has checked the chunks (ids), the header (``check_header``) and the
    layout (``check_compatible``). The target tensors keep their identity, device
    and dtype (``data_ptr`` unchanged); a dtype that differs is cast on copy.
    """
    stream = _ChunkedStream(chunks)
    base = manifest.header_len

    def copy(entry: TensorEntry) -> None:
        target = targets[entry.name]
        with torch.no_grad():
            if target.device.type == "cpu" and target.is_contiguous() and target.dtype == entry.torch_dtype:
                out = target.detach().reshape(-1).view(torch.uint8).numpy()
                stream.copy_range(base + entry.begin, base + entry.end, out)
            else:
                tmp = torch.empty(entry.nbytes, dtype=torch.uint8)
                stream.copy_range(base + entry.begin, base + entry.end, tmp.numpy())
                target.copy_(tmp.view(entry.torch_dtype).view(entry.shape))

    wanted = [e for e in manifest.tensors if e.nbytes and (names is None or e.name in names)]
    (threads or INLINE).spread(copy, wanted, size=lambda e: e.nbytes)  # one run of tensors per thread
