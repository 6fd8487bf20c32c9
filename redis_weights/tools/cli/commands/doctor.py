"""``redis-weights doctor``: the server's settings and the namespace's index checked (``observe.health``)."""

from __future__ import annotations

import argparse
import sys

from ....backend.deployment import redacted
from ....format.manifest import DEFAULT_CHUNK_SIZE
from ....observe.health import UNSAFE, check_deployment, check_namespace, worst
from ...admin import Admin
from ..args import add_json_option, chunk_size
from ..guard import EXIT_UNSAFE
from ..render import is_tty, print_json, printable
from .base import Command

NAME = "doctor"
HELP = "check the server's settings; exit code 3 when something is unsafe"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_json_option(parser)
    parser.add_argument("--chunk-size", type=chunk_size, default=DEFAULT_CHUNK_SIZE,
                        help="the chunk size you push with")  # fmt: skip
    parser.add_argument("--deep", action="store_true",
                        help="also compare the namespace's index with a SCAN of its keys")


def run(admin: Admin, args: argparse.Namespace) -> int:
    """Print one line per finding (colored on a terminal) and the verdict; ``EXIT_UNSAFE`` when unsafe."""
    findings = check_deployment(admin.store.deployment, admin.keyspace, chunk_size=args.chunk_size)
    findings += check_namespace(admin.store.deployment, admin.keyspace, deep=args.deep)
    verdict = worst(findings)
    if args.json:
        print_json({"url": redacted(args.url), "verdict": verdict, "findings": [f.to_dict() for f in findings]})
    else:
        tty = is_tty(sys.stdout)
        colors = {"ok": "32", "warn": "33", "unsafe": "31"}
        for f in findings:
            tag = f"[{f.level.upper():^6}]"
            if tty:
                tag = f"\033[{colors[f.level]}m{tag}\033[0m"
            print(f"{tag} {f.check}{f' ({printable(f.node)})' if f.node else ''}: {printable(f.what)}")
            if f.fix:
                print(f"         {'fix' if f.level != 'ok' else 'tip'}: {printable(f.fix)}")
        print(f"verdict: {verdict}" + (" (exit code 3)" if verdict == UNSAFE else ""))
    return EXIT_UNSAFE if verdict == UNSAFE else 0


COMMAND = Command(NAME, HELP, add_arguments, run)
