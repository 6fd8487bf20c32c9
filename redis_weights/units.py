"""Units: human-readable sizes, durations and times for reports (CLI, doctor, demo), and the
seconds-to-milliseconds conversion of every TTL the library sets."""

from __future__ import annotations

import math
import time

_FIRST_SECOND, _LAST_SECOND = -62135596800.0, 253402300799.0  # years 1 to 9999 UTC: what a calendar shows


def human_bytes(nbytes: float) -> str:
    """``1536`` -> ``"1.5 KiB"``; bytes below 1 KiB stay exact."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float | None) -> str:
    """``3.2`` -> ``"3.2s ago"``, minutes and hours for longer; ``"-"`` when unknown."""
    if seconds is None:
        return "-"
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def human_seconds(seconds: float | None) -> str:
    """``0.0123`` -> ``"12.3 ms"``, ``2.5`` -> ``"2.50 s"``; ``"-"`` when unknown."""
    if seconds is None:
        return "-"
    if not math.isfinite(seconds):
        return "?"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def utc_time(timestamp: float) -> str:
    """A wall-clock timestamp as ``YYYY-MM-DD HH:MM:SS`` UTC (``"-"`` for 0, ``"?"`` for one no
    calendar holds: a manifest's ``created`` of 1e300, inf or NaN)."""
    if not timestamp:
        return "-"
    if not _FIRST_SECOND <= timestamp <= _LAST_SECOND:  # False for NaN
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp))


def milliseconds(seconds: float) -> int:
    """A TTL in seconds as whole milliseconds for ``PX``/``PEXPIRE``: at least 1 (0 would be refused
    or delete the key)."""
    return max(1, int(seconds * 1000))
