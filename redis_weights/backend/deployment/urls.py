"""Redis URLs: the checks every kind shares, this library's own query parameters, and redaction.

A URL's password never shows in a message or a log: ``redacted(url)`` replaces it (also
``?password=`` and ``?sentinel_password=``), and ``detail`` drops redis-py's reason for
refusing a URL when that reason quotes any piece of the password.
"""

from __future__ import annotations

import re
from typing import Any

from ...errors import ConfigurationError

_QUERY_PASSWORD = re.compile(r"([?&](?:sentinel_)?password=)[^&#]*", re.IGNORECASE)
_SPECIAL = re.compile(r"[#?/@:]")
_UNENCODED = re.compile(r"[#?/]")  # characters that end a URL's host part: never inside its credentials
_TRUE, _FALSE = ("1", "yes", "true", "on"), ("0", "no", "false", "off")
_OUR_QUERY = ("cluster", "replica_reads")  # query parameters this library reads; redis-py never sees them


def scheme(url: object) -> str:
    """The scheme of ``url`` (``redis``, ``redis+sentinel``...); "" when it has none."""
    if not isinstance(url, str):
        return ""
    name, sep, _ = url.partition("://")
    return name if sep else ""


def _credentials(text: str) -> tuple[int, int]:
    """``(start, end)`` of the credentials in a URL: between ``://`` and the last ``@``
    (a password may hold an unencoded ``#``, ``?``, ``/`` or ``@``); ``(0, -1)`` if none."""
    scheme_end = text.find("://")
    start = 0 if scheme_end < 0 else scheme_end + 3
    end = text.rfind("@")
    return (start, end) if end >= start else (0, -1)


def _secret(text: str) -> str:
    """The password part of a URL's credentials ("" when there is none)."""
    start, end = _credentials(text)
    return text[start:end].partition(":")[2] if end >= 0 else ""


def redacted(url: object) -> str:
    """``url`` for messages and logs: its password (also ``?password=``) replaced by ``***``.

    The user name stays. Everything between ``://`` and the last ``@`` counts as
    credentials, so an unencoded ``#``, ``?``, ``/`` or ``@`` in a password never
    shows, and neither do bracketed IPv6 hosts get lost. Any object is accepted
    (``str()`` of it); nothing here raises.
    """
    text = str(url)
    start, end = _credentials(text)
    if end >= 0:
        user, colon, _ = text[start:end].partition(":")
        if colon:
            text = f"{text[:start]}{user}:***{text[end:]}"
    return _QUERY_PASSWORD.sub(r"\1***", text)


def detail(exc: Exception, url: str) -> str:
    """redis-py's reason for refusing ``url``, unless it quotes any piece of the password."""
    message = str(exc)
    pieces = [p for p in _SPECIAL.split(_secret(url)) if p]
    if any(piece in message for piece in pieces):
        return "it does not parse (percent-encode '#', '?' and '/' in a user or password: %23, %3F, %2F)"
    return message


def check_credentials(url: str) -> None:
    """``ConfigurationError`` for credentials that hold a character ending the host part: the URL
    would end its host part there, so a piece of the password would be taken for the host or the
    port, and show in every later message ("cannot reach user:1234")."""
    start, end = _credentials(url)
    if end >= 0 and _UNENCODED.search(url, start, end):
        raise ConfigurationError(
            f"invalid Redis URL {redacted(url)!r}: percent-encode '#', '?' and '/' in a user or password "
            "(%23, %3F, %2F), and '@' anywhere after the host (%40)"
        )


def flag(value: Any, name: str, url: str) -> bool | None:
    """``True``/``False`` for yes/no-like values, None for None or ``auto`` (``cluster``)."""
    if value is None or isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    if word == "auto" and name == "cluster":
        return None
    raise ConfigurationError(f"invalid Redis URL {redacted(url)!r}: {name}={value!r} (expected yes or no)")


def split_query(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without this library's own query parameters, and their values."""
    base, mark, query = url.partition("?")
    if not mark:
        return url, {}
    ours: dict[str, str] = {}
    kept = []
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if name.lower() in _OUR_QUERY:
            ours[name.lower()] = value
        elif pair:
            kept.append(pair)
    return (f"{base}?{'&'.join(kept)}" if kept else base), ours
