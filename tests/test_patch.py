"""Chunk patches (redis_weights.format.patch): lossless round trips, the choice of encoding, and
hostile patches refused with a PatchError before anything is written."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from redis_weights.errors import CodecError, PatchError
from redis_weights.format.manifest import MAX_CHUNK_SIZE
from redis_weights.format.patch import (
    BITMAP,
    GAPS,
    HEADER_SIZE,
    ITEMSIZES,
    _build,
    _sample_says_dense,  # noqa: PLC2701 (the early exit itself)
    apply_patch,
    encode_patch,
    patch_info,
)

PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = ("magic", "version", "kind", "itemsize", "flags", "width", "chunk_len", "count", "pos_len", "val_len")
_HEAD = struct.Struct("<4sBBBBB3xQQQQ")  # the header up to the checksum


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def _changed(base: bytes, itemsize: int, density: float, seed: int) -> bytes:
    """``base`` with about ``density`` of its elements (and tail bytes) changed."""
    rng = np.random.default_rng(seed)
    arr = np.frombuffer(base, dtype=np.uint8).copy()
    n = len(arr) // itemsize
    flip = np.repeat(rng.random(n) < density, itemsize)
    noise = rng.integers(1, 256, len(arr), dtype=np.uint8)
    arr[: n * itemsize] ^= np.where(flip, noise[: n * itemsize], 0).astype(np.uint8)
    if rng.random() < density:
        arr[n * itemsize :] ^= noise[n * itemsize :]
    return arr.tobytes()


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounding to nearest even."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _adam_step(density: float, n: int = 1 << 16, seed: int = 0) -> tuple[bytes, bytes]:
    """bf16 weights before and after an AdamW-like step that changes about ``density`` of them."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(n) * 0.02).astype(np.float32)
    u = (np.sign(rng.standard_normal(n)) * (0.5 + rng.random(n))).astype(np.float32)
    base = _bf16(w)
    lo, hi = 1e-9, 1e-2
    for _ in range(30):  # the learning rate that gives the density
        lr = (lo * hi) ** 0.5
        if np.count_nonzero(_bf16(w - lr * u) != base) / n < density:
            lo = lr
        else:
            hi = lr
    return base.tobytes(), _bf16(w - lr * u).tobytes()


def _roundtrip(base: bytes, patch: bytes) -> bytes:
    """The chunk ``patch`` makes of ``base``, applied into fresh memory and in place (same result)."""
    out = bytearray(len(base))
    apply_patch(base, patch, out)
    inplace = bytearray(base)
    apply_patch(inplace, patch, inplace)
    assert inplace == out
    return bytes(out)


def _resign(patch: bytes | bytearray) -> bytes:
    """``patch`` with its checksum recomputed, so that only the structural checks can refuse it."""
    p = bytearray(patch)
    h = xxhash.xxh3_64(bytes(p[: HEADER_SIZE - 8]))
    h.update(bytes(p[HEADER_SIZE:]))
    p[HEADER_SIZE - 8 : HEADER_SIZE] = struct.pack("<Q", h.intdigest())
    return bytes(p)


def _edit(patch: bytes, body: bytes | None = None, **fields: object) -> bytes:
    """``patch`` with header fields (and optionally the sections) replaced, re-signed."""
    values = _header(patch)
    values.update(fields)
    rest = patch[HEADER_SIZE:] if body is None else body
    return _resign(_HEAD.pack(*values.values()) + b"\0" * 8 + rest)


def _header(patch: bytes) -> dict[str, object]:
    return dict(zip(FIELDS, _HEAD.unpack_from(patch), strict=True))


def _refused(base: bytes, patch: bytes, match: str | None) -> None:
    """``patch`` is refused with a PatchError naming ``match``, and an in-place base stays whole."""
    target = bytearray(base)
    with pytest.raises(PatchError, match=match):
        apply_patch(target, patch, target)
    assert target == base


