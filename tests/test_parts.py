"""``format.parts``: spans of bytes held as parts, checked against the joined bytes."""

from __future__ import annotations

import random

import numpy as np
import pytest

from redis_weights.format.parts import gather, within_one


def _parts(sizes: list[int]) -> tuple[list[memoryview], bytes]:
    rng = random.Random(sum(sizes))
    joined = bytes(rng.randrange(256) for _ in range(sum(sizes)))
    out, offset = [], 0
    for size in sizes:
        out.append(memoryview(joined)[offset : offset + size])
        offset += size
    return out, joined


@pytest.mark.parametrize("sizes", [[7], [3, 5, 0, 9], [1, 1, 1, 1], [16, 4]])
def test_gather_copies_any_span_of_the_joined_bytes(sizes):
    parts, joined = _parts(sizes)
    for start in range(len(joined) + 1):
        for end in range(start, len(joined) + 1):
            out = bytearray(b"\xaa" * (len(joined) + 2))
            assert gather(parts, memoryview(out), start, end) == end - start
            assert bytes(out[: end - start]) == joined[start:end]
            assert out[end - start :] == b"\xaa" * (len(out) - (end - start))  # nothing beyond the span


def test_gather_defaults_to_everything_and_fills_numpy_arrays():
    parts, joined = _parts([5, 11, 2])
    arrays = [np.frombuffer(p, dtype=np.uint8) for p in parts]
    out = np.zeros(len(joined), dtype=np.uint8)
    assert gather(arrays, out) == len(joined) and out.tobytes() == joined


@pytest.mark.parametrize("span", [(-1, 2), (3, 2), (0, 19)])
def test_gather_refuses_a_span_outside_the_parts(span):
    parts, _ = _parts([8, 10])
    with pytest.raises(ValueError, match="outside"):
        gather(parts, bytearray(32), *span)


def test_within_one_is_a_view_of_one_part_or_none_across_a_boundary():
    parts, joined = _parts([4, 6])
    view = within_one(parts, 5, 9)
    assert view is not None and bytes(view) == joined[5:9] and view.obj is parts[1].obj
    assert bytes(within_one(parts, 0, 4)) == joined[:4]
    assert within_one(parts, 3, 5) is None
