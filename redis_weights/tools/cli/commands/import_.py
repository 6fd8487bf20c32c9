"""``redis-weights import FILE``: a ``.safetensors`` checkpoint published as a new version.

The module is ``import_`` because ``import`` is a Python keyword; the command is ``import``.
"""

from __future__ import annotations

import argparse

from ....format.manifest import DEFAULT_CHUNK_SIZE
from ....units import human_bytes
from ...admin import Admin
from ..args import chunk_size, key_value
from .base import Command

NAME = "import"
HELP = "publish a .safetensors checkpoint as a new version (workers apply it)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a .safetensors file")
    parser.add_argument("--chunk-size", type=chunk_size, default=DEFAULT_CHUNK_SIZE, help="bytes per Redis value")
    parser.add_argument("--metadata", action="append", metavar="KEY=VALUE", help="extra metadata (repeatable)")


def run(admin: Admin, args: argparse.Namespace) -> int:
    """Publish the file (workers apply it)."""
    metadata = dict(key_value(item) for item in args.metadata or [])
    manifest = admin.import_file(args.file, chunk_size=args.chunk_size, metadata=metadata)
    print(f"imported {args.file} as version {manifest.version} ({human_bytes(manifest.total_bytes)}, "
          f"{len(manifest.tensors)} tensors); workers will apply it")  # fmt: skip
    return 0


COMMAND = Command(NAME, HELP, add_arguments, run)