BASE = bytes(np.random.default_rng(7).integers(0, 256, 4096 + 3, dtype=np.uint8))


# ---------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------
@PROPS
@given(
    base=st.binary(max_size=700),
    itemsize=st.sampled_from(ITEMSIZES),
    density=st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
    encoding=st.sampled_from([None, GAPS, BITMAP]),
    compress=st.booleans(),
)
def test_every_form_of_patch_restores_new_bit_for_bit(base, itemsize, density, seed, encoding, compress):
    new = _changed(base, itemsize, density, seed)
    patch = _build(base, new, itemsize, encoding=encoding, compress=compress)
    assert _roundtrip(base, patch) == new
    info = patch_info(patch)
    assert info.chunk_len == len(base) and info.itemsize == itemsize and info.size == len(patch)
    assert info.changed == int(np.count_nonzero(_elements(base, itemsize) != _elements(new, itemsize)))


def _elements(chunk: bytes, itemsize: int) -> np.ndarray:
    whole = len(chunk) // itemsize * itemsize
    return np.frombuffer(chunk, dtype=np.uint8)[:whole].reshape(-1, itemsize).view(f"V{itemsize}").ravel()


@PROPS
@given(
    base=st.binary(min_size=64, max_size=3000),
    itemsize=st.sampled_from(ITEMSIZES),
    density=st.floats(0.0, 0.3),
    seed=st.integers(0, 2**32 - 1),
)
def test_encode_patch_is_smaller_than_the_chunk_or_none(base, itemsize, density, seed):
    new = _changed(base, itemsize, density, seed)
    patch = encode_patch(base, new, itemsize)
    if patch is not None:
        assert len(patch) < len(new)
        assert _roundtrip(base, patch) == new


@pytest.mark.parametrize("itemsize", ITEMSIZES)
def test_unchanged_chunk_gives_an_empty_patch(itemsize):
    patch = encode_patch(BASE, BASE, itemsize)
    info = patch_info(patch)
    assert info.changed == 0 and info.density == 0.0
    assert len(patch) == HEADER_SIZE + len(BASE) % itemsize  # the tail is always carried
    assert _roundtrip(BASE, patch) == BASE


@pytest.mark.parametrize("itemsize", ITEMSIZES)
def test_every_element_changed_randomly_is_not_worth_a_patch(itemsize):
    new = bytes(np.random.default_rng(8).integers(0, 256, len(BASE), dtype=np.uint8))
    assert encode_patch(BASE, new, itemsize) is None
    patch = _build(BASE, new, itemsize)  # still a valid patch when forced
    assert patch_info(patch).changed >= len(BASE) // itemsize * 0.99
    assert _roundtrip(BASE, patch) == new


def test_buffers_of_every_kind():
    base, new = _adam_step(0.05, n=4096)
    patch = encode_patch(memoryview(base), np.frombuffer(new, dtype=np.uint16), 2)
    out = np.zeros(len(base), dtype=np.uint8)
    apply_patch(np.frombuffer(base, dtype=np.uint16), memoryview(patch), memoryview(out))
    assert out.tobytes() == new
    live = np.frombuffer(bytearray(base), dtype=np.uint16)  # e.g. a tensor's numpy view, patched in place
    apply_patch(live, patch, live)
    assert live.tobytes() == new


# ---------------------------------------------------------------------------------------
# The choice of encoding
# ---------------------------------------------------------------------------------------
def test_sparse_bf16_step_uses_compressed_gaps():
    base, new = _adam_step(0.01)
    patch = encode_patch(base, new, 2)
    info = patch_info(patch)
    assert info.encoding == "gaps" and info.positions_compressed and info.values_compressed
    assert 0.005 < info.density < 0.02
    assert info.ratio < 0.02  # ~1% of the elements changed: ~1% of the bytes
    assert _roundtrip(base, patch) == new


