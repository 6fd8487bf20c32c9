"""Background upload for async pushes: the trainer snapshots, a thread uploads and commits.

The trainer is blocked only while ``prepare`` copies the weights into a staging
buffer. Two buffers ("slots") alternate: one may be uploading while the trainer
snapshots into the other. A job still waiting when a newer one is submitted is
dropped (superseded: its version number is simply never committed); a job already
uploading runs to its commit, so workers keep getting new versions however fast
the trainer pushes. An upload error is kept and raised by the next ``submit``,
``flush`` or ``raise_error`` call, never lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from ..errors import BackgroundUploadError

log = logging.getLogger(__name__)

Job = TypeVar("Job")
SLOTS = 2


class BackgroundUploader(Generic[Job]):
    """Run ``upload(job)`` on one daemon thread; the newest waiting job wins.

    ``submit(prepare)`` calls ``prepare(slot)`` on the caller's thread with a slot
    (0 or 1) that no upload is reading, and queues the job it returns.
    """

    def __init__(self, upload: Callable[[Job], None], name: str = "redis-weights-upload") -> None:
        self._upload = upload
        self._name = name
        self._cond = threading.Condition()
        self._pending: tuple[int, Job] | None = None
        self._inflight: int | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self.superseded = 0  # jobs dropped because a newer one came first

    def submit(self, prepare: Callable[[int], Job]) -> None:
        """Build a job in a free slot (on this thread) and queue it, replacing a waiting one."""
        self.raise_error()
        with self._cond:
            if self._closed:
                raise BackgroundUploadError("the background uploader is closed")
            if self._pending is not None:  # not started yet: the new job replaces it
                self._pending = None
                self.superseded += 1
            slot = 1 if self._inflight == 0 else 0
        job = prepare(slot)  # outside the lock: the upload thread never reads a slot not in flight
        with self._cond:
            self._pending = (slot, job)
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                (slot, job), self._pending = self._pending, None
                self._inflight = slot
            try:
                self._upload(job)
            except BaseException as exc:  # kept for the trainer's thread
                log.error("background upload failed: %s", exc)
                with self._cond:
                    self._error = exc
            finally:
                with self._cond:
                    self._inflight = None
                    self._cond.notify_all()

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._pending is not None or self._inflight is not None

    def raise_error(self) -> None:
        """Raise (once) the error of a failed background upload, if any."""
        with self._cond:
            error, self._error = self._error, None
        if error is not None:
            raise BackgroundUploadError(f"background upload failed: {error}") from error

    def flush(self, timeout: float | None = None) -> None:
        """Wait until nothing is waiting or uploading; raise a background error.

        Raises ``TimeoutError`` if uploads are still running after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._inflight is not None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"background upload still running after {timeout:g}s")
                self._cond.wait(remaining)
        self.raise_error()

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued upload (so the last push is committed), then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
