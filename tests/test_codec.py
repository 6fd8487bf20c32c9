"""Codec: weights <-> chunked safetensors, manifest validation, in-place apply."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import safetensors.torch
import torch
from tensordict import TensorDict
from torch import nn

from redis_weights.errors import CodecError, IntegrityError, LegacyFormatError, WeightMismatchError
from redis_weights.format.codec import Encoder, flatten_weights, plan_chunks, tensors_in_chunks
from redis_weights.format.manifest import (
    ChunkEntry,
    Manifest,
    ManifestTooLargeError,
    Pack,
    Step,
    checksum,
    parse_header,
    parse_header_bytes,
)
from redis_weights.threads import Threads
from tests.codec_support import apply_chunks, built_chunks, decode_to_tensors, format2_doc, join_format3, split_format3

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.uint8, torch.bool]


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {
        f"t_{str(d).split('.')[-1]}": (torch.randn(37, 11, generator=g) * 10).to(d) for d in DTYPES
    }
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.empty(0, 4)
    out["big"] = torch.randn(300, 1000, generator=g)
    return out


def _encode(weights, chunk_size=64 * 1024, wire_dtype=None, **kw):
    encoded = Encoder(chunk_size, wire_dtype).encode(weights, **kw)
    manifest = encoded.manifest(1, created=0.0, producer="test")
    chunks = built_chunks(encoded)
    return encoded, Manifest.from_bytes(manifest.to_bytes()), chunks


def test_concatenated_chunks_are_a_safetensors_file_equal_to_the_weights():
    weights = _weights()
    encoded, manifest, chunks = _encode(weights, metadata={"step": "12"})
    loaded = safetensors.torch.load(b"".join(chunks))
    assert loaded.keys() == weights.keys()
    for name, tensor in weights.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert len(chunks) > 3 and all(len(c) == 64 * 1024 for c in chunks[:-1])  # fixed size by stream offset
    assert manifest.total_bytes == len(b"".join(chunks))
    assert manifest.metadata == {"step": "12"}
    assert json.loads(b"".join(chunks)[8 : manifest.header_len])["__metadata__"] == {"step": "12"}


def test_big_tensors_are_sent_from_their_own_memory():
    weights = {"big": torch.zeros(1 << 20)}
    encoded = Encoder(1 << 20).encode(weights)
    weights["big"].fill_(1.0)  # visible through the chunks: they are views, not copies
    data = b"".join(built_chunks(encoded))[encoded.header_len :]
    assert data == torch.ones(1 << 20).numpy().tobytes()
    assert len(encoded.plan[1]) == 1, "a chunk inside one tensor is a view of it"


def test_snapshot_copies_so_later_changes_do_not_leak_into_the_push():
    weights = {"big": torch.zeros(1 << 18)}
    encoded = Encoder(1 << 20).encode(weights, snapshot=True)
    weights["big"].fill_(1.0)
    assert set(b"".join(built_chunks(encoded))[encoded.header_len :]) == {0}


def test_non_contiguous_and_shared_tensors_are_encoded():
    base = torch.arange(12.0).reshape(3, 4)
    weights = {"t": base.t(), "a": base, "alias": base}
    _, manifest, chunks = _encode(weights)
    out = decode_to_tensors(chunks, manifest)
    assert torch.equal(out["t"], base.t()) and torch.equal(out["alias"], base)


def test_plan_chunks_cuts_at_fixed_stream_offsets_whatever_the_pieces():
    pieces = [b"a" * 10, b"b" * 100, b"c" * 5, bytes(range(256)) * 4]
    chunks = [b"".join(bytes(p) for p in parts) for parts in plan_chunks(pieces, 64)]
    assert b"".join(chunks) == b"".join(pieces)
    assert [len(c) for c in chunks] == [64] * 17 + [len(b"".join(pieces)) - 64 * 17]
    regrouped = [b"".join(pieces[:2]), b"".join(pieces[2:])]
    assert [b"".join(bytes(p) for p in parts) for parts in plan_chunks(regrouped, 64)] == chunks


def test_an_unchanged_region_keeps_its_chunk_id_from_version_to_version():
    weights = {"frozen": torch.randn(50_000), "trained": torch.randn(50_000)}
    before = Encoder(16384).encode(weights).ids
    weights["trained"].add_(1.0)
    after = Encoder(16384).encode(weights).ids
    same = [a == b for a, b in zip(before, after, strict=True)]
    assert any(same) and not all(same)
    assert all(len(i) == 32 for i in after) and after[0] == checksum(built_chunks(Encoder(16384).encode(weights))[0])


def test_wire_dtype_casts_floating_tensors_only_and_records_the_trainer_dtypes():
    weights = {"w": torch.randn(64, 64), "h": torch.randn(8).half(), "step": torch.arange(5), "mask": torch.ones(3) > 0}
    _, manifest, chunks = _encode(weights, wire_dtype=torch.bfloat16)
    loaded = safetensors.torch.load(b"".join(chunks))
    assert loaded["w"].dtype == torch.bfloat16 and torch.equal(loaded["w"], weights["w"].bfloat16())
    assert loaded["h"].dtype == torch.bfloat16
    assert torch.equal(loaded["step"], weights["step"]) and torch.equal(loaded["mask"], weights["mask"])
    assert manifest.wire_dtype == "BF16" and manifest.cast == {"w": "F32", "h": "F16"}
    targets = {name: torch.zeros_like(t) for name, t in weights.items()}  # the trainer's own dtypes
    apply_chunks(chunks, manifest, targets)  # accepted without allow_cast: the trainer chose the cast
    assert targets["w"].dtype == torch.float32 and torch.equal(targets["w"], weights["w"].bfloat16().float())
    with pytest.raises(WeightMismatchError, match="key 'step': dtype"):
        apply_chunks(chunks, manifest, dict(targets, step=torch.zeros(5, dtype=torch.int32)))


def test_tensors_in_chunks_names_the_tensors_a_chunk_overlaps():
    weights = {"a": torch.zeros(4096), "b": torch.zeros(4096), "c": torch.zeros(4096)}
    _, manifest, _ = _encode(weights, chunk_size=4096)
    assert tensors_in_chunks(manifest, []) == set()
    assert tensors_in_chunks(manifest, [manifest.num_chunks - 1]) == {"c"}
    assert tensors_in_chunks(manifest, [0]) == {"a"}


def test_apply_is_in_place_and_keeps_identity_device_and_dtype():
    src, dst = nn.Linear(64, 32), nn.Linear(64, 32)
    params_before = {n: (p, p.data_ptr()) for n, p in dst.named_parameters()}
    _, manifest, chunks = _encode(src)
    apply_chunks(chunks, manifest, flatten_weights(dst))
    for name, p in dst.named_parameters():
        assert p is params_before[name][0] and p.data_ptr() == params_before[name][1]
        assert torch.equal(p, getattr(src, name))


def test_tensordict_and_nested_dict_are_flattened_with_dots():
    td = TensorDict({"a": {"b": torch.ones(2)}, "c": torch.zeros(3)}, [])
    assert set(flatten_weights(td)) == {"a.b", "c"}
    assert set(flatten_weights({"x": {"y": torch.ones(1)}})) == {"x.y"}
    module = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    assert "1.running_mean" in flatten_weights(TensorDict.from_module(module))


@pytest.mark.parametrize(
    "weights, match",
    [
        ({"x": [1, 2]}, "not a tensor"),
        ({"x": torch.ones(2).to_sparse()}, "layout"),
        (42, "nn.Module"),
        ({1: torch.ones(1)}, "strings"),
    ],
)
def test_unencodable_weights_are_refused_at_push_time(weights, match):
    with pytest.raises(CodecError, match=match):
        Encoder().encode(weights)


def test_empty_model_round_trips():
    _, manifest, chunks = _encode({})
    assert safetensors.torch.load(b"".join(chunks)) == {}
    apply_chunks(chunks, manifest, {})


def _mismatch(targets, match):
    src = {"w": torch.ones(4, 4), "b": torch.ones(4)}
    _, manifest, chunks = _encode(src)
    before = {k: v.clone() for k, v in targets.items()}
    with pytest.raises(WeightMismatchError, match=match):
        apply_chunks(chunks, manifest, targets)
    for k, v in targets.items():  # the old weights stay whole
        assert torch.equal(v, before[k])


def test_missing_key_is_named():
    _mismatch({"w": torch.zeros(4, 4), "b": torch.zeros(4), "extra": torch.zeros(1)}, "'extra' is missing")


def test_unexpected_key_is_named():
    _mismatch({"w": torch.zeros(4, 4)}, "unexpected key 'b'")


def test_shape_mismatch_is_named():
    _mismatch({"w": torch.zeros(4, 5), "b": torch.zeros(4)}, r"key 'w': shape \[4, 4\]")


def test_dtype_mismatch_is_named_unless_casting_is_allowed():
    _mismatch({"w": torch.zeros(4, 4, dtype=torch.float16), "b": torch.zeros(4)}, "key 'w': dtype")
    src = {"w": torch.full((4, 4), 1.5)}
    _, manifest, chunks = _encode(src)
    target = {"w": torch.zeros(4, 4, dtype=torch.float64)}
    apply_chunks(chunks, manifest, target, allow_cast=True)
    assert torch.equal(target["w"], torch.full((4, 4), 1.5, dtype=torch.float64))


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_damaged_chunks_are_refused_before_anything_is_written(damage):
    src = {"w": torch.randn(100, 100)}
    _, manifest, chunks = _encode(src, chunk_size=8192)
    if damage == "flip":
        chunks[2] = chunks[2][:100] + bytes([chunks[2][100] ^ 0xFF]) + chunks[2][101:]
    elif damage == "truncate":
        chunks[-1] = chunks[-1][:-1]
    else:
        chunks[1] = None  # type: ignore[call-overload]
    target = {"w": torch.zeros(100, 100)}
    with pytest.raises(IntegrityError, match="chunk"):
        apply_chunks(chunks, manifest, target)
    assert not target["w"].any()


def test_a_manifest_that_disagrees_with_the_header_in_the_chunks_is_refused():
    """Checksums cover the chunks only: swapped same-shape entries must not place bytes wrongly."""
    src = {"a": torch.randn(8), "b": torch.randn(8)}
    _, manifest, chunks = _encode(src)
    doc, table = split_format3(manifest.to_bytes())
    doc["tensors"]["a"], doc["tensors"]["b"] = doc["tensors"]["b"], doc["tensors"]["a"]
    target = {"a": torch.zeros(8), "b": torch.zeros(8)}
    with pytest.raises(IntegrityError, match="tensor 'a' differs"):
        apply_chunks(chunks, Manifest.from_bytes(join_format3(doc, table)), target)
    assert not target["a"].any() and not target["b"].any()


def test_a_header_longer_than_a_chunk_is_checked_across_chunks():
    src = {f"layer_{i:03d}.weight": torch.full((3,), float(i)) for i in range(200)}
    _, manifest, chunks = _encode(src, chunk_size=4096)
    assert manifest.header_len > len(chunks[0])
    target = {name: torch.zeros(3) for name in src}
    apply_chunks(chunks, manifest, target)
    assert all(torch.equal(target[n], src[n]) for n in src)


def test_manifest_round_trip_and_validation():
    _, manifest, _ = _encode({"w": torch.ones(3)})
    doc, table = split_format3(manifest.to_bytes())
    assert Manifest.from_bytes(join_format3(doc, table)) == manifest
    for field, value, match in [
        ("format", "other", "format"),
        ("checksum_algo", "md5", "checksum"),
        ("chunk_size", 1, "chunk_size"),
        ("total_bytes", 10**6, "chunk entries"),
        ("version", -1, "version"),
        ("header_len", 10**12, "header_len"),
        ("total_bytes", 1, "total_bytes"),
        ("packs", {}, "packs must be a list"),
        ("packs", [[1, "a" * 32, 0]], "bad pack"),
        ("packs", [[2, "a" * 32, 10]], "bad pack"),  # a pack of a version after this one
    ]:
        with pytest.raises(CodecError, match=match):
            Manifest.from_bytes(join_format3(dict(doc, **{field: value}), table))
    for bad_table, match in [(b"", "chunk entries"), (b"\x03" + table[1:], "chunk kinds"),
                             (table[:-1], "chunk entries"), (table + b"\0", "after the last field"),
                             (b"\x01" + table[1:], "too short")]:  # fmt: skip
        with pytest.raises(CodecError, match=match):
            Manifest.from_bytes(join_format3(doc, bad_table))
    chained = b"\x01" + table[1:] + table[1:17]  # chunk 0 chained to itself
    with pytest.raises(CodecError, match="chained to itself"):
        Manifest.from_bytes(join_format3(dict(doc, packs=[[1, "a" * 32, 10]]), chained))
    with pytest.raises(CodecError, match="lists no pack"):
        Manifest.from_bytes(join_format3(doc, b"\x01" + table[1:] + b"b" * 16))
    with pytest.raises(CodecError, match="not JSON"):
        Manifest.from_bytes(b"\x80not json")
    with pytest.raises(CodecError, match="not JSON"):
        Manifest.from_bytes(b"RWM3\x03\0\0\0abc")
    with pytest.raises(CodecError, match="lacks"):
        Manifest.from_bytes(join_format3({"format": doc["format"]}, b""))
    with pytest.raises(CodecError, match="says it is version 1"):
        Manifest.from_bytes(manifest.to_bytes(), version=2)


def test_a_manifest_of_the_previous_format_is_read():
    """Format 2 (JSON, chains repeated in every entry): namespaces of the previous release keep working."""
    _, manifest, _ = _encode({"w": torch.ones(3)})
    doc = format2_doc(manifest)
    assert Manifest.from_bytes(json.dumps(doc)) == manifest
    for field, value, match in [
        ("chunks", [], "chunk entries"),
        ("chunks", [{"id": "xyz"}], "32-hex-digit id"),
        ("header_len", 10**12, "header_len"),
    ]:
        with pytest.raises(CodecError, match=match):
            Manifest.from_bytes(json.dumps(dict(doc, **{field: value})))
    with pytest.raises(CodecError, match="lacks"):
        Manifest.from_bytes(json.dumps({"format": doc["format"]}))


def test_a_format2_chain_committed_again_is_written_in_format3_and_read_back():
    """A rollback of a version of the previous release: its own patch chains carried over (kind 2)."""
    _, manifest, _ = _encode({"w": torch.randn(3000)}, chunk_size=4096)
    doc = format2_doc(manifest)
    doc["chunks"][1] = {"id": "a" * 32, "base": "b" * 32, "steps": [["c" * 32, 10, "d" * 32], ["e" * 32, 12, "a" * 32]]}
    old = Manifest.from_bytes(json.dumps(doc))
    again = Manifest.from_bytes(old.renumbered(2, created=1.0, producer="rollback").to_bytes())
    assert again.chunks == old.chunks and again.version == 2 and again.objects() == old.objects()
    assert again.chunks[1].steps[1] == Step("e" * 32, 12, "a" * 32)


def test_the_manifest_size_does_not_grow_with_chain_depth():
    """A chained chunk costs the same at any depth: the chain lives in the packs, listed once per version."""
    _, manifest, _ = _encode({"w": torch.randn(1024 * 1024)}, chunk_size=4096)  # 1,025 chunks
    chained = [ChunkEntry(c.id, "b" * 32) for c in manifest.chunks]
    sizes = []
    for depth in (1, 19):
        packs = [Pack(v, f"{v:032x}", 1000) for v in range(2, 2 + depth)]
        deep = replace(manifest, chunks=chained, packs=packs, depth=depth, version=1 + depth, keyframe=1)
        raw = deep.to_bytes()
        assert Manifest.from_bytes(raw) == deep
        sizes.append(len(raw))
    assert sizes[1] < 1.2 * sizes[0] and sizes[0] < 40 * manifest.num_chunks


def test_a_manifest_larger_than_its_workers_accept_is_never_written():
    _, manifest, _ = _encode({"w": torch.randn(2048)}, chunk_size=4096)
    assert len(manifest.to_bytes()) < manifest.limit()
    huge = replace(manifest, metadata={"notes": "x" * manifest.limit()})
    with pytest.raises(ManifestTooLargeError, match="more than the .* a worker of this model accepts"):
        huge.to_bytes()


def test_a_manifest_of_the_previous_format_is_refused_with_what_to_do():
    with pytest.raises(LegacyFormatError, match="push again from the trainer"):
        Manifest.from_bytes(json.dumps({"format": "redis_weights/1", "version": 3}), version=3)


@pytest.mark.parametrize(
    "chain, match",
    [
        ({"base": "b" * 32, "steps": []}, "1..64 steps"),
        ({"base": "b" * 32, "steps": [["c" * 32, 10, "d" * 32]]}, "ends at"),
        ({"base": "b" * 32, "steps": [["c" * 32, 10, "b" * 32], ["e" * 32, 10, "a" * 32]]}, "cycle"),
        ({"base": "b" * 32, "steps": [["c" * 32, 10**9, "a" * 32]]}, "bad step"),
        ({"base": "b" * 32, "steps": [["c" * 32, 10, "a" * 32]] * 65}, "1..64 steps"),
        ({"base": 5, "steps": [["c" * 32, 10, "a" * 32]]}, "base id"),
    ],
)
def test_a_chain_with_a_cycle_a_gap_or_no_end_is_refused(chain, match):
    _, manifest, _ = _encode({"w": torch.ones(3)})
    doc = format2_doc(manifest)
    doc["chunks"] = [{"id": "a" * 32, **chain}]
    with pytest.raises(CodecError, match=match):
        Manifest.from_bytes(json.dumps(doc))


@pytest.mark.parametrize(
    "header, match",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, None),
        ({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "bad shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 99]}}, "outside"),
        ({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 8]}}, "does not fill"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "gap"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, "describes 4 bytes"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"k": 1}}, "__metadata__"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_parse_header_refuses_lies(header, match):
    if match is None:
        assert parse_header(header, 8)[0].shape == (2,)
    else:
        with pytest.raises(CodecError, match=match):
            parse_header(header, 8)


def test_parse_header_bytes_bounds_the_length_before_allocating():
    huge = (10**12).to_bytes(8, "little") + b"{}"
    with pytest.raises(CodecError, match="out of range"):
        parse_header_bytes(huge, 100)
    _, manifest, chunks = _encode({"w": torch.ones(3)})
    start, entries = parse_header_bytes(b"".join(chunks), manifest.total_bytes)
    assert start == manifest.header_len and entries == manifest.tensors


def test_a_region_of_the_stream_is_a_view_where_it_lies_in_one_piece():
    """``Encoded.region``: a cast stream is one staging buffer, header included (a delta diffs it where
    it lies); bytes across the header and tensors read in place, or across two such tensors, are no one piece."""
    weights = {"a": torch.randn(3000), "b": torch.randn(5000)}
    cast = Encoder(4096, wire_dtype=torch.bfloat16).encode(weights)
    stream = b"".join(bytes(cast.chunk(i)[0]) for i in range(len(cast.plan)))
    lo, hi = cast.header_len + 10, cast.total_bytes - 6
    view = cast.region(lo, hi)
    assert view is not None and bytes(view) == stream[lo:hi]
    assert bytes(cast.region(0, cast.header_len + 10)) == stream[: cast.header_len + 10]  # the header staged too
    plain = Encoder(4096).encode(weights)
    first, second = plain.tensors
    assert plain.region(0, plain.header_len + 10) is None  # the header and a tensor read in place: two pieces
    boundary = plain.header_len + first.end
    assert plain.region(boundary - 8, boundary + 8) is None
    assert bytes(plain.region(boundary, boundary + 8)) == weights[second.name][:2].numpy().tobytes()


def test_a_stream_staged_whole_is_traded_once_for_the_next_staging_buffer():
    """``Encoded.take_stream``: the planner keeps a cast stream's staging buffer instead of copying it and
    hands its old buffer to the encoder; never twice, never after the encoder reused the buffer, and
    never for a stream of tensors read in place."""
    weights = {"a": torch.randn(3000), "b": torch.randn(5000)}
    encoder = Encoder(4096, wire_dtype=torch.bfloat16)
    first = encoder.encode(weights)
    stream = b"".join(bytes(first.chunk(i)[0]) for i in range(len(first.plan)))
    spare = np.zeros(first.total_bytes, dtype=np.uint8)
    kept = first.take_stream(spare)
    assert kept is not None and kept.tobytes() == stream
    assert first.take_stream(np.zeros_like(spare)) is None  # traded already: the encoder stages elsewhere now
    with torch.no_grad():
        weights["a"].add_(1.0)
    second = encoder.encode(weights)
    assert kept.tobytes() == stream  # the kept stream is not overwritten by the next encode
    assert np.shares_memory(np.frombuffer(second.chunk(0)[0], dtype=np.uint8), spare)  # staged in the spare
    third = encoder.encode(weights)
    assert second.take_stream(None) is None  # encoded again since: its buffer holds the third stream
    assert third.take_stream(None) is not None  # None: the encoder allocates its next staging buffer
    assert Encoder(4096).encode(weights).take_stream(None) is None  # tensors read in place: nothing staged
    assert Encoder(4096).encode(weights, snapshot=True).take_stream(None) is not None  # snapshotted: staged whole


def test_an_encode_on_threads_stages_and_names_the_same_bytes_as_one_on_the_caller():
    """The casts and copies spread over threads (``diff_threads``) give the stream and the ids of
    the inline encode: each tensor lands in its own region, each id is its chunk's."""
    weights = {f"t{i}": torch.randn(1000 + 937 * i) for i in range(9)} | {"steps": torch.arange(77)}
    threads = Threads(3, "test-encode")
    try:
        for wire, snapshot in ((torch.bfloat16, False), (None, True)):
            alone = Encoder(4096, wire_dtype=wire).encode(weights, snapshot=snapshot)
            spread = Encoder(4096, wire_dtype=wire, threads=threads).encode(weights, snapshot=snapshot)
            assert spread.ids == alone.ids
            assert [bytes(spread.chunk(i)[0]) for i in range(len(spread.plan))] == [
                bytes(alone.chunk(i)[0]) for i in range(len(alone.plan))
            ]
    finally:
        threads.close()
