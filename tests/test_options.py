"""``PushOptions`` / ``ReceiveOptions``: one declaration and one check per option, taken by the updater and the
receiver as an object or as keyword arguments (fakeredis: no server)."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from redis_weights import ConfigurationError, PushOptions, ReceiveOptions, RedisWeightReceiver, RedisWeightUpdater


def _updater(fake_store, **kwargs) -> RedisWeightUpdater:
    return RedisWeightUpdater(fake_store, {"w": torch.zeros(4)}, 1, **kwargs)


def test_the_keyword_arguments_build_the_options_and_attributes_read_them(fake_store) -> None:
    updater = _updater(fake_store, sync=False, timeout=5.0, retention=2, wire_dtype=torch.bfloat16, delta=True,
                       metadata={"run": "a"}, check_server=False)  # fmt: skip
    assert updater.options == PushOptions(timeout=5.0, retention=2, wire_dtype=torch.bfloat16, delta=True,
                                          metadata={"run": "a"}, check_server=False)  # fmt: skip
    assert (updater.timeout, updater.retention, updater.wire_dtype, updater.delta) == (5.0, 2, torch.bfloat16, True)
    same = _updater(fake_store, sync=False, options=updater.options)
    assert same.options is updater.options and same.metadata == {"run": "a"}
    receiver = RedisWeightReceiver(fake_store, 1, {"w": torch.zeros(4)}, poll_interval=0.5, check_server=False)
    try:
        assert receiver.options == ReceiveOptions(poll_interval=0.5, check_server=False)
        assert (receiver.poll_interval, receiver.allow_cast, receiver.host_cache) == (0.5, False, None)
    finally:
        receiver.close()
    assert pickle.loads(pickle.dumps(updater.options)) == updater.options, "options travel to other processes"


def test_options_and_keyword_arguments_are_not_mixed_and_unknown_names_are_refused(fake_store) -> None:
    with pytest.raises(ConfigurationError, match="pass options= or keyword options \\(timeout\\), not both"):
        _updater(fake_store, options=PushOptions(), timeout=3.0)
    with pytest.raises(ConfigurationError, match="options must be a PushOptions, got ReceiveOptions"):
        _updater(fake_store, options=ReceiveOptions())
    with pytest.raises(TypeError, match="unexpected keyword argument 'timout'"):
        _updater(fake_store, timout=3.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'retention'"):
        RedisWeightReceiver(fake_store, 1, {"w": torch.zeros(4)}, retention=3)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"timeout": 0}, "timeout must be positive"),
        ({"retention": 0}, "retention must be at least 1"),
        ({"replica_timeout": -1.0}, "replica_timeout must be positive"),
        ({"min_replicas": True}, "min_replicas must be a non-negative integer or None"),
        ({"wire_dtype": torch.float64}, "wire_dtype must be one of"),
        ({"keyframe_interval": 65}, "keyframe_interval must be within 1..64"),
        ({"keyframe_fraction": 0.0}, "keyframe_fraction must be within"),
        ({"diff_threads": 0}, "diff_threads must be a positive integer"),
        ({"diff_threads": True}, "diff_threads must be a positive integer"),
        ({"max_lag": -1}, "max_lag must be a non-negative integer or None"),
        ({"max_lag": 1, "background": True}, "max_lag needs background=False"),
        ({"overlap_min_bytes": 1.5}, "overlap_min_bytes must be a non-negative integer or None"),
    ],
)
def test_each_push_option_is_checked_once_by_the_dataclass(fake_store, options, message) -> None:
    with pytest.raises(ConfigurationError, match=message):
        PushOptions(**options)
    with pytest.raises(ConfigurationError, match=message):
        _updater(fake_store, sync=False, **options)


def test_checks_that_involve_sync_and_the_receivers_checks(fake_store) -> None:
    with pytest.raises(ConfigurationError, match="background=True needs sync=False"):
        _updater(fake_store, background=True)
    with pytest.raises(ConfigurationError, match="max_lag=2 needs sync=False"):
        _updater(fake_store, options=PushOptions(max_lag=2))
    with pytest.raises(ConfigurationError, match="poll_interval and heartbeat_ttl must be positive"):
        ReceiveOptions(heartbeat_ttl=0)
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigurationError, match="apply_threads must be a positive integer"):
            ReceiveOptions(apply_threads=bad)


def test_assigning_an_option_replaces_the_options_checked_again(fake_store) -> None:
    updater = _updater(fake_store, sync=False, max_lag=2, check_server=False)
    updater.timeout = 20.0
    assert updater.options == PushOptions(max_lag=2, timeout=20.0, check_server=False)
    with pytest.raises(ConfigurationError, match="max_lag=2 needs sync=False"):
        updater.sync = True
    updater.max_lag = None
    updater.sync = True
    with pytest.raises(ConfigurationError, match="timeout must be positive"):
        updater.timeout = 0
    with pytest.raises(AttributeError, match="chunk_size is fixed"):
        updater.chunk_size = 1024
    updater.replica_timeout = 0.3
    assert updater._replicas.timeout == 0.3, "the replicas' WAIT follows the option"
    with pytest.raises(dataclasses.FrozenInstanceError):
        updater.options.timeout = 1.0  # type: ignore[misc]
