"""What a command module declares: its name, its one-line help, its arguments and its handler.

Two kinds, told apart by what the handler takes. A ``Command`` reads or steers one namespace
through an ``Admin`` that ``execute`` opens on ``--url``/``--namespace`` (and closes); a
``StandaloneCommand`` gets only the parsed arguments and connects (or starts a server) itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from ...admin import Admin


@dataclass(frozen=True)
class Command:
    """A command whose handler ``run(admin, args) -> exit code`` works through an ``Admin``."""

    name: str  # the word after ``redis-weights``
    help: str  # one line: the ``--help`` listing and the subcommand's description
    arguments: Callable[[argparse.ArgumentParser], None]  # adds the command's own arguments to its subparser
    run: Callable[[Admin, argparse.Namespace], int]

    def execute(self, args: argparse.Namespace) -> int:
        """Run the handler with an ``Admin`` on the resolved ``args.url`` / ``args.namespace``."""
        with Admin.from_url(args.url, args.namespace) as admin:
            return int(self.run(admin, args))


@dataclass(frozen=True)
class StandaloneCommand:
    """A command that needs no ``Admin``: its handler ``run(args) -> exit code`` connects by itself (``demo``)."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]

    def execute(self, args: argparse.Namespace) -> int:
        """Run the handler on the parsed ``args`` alone."""
        return int(self.run(args))


AnyCommand: TypeAlias = Command | StandaloneCommand  # an entry of the registry, ``commands.COMMANDS``
