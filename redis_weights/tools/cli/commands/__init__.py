"""The registry of ``redis-weights`` commands: one module per command, listed in ``COMMANDS`` in ``--help`` order.

Each module declares its ``NAME``, its one-line ``HELP``, a function that adds its arguments to its
subparser, its handler ``run`` and ``COMMAND``, the four bundled: a ``base.Command`` (the handler
takes an ``Admin`` and the parsed arguments) or a ``base.StandaloneCommand`` (it needs no
``Admin``); the helpers only one command uses stay in its module. A new command is one module, its
line below and its row in the manual (docs/operations/cli.md; ``tests/test_readme.py`` checks it).
"""

from __future__ import annotations

from . import delete, demo, doctor, export, exporter, gc, import_, reindex, rollback, show, versions, watch, workers
from .base import AnyCommand

COMMANDS: tuple[AnyCommand, ...] = (
    versions.COMMAND,
    show.COMMAND,
    workers.COMMAND,
    export.COMMAND,
    import_.COMMAND,
    rollback.COMMAND,
    gc.COMMAND,
    delete.COMMAND,
    watch.COMMAND,
    doctor.COMMAND,
    reindex.COMMAND,
    exporter.COMMAND,
    demo.COMMAND,
)
