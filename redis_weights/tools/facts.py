"""The two fields of a manifest that reports need (``created``, ``total_bytes``), read without the manifest.

A manifest lists every chunk: megabytes for a big model. The exporter's scrape and the
ack latencies of ``workers`` need only when each version was made and how big it is,
so they read the first and the last ``PIECE`` bytes of each manifest (one pipelined
round trip) and take them from there: a format-3 manifest's JSON meta at its head (one more
round trip for a meta longer than the piece), a format-2 manifest's fields at its two ends. A manifest
whose fields are not found there is read and parsed whole: a change of layout costs
bytes, never a wrong number.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import CodecError, VersionNotFoundError
from ..format.header import MAX_HEADER_BYTES, load_json
from ..format.manifest_format import MAGIC
from ..protocol.versions import VersionRegistry

PIECE = 512  # bytes read at each end of a manifest
_TOTAL = re.compile(rb'"total_bytes":([0-9]{1,19})[,}]')
_CREATED = re.compile(rb'"created":(-?(?:[0-9][0-9.eE+-]{0,30}|Infinity)|NaN)[,}]')


@dataclass(frozen=True)
class Facts:
    """What a report needs of one version."""

    created: float
    total_bytes: int


def read_facts(registry: VersionRegistry, versions: Iterable[int]) -> dict[int, Facts]:
    """``Facts`` of each of ``versions`` still in Redis (absent: deleted, or a manifest that cannot be read)."""
    wanted = sorted(set(versions))
    pipe = registry.client.pipeline(transaction=False)
    for version in wanted:
        key = registry.keyspace.manifest(version)
        pipe.getrange(key, 0, PIECE - 1)
        pipe.getrange(key, -PIECE, -1)
    replies = pipe.execute() if wanted else []
    heads = {v: replies[2 * i] for i, v in enumerate(wanted)}
    lengths = {v: _meta_length(h) for v, h in heads.items() if h}
    longer = {v: n for v, n in lengths.items() if n and 8 + n > len(heads[v])}
    if longer:  # format 3 with a big tensor table: its JSON meta alone, one more round trip
        pipe = registry.client.pipeline(transaction=False)
        for version, length in longer.items():
            pipe.getrange(registry.keyspace.manifest(version), 0, 8 + length - 1)
        heads.update(zip(longer, pipe.execute(), strict=True))
    facts: dict[int, Facts] = {}
    for i, version in enumerate(wanted):
        head, tail = heads[version], replies[2 * i + 1]
        if not head:
            continue  # deleted
        found = _parse(head, tail)
        if found is None:
            try:
                manifest = registry.read_manifest(version)
            except (VersionNotFoundError, CodecError):
                continue
            found = Facts(manifest.created, manifest.total_bytes)
        facts[version] = found
    return facts


def _meta_length(head: bytes) -> int:
    """The length of a format-3 manifest's JSON meta (0 for another format), bounded by the header limit."""
    if head[:4] != MAGIC or len(head) < 8:
        return 0
    (length,) = struct.unpack_from("<I", head, 4)
    return length if length <= MAX_HEADER_BYTES else 0


def _parse(head: bytes, tail: bytes) -> Facts | None:
    """The fields from the two ends of a manifest (format 3: its JSON meta, at the head); None when
    they are not there."""
    length = _meta_length(head)
    if length:
        try:
            meta = load_json(bytes(head[8 : 8 + length]), "manifest meta")
            created, total_bytes = meta["created"], meta["total_bytes"]
            return Facts(float(created), int(total_bytes))
        except (CodecError, KeyError, TypeError, ValueError, OverflowError):
            return None
    total = _TOTAL.search(head)
    created = _CREATED.findall(tail)  # the last one: the top level's, which its writer puts last
    if total is None or not created:
        return None
    try:
        return Facts(float(created[-1]), int(total.group(1)))
    except ValueError:
        return None
