"""``redis-weights reindex``: the index of a namespace written by an older release, built by a resumable SCAN."""

from __future__ import annotations

import argparse

from ...admin import Admin
from ..args import positive_int
from .base import Command

NAME = "reindex"
HELP = "index a namespace written by an older release (a resumable SCAN of its keys)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="pause after this many SCAN steps (each visits about 1000 keys); run again to resume")


def run(admin: Admin, args: argparse.Namespace) -> int:
    """Index the namespace (or as much as ``--max-steps`` allows) and say what was added."""
    report = admin.reindex(max_steps=args.max_steps)
    state = "complete" if report.complete else "paused (run it again to resume)"
    print(f"reindex {state}: {report.steps:,} SCAN steps; added {report.objects:,} objects, {report.ranks} ranks, "
          f"{report.pushes} pending pushes, {report.names} store keys")  # fmt: skip
    return 0


COMMAND = Command(NAME, HELP, add_arguments, run)
