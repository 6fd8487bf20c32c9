"""Decode values read from Redis: text, and numbers within a range.

redis-py returns ``bytes`` (responses are not decoded: weights are binary), ``str``
or an already parsed ``int`` (INFO fields), and ``None`` for a missing key. Status
keys, heartbeats and server replies are written by other processes, or by hand,
so a value that does not parse is treated as absent rather than raised.
"""

from __future__ import annotations

import math
import re

_INTEGER = re.compile(r"[+-]?[0-9]{1,30}")
MAX_VERSION = 2**53  # the scripts' Lua numbers are doubles: above this, version numbers lose precision  # ASCII digits only, as Redis writes them (no "1_000", no "١")


def text(value: object) -> str:
    """``value`` as text: bytes decoded as UTF-8 (undecodable bytes replaced), anything else ``str()``."""
    return value.decode(errors="replace") if isinstance(value, (bytes, bytearray)) else str(value)


def text_or_none(value: object) -> str | None:
    """``text(value)``, but ``None`` (a missing key) stays ``None``."""
    return None if value is None else text(value)


def parse_int(value: object, *, minimum: int | None = None, maximum: int | None = None) -> int | None:
    """``value`` as an int in ``[minimum, maximum]``; None when missing, not an integer or out of range."""
    if value is None or isinstance(value, (bool, float)):
        return None
    if isinstance(value, int):
        number = value
    else:
        digits = text(value).strip()
        if not _INTEGER.fullmatch(digits):
            return None
        number = int(digits)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        return None
    return number


def parse_float(value: object, *, minimum: float | None = None, maximum: float | None = None) -> float | None:
    """``value`` as a finite float in ``[minimum, maximum]``; None when missing, not a number or out of range."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value) if isinstance(value, (int, float)) else float(text(value).strip())
    except ValueError:
        return None
    if not math.isfinite(number):
        return None
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        return None
    return number