def test_dense_bf16_step_uses_a_compressed_bitmap():
    base, new = _adam_step(0.7)
    patch = encode_patch(base, new, 2)
    info = patch_info(patch)
    assert info.encoding == "bitmap" and info.positions_compressed and info.values_compressed
    assert info.ratio < 0.5  # XOR values compress: 70% of the elements changed, well under half the bytes
    assert _roundtrip(base, patch) == new


def test_small_patches_store_sections_raw():
    new = bytearray(BASE)
    new[100] ^= 1
    new[3000] ^= 0x80
    info = patch_info(encode_patch(BASE, bytes(new), 1))
    assert info.encoding == "gaps" and info.changed == 2
    assert not info.positions_compressed and not info.values_compressed
    assert info.positions_bytes == 2 * 2 and info.values_bytes == 2 + 0  # 2-byte gaps (2899 > 255)


def test_max_ratio_sets_the_bar():
    base, new = _adam_step(0.1, n=8192)
    ratio = patch_info(encode_patch(base, new, 2)).ratio
    assert encode_patch(base, new, 2, max_ratio=ratio * 0.99) is None
    assert encode_patch(base, new, 2, max_ratio=ratio * 1.01) is not None
    assert encode_patch(b"", b"", 2) is None  # nothing is smaller than an empty chunk
    assert encode_patch(BASE[:HEADER_SIZE], BASE[:HEADER_SIZE], 1) is None  # the header alone is as big


@pytest.mark.parametrize("max_ratio", [0.0, -1.0, 1.5, float("nan")])
def test_max_ratio_out_of_range(max_ratio):
    with pytest.raises(PatchError, match="max_ratio"):
        encode_patch(BASE, BASE, 2, max_ratio=max_ratio)


@pytest.mark.parametrize(
    ("base", "new", "itemsize", "match"),
    [
        (BASE, BASE[:-1], 2, "differ in length"),
        (BASE, BASE, 3, "itemsize"),
        (BASE, "text", 2, "bytes-like"),
        (np.zeros((4, 4), dtype=np.uint8)[:, ::2], np.zeros(8, dtype=np.uint8), 1, "contiguous"),
    ],
)
def test_bad_encode_arguments(base, new, itemsize, match):
    with pytest.raises(PatchError, match=match):
        encode_patch(base, new, itemsize)


# ---------------------------------------------------------------------------------------
# Hostile patches
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def patches() -> dict[str, tuple[bytes, bytes]]:
    """(new, patch) against BASE in every form: gaps/bitmap, raw/compressed."""
    sparse = _changed(BASE, 2, 0.05, seed=1)  # gaps of one byte
    dense = _changed(BASE, 2, 0.6, seed=2)
    # every element changed by its low bit (all gaps 0), or all but every fifth (a regular
    # bitmap): positions and values both compress
    ones, fifths = bytearray(BASE), bytearray(BASE)
    for i in range(0, len(BASE) - 1, 2):
        ones[i] ^= 1
        fifths[i] ^= 1 if i % 10 else 0
    out = {
        "gaps_raw": (sparse, _build(BASE, sparse, 2, encoding=GAPS, compress=False)),
        "bitmap_raw": (dense, _build(BASE, dense, 2, encoding=BITMAP, compress=False)),
        "gaps_zstd": (bytes(ones), _build(BASE, bytes(ones), 2, encoding=GAPS)),
        "bitmap_zstd": (bytes(fifths), _build(BASE, bytes(fifths), 2, encoding=BITMAP)),
    }
    for name, (new, patch) in out.items():
        head = _header(patch)
        assert bool(head["flags"] & 1) == name.endswith("zstd") == bool(head["flags"] & 2), name
        assert _roundtrip(BASE, patch) == new
    return out


def test_truncated_or_padded_patch(patches):
    _, patch = patches["gaps_raw"]
    for cut in [0, 1, 4, HEADER_SIZE - 1, HEADER_SIZE, len(patch) - 1]:
        _refused(BASE, patch[:cut], "shorter than its|truncated")
    _refused(BASE, patch + b"\0", "truncated or padded")


