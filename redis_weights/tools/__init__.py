"""The operator tools: the ``redis-weights`` command, the admin library, the demo, a local server.

Nothing here is on the trainer's or the workers' path: the core (``redis_weights/*.py``)
never imports this package. ``admin`` is the library behind the command and the scripts
in ``scripts/``; ``cli`` is the command; ``demo`` a trainer and workers with a live view;
``server`` a private ``redis-server`` for the demo and the tests.
"""
