"""``redis-weights rollback VERSION``: an older version committed again as the newest."""

from __future__ import annotations

import argparse

from ...admin import Admin
from .base import Command

NAME = "rollback"
HELP = "commit an older version again as the newest (workers apply it)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("version", help="the version to go back to")


def run(admin: Admin, args: argparse.Namespace) -> int:
    """Commit the version's weights again (nothing is uploaded; workers apply it)."""
    source = admin.resolve(args.version)
    manifest = admin.rollback(source)
    print(f"committed the weights of version {source} again as version {manifest.version}; workers will apply it")
    return 0


COMMAND = Command(NAME, HELP, add_arguments, run)
