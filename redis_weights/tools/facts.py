"""The two fields of a manifest that reports need (``created``, ``total_bytes``), read without the manifest.

A manifest lists every chunk: megabytes for a big model. The exporter's scrape and the
ack latencies of ``workers`` need only when each version was made and how big it is,
so they read the first and the last ``PIECE`` bytes of each manifest (one pipelined
round trip), where its writer puts these fields, and take them from there. A manifest
whose fields are not found there is read and parsed whole: a change of layout costs
bytes, never a wrong number.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import CodecError, VersionNotFoundError
from ..versions import VersionRegistry

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
    facts: dict[int, Facts] = {}
    for i, version in enumerate(wanted):
        head, tail = replies[2 * i], replies[2 * i + 1]
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


def _parse(head: bytes, tail: bytes) -> Facts | None:
    """The fields from the two ends of a manifest; None when either is not there."""
    total = _TOTAL.search(head)
    created = _CREATED.findall(tail)  # the last one: the top level's, which its writer puts last
    if total is None or not created:
        return None
    try:
        return Facts(float(created[-1]), int(total.group(1)))
    except ValueError:
        return None
