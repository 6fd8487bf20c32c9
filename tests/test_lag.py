"""Bounded policy lag (``max_lag``) against a real server, with a slow worker process.

Rank 1 applies at once; rank 2 sleeps inside every apply (``--apply-delay``), so it
falls behind as soon as the trainer pushes faster than it applies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from redis_weights import PushTimeoutError, RedisStore, RedisWeightUpdater
from tests.models import make_model
from tests.procs import Worker, wait_ready, workers

pytestmark = pytest.mark.server


@contextlib.contextmanager
def fast_and_slow(tmp_path: Path, url: str, namespace: str, delay: float) -> Iterator[dict[int, Worker]]:
    """Rank 1 (fast) and rank 2 (``delay`` seconds per apply), both polling every 0.1 s, started together."""
    fast_args = ("--poll-interval", "0.1")
    slow_args = (*fast_args, "--apply-delay", str(delay))
    with workers(tmp_path, url, namespace, [1], *fast_args, ready=False) as fast, \
            workers(tmp_path, url, namespace, [2], *slow_args, ready=False) as slow:  # fmt: skip
        wait_ready(fast, slow)
        yield {**fast, **slow}


def _step(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)


def test_a_push_returns_only_while_every_rank_is_within_max_lag(
    tmp_path: Path, redis_url: str, real_store: RedisStore, namespace: str
) -> None:
    model = make_model("mlp", seed=1)
    store = RedisStore(real_store.client, namespace, owns_client=False)
    with fast_and_slow(tmp_path, redis_url, namespace, delay=0.6) as procs, \
            RedisWeightUpdater(store, model, 2, sync=False, max_lag=1, timeout=60) as updater:  # fmt: skip
        slow_lags = []
        for _ in range(4):
            _step(model)
            updater.update_weights()
            states = {s.rank: s for s in updater.workers()}
            assert all(s.version >= updater.version - 1 for s in states.values()), (updater.version, states)
            slow_lags.append(states[2].lag(updater.version))
            assert updater.last_push is not None and updater.last_push.max_lag == 1
        assert max(slow_lags) == 1  # the slow rank did lag, and by no more than the bound
        procs[2].wait_version(updater.version, timeout=30)  # it still gets every version in the end

        updater.max_lag = None  # unbounded: the same pushes leave the slow rank further behind
        for _ in range(3):
            _step(model)
            updater.update_weights()
        assert {s.rank: s for s in updater.workers()}[2].lag(updater.version) >= 2


def test_a_rank_that_stays_too_far_behind_times_out_by_name(
    tmp_path: Path, redis_url: str, real_store: RedisStore, namespace: str
) -> None:
    model = make_model("mlp", seed=1)
    store = RedisStore(real_store.client, namespace, owns_client=False)
    with fast_and_slow(tmp_path, redis_url, namespace, delay=5.0) as procs, \
            RedisWeightUpdater(store, model, 2, sync=False, max_lag=1, timeout=0.5) as updater:  # fmt: skip
        updater.update_weights()  # version 1: nothing committed is more than one behind
        _step(model)
        expected = r"push of version 2 no ack within 0.5s .*max_lag=1.*rank 2 lags"
        with pytest.raises(PushTimeoutError, match=expected) as info:
            updater.update_weights()  # rank 2 is still inside its 5 s apply of version 1
        assert info.value.lagging == [2] and info.value.version == 2
        procs[2].kill()  # the rest of that apply is not waited out
