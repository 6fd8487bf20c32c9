"""``python -m tests.launch MODULE ARGS...``: run a test process's script (``MODULE.main()``, given ARGS)
with its imports made quickly and its exit kept short; ``tests.procs.Worker`` starts every worker and
trainer process this way.

Start-up and exit are much of a test process's life. Importing torch allocates millions of objects
and frees few, so the collections that run meanwhile find nothing (~0.3 s): the collector is off until
the imports are done. What they made then lives until exit, so it is frozen (``gc.freeze``): the last
collection at exit skips it (~0.5 s). Everything made after the imports is collected as usual.
"""

from __future__ import annotations

import gc
import importlib
import sys


def main() -> None:
    name = sys.argv[1]
    sys.argv = [name, *sys.argv[2:]]  # what the script's own parser reads
    gc.disable()
    module = importlib.import_module(name)
    gc.freeze()
    gc.enable()
    sys.exit(module.main())


if __name__ == "__main__":
    main()
