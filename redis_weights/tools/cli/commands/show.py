"""``redis-weights show VERSION``: one version's manifest, its tensors and how each chunk is stored."""

from __future__ import annotations

import argparse
from typing import Any

from ....units import human_bytes, utc_time
from ...admin import Admin, manifest_dict
from ..args import add_json_option, add_version_argument
from ..render import print_json, print_table, printable
from .base import Command

NAME = "show"
HELP = "a version: full or patch, chain, stored and new bytes; tensors; chunk ids"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_version_argument(parser)
    add_json_option(parser)


def run(admin: Admin, args: argparse.Namespace) -> int:
    """Print the manifest: storage, metadata, a table of tensors and one of chunks (``--json``: the manifest)."""
    doc = manifest_dict(admin.manifest(args.version))
    if args.json:
        print_json(doc)
        return 0
    print(f"version {doc['version']}  created {utc_time(doc['created'])} UTC  by {printable(doc['producer'] or '-')}")
    print(f"{human_bytes(doc['total_bytes'])} ({doc['total_bytes']} bytes) in {len(doc['chunks'])} chunk(s), "
          f"{len(doc['tensors'])} tensor(s), {doc['checksum_algo']} chunk ids")  # fmt: skip
    if doc["storage"] == "full":
        storage = "full (keyframe)"
    else:
        storage = (f"patch against version {doc['base']}, chain length {doc['chain_length']} "
                   f"from keyframe {doc['keyframe']}")  # fmt: skip
    if doc["packs"]:
        storage += f", {doc['chained_chunks']} chunk(s) patched by {len(doc['packs'])} pack(s)"
    print(f"stored: {storage}; {human_bytes(doc['stored_bytes'])} stored, {human_bytes(doc['new_bytes'])} new"
          + (f"; wire dtype {printable(doc['wire_dtype'])} ({len(doc['cast'])} tensor(s) cast)"
             if doc["wire_dtype"] else ""))  # fmt: skip
    for key, value in doc["metadata"].items():
        print(f"metadata {printable(key)} = {printable(value)}")
    print_table(["tensor", "dtype", "shape", "bytes"],
                [(t["name"], t["dtype"], "x".join(map(str, t["shape"])) or "scalar", t["bytes"])
                 for t in doc["tensors"]])  # fmt: skip
    print_table(["chunk", "bytes", "id", "stored as"],
                [(c["index"], c["bytes"], c["id"],
                  _stored_as(c))
                 for c in doc["chunks"]])  # fmt: skip
    return 0


def _stored_as(chunk: dict[str, Any]) -> str:
    """The "stored as" cell of a chunk: whole, or its base and the patches (or packs) that make it."""
    if not chunk["base"]:
        return "whole"
    if not chunk["patches"]:  # patched by the records of the version's packs
        return f"base {chunk['base'][:12]} + packs"
    return (f"base {chunk['base'][:12]} + {len(chunk['patches'])} patch(es), "
            f"{sum(p['bytes'] for p in chunk['patches'])} bytes")


COMMAND = Command(NAME, HELP, add_arguments, run)
