"""``python -m redis_weights``: the ``redis-weights`` command."""

import sys

from .tools.cli import main

sys.exit(main())
