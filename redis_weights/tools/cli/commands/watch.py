"""``redis-weights watch``: pushes and acks as they happen, until Ctrl-C."""

from __future__ import annotations

import argparse

from ....units import human_bytes, human_seconds, utc_time
from ...admin import Admin
from ..args import positive_float, positive_int
from ..render import json_line, printable
from .base import Command

NAME = "watch"
HELP = "live view of pushes and acks until Ctrl-C"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--count", type=positive_int, help="stop after this many events")
    parser.add_argument("--timeout", type=positive_float, help="stop after this many seconds")


def run(admin: Admin, args: argparse.Namespace) -> int:
    """Print one line per event (``--json``: one JSON object per line), flushed as it comes."""
    if not args.json:
        print(f"watching namespace {admin.keyspace.namespace!r} (Ctrl-C to stop)", flush=True)
    seen = 0
    for event in admin.watch(timeout=args.timeout):
        if args.json:
            print(json_line(event.to_dict()), flush=True)
        elif event.kind == "push":
            size = f"{human_bytes(event.total_bytes)}, {event.tensors} tensors" if event.total_bytes else "(gone)"
            print(f"{utc_time(event.time)}  push  v{event.version}  {size}  by {printable(event.producer or '-')}",
                  flush=True)  # fmt: skip
        else:
            print(f"{utc_time(event.time)}  ack   v{event.version}  rank {event.rank}: {printable(event.status)}  "
                  f"lag {event.lag}  ack latency {human_seconds(event.ack_latency)}", flush=True)  # fmt: skip
        seen += 1
        if args.count and seen >= args.count:
            break
    return 0


COMMAND = Command(NAME, HELP, add_arguments, run)
