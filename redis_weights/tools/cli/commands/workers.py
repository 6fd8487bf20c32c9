"""``redis-weights workers``: every rank that ever joined, with its applied version, lag and liveness."""

from __future__ import annotations

import argparse

from ....units import human_age, human_seconds
from ...admin import Admin
from ..args import add_json_option
from ..render import print_json, print_table
from .base import Command

NAME = "workers"
HELP = "per rank: status, applied version, lag, heartbeat age, alive or dead"


def run(admin: Admin, args: argparse.Namespace) -> int:
    """Print one row per rank (``--json``: the rows with ``latest``)."""
    latest, rows = admin.workers()
    if args.json:
        print_json({"namespace": admin.keyspace.namespace, "latest": latest, "workers": [r.to_dict() for r in rows]})
        return 0
    if not rows:
        print(f"namespace {admin.keyspace.namespace!r}: no worker has joined (latest version {latest})")
        return 0
    table = [(r.rank, r.status or "-", r.version, r.lag, human_seconds(r.ack_latency), human_age(r.heartbeat_age),
              "alive" if r.alive else "DEAD") for r in rows]  # fmt: skip
    print_table(["rank", "status", "applied", "lag", "ack latency", "heartbeat", "state"], table,
                title=f"namespace {admin.keyspace.namespace!r}, latest version {latest}")  # fmt: skip
    return 0


COMMAND = Command(NAME, HELP, add_json_option, run)
