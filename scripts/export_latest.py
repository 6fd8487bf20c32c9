#!/usr/bin/env python3
"""Export the latest version of a namespace to a directory of .safetensors files (a cron backup).

    scripts/export_latest.py --url redis://redis:6379/0 --namespace policy --dir /backups/policy --keep 5

Writes DIR/<namespace>-v<N>.safetensors (atomically, verified chunk by chunk, the
same code as `redis-weights export`), does nothing when that file is already there,
and keeps only the newest --keep exports of the namespace. Prints the file's path.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from redis_weights.tools.admin import Admin  # noqa: E402
from redis_weights.tools.cli.args import connection_options, non_negative_int  # noqa: E402
from redis_weights.tools.cli.guard import run_script  # noqa: E402
from redis_weights.units import human_bytes  # noqa: E402


def exports(directory: Path, namespace: str) -> list[tuple[int, Path]]:
    """The exports of ``namespace`` in ``directory``, oldest version first."""
    pattern = re.compile(rf"^{re.escape(namespace)}-v(\d+)\.safetensors$")
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := pattern.match(p.name))]
    return sorted(found)


def export_latest(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    with Admin.from_url(args.url, args.namespace) as admin:

        def name(version: int) -> Path:
            return directory / f"{admin.keyspace.namespace}-v{version}.safetensors"

        target = name(admin.resolve("latest"))
        if target.exists():
            print(f"{target} (already exported)")
        else:  # "latest" again: a newer version replaces one garbage-collected while it is read
            manifest = admin.export("latest", name)
            target = name(manifest.version)
            print(f"{target} ({human_bytes(manifest.total_bytes)}, {len(manifest.tensors)} tensors)")
        if args.keep:
            for _, old in exports(directory, admin.keyspace.namespace)[: -args.keep]:
                old.unlink()
                print(f"removed {old}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[connection_options()])
    parser.add_argument("--dir", required=True, help="directory of the exports")
    parser.add_argument("--keep", type=non_negative_int, default=0, help="keep only the newest K exports (0: keep all)")
    return run_script(parser, export_latest, argv, prog="export_latest")


if __name__ == "__main__":
    sys.exit(main())
