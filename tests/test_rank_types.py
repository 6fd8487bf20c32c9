"""Ranks of any integer type (``numpy.int64``, a 0-d integer tensor) work everywhere a rank is
taken; anything else is one clear error naming the value, never a bare ``TypeError``."""

from __future__ import annotations

import fakeredis
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from redis_weights import RedisStore, RedisWeightReceiver, RedisWeightUpdater
from redis_weights.errors import ConfigurationError
from redis_weights.protocol.ranks import check_rank, check_worker_count
from tests.models import make_model, state_digest


@pytest.mark.server
def test_numpy_and_tensor_ranks_push_ack_and_report_like_ints(real_store, redis_url, namespace):
    policies = {1: make_model("mlp", seed=None), 2: make_model("mlp", seed=None)}
    given_ranks = {1: np.int64(1), 2: torch.tensor(2)}
    receivers = [RedisWeightReceiver(RedisStore.from_url(redis_url, namespace), given_ranks[r], policies[r]).start()
                 for r in (1, 2)]  # fmt: skip
    try:
        assert [type(r.rank) for r in receivers] == [int, int]
        model = make_model("mlp", seed=3)
        updater = RedisWeightUpdater(real_store, model, num_workers=np.int64(2), sync=True, timeout=30)
        assert updater.all_worker_ids() == [1, 2]
        updater.update_weights(worker_ids=np.int64(1))  # one numpy rank
        assert updater.last_push.ranks == (1,) and state_digest(policies[1]) == state_digest(model)
        updater.update_weights(worker_ids=np.array([1, 2]))  # a numpy array of ranks
        assert updater.last_push.ranks == (1, 2)
        assert all(type(r) is int for r in updater.last_push.ranks)
        assert state_digest(policies[2]) == state_digest(model)
        (state,) = updater.workers(np.int32(2))
        assert state.rank == 2 and state.version == updater.version and state.alive
        assert real_store[f"rank:{2}:version"] == str(updater.version)
    finally:
        for receiver in receivers:
            receiver.close()


NOT_INTEGERS = st.one_of(
    st.floats(allow_nan=True), st.text(max_size=5), st.booleans(), st.none(), st.just(np.float64(2.0)),
    st.just(np.bool_(True)), st.just(torch.tensor(1.5)), st.just(torch.tensor([1, 2])), st.complex_numbers(),
)


NOT_POSITIVE = st.one_of(st.integers(max_value=0), st.integers(min_value=-(2**62), max_value=0).map(np.int64))


@given(value=st.one_of(NOT_INTEGERS, NOT_POSITIVE))
def test_anything_but_a_positive_integer_is_one_clear_configuration_error(value):
    with pytest.raises(ConfigurationError, match="rank must be a 1-based integer"):
        check_rank(value)
    with pytest.raises(ConfigurationError, match="num_workers must be a positive integer"):
        check_worker_count(value)


# worker_ids=None means every rank; a 1-d tensor is a sequence of ranks
NOT_RANKS = NOT_INTEGERS.filter(lambda v: v is not None and not (isinstance(v, torch.Tensor) and v.dim()))


@given(value=st.one_of(NOT_RANKS, st.lists(NOT_RANKS, min_size=1, max_size=3)))
def test_worker_ids_that_are_not_ranks_are_a_runtime_error_naming_them(value):
    updater = RedisWeightUpdater(RedisStore(fakeredis.FakeRedis(), "t"), make_model("mlp", seed=1), num_workers=2,
                                 sync=False, check_server=False)  # fmt: skip
    with pytest.raises(RuntimeError, match="1-based integer ranks"):
        updater._normalize_worker_ids(value)


@given(rank=st.integers(min_value=1, max_value=2**62))
def test_every_integer_type_is_a_plain_int_rank(rank):
    for value in (rank, np.int64(rank), torch.tensor(rank)):
        assert check_rank(value) == rank and type(check_rank(value)) is int
