"""``redis-weights versions``: the committed versions of a namespace, newest first."""

from __future__ import annotations

import argparse

from ....units import human_bytes, utc_time
from ...admin import Admin
from ..args import add_json_option
from ..render import print_json, print_table
from .base import Command

NAME = "versions"
HELP = "committed versions: created, size, tensors, producer, ranks running it"


def run(admin: Admin, args: argparse.Namespace) -> int:
    """Print the versions as a table (``--json``: oldest first, with ``latest``)."""
    rows = admin.versions()
    if args.json:
        print_json({"namespace": admin.keyspace.namespace, "latest": admin.registry.latest(),
                    "versions": [r.to_dict() for r in rows]})  # fmt: skip
        return 0
    if not rows:
        print(f"namespace {admin.keyspace.namespace!r}: no committed version")
        return 0
    table = [
        (f"{r.version}{' (latest)' if r.latest else ''}", utc_time(r.created),
         human_bytes(r.total_bytes) if not r.error else "?", r.tensors if not r.error else "?",
         ("?" if r.error else "keyframe" if r.keyframe else f"patch +{r.depth}"),
         human_bytes(r.new_bytes) if not r.error else "?",
         r.error or r.producer, ",".join(map(str, r.ranks)) or "-")
        for r in reversed(rows)
    ]  # fmt: skip
    print_table(["version", "created (UTC)", "size", "tensors", "stored", "new", "producer", "ranks"], table,
                title=f"namespace {admin.keyspace.namespace!r}")  # fmt: skip
    return 0


COMMAND = Command(NAME, HELP, add_json_option, run)
