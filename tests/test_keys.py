"""Key layout: every name of a namespace shares one cluster hash tag and is built in keys.py."""

from __future__ import annotations

import pytest

from redis_weights.keys import Keys, validate_namespace


def test_layout_matches_the_documented_table():
    k = Keys("policy")
    assert k.latest == "rw:{policy}:latest"
    assert k.counter == "rw:{policy}:next"
    assert k.versions == "rw:{policy}:versions"
    assert k.manifest(7) == "rw:{policy}:v:7:manifest"
    assert k.chunk(7, 3) == "rw:{policy}:v:7:c:3"
    assert k.chunks(2, 2) == ["rw:{policy}:v:2:c:0", "rw:{policy}:v:2:c:1"]
    assert k.rank_status(1) == "rw:{policy}:rank:1:status"
    assert k.rank_version(1) == "rw:{policy}:rank:1:version"
    assert k.rank_alive(1) == "rw:{policy}:rank:1:alive"
    assert k.updates_channel == "rw:{policy}:updates"
    assert k.acks_channel == "rw:{policy}:acks"


def test_every_key_carries_the_same_hash_tag():
    k = Keys("ns-1")
    names = [k.latest, k.counter, k.versions, k.manifest(1), k.chunk(1, 0), k.rank_status(3), k.rank_alive(3)]
    assert {n[n.index("{") + 1 : n.index("}")] for n in names} == {"ns-1"}


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
