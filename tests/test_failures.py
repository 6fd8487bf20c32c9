"""``failures.Repeats``: consecutive failures of one subject, spaced out, reported once per cause."""

from __future__ import annotations

from redis_weights.worker.failures import Repeats


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_failures_back_off_and_are_reported_once_they_repeat():
    clock = _Clock()
    repeats = Repeats(report_after=3, first_delay=0.5, max_delay=4.0, clock=clock)
    assert repeats.due(7)
    assert repeats.failed(7) == 1 and repeats.delay == 0.5 and not repeats.to_report("cut")
    assert not repeats.due(7) and repeats.due(8), "another subject is tried at once"
    clock.now += 0.5
    assert repeats.due(7) and repeats.failed(7) == 2 and repeats.delay == 1.0
    clock.now += 1.0
    assert repeats.failed(7) == 3 and repeats.to_report("cut") and not repeats.to_report("cut")
    assert repeats.to_report("another cause"), "a new cause is reported again"
    for _ in range(5):
        repeats.failed(7)
    assert repeats.delay == 4.0, "the backoff has a ceiling"
    assert repeats.failed(8) == 1 and repeats.subject == 8, "a new subject starts from zero"
    repeats.clear()
    assert repeats.count == 0 and repeats.due(8)
