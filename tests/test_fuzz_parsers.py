"""Fuzz the parsers of what is read from Redis: the manifest and the safetensors header.

Whatever the bytes, parsing either succeeds with a self-consistent layout or raises
``CodecError``: no other exception, no crash, no allocation sized by the input.
"""

from __future__ import annotations

import json
import math
import struct

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from redis_weights.errors import CodecError, WeightMismatchError
from redis_weights.format.codec import DTYPES, Encoder
from redis_weights.format.manifest import MAX_CHAIN, Manifest, parse_header, parse_header_bytes
from redis_weights.format.packs import build_packs, parse_pack
from tests.codec_support import apply_chunks, built_chunks, format2_doc, join_format3, split_format3

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON values, biased towards the shapes the parsers look at.
_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
_dims = st.lists(st.integers(-2, 2**66) | st.sampled_from([0, 1, 2**31, 2**63, 2**64]), max_size=5)
_entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*DTYPES, "F128", "", None]),
        "shape": _dims | _json,
        "data_offsets": st.lists(st.integers(-10, 2**65), min_size=0, max_size=3) | _json,
    }
)
_header = st.dictionaries(st.text(min_size=1, max_size=6), _entry | _json, max_size=4)


def _assert_consistent(entries, data_size: int) -> None:
    position = 0
    for e in entries:
        assert e.begin == position and e.end >= e.begin
        assert len(e.shape) <= 64
        # what a receiver allocates for an entry is bounded by the data it actually has
        assert e.nbytes <= data_size
        torch.empty(e.shape, dtype=e.torch_dtype, device="meta")  # representable
        position = e.end
    assert position == data_size


@FUZZ
@given(header=_header, data_size=st.integers(0, 2**40))
@example(header={"0": {"dtype": []}}, data_size=0)  # an unhashable dtype: once a TypeError, not a CodecError
def test_parse_header_accepts_only_consistent_layouts(header, data_size):
    try:
        entries = parse_header(header, data_size)
    except CodecError:
        return
    _assert_consistent(entries, data_size)


@FUZZ
@given(dtype=st.sampled_from(sorted(DTYPES)), shape=_dims, extra=st.integers(0, 8))
def test_parse_header_on_plausible_entries(dtype, shape, extra):
    """Offsets computed from the shape: only the shape itself can be wrong (overflow, huge dims)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()
    header = {"t": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}
    try:
        entries = parse_header(header, nbytes + extra)
    except CodecError:
        return
    _assert_consistent(entries, nbytes + extra)


@FUZZ
@given(prefix=st.binary(max_size=64), total=st.integers(0, 2**64))
def test_parse_header_bytes_on_random_bytes(prefix, total):
    try:
        start, entries = parse_header_bytes(prefix, total)
    except CodecError:
        return
    assert 8 <= start <= total
    _assert_consistent(entries, total - start)


@FUZZ
@given(length=st.integers(0, 2**64 - 1), body=st.binary(max_size=32))
def test_a_header_claiming_gigabytes_is_refused_without_allocating(length, body):
    prefix = struct.pack("<Q", length) + body
    try:
        parse_header_bytes(prefix, 2**62)
    except CodecError:
        return
    assert length <= len(body)


def _valid_manifest() -> dict:
    """A format-2 manifest (JSON): still read, so still fuzzed."""
    weights = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([True, False])}
    encoded = Encoder(4096).encode(weights)
    return format2_doc(encoded.manifest(1, created=0.0, producer="fuzz"))


_BASE = _valid_manifest()
_META3, _TABLE3 = split_format3(
    Encoder(4096).encode({"w": torch.randn(3000)}).manifest(1, created=0.0, producer="fuzz").to_bytes()
)


@FUZZ
@given(field=st.sampled_from(sorted(_BASE)), value=_json | _dims)
def test_manifest_with_one_field_replaced(field, value):
    doc = dict(_BASE, **{field: value})
    try:
        manifest = Manifest.from_bytes(json.dumps(doc).encode())
    except CodecError:
        return
    _assert_consistent(manifest.tensors, manifest.total_bytes - manifest.header_len)
    assert len(manifest.chunks) == manifest.num_chunks == len(manifest.chunk_sizes)
    assert sum(manifest.chunk_sizes) == manifest.total_bytes


@FUZZ
@given(doc=_json)
def test_manifest_from_arbitrary_json(doc):
    try:
        Manifest.from_bytes(json.dumps(doc).encode())
    except CodecError:
        pass


@FUZZ
@given(raw=st.binary(max_size=256))
def test_manifest_from_arbitrary_bytes(raw):
    try:
        Manifest.from_bytes(raw)
    except CodecError:
        pass


@FUZZ
@given(data=st.data())
def test_flipped_bytes_in_a_manifest_never_write_a_mix(data):
    """Corrupt a valid manifest byte-wise; applying it either fails whole or leaves valid weights."""
    weights = {"w": torch.randn(64), "b": torch.randn(8)}
    encoded = Encoder(4096).encode(weights)
    raw = bytearray(encoded.manifest(1, created=0.0, producer="fuzz").to_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    targets = {"w": torch.zeros(64), "b": torch.zeros(8)}
    try:
        manifest = Manifest.from_bytes(bytes(raw))
        apply_chunks(built_chunks(encoded), manifest, targets)
    except (CodecError, WeightMismatchError):  # a flipped name is a mismatch with the policy
        assert all(bool((t == 0).all()) for t in targets.values()), "a refused version wrote into the weights"
        return
    # accepted: the layout still fits, the checksums still match, the bytes are the originals
    assert torch.equal(targets["w"], weights["w"]) and torch.equal(targets["b"], weights["b"])


_ID = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)
_STEP = st.lists(st.one_of(_ID, st.integers(-5, 10**6), _json), min_size=0, max_size=4)


@FUZZ
@given(
    entry=st.fixed_dictionaries(
        {"id": _ID}, optional={"base": st.one_of(_ID, _json), "steps": st.lists(_STEP, max_size=70) | _json}
    )
)
def test_chunk_entries_with_arbitrary_chains(entry):
    """A chain either parses into something bounded, acyclic and ending at the chunk's id, or is refused."""
    doc = dict(_BASE, chunks=[entry])
    try:
        manifest = Manifest.from_bytes(json.dumps(doc).encode())
    except CodecError:
        return
    (parsed,) = manifest.chunks
    assert parsed.chain[-1] == parsed.id and len(set(parsed.chain)) == len(parsed.chain)
    assert len(parsed.steps) <= MAX_CHAIN
    assert all(0 < s.size < manifest.total_bytes for s in parsed.steps)


