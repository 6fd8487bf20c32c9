"""Repeated failures: count them, space the attempts out, and say when one has become the rule.

A worker that cannot fetch a version retries. A failure that comes back at every
try (a host-cache directory too small for the version, a server limit that cuts
every fetch short, a ``latest`` that points at a deleted version) must not become a
silent loop that downloads the whole model a few times a second forever while the
trainer only sees a rank that lags. ``Repeats`` counts the consecutive failures of
one subject (a version), spaces the attempts at it out with an exponential backoff,
and says when the count has reached the point where the failure is reported (the
receiver then writes it as the rank's ``"error: ..."`` status).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

REPORT_AFTER = 3  # consecutive failures of one subject before they are reported
FIRST_DELAY = 0.5  # seconds before the attempt after the first failure
MAX_DELAY = 30.0  # the backoff's ceiling


class Repeats:
    """Consecutive failures of one subject at a time (a new subject starts from zero)."""

    def __init__(
        self,
        *,
        report_after: int = REPORT_AFTER,
        first_delay: float = FIRST_DELAY,
        max_delay: float = MAX_DELAY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.report_after = report_after
        self.first_delay = first_delay
        self.max_delay = max_delay
        self._clock = clock
        self.subject: Hashable | None = None
        self.count = 0
        self.delay = 0.0
        self._retry_at = 0.0
        self._reported: str | None = None

    def failed(self, subject: Hashable) -> int:
        """Count a failure of ``subject``; the number of its failures in a row."""
        if subject != self.subject:
            self.clear()
            self.subject = subject
        self.count += 1
        self.delay = min(self.max_delay, self.first_delay * 2 ** (self.count - 1))
        self._retry_at = self._clock() + self.delay
        return self.count

    def due(self, subject: Hashable) -> bool:
        """Whether ``subject`` may be tried now (any other subject always may)."""
        return subject != self.subject or self._clock() >= self._retry_at

    def to_report(self, cause: str) -> bool:
        """Whether ``cause`` should be reported now: the failures reached ``report_after``
        and this cause was not reported already (a cause is reported once, not per try)."""
        if self.count < self.report_after or cause == self._reported:
            return False
        self._reported = cause
        return True

    def clear(self) -> None:
        """Forget every failure (the subject succeeded, or another one is tried)."""
        self.subject, self.count, self.delay, self._retry_at, self._reported = None, 0, 0.0, 0.0, None
