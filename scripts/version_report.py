#!/usr/bin/env python3
"""Versions and workers of a namespace, for cron: exit code 1 when the fleet needs a look.

    scripts/version_report.py --url redis://redis:6379/0 --namespace policy --max-lag 2
    */5 * * * * REDIS_URL=... /opt/rw/.venv/bin/python /opt/rw/scripts/version_report.py --max-lag 2 --fail-on-dead

Prints the same tables as `redis-weights versions` and `redis-weights workers`
(or one JSON document with --json), then the problems found: ranks that report an
error, ranks more than --max-lag versions behind the latest, dead ranks (with
--fail-on-dead). Exit codes: 0 healthy, 1 a problem (or an error), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from redis_weights.protocol.ranks import is_error  # noqa: E402
from redis_weights.tools.admin import Admin, VersionRow, WorkerRow  # noqa: E402
from redis_weights.tools.cli.args import connection_options, non_negative_int  # noqa: E402
from redis_weights.tools.cli.commands import versions as versions_command  # noqa: E402
from redis_weights.tools.cli.commands import workers as workers_command  # noqa: E402
from redis_weights.tools.cli.guard import run_script  # noqa: E402


def problems(rows: list[WorkerRow], max_lag: int | None, fail_on_dead: bool) -> list[str]:
    """What is wrong with the fleet, one line each."""
    found = []
    for w in rows:
        if is_error(w.status):
            found.append(f"rank {w.rank} reports {w.status!r}")
        if not w.alive:
            if fail_on_dead:
                found.append(f"rank {w.rank} is dead (last applied version {w.version})")
        elif max_lag is not None and w.lag > max_lag:
            found.append(f"rank {w.rank} lags {w.lag} versions (applied {w.version})")
    return found


def report(args: argparse.Namespace) -> int:
    with Admin.from_url(args.url, args.namespace) as admin:
        latest, workers = admin.workers()
        found = problems(workers, args.max_lag, args.fail_on_dead)
        if args.json:
            versions: list[VersionRow] = admin.versions()
            json.dump({"namespace": admin.keyspace.namespace, "latest": latest,
                       "versions": [v.to_dict() for v in versions], "workers": [w.to_dict() for w in workers],
                       "problems": found}, sys.stdout, indent=2)  # fmt: skip
            print()
        else:
            versions_command.run(admin, args)
            print()
            workers_command.run(admin, args)
            print()
            print("\n".join(f"PROBLEM: {p}" for p in found) if found else "OK: no problem found")
    return 1 if found else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[connection_options()])
    parser.add_argument("--max-lag", type=non_negative_int, default=None,
                        help="a live rank further behind is a problem")
    parser.add_argument("--fail-on-dead", action="store_true", help="a dead rank is a problem")
    parser.add_argument("--json", action="store_true", help="one JSON document")
    return run_script(parser, report, argv, prog="version_report")


if __name__ == "__main__":
    sys.exit(main())