@pytest.mark.parametrize("name", ["gaps_raw", "bitmap_zstd"])
def test_every_single_byte_corruption_is_refused(patches, name):
    _, patch = patches[name]
    for i in range(0, len(patch), max(1, len(patch) // 300)):
        bad = bytearray(patch)
        bad[i] ^= 0x10
        _refused(BASE, bytes(bad), None)


def test_corrupted_body_is_caught_by_the_checksum(patches):
    _, patch = patches["gaps_raw"]
    bad = bytearray(patch)
    bad[-1] ^= 1  # a value byte: structurally fine
    _refused(BASE, bytes(bad), "checksum mismatch")


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"magic": b"RWPX"}, "magic"),
        ({"version": 2}, "format version 2"),
        ({"kind": 3}, "unknown positions encoding"),
        ({"itemsize": 3}, "itemsize 3"),
        ({"flags": 0x04}, "unknown flags"),
        ({"width": 3}, "gap width 3"),
        ({"width": 8}, "gap width 8"),
        ({"count": 10**9}, "changes 1000000000 elements of a chunk that has 2049"),
        ({"chunk_len": MAX_CHUNK_SIZE + 2}, "MAX_CHUNK_SIZE"),
        ({"pos_len": 2**63}, "positions section"),
        ({"val_len": 2**64 - 1}, "values section"),
    ],
)
def test_bad_header_fields(patches, fields, match):
    _, patch = patches["gaps_raw"]
    bad = _edit(patch, **fields)
    _refused(BASE, bad, match)
    with pytest.raises(PatchError, match=match):
        patch_info(bad)


def test_reserved_bytes_must_be_zero(patches):
    _, patch = patches["gaps_raw"]
    bad = bytearray(patch)
    bad[10] = 1
    _refused(BASE, _resign(bad), "reserved")


def test_bitmap_with_a_gap_width(patches):
    _, patch = patches["bitmap_raw"]
    _refused(BASE, _edit(patch, width=1), "gap width 1")


def test_patch_for_another_chunk_length(patches):
    new, patch = patches["gaps_raw"]
    _refused(BASE[:-2], patch, "chunk of 4099 bytes")
    _refused(BASE + b"xx", patch, "chunk of 4099 bytes")
    with pytest.raises(PatchError, match="out of 4098"):
        apply_patch(BASE, patch, bytearray(len(BASE) - 1))


def test_count_that_disagrees_with_the_sections(patches):
    _, patch = patches["gaps_raw"]
    count = _header(patch)["count"]
    _refused(BASE, _edit(patch, count=count + 1), "section of")  # sections too short for it
    _, patch = patches["bitmap_raw"]
    head = _header(patch)
    # one element fewer, values section shortened to match: the bitmap's population now disagrees
    body = patch[HEADER_SIZE:]
    shorter = body[: head["pos_len"]] + _drop_last_value(body[head["pos_len"] :], head["count"])
    _refused(BASE, _edit(patch, shorter, count=head["count"] - 1, val_len=head["val_len"] - 2), "bitmap marks")


def _drop_last_value(values: bytes, count: int) -> bytes:
    """Byte planes of ``count`` 2-byte values (plus a 1-byte tail) with the last value removed."""
    lo, hi, tail = values[:count], values[count : 2 * count], values[2 * count :]
    return lo[:-1] + hi[:-1] + tail


def test_gap_beyond_the_last_element(patches):
    _, patch = patches["gaps_raw"]
    head = _header(patch)
    assert head["width"] == 1
    body = bytearray(patch[HEADER_SIZE:])
    body[head["count"] - 1] = 255  # the last gap (low plane): 255 elements further, past the end
    assert sum(body[: head["count"]]) + head["count"] - 1 >= len(BASE) // 2
    _refused(BASE, _edit(patch, bytes(body)), "beyond the chunk's 2049 elements")


