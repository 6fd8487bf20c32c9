"""The rank protocol on fakeredis: register, heartbeat, ack, reads that survive garbage, claims."""

from __future__ import annotations

import pytest

from redis_weights import ConfigurationError
from redis_weights.backend.keys import Keys
from redis_weights.backend.subscriptions import Subscription
from redis_weights.protocol import ranks
from redis_weights.protocol.ranks import (
    STATUS_PENDING,
    STATUS_UPDATED,
    error_status,
    is_error,
    parse_ack,
    read_rank_states,
)

K = Keys("r")


def test_register_heartbeat_and_ack(fake_redis):
    ranks.register(fake_redis, K, 1, ttl=30)
    (state,) = read_rank_states(fake_redis, K, [1])
    assert (state.joined, state.alive, state.version, state.status) == (True, True, 0, None)
    assert not ranks.heartbeat(fake_redis, K, 1, version=0, ttl=30)
    fake_redis.set(K.latest, 2)
    fake_redis.set(K.rank_status(1), STATUS_PENDING)
    assert ranks.ack(fake_redis, K, 1, 2, STATUS_UPDATED) == 2
    assert read_rank_states(fake_redis, K, [1])[0].has_applied(2)
    fake_redis.set(K.latest, 3)
    fake_redis.set(K.rank_status(1), STATUS_PENDING)
    ranks.ack(fake_redis, K, 1, 2, STATUS_UPDATED)  # a late ack of an older version
    state = read_rank_states(fake_redis, K, [1])[0]
    assert state.status == STATUS_PENDING and state.version == 2, "it never hides a newer pending"
    ranks.ack(fake_redis, K, 1, 3, error_status("version 3: does not fit"))
    state = read_rank_states(fake_redis, K, [1])[0]
    assert state.error == "error: version 3: does not fit" and state.version == 2, "a refusal applies nothing"


def test_a_lost_version_key_is_recreated_by_the_heartbeat(fake_redis):
    ranks.register(fake_redis, K, 2, ttl=30)
    fake_redis.delete(K.rank_version(2))
    assert ranks.heartbeat(fake_redis, K, 2, version=5, ttl=30)
    assert read_rank_states(fake_redis, K, [2])[0].version == 5 and ranks.known_ranks(fake_redis, K) == [2]


def test_garbage_in_rank_keys_reads_as_absent_values(fake_redis):
    fake_redis.set(K.rank_version(3), b"not a number")
    fake_redis.set(K.rank_alive(3), b"\xff\xfe")
    fake_redis.set(K.rank_status(3), b"\xffupdated")
    (state,) = read_rank_states(fake_redis, K, [3])
    assert (state.version, state.joined, state.alive, state.heartbeat_age) == (0, True, True, None)
    assert state.status == "\ufffdupdated" and not state.has_applied(0)
    assert read_rank_states(fake_redis, K, []) == []


def test_error_vocabulary():
    assert error_status("x") == "error: x" and is_error("error: x")
    assert not is_error(None) and not is_error(STATUS_UPDATED) and not is_error("")



class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _state(rank: int, *, alive: bool, ttl: float | None = 1.5) -> ranks.RankState:
    return ranks.RankState(rank, STATUS_PENDING, 1, True, alive, 0.1 if alive else None,
                           heartbeat_ttl=ttl if alive else None)


def test_death_watch_confirms_a_missing_heartbeat_only_after_a_beat_interval_of_prompt_reads():
    clock = _Clock()
    watch = ranks.DeathWatch(clock)
    window = ranks.beat_interval(1.5) + ranks.CONFIRM_SLACK
    assert watch.dead([_state(1, alive=True), _state(2, alive=True)], 0.01) == []  # TTLs learnt
    assert watch.dead([_state(1, alive=False), _state(2, alive=True)], 0.01) == []  # missing: suspected only
    assert watch.suspected() == [1]
    clock.now += window - 0.01
    assert watch.dead([_state(1, alive=False)], 0.01) == []
    clock.now += 0.02
    assert watch.dead([_state(1, alive=False)], 0.01) == [1]  # missing for the whole window: dead


