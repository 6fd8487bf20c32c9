"""``Threads``: the data path's few threads (unit tests, no Redis)."""

from __future__ import annotations

import threading
import time

import pytest

from redis_weights.threads import Threads


def test_map_keeps_the_order_and_runs_side_by_side_only_with_more_than_one_thread() -> None:
    names: set[str] = set()

    def work(item: int) -> int:
        names.add(threading.current_thread().name)
        time.sleep(0.01)
        return item * item

    one = Threads(1, "t-one")
    assert one.map(work, range(5)) == [0, 1, 4, 9, 16]
    assert names == {threading.current_thread().name}  # one thread: the caller's
    names.clear()
    two = Threads(2, "t-two")
    assert two.map(work, range(8)) == [i * i for i in range(8)]
    assert names and all(name.startswith("t-two") for name in names)
    two.close()
    assert not any(t.name.startswith("t-two") for t in threading.enumerate())


def test_map_raises_the_first_error_only_once_every_call_has_ended() -> None:
    ended: list[int] = []

    def work(item: int) -> int:
        if item == 0:
            raise ValueError("bad item 0")
        time.sleep(0.05)
        ended.append(item)
        return item

    threads = Threads(2, "t-err")
    with pytest.raises(ValueError, match="bad item 0"):
        threads.map(work, range(4))
    assert sorted(ended) == [1, 2, 3]  # nothing still running behind the caller's back
    threads.close()


def test_a_thread_count_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Threads(0, "t")


def test_spread_runs_one_task_per_thread_over_runs_of_about_equal_size() -> None:
    class Recording(Threads):
        def map(self, fn, items):  # type: ignore[no-untyped-def]
            self.runs = list(items)
            return super().map(fn, self.runs)

    names: set[str] = set()

    def work(item: int) -> int:
        names.add(threading.current_thread().name)
        time.sleep(0.001)
        return -item

    three = Recording(3, "t-spread")
    sizes = [5, 1, 1, 1, 1, 1, 4, 1]  # total 15: three runs of 5
    assert three.spread(work, sizes, size=lambda s: s) == [-s for s in sizes]
    assert three.runs == [[5], [1, 1, 1, 1, 1], [4, 1]]
    assert names and all(name.startswith("t-spread") for name in names)
    assert Threads(1, "t-spread-one").spread(work, [1, 2], size=lambda s: s) == [-1, -2]
    three.close()
