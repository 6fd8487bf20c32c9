"""The rank protocol on fakeredis: register, heartbeat, ack, reads that survive garbage, claims."""

from __future__ import annotations

from redis_weights import ranks
from redis_weights.keys import Keys
from redis_weights.ranks import STATUS_PENDING, STATUS_UPDATED, error_status, is_error, read_rank_states

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