@FUZZ
@given(field=st.sampled_from(sorted(_META3)), value=_json | _dims)
def test_format3_manifest_with_one_meta_field_replaced(field, value):
    try:
        manifest = Manifest.from_bytes(join_format3(dict(_META3, **{field: value}), _TABLE3))
    except CodecError:
        return
    assert len(manifest.chunks) == manifest.num_chunks == len(manifest.chunk_sizes)
    assert sum(manifest.chunk_sizes) == manifest.total_bytes


@FUZZ
@given(table=st.binary(max_size=200),
       packs=st.lists(st.lists(_scalars | st.text("0123456789abcdef", min_size=32, max_size=32), max_size=4),
                      max_size=3))  # fmt: skip
def test_format3_manifest_with_an_arbitrary_chunk_table_and_packs(table, packs):
    """Any table and pack list: a self-consistent manifest (chained chunks only with packs), or CodecError."""
    try:
        manifest = Manifest.from_bytes(join_format3(dict(_META3, packs=packs), _TABLE3[:1] + table))
    except CodecError:
        return
    assert len(manifest.chunks) == manifest.num_chunks
    assert all(c.base != c.id for c in manifest.chunks if c.base is not None)
    assert manifest.packs or all(c.base is None or c.steps for c in manifest.chunks)


@FUZZ
@given(raw=st.binary(max_size=256))
def test_format3_manifest_from_arbitrary_bytes_after_the_magic(raw):
    try:
        Manifest.from_bytes(b"RWM3" + raw)
    except CodecError:
        pass


@FUZZ
@given(data=st.data())
def test_a_pack_parses_into_bounded_records_or_is_refused(data):
    """A valid pack with bytes flipped or cut: records inside the pack and the chunks, or CodecError."""
    sizes = [4096] * 8
    records = [(i, f"{i:032x}", f"{i + 100:032x}", bytes(range(i + 1))) for i in range(0, 8, 2)]
    (pack,) = build_packs(records, 1 << 20)
    assert [(r.index, r.length) for r in parse_pack(pack, sizes, "pack")] == [(i, len(p)) for i, _, _, p in records]
    raw = bytearray(pack)
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    try:
        parsed = parse_pack(bytes(raw), sizes, "pack")
    except CodecError:
        return
    assert all(0 < r.length < 4096 and r.offset + r.length <= len(raw) and r.index < 8 for r in parsed)
    assert [r.index for r in parsed] == sorted({r.index for r in parsed})
