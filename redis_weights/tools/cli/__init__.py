"""The ``redis-weights`` command: inspect and steer the weights in Redis from a shell.

The package is split by job: ``commands`` (the registry ``COMMANDS``: one module per command,
each declaring its name, one-line help, arguments and handler), ``args`` (argument types,
``--url``/``--namespace``), ``render`` (tables, JSON), ``guard`` (the error guard and logging
set-up that the scripts in ``scripts/`` import too); this module builds the parser from the
registry and holds the entry point, so a new command never touches it. Failures print one line
on stderr and exit non-zero, never a traceback. Tables are boxed on a terminal and plain,
aligned text when piped; ``--json`` is for scripts.

Exit codes: 0 success, 1 error, 2 bad usage, 3 ``doctor`` found something unsafe,
130 interrupted.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .args import connection_options
from .commands import COMMANDS
from .guard import run_parsed


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command in ``COMMANDS``; each subparser sets ``func``, its command's ``execute``."""
    common = connection_options()
    parser = argparse.ArgumentParser(
        prog="redis-weights", parents=[common],
        description="Inspect and steer the policy weights that redis_weights keeps in Redis.",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, parents=[common], help=command.help, description=command.help)
        command.arguments(p)
        p.set_defaults(func=command.execute)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``redis-weights`` (and ``python -m redis_weights``).

    ``func`` opens an ``Admin`` for a ``Command`` and none for a ``StandaloneCommand`` (``demo``).
    """
    args = build_parser().parse_args(argv)
    return run_parsed(args, lambda: args.func(args))