def test_death_watch_starts_over_after_a_stall_or_a_lost_connection():
    clock = _Clock()
    watch = ranks.DeathWatch(clock)
    watch.dead([_state(1, alive=True)], 0.01)
    watch.dead([_state(1, alive=False)], 0.01)
    clock.now += 10
    assert watch.dead([_state(1, alive=False)], 3.0) == [], "a read that took 3 s: the server stalled"
    clock.now += ranks.beat_interval(1.5) + ranks.CONFIRM_SLACK - 0.1
    assert watch.dead([_state(1, alive=False)], 0.01) == []
    watch.stalled()  # the caller could not reach Redis
    clock.now += 1.0
    assert watch.dead([_state(1, alive=False)], 0.01) == []
    assert watch.dead([_state(1, alive=True)], 0.01) == [] and watch.suspected() == []  # it beat again
    watch.start()
    unknown = ranks.DeathWatch(clock)  # a rank never seen alive gets the default TTL's window
    unknown.dead([_state(7, alive=False)], 0.01)
    clock.now += ranks.beat_interval(ranks.DEFAULT_HEARTBEAT_TTL) + ranks.CONFIRM_SLACK + 0.01
    assert unknown.dead([_state(7, alive=False)], 0.01) == [7]


def test_a_heartbeat_carries_its_ttl_and_its_age_comes_from_the_server(fake_redis):
    ranks.register(fake_redis, K, 4, ttl=2.0)
    (state,) = read_rank_states(fake_redis, K, [4])
    assert state.heartbeat_ttl == 2.0 and 0 <= state.heartbeat_age < 0.5
    fake_redis.pexpire(K.rank_alive(4), 500)  # 1.5 s of the TTL have gone by, as the server counts them
    (state,) = read_rank_states(fake_redis, K, [4])
    assert 1.4 <= state.heartbeat_age <= 1.6
    ranks.heartbeat(fake_redis, K, 4, version=0, ttl=2.0)
    assert read_rank_states(fake_redis, K, [4])[0].heartbeat_age < 0.5
    ranks.heartbeat(fake_redis, K, 4, version=0, ttl=5.0)  # another TTL: the value follows
    assert read_rank_states(fake_redis, K, [4])[0].heartbeat_ttl == 5.0
    states, seconds = ranks.observe_rank_states(fake_redis, K, [4])
    assert states[0].alive and seconds >= 0 and not fake_redis.exists(K.stall_probe), "the probe creates nothing"


def test_an_ack_message_parses_back_to_its_rank_and_version(fake_redis):
    subscription = Subscription(fake_redis, [K.acks_channel], what="test", poll_every=0.01)
    subscription.open()
    try:
        ranks.ack(fake_redis, K, 4, 7, STATUS_UPDATED)
        ranks.ack(fake_redis, K, 5, 0, error_status("lost"))
        messages = subscription.messages(5.0)
        while len(messages) < 2:
            messages += subscription.messages(5.0)
    finally:
        subscription.close()
    assert [parse_ack(data) for _, data in messages] == [(4, 7), (5, 0)]
    for garbage in ("", "4", "x:7", "4:x", "0:3", "4:-1", ":"):
        assert parse_ack(garbage) is None, garbage


def test_ranks_and_worker_counts_are_checked_once():
    assert ranks.check_rank(3) == 3 and ranks.check_worker_count(2) == 2
    for rank in (0, -1, True, "1", 1.0, None):
        with pytest.raises(ConfigurationError, match="rank must be a 1-based integer"):
            ranks.check_rank(rank)
    for count in (0, -2, "3", 2.0, None):
        with pytest.raises(ConfigurationError, match="num_workers must be a positive integer"):
            ranks.check_worker_count(count)
