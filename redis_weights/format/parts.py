"""Bytes held as parts: byte views that tile a chunk or a region in order (the tensors of a
stream read in place, a header beside them). One owner for reading a span of them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def gather(parts: Sequence[Any], out: Any, start: int = 0, end: int | None = None) -> int:
    """Copy bytes ``[start, end)`` of the concatenation of ``parts`` (byte views) to the front of
    ``out`` (a writable byte view at least that long); ``end`` defaults to the parts' total.
    Returns the number of bytes copied. Only the parts that overlap the span are touched."""
    total = sum(len(p) for p in parts)
    end = total if end is None else end
    if not 0 <= start <= end <= total:
        raise ValueError(f"span [{start}, {end}) outside the parts' {total} bytes")
    offset = 0
    for part in parts:
        lo, hi = max(start, offset), min(end, offset + len(part))
        if lo < hi:
            out[lo - start : hi - start] = part[lo - offset : hi - offset]
        offset += len(part)
        if offset >= end:
            break
    return end - start


def within_one(parts: Sequence[Any], start: int, end: int) -> Any | None:
    """Bytes ``[start, end)`` of the concatenation of ``parts`` as a view of one part, or None
    when the span crosses a part boundary."""
    offset = 0
    for part in parts:
        if offset <= start and end <= offset + len(part):
            return part[start - offset : end - offset]
        offset += len(part)
    return None
