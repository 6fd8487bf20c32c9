"""``redis-weights gc --keep K``: all but the newest K versions deleted, then their unreferenced chunks."""

from __future__ import annotations

import argparse

from ...admin import Admin
from ..args import positive_int
from .base import Command

NAME = "gc"
HELP = "delete all but the newest K versions (never the latest)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep", type=positive_int, required=True, metavar="K")


def run(admin: Admin, args: argparse.Namespace) -> int:
    """Delete the older versions and say which."""
    deleted = admin.gc(args.keep)
    print(f"deleted {len(deleted)} version(s){': ' + ', '.join(map(str, deleted)) if deleted else ''}")
    return 0


COMMAND = Command(NAME, HELP, add_arguments, run)