def test_positions_are_increasing_by_construction(patches):
    """Gaps are unsigned: a position repeated or out of order cannot be written. The
    largest gap every element can hold is still bounded by the chunk."""
    _, patch = patches["gaps_raw"]
    head = _header(patch)
    count = head["count"]
    body = bytes([255] * count) + patch[HEADER_SIZE + count :]
    _refused(BASE, _edit(patch, body), "beyond the chunk")
    body = bytes(count) + patch[HEADER_SIZE + count :]  # all gaps 0: the first `count` elements
    out = bytearray(len(BASE))
    apply_patch(BASE, _edit(patch, body), out)  # valid, just another change


def test_bitmap_bits_beyond_the_last_element(patches):
    _, patch = patches["bitmap_raw"]
    head = _header(patch)
    body = bytearray(patch[HEADER_SIZE:])
    # 2049 elements: the bitmap's last byte holds element 2048 in bit 0, bits 1-7 are past the end
    body[head["pos_len"] - 1] |= 0x80
    _refused(BASE, _edit(patch, bytes(body)), "beyond the chunk's 2049 elements")


def test_compressed_section_that_is_not_zstd(patches):
    _, patch = patches["bitmap_zstd"]
    head = _header(patch)
    body = b"\x00" * head["pos_len"] + patch[HEADER_SIZE + head["pos_len"] :]
    _refused(BASE, _edit(patch, body), "positions section is not a zstd frame")


def _values_replaced(patch: bytes, section: bytes) -> bytes:
    head = _header(patch)
    return _edit(patch, patch[HEADER_SIZE : HEADER_SIZE + head["pos_len"]] + section, val_len=len(section))


def test_zstd_frame_of_the_wrong_size(patches):
    _, patch = patches["bitmap_zstd"]
    raw = _header(patch)["count"] * 2 + 1
    _refused(BASE, _values_replaced(patch, zstandard.ZstdCompressor().compress(bytes(raw + 1))), "declares")
    _refused(BASE, _values_replaced(patch, zstandard.ZstdCompressor().compress(bytes(raw - 1))), "declares")
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(raw))
    _refused(BASE, _values_replaced(patch, unsized), "declares -1 bytes")


def test_zstd_frame_with_trailing_data(patches):
    _, patch = patches["bitmap_zstd"]
    raw = _header(patch)["count"] * 2 + 1
    frame = zstandard.ZstdCompressor().compress(bytes(raw))
    _refused(BASE, _values_replaced(patch, frame + b"junk"), "does not decompress")
    _refused(BASE, _values_replaced(patch, frame + frame), "does not decompress")


def test_zstd_bomb_is_refused_before_decompressing(patches):
    _, patch = patches["bitmap_zstd"]
    size = 64 * 1024 * 1024  # 64 MiB of zeros in a frame of 2 KB
    frames = zstandard.ZstdCompressor(level=1).compressobj(size=size)
    zeros = bytes(1 << 20)
    bomb = b"".join(frames.compress(zeros) for _ in range(size >> 20)) + frames.flush()
    assert len(bomb) < _header(patch)["count"] * 2  # smaller than the section it claims to be
    bad = _values_replaced(patch, bomb)
    tracemalloc.start()
    try:
        _refused(BASE, bad, "declares 67108864 bytes")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_bad_output_buffers(patches):
    new, patch = patches["gaps_raw"]
    with pytest.raises(PatchError, match="writable"):
        apply_patch(BASE, patch, bytes(len(BASE)))
    with pytest.raises(PatchError, match="bytes-like"):
        apply_patch(BASE, patch, None)
    with pytest.raises(PatchError, match="patch must be a bytes-like"):
        apply_patch(BASE, patch.hex(), bytearray(len(BASE)))
    with pytest.raises(PatchError, match="patch must be a bytes-like"):
        patch_info(None)
    shared = bytearray(2 * len(BASE))
    shared[: len(BASE)] = BASE
    view = memoryview(shared)
    with pytest.raises(PatchError, match="overlaps"):
        apply_patch(view[: len(BASE)], patch, view[1 : len(BASE) + 1])
    apply_patch(view[: len(BASE)], patch, view[len(BASE) :])  # adjacent, not overlapping
    assert bytes(view[len(BASE) :]) == new


