"""Values read from Redis: text, and numbers that parse only when they are what they claim."""

from __future__ import annotations

import pytest

from redis_weights.backend.values import parse_float, parse_int, text, text_or_none


@pytest.mark.parametrize("value, expected", [
    (b"updated", "updated"), ("x", "x"), (7, "7"), (b"\xff", "\ufffd"), (bytearray(b"ab"), "ab"),
])
def test_text(value, expected):
    assert text(value) == expected


def test_text_or_none_keeps_a_missing_key_missing():
    assert text_or_none(None) is None and text_or_none(b"") == ""


@pytest.mark.parametrize("value, expected", [
    (b"12", 12), ("-3", -3), (b" 4 ", 4), (5, 5), (None, None), (b"", None), (b"1.5", None), (b"1_000", None),
    ("\u0661", None), (b"9" * 31, None), (True, None), (2.0, None), (b"0x10", None),
])
def test_parse_int(value, expected):
    assert parse_int(value) == expected


def test_parse_int_range():
    assert parse_int(b"5", minimum=0, maximum=5) == 5
    assert parse_int(b"-1", minimum=0) is None and parse_int(b"6", maximum=5) is None


@pytest.mark.parametrize("value, expected", [
    (b"1700000000.25", 1700000000.25), ("3", 3.0), (2, 2.0), (None, None), (b"nan", None), (b"inf", None),
    (b"garbage", None), (False, None),
])
def test_parse_float(value, expected):
    assert parse_float(value) == expected


def test_parse_float_range():
    assert parse_float(b"0.5", minimum=0.0, maximum=1.0) == 0.5 and parse_float(b"2", maximum=1.0) is None
