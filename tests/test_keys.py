"""Key layout: every name of a namespace shares one cluster hash tag and is built in keys.py."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from redis_weights.backend.keys import Keys, validate_namespace

LAYOUT = Path(__file__).resolve().parent.parent / "docs" / "design" / "keys.md"
# Members of Keys that do not name one key or channel (helpers, patterns, the prefix).
NOT_NAMES = {"namespace", "prefix", "full", "relative", "pattern", "is_blob", "rank_version_pattern", "rank_of",
             "patterns", "acl_key_patterns", "chunk_pattern", "chunk_id_of", "pending_pattern", "legacy_chunks_pattern",
             "acl_pattern", "index_keys", "is_library_name"}
# Sample arguments for the members that take some, and the layout table's placeholders for them.
SAMPLES = {"version": 7, "rank": 1, "chunk_id": "0123456789abcdef" * 2, "token": "t0", "tag": "t5", "index": 3}
PLACEHOLDERS = {"{ns}": "{policy}", "<ns>": "policy", "<N>": "7", "<id>": "0123456789abcdef" * 2, "<token>": "t0",
                "<r>": "1", "<tag>": "t5", "<i>": "3"}


def documented_layout() -> dict[str, bool]:
    """The manual's "Redis key layout" table: each name (placeholders filled in) -> whether it is a channel."""
    section = LAYOUT.read_text()
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| (channel )?`(rw:[^`]+)` \|", line)
        if match:
            name = match.group(2)
            for placeholder, value in PLACEHOLDERS.items():
                name = name.replace(placeholder, value)
            assert name not in rows, f"{name} listed twice"
            rows[name] = bool(match.group(1))
    return rows


def built_names() -> dict[str, bool]:
    """Every name keys.py builds, with sample arguments -> whether it is a channel."""
    k = Keys("policy")
    names = {}
    for member, value in inspect.getmembers(Keys):
        if member.startswith("_") or member in NOT_NAMES:
            continue
        if isinstance(value, property):
            name = getattr(k, member)
        else:
            params = list(inspect.signature(value).parameters)[1:]
            name = getattr(k, member)(*(SAMPLES[p] for p in params))
        names[name] = member.endswith("_channel")
    return names


def test_the_layout_table_lists_every_key_exactly_as_keys_py_builds_it():
    assert documented_layout() == built_names()


def test_layout_matches_the_documented_table():
    k = Keys("policy")
    assert k.latest == "rw:{policy}:latest"
    assert k.counter == "rw:{policy}:next"
    assert k.versions == "rw:{policy}:versions"
    assert k.manifest(7) == "rw:{policy}:v:7:manifest"
    assert k.chunk("ab" * 16) == "rw:policy:c:{" + "ab" * 16 + "}"
    assert k.chunk_id_of(k.chunk("ab" * 16).encode()) == "ab" * 16 and k.chunk_id_of(k.latest) is None
    assert k.pending("t") == "rw:{policy}:pending:t"
    assert k.gc_epoch == "rw:{policy}:gc:epoch" and k.gc_lease == "rw:{policy}:gc:lease"
    with pytest.raises(ValueError, match="chunk id"):
        k.chunk("../etc")
    assert k.rank_status(1) == "rw:{policy}:rank:1:status"
    assert k.rank_version(1) == "rw:{policy}:rank:1:version"
    assert k.rank_alive(1) == "rw:{policy}:rank:1:alive"
    assert k.updates_channel == "rw:{policy}:updates"
    assert k.acks_channel == "rw:{policy}:acks"


def test_control_keys_share_the_namespace_tag_and_chunks_carry_their_own():
    k = Keys("ns-1")
    names = [k.latest, k.counter, k.versions, k.manifest(1), k.rank_status(3), k.rank_alive(3), k.pending("x"),
             k.gc_epoch, k.gc_lease]  # fmt: skip
    assert {n[n.index("{") + 1 : n.index("}")] for n in names} == {"ns-1"}
    chunk = k.chunk("cd" * 16)
    assert chunk[chunk.index("{") + 1 : chunk.index("}")] == "cd" * 16 and chunk.startswith("rw:ns-1:c:")


def test_the_chunk_pattern_matches_chunks_of_this_namespace_only(fake_redis):
    k = Keys("p")
    fake_redis.set(k.chunk("ab" * 16), b"x")
    fake_redis.set(Keys("p2").chunk("ab" * 16), b"x")
    fake_redis.set(k.latest, 1)
    assert [n.decode() for n in fake_redis.scan_iter(match=k.chunk_pattern)] == [k.chunk("ab" * 16)]


def test_relative_names_round_trip_and_blobs_are_recognised():
    k = Keys("a")
    assert k.relative(k.full("rank:2:status")) == "rank:2:status"
    assert k.relative(k.latest.encode()) == "latest"
    assert Keys.is_blob("v:3:c:0") and not Keys.is_blob("v:3:manifest") and not Keys.is_blob("latest")
    with pytest.raises(ValueError):
        k.relative("rw:{b}:latest")


@pytest.mark.parametrize("bad", ["", "a b", "x{y}", "a:b", "a" * 129, None, 3])
def test_namespaces_that_would_break_the_hash_tag_are_refused(bad):
    with pytest.raises(ValueError):
        validate_namespace(bad)


def test_scan_pattern_escapes_the_braces(fake_redis):
    k = Keys("p")
    fake_redis.set(k.latest, 1)
    fake_redis.set("rw:{other}:latest", 1)
    assert [n.decode() for n in fake_redis.scan_iter(match=k.pattern)] == [k.latest]


def test_the_namespace_check_refuses_a_trailing_newline():
    for bad in ("policy\n", "policy\r\n", "poli\ncy", "\npolicy"):
        with pytest.raises(ValueError, match="invalid namespace"):
            Keys(bad)
    assert Keys("policy-1.a_b").namespace == "policy-1.a_b"
    k = Keys("policy")
    assert k.rank_of(k.rank_version(3)) == 3 and k.rank_of(k.rank_version(3) + "\n") is None
    assert k.is_blob("v:1:c:0") and not k.is_blob("v:1:c:0\n")
