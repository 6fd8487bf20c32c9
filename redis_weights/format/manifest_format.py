"""The stored form of a manifest: format 3 (written), format 2 (read), format 1 (refused).

Format ``redis_weights/3`` is binary, so that a manifest costs ~17 bytes per stored
chunk and ~33 per chained one, whatever the depth of the chain::

    offset   size        field
    0        4           magic b"RWM3"
    4        4           u32 length M of the JSON meta
    8        M           JSON object: format, version, header_len, total_bytes, chunk_size,
                         checksum_algo, tensors (the safetensors header), metadata, keyframe,
                         parent, depth, wire_dtype, cast, uploaded_bytes, created, producer,
                         packs: [[version, pack id, bytes], ...] oldest first
    8+M      N           one kind byte per chunk: 0 stored, 1 chained (base + the packs' records),
                         2 a format-2 chain carried over by a rollback (base + its own steps)
    ...      16 N        the chunk ids (raw xxh3-128 digests)
    ...      16 per kind-1-or-2 chunk: its base id, in chunk order
    ...      per kind-2 chunk, in chunk order: u8 step count k, then k x (16 B patch id, u32 size, 16 B id)

N follows from ``total_bytes`` and ``chunk_size`` (checked before anything is sliced),
and the manifest ends exactly after its last field.

Format ``redis_weights/2`` (JSON; each chunk entry repeated its whole chain of
patches, ~68 bytes per step, so a 70B model's manifest crossed the readers' limit
at chain depth 7) is still read, so namespaces written by the previous release keep
working; it is never written. Format ``redis_weights/1`` (per-version chunk keys) is
refused with ``LegacyFormatError``, whose message says what to do.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..errors import CodecError, LegacyFormatError
from .header import (
    CHECKSUM_ALGO,
    DEFAULT_CHUNK_SIZE,
    DTYPE_SIZES,
    MAX_CHUNK_SIZE,
    MAX_HEADER_BYTES,
    MAX_TENSOR_BYTES,
    MIN_CHUNK_SIZE,
    Buffer,
    _is_int,
    load_json,
    parse_header,
)

MAX_MANIFEST_BYTES = 32 * 1024 * 1024  # refused before download (STRLEN) and before parsing
MAX_CHAIN = 64  # patches per chunk since its stored base (keyframe_interval is capped below it)
FORMAT = "redis_weights/3"
PREVIOUS_FORMAT = "redis_weights/2"
LEGACY_FORMAT = "redis_weights/1"
MAGIC = b"RWM3"
STORED, CHAINED, STEPS = 0, 1, 2
_HEAD = struct.Struct("<4sI")
_STEP = struct.Struct("<16sI16s")


# ---------------------------------------------------------------------------------------
# Entries
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


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------
def encode(m: Any) -> bytes:
    """Format 3 bytes of the ``Manifest`` ``m`` (see the module docstring)."""
    meta = json.dumps(
        {
            "format": FORMAT,
            "version": m.version,
            "header_len": m.header_len,
            "total_bytes": m.total_bytes,
            "chunk_size": m.chunk_size,
            "checksum_algo": m.checksum_algo,
            "tensors": {e.name: e.to_json() for e in m.tensors},
            "metadata": m.metadata,
            "keyframe": m.keyframe,
            "parent": m.parent,
            "depth": m.depth,
            "wire_dtype": m.wire_dtype,
            "cast": m.cast,
            "uploaded_bytes": m.uploaded_bytes,
            "created": m.created,
            "producer": m.producer,
            "packs": [[p.version, p.id, p.size] for p in m.packs],
        },
        separators=(",", ":"),
    ).encode()
    kinds = bytes(STORED if c.base is None else STEPS if c.steps else CHAINED for c in m.chunks)
    ids = bytes.fromhex("".join(c.id for c in m.chunks))
    bases = bytes.fromhex("".join(c.base for c in m.chunks if c.base is not None))
    steps = b"".join(
        bytes([len(c.steps)]) + b"".join(_STEP.pack(bytes.fromhex(s.patch), s.size, bytes.fromhex(s.id))
                                         for s in c.steps)
        for c in m.chunks
        if c.steps
    )  # fmt: skip
    return b"".join((_HEAD.pack(MAGIC, len(meta)), meta, kinds, ids, bases, steps))


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------
def decode(raw: Buffer | str, version: int | None = None) -> dict[str, Any]:
    """The validated fields of a stored manifest, ``chunks`` included (see ``Manifest.from_bytes``)."""
    where = "manifest"  # the caller names the version it read
    if len(raw) > MAX_MANIFEST_BYTES:
        raise CodecError(f"{where}: {len(raw)} bytes, more than the limit of {MAX_MANIFEST_BYTES}")
    data = raw.encode() if isinstance(raw, str) else bytes(raw)
    if data[:4] == MAGIC:
        return _decode_binary(data, version)
    return _decode_json(data, version)


def _decode_binary(data: bytes, version: int | None) -> dict[str, Any]:
    if len(data) < _HEAD.size:
        raise CodecError("manifest: shorter than its header")
    _, meta_len = _HEAD.unpack_from(data, 0)
    if _HEAD.size + meta_len > len(data):
        raise CodecError(f"manifest: meta of {meta_len} bytes in {len(data)}")
    doc = load_json(data[_HEAD.size : _HEAD.size + meta_len], "manifest")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CodecError(f"manifest: format is not {FORMAT!r}")
    fields, sizes, where = _fields(doc, version, (len(data) - _HEAD.size - meta_len) // 17)
    n = len(sizes)
    pos = _HEAD.size + meta_len
    kinds = data[pos : pos + n]
    if len(kinds) != n or (n and max(kinds) > STEPS):
        raise CodecError(f"{where}: {n} chunk kinds expected, each 0, 1 or 2")
    chained = n - kinds.count(STORED)
    pos += n
    if len(data) < pos + 16 * (n + chained):
        raise CodecError(f"{where}: {len(data)} bytes, too short for {n} chunks ({chained} chained)")
    ids = _hex_ids(data, pos, n)
    pos += 16 * n
    bases = iter(_hex_ids(data, pos, chained))
    pos += 16 * chained
    packs = fields["packs"]
    chunks: list[ChunkEntry] = []
    for i, (kind, chunk_id) in enumerate(zip(kinds, ids, strict=True)):
        if kind == STORED:
            chunks.append(ChunkEntry(chunk_id))
            continue
        base = next(bases)
        if base == chunk_id:
            raise CodecError(f"{where}: chunk {i} is chained to itself")
        if kind == CHAINED:
            if not packs:
                raise CodecError(f"{where}: chunk {i} is chained, but the manifest lists no pack")
            chunks.append(ChunkEntry(chunk_id, base))
            continue
        steps, pos = _binary_steps(data, pos, sizes[i], f"{where}: chunk {i}")
        chunks.append(_checked_chain(ChunkEntry(chunk_id, base, steps), i, where))
    if pos != len(data):
        raise CodecError(f"{where}: {len(data) - pos} bytes after the last field")
    return dict(fields, chunks=chunks)


def _hex_ids(data: bytes, pos: int, count: int) -> list[str]:
    text = data[pos : pos + 16 * count].hex()
    return [text[j : j + 32] for j in range(0, 32 * count, 32)]


def _binary_steps(data: bytes, pos: int, size: int, where: str) -> tuple[tuple[Step, ...], int]:
    count = data[pos] if pos < len(data) else 0
    pos += 1
    if not 1 <= count <= MAX_CHAIN or pos + count * _STEP.size > len(data):
        raise CodecError(f"{where}: a format-2 chain needs 1..{MAX_CHAIN} steps")
    steps = []
    for patch, length, chunk_id in _STEP.iter_unpack(data[pos : pos + count * _STEP.size]):
        if not 0 < length < size:
            raise CodecError(f"{where}: a patch of {length} bytes for a chunk of {size}")
        steps.append(Step(patch.hex(), length, chunk_id.hex()))
    return tuple(steps), pos + count * _STEP.size


def _decode_json(data: bytes, version: int | None) -> dict[str, Any]:
    """Format 2 (JSON, every chunk entry with its whole chain)."""
    where = "manifest"
    doc = load_json(data, where)
    if isinstance(doc, dict) and doc.get("format") == LEGACY_FORMAT:
        raise LegacyFormatError(
            f"{where} is in format {LEGACY_FORMAT!r} (written by redis_weights 0.1), which this release does "
            "not read: push again from the trainer (a new version supersedes it), or export it with "
            "redis_weights 0.1 and `redis-weights import` the file"
        )
    if not isinstance(doc, dict) or doc.get("format") != PREVIOUS_FORMAT:
        raise CodecError(f"{where}: format is not {FORMAT!r} (nor {PREVIOUS_FORMAT!r})")
    raw_chunks = doc.get("chunks")
    fields, sizes, where = _fields(dict(doc, packs=[]), version, len(raw_chunks) if isinstance(raw_chunks, list) else 0)
    assert isinstance(raw_chunks, list)
    chunks = [_json_entry(e, i, sizes[i], where) for i, e in enumerate(raw_chunks)]
    return dict(fields, chunks=chunks)


def _fields(doc: dict[str, Any], version: int | None, room: int) -> tuple[dict[str, Any], list[int], str]:
    """The validated fields of either format but the chunks; the chunk sizes; how errors name it.
    ``room``: the chunk entries the stored form has room for (the chunk count is checked against it
    before the sizes are built)."""
    where = "manifest"
    try:
        number, header_len, total = doc["version"], doc["header_len"], doc["total_bytes"]
        size, algo, raw_packs = doc["chunk_size"], doc["checksum_algo"], doc["packs"]
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
    if -(-total // size) > room:  # checked before the sizes are built
        raise CodecError(f"{where}: {total} bytes in chunks of {size} need {-(-total // size)} chunk entries")
    if not _is_int(header_len) or not 8 <= header_len <= min(total, 8 + MAX_HEADER_BYTES):
        raise CodecError(f"{where}: header_len {header_len!r} out of range")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CodecError(f"{where}: metadata must map strings to strings")
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
    fields = {
        "version": number,
        "header_len": header_len,
        "tensors": entries,
        "chunk_size": size,
        "total_bytes": total,
        "metadata": metadata,
        "created": float(created) if isinstance(created, float) or (_is_int(created) and abs(created) < 2**63) else 0,
        "producer": str(producer),
        "keyframe": keyframe,
        "parent": parent,
        "depth": depth,
        "wire_dtype": wire,
        "cast": {str(k): v for k, v in cast.items()},
        "uploaded_bytes": uploaded,
        "packs": _packs(raw_packs, keyframe, number, pack_limit(size), where),
    }
    return fields, chunk_sizes(total, size), where


def _packs(raw: Any, keyframe: int, version: int, limit: int, where: str) -> list[Pack]:
    """The pack list: ``[version, id, bytes]`` each, versions ascending within the chain."""
    if not isinstance(raw, list):
        raise CodecError(f"{where}: packs must be a list")
    packs: list[Pack] = []
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not _is_int(item[0])
            or not (packs[-1].version if packs else keyframe) <= item[0] <= version
            or not _is_id(item[1])
            or not _is_int(item[2])
            or not 0 < item[2] <= limit
        ):
            raise CodecError(f"{where}: bad pack {str(item)[:120]} (version {keyframe}..{version} ascending, "
                             f"32-hex-digit id, 1..{limit} bytes)")  # fmt: skip
        packs.append(Pack(item[0], item[1], item[2]))
    return packs


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def _json_entry(raw: Any, index: int, size: int, where: str) -> ChunkEntry:
    """One validated format-2 chunk entry: ids are 32 hex digits, a chain is short, acyclic and ends
    at ``id``, and every patch is smaller than the chunk (a patch that is not would never be stored)."""
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
    return _checked_chain(ChunkEntry(raw["id"], base, tuple(parsed)), index, where)


def _checked_chain(entry: ChunkEntry, index: int, where: str) -> ChunkEntry:
    if entry.steps[-1].id != entry.id:
        raise CodecError(f"{where}: chunk {index}: its chain ends at {entry.steps[-1].id}, not at its id {entry.id}")
    if len(set(entry.chain)) != len(entry.chain):
        raise CodecError(f"{where}: chunk {index}: its chain has a cycle (an id appears twice)")
    return entry
