"""Argument types and connection options of the ``redis-weights`` command and the scripts in ``scripts/``.

``connection_options`` is the parent parser of ``--url`` / ``--namespace`` /
``--verbose``; ``resolve_connection`` fills them in from the environment and the
defaults once parsed. The argparse types refuse bad values with a usage error (exit 2).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

from ...backend.keys import DEFAULT_NAMESPACE
from ...errors import ConfigurationError, RedisWeightsError
from ...format.manifest import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE

DEFAULT_URL = "redis://localhost:6379/0"
ENV_URL, ENV_NAMESPACE = "REDIS_URL", "REDIS_WEIGHTS_NAMESPACE"  # read when --url / --namespace are not given
ENV_EXPORTER_AUTH = "REDIS_WEIGHTS_EXPORTER_AUTH"  # USER:PASSWORD of the exporter's basic auth (never in argv)
ENV_WORKERS = "WORKERS"  # read when ``demo --workers`` is not given (Docker Compose sets it)
DEFAULT_WORKERS = 4


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


non_negative_int, positive_int = _int_at_least(0), _int_at_least(1)  # argparse types (scripts/ use them too)


def port(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {value}")
    return value


def _seconds(minimum: float, inclusive: bool) -> Callable[[str], float]:
    """An argparse type: a finite number above ``minimum`` (or equal to it when ``inclusive``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if inclusive else '>'} {minimum:g}, "
                                             f"got {text!r}")  # fmt: skip
        return value

    return parse


non_negative_float, positive_float = _seconds(0, True), _seconds(0, False)  # argparse types: never NaN or inf


def chunk_size(text: str) -> int:
    """An argparse type: a chunk size in bytes (``8m``, ``512k``, ``4194304``) within the codec's bounds."""
    units = {"k": 1024, "m": 1024**2}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        value = int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 8m, 512k, 4194304)") from None
    if not MIN_CHUNK_SIZE <= value <= MAX_CHUNK_SIZE:
        raise argparse.ArgumentTypeError(f"chunk size must be within {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes")
    return value


def key_value(item: str) -> tuple[str, str]:
    """``KEY=VALUE`` (an ``import --metadata`` item) as a pair; a ``RedisWeightsError`` otherwise."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise RedisWeightsError(f"--metadata expects KEY=VALUE, got {item!r}")
    return key, value


def workers_from_environment() -> int:
    """``$WORKERS`` (a positive integer), else ``DEFAULT_WORKERS``: the ``demo --workers`` default."""
    text = os.environ.get(ENV_WORKERS)
    if not text:
        return DEFAULT_WORKERS
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError as exc:
        raise RedisWeightsError(f"{ENV_WORKERS}={text!r}: {exc}") from None


def connection_options() -> argparse.ArgumentParser:
    """The ``--url`` / ``--namespace`` / ``--verbose`` options (a parent parser; scripts share it).

    Accepted before or after a subcommand; ``resolve_connection`` fills in the
    environment's values and the defaults.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS,
                        help=f"Redis URL (default: ${ENV_URL}, else {DEFAULT_URL}); user:password@ for ACL, "
                             "rediss:// for TLS")  # fmt: skip
    common.add_argument("--namespace", "-n", default=argparse.SUPPRESS,
                        help=f"namespace (default: ${ENV_NAMESPACE}, else {DEFAULT_NAMESPACE!r})")
    common.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return common


def resolve_connection(args: argparse.Namespace) -> None:
    """Set ``args.url``, ``args.namespace`` (and whether each was given) from the options, the environment, defaults.

    An empty value, given or from a variable that is set, is a ``ConfigurationError``: never the
    default in disguise (``-n "$NS"`` with ``NS`` unset must not hit the default namespace).
    """
    url = _given(args, "url", "--url", ENV_URL)
    args.url_given = url is not None
    args.url = url or DEFAULT_URL
    namespace = _given(args, "namespace", "--namespace", ENV_NAMESPACE)
    args.namespace_given = namespace
    args.namespace = namespace or DEFAULT_NAMESPACE
    args.verbose = getattr(args, "verbose", False)


def _given(args: argparse.Namespace, name: str, option: str, variable: str) -> str | None:
    """The option's value, else the environment variable's, else None; an empty one is refused."""
    if hasattr(args, name):
        value, where = getattr(args, name), option
    elif variable in os.environ:
        value, where = os.environ[variable], f"${variable}"
    else:
        return None
    if not value.strip():
        raise ConfigurationError(f"{where} is empty: give a value, or leave it out for the default")
    return value


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """``--json``: the report as one JSON document (``versions``, ``show``, ``workers``, ``doctor``)."""
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    """The ``VERSION`` argument that also takes ``latest`` (``show``, ``export``)."""
    parser.add_argument("version", help="a version number or 'latest'")
