"""``redis-weights export VERSION -o FILE``: a version materialised as a ``.safetensors`` file."""

from __future__ import annotations

import argparse

from ....units import human_bytes
from ...admin import Admin
from ..args import add_version_argument
from .base import Command

NAME = "export"
HELP = "write a version to a .safetensors file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_version_argument(parser)
    parser.add_argument("-o", "--output", required=True, help="the file to write (FILE.safetensors)")


def run(admin: Admin, args: argparse.Namespace) -> int:
    """Write the version to ``--output``."""
    manifest = admin.export(args.version, args.output)
    print(f"exported version {manifest.version} ({human_bytes(manifest.total_bytes)}, "
          f"{len(manifest.tensors)} tensors) to {args.output}")  # fmt: skip
    return 0


COMMAND = Command(NAME, HELP, add_arguments, run)
