"""``redis-weights delete VERSION``: one version deleted (the latest only with ``--force``)."""

from __future__ import annotations

import argparse

from ...admin import Admin
from .base import Command

NAME = "delete"
HELP = "delete one version (the latest only with --force)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("version")
    parser.add_argument("--force", action="store_true", help="also delete the latest version")


def run(admin: Admin, args: argparse.Namespace) -> int:
    """Delete the version and say which."""
    version = admin.delete(args.version, force=args.force)
    print(f"deleted version {version}")
    return 0


COMMAND = Command(NAME, HELP, add_arguments, run)
