"""``Threads``: a few threads for the data path's GIL-free work, one owner per trainer or worker.

numpy, zstd and torch's copies release the GIL on large buffers (xxhash does not), so a push's
casts and diff of 64 MiB regions, or a worker's patches of independent chunks, run side by side
on as many cores. The pool starts on first use (a push or a worker that never needs it starts
no thread); with one thread, or a single item, the work runs on the calling thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_THREADS = max(1, min(4, os.cpu_count() or 1))  # the CPU count, at most 4


class Threads:
    """Up to ``count`` threads named ``name-N``, started when first needed."""

    def __init__(self, count: int, name: str) -> None:
        if count < 1:
            raise ValueError(f"a thread count must be at least 1, got {count!r}")
        self.count = count
        self.name = name
        self._pool: ThreadPoolExecutor | None = None

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.count, thread_name_prefix=self.name)
        return self._pool

    def submit(self, fn: Callable[..., R], *args: Any) -> Future[R]:
        """``fn(*args)`` on one of the threads."""
        return self._executor().submit(fn, *args)

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``[fn(item) for item in items]``, side by side; the first error is raised once all are done
        (no call is left running behind the caller's back)."""
        todo = list(items)
        if self.count == 1 or len(todo) <= 1:
            return [fn(item) for item in todo]
        futures = [self._executor().submit(fn, item) for item in todo]
        errors = [f.exception() for f in futures]  # waits for every one
        for error in errors:
            if error is not None:
                raise error
        return [f.result() for f in futures]

    def spread(self, fn: Callable[[T], R], items: Iterable[T], size: Callable[[T], int]) -> list[R]:
        """``[fn(item) for item in items]``, the items cut into at most ``count`` runs of about equal
        total ``size`` and the runs side by side: one task per thread, not per item (hundreds of
        chunks or tensors would otherwise cost a task each)."""
        todo = list(items)
        if self.count == 1 or len(todo) <= 1:
            return [fn(item) for item in todo]
        share = sum(size(item) for item in todo) / self.count
        runs: list[list[T]] = [[]]
        filled = 0.0
        for item in todo:
            if filled >= share * len(runs) and len(runs) < self.count:
                runs.append([])
            runs[-1].append(item)
            filled += size(item)
        return [result for run in self.map(lambda run: [fn(item) for item in run], runs) for result in run]

    def close(self) -> None:
        """Stop the threads (a later call starts them again)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


INLINE = Threads(1, "redis-weights-inline")  # for callers handed no threads: the work runs on the caller's
