"""``python -m redis_weights``: the ``redis-weights`` command."""

import sys

from .cli import main

sys.exit(main())