def test_patch_info_reads_the_header():
    base, new = _adam_step(0.01, n=8192)
    patch = encode_patch(base, new, 2)
    info = patch_info(patch)
    assert info.elements == 8192 and info.chunk_len == len(base)
    assert info.size == HEADER_SIZE + info.positions_bytes + info.values_bytes == len(patch)
    assert info.ratio == len(patch) / len(base)
    assert issubclass(PatchError, CodecError)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["gaps_raw", "bitmap_raw", "gaps_zstd", "bitmap_zstd"]),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.none() | st.integers(0, 10**6),
)
def test_fuzzed_patches_apply_or_raise_patch_error(patches, name, edits, cut):
    """Random byte edits to a valid patch, re-signed so the parser, not the checksum, decides."""
    _, patch = patches[name]
    bad = bytearray(patch)
    for pos, value in edits:
        bad[pos % len(bad)] = value
    if cut is not None:
        bad = bad[: cut % (len(bad) + 1)]
    bad = _resign(bad) if len(bad) >= HEADER_SIZE else bytes(bad)
    target = bytearray(BASE)
    try:
        apply_patch(target, bad, target)
    except PatchError:
        assert target == BASE


# -- large chunks: the sample decides "dense" early, never "patch" ------------------------------
def test_a_large_chunk_whose_every_element_moves_randomly_is_stored_dense() -> None:
    rng = np.random.default_rng(7)
    base = rng.integers(0, 2**32, size=(4 << 20) // 4, dtype=np.uint32)
    new = rng.integers(0, 2**32, size=base.size, dtype=np.uint32)  # incompressible XOR values
    assert _sample_says_dense(base.tobytes(), new.tobytes(), 4, 1.0)  # decided on 128 KiB, not 4 MiB
    assert encode_patch(base.tobytes(), new.tobytes(), 4) is None


def test_a_large_sparse_chunk_is_still_patched_exactly() -> None:
    rng = np.random.default_rng(8)
    base = rng.integers(0, 2**16, size=(4 << 20) // 2, dtype=np.uint16)
    new = base.copy()
    moved = rng.choice(base.size, size=base.size // 100, replace=False)
    new[moved] ^= rng.integers(1, 8, size=moved.size, dtype=np.uint16)
    assert not _sample_says_dense(base.tobytes(), new.tobytes(), 2, 1.0)
    patch = encode_patch(base.tobytes(), new.tobytes(), 2)
    assert patch is not None and len(patch) < 0.05 * base.nbytes
    out = bytearray(base.tobytes())
    apply_patch(out, patch, out)
    assert bytes(out) == new.tobytes()


def test_changes_outside_the_sample_are_decided_by_the_whole_chunk() -> None:
    rng = np.random.default_rng(9)
    base = rng.integers(0, 2**16, size=(4 << 20) // 2, dtype=np.uint16)
    new = base.copy()
    new[:1000] ^= 1  # the middle (the sample) is unchanged; the start moved
    patch = encode_patch(base.tobytes(), new.tobytes(), 2)
    assert patch is not None
    out = bytearray(base.tobytes())
    apply_patch(out, patch, out)
    assert bytes(out) == new.tobytes()


@pytest.mark.parametrize("chunk_size, itemsize", [(4096, 2), (4096, 4), (8192, 1), (4098, 4), (4096, 8)])
@pytest.mark.parametrize("changes", [1, 7, 40, 5000])
def test_patches_of_many_chunks_in_one_pass_are_the_chunk_by_chunk_patches(chunk_size, itemsize, changes):
    """``encode_patches`` gives, byte for byte, ``encode_patch`` of every chunk that changed (sparse chunks
    built without numpy, dense ones, a last chunk shorter and changed in its tail only, misaligned chunks)."""
    from redis_weights.format.patch import encode_patches

    rng = np.random.default_rng(changes + chunk_size + itemsize)
    length = 9 * chunk_size + 4093
    base = rng.integers(0, 256, length, dtype=np.uint8)
    new = base.copy()
    where = rng.integers(0, length, changes)
    new[where] ^= rng.integers(1, 256, changes, dtype=np.uint8)
    new[-1] ^= 1  # the tail of the last chunk
    cut = [slice(i * chunk_size, (i + 1) * chunk_size) for i in range(10)]
    pieces = [(base[c], new[c]) for c in cut]
    expected = {i: encode_patch(a, b, itemsize) for i, (a, b) in enumerate(pieces) if not np.array_equal(a, b)}
    assert encode_patches(base, new, chunk_size, itemsize) == expected


@pytest.mark.parametrize("itemsize", [2, 4, 8])
@pytest.mark.parametrize("split", ["elements", "bytes"])
def test_patches_of_a_region_given_as_pieces_are_those_of_the_region_in_one_buffer(itemsize, split):
    """The new region given as the pieces that tile it (tensors read in place, cut anywhere, also
    inside a chunk and inside an element) gives the same patches as the region in one buffer."""
    from redis_weights.format.patch import encode_patches

    rng = np.random.default_rng(itemsize)
    chunk_size = 4096
    length = 12 * chunk_size
    base = rng.integers(0, 256, length, dtype=np.uint8)
    new = base.copy()
    where = rng.choice(length, 3000, replace=False)
    new[where] ^= rng.integers(1, 256, len(where), dtype=np.uint8)
    new[5 * chunk_size : 6 * chunk_size] = base[5 * chunk_size : 6 * chunk_size]  # a chunk unchanged
    cuts = sorted(set(rng.choice(length // itemsize, 20, replace=False).tolist()))
    bounds = [0, *(c * itemsize + (1 if split == "bytes" else 0) for c in cuts if c), length]
    pieces = [memoryview(new[a:b]) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    assert len(pieces) > 10
    expected = encode_patches(base, new, chunk_size, itemsize)
    assert 5 not in expected and len(expected) == 11
    assert encode_patches(base, pieces, chunk_size, itemsize) == expected


@pytest.mark.parametrize("itemsize", [2, 4])
@pytest.mark.parametrize("fraction, bits", [(0.01, 0xFF), (0.3, 0x03), (1.0, 0xFF)])
def test_patches_of_large_chunks_in_one_pass_are_the_chunk_by_chunk_patches(itemsize, fraction, bits):
    """Chunks large enough to be sampled first: ``encode_patches`` builds them from the region's diff
    (never diffed again), byte for byte what ``encode_patch`` makes, the chunks whose sample says
    "dense" (None) included."""
    from redis_weights.format.patch import SAMPLE_FROM, encode_patches

    chunk_size = SAMPLE_FROM
    rng = np.random.default_rng(int(fraction * 100) + itemsize)
    length = 3 * chunk_size + 4096
    base = rng.integers(0, 256, length, dtype=np.uint8)
    new = base.copy()
    where = rng.choice(length, int(fraction * length), replace=False)
    new[where] ^= rng.integers(1, 256, len(where), dtype=np.uint8) & bits
    cut = [slice(i * chunk_size, (i + 1) * chunk_size) for i in range(4)]
    expected = {i: encode_patch(base[c], new[c], itemsize) for i, c in enumerate(cut)}
    got = encode_patches(base, new, chunk_size, itemsize)
    assert got == expected
    assert (fraction < 0.5) == all(p is not None for p in got.values())  # every byte new: stored dense
