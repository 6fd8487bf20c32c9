"""The error guard and logging set-up of the ``redis-weights`` command and the scripts in ``scripts/``.

Every expected failure becomes one line on stderr and an exit code, never a
traceback: 0 success, 1 error, 2 bad usage (argparse), 3 ``doctor`` found something
unsafe, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

import redis

from ...errors import ConfigurationError, RedisWeightsError
from ..admin import connection_error_message
from .args import resolve_connection
from .render import printable

EXIT_ERROR, EXIT_USAGE, EXIT_UNSAFE, EXIT_INTERRUPTED = 1, 2, 3, 130


def setup_logging(verbose: bool = False) -> None:
    """Warnings and errors on stderr; everything with ``--verbose``."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")  # fmt: skip


def guarded(url: str, action: Callable[[], int], prog: str = "redis-weights") -> int:
    """Run ``action``; turn every expected failure into one line on stderr and an exit code.

    Used by the CLI and by the admin scripts in ``scripts/``.
    """
    try:
        return action()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `redis-weights versions | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (RedisWeightsError, ValueError) as exc:  # RefusedError too
        return _fail(prog, str(exc))
    except redis.exceptions.RedisError as exc:
        return _fail(prog, connection_error_message(exc, url))
    except OSError as exc:
        return _fail(prog, f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}")


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {printable(message)}", file=sys.stderr)  # messages quote what Redis holds
    return EXIT_ERROR


def run_script(
    parser: argparse.ArgumentParser, action: Callable[[argparse.Namespace], int], argv: Sequence[str] | None, prog: str
) -> int:
    """Parse (a parser built on ``connection_options``), resolve the connection, run ``action`` guarded.

    The entry point of the admin scripts in ``scripts/``.
    """
    args = parser.parse_args(argv)
    return run_parsed(args, lambda: action(args), prog)


def run_parsed(args: argparse.Namespace, action: Callable[[], int], prog: str = "redis-weights") -> int:
    """Resolve the connection options of parsed ``args`` (an empty one is one line, exit 1), set up
    logging, run ``action`` guarded."""
    try:
        resolve_connection(args)
    except ConfigurationError as exc:
        return _fail(prog, str(exc))
    setup_logging(args.verbose)
    return guarded(args.url, action, prog=prog)
