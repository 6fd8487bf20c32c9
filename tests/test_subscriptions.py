"""The one pub/sub policy: messages drained, a lost connection resubscribed, a refusal warned once.

Real servers (a killed pub/sub connection, an ACL without channel rights) are in
tests/test_faults.py; here fakeredis, with errors injected into its pub/sub.
"""

from __future__ import annotations

import logging

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from redis_weights.backend.subscriptions import Subscription


class _Faulty:
    """Wraps ``client.pubsub`` so that the next ``get_message`` calls raise ``fail`` (if set)."""

    def __init__(self, client, monkeypatch) -> None:
        self.fail: Exception | None = None
        self.opened = 0
        real = client.pubsub

        def pubsub(**kwargs):
            self.opened += 1
            ps = real(**kwargs)
            real_get = ps.get_message

            def get_message(*args, **kw):
                if self.fail is not None:
                    raise self.fail
                return real_get(*args, **kw)

            ps.get_message = get_message
            return ps

        monkeypatch.setattr(client, "pubsub", pubsub)


def _subscription(client, **kwargs) -> Subscription:
    return Subscription(client, ["ch"], what="test subscription", poll_every=0.01, **kwargs)


def test_messages_are_drained_as_text(fake_redis):
    sub = _subscription(fake_redis)
    assert sub.open()
    assert sub.messages(0.05) == []  # the confirmation is no message
    for n in range(3):
        fake_redis.publish("ch", str(n))
    assert sub.messages(1.0) == [("ch", "0"), ("ch", "1"), ("ch", "2")]
    assert sub.error is None
    sub.close()


def test_a_lost_connection_is_closed_and_resubscribed_at_the_next_call(fake_redis, monkeypatch):
    faults = _Faulty(fake_redis, monkeypatch)
    sub = _subscription(fake_redis)
    sub.open()
    faults.fail = redis.exceptions.ConnectionError("reset")
    assert sub.messages(1.0) == [] and isinstance(sub.error, redis.exceptions.ConnectionError)
    assert not sub.refused
    faults.fail = None
    assert sub.open() and faults.opened == 2
    fake_redis.publish("ch", "1")
    assert sub.messages(1.0) == [("ch", "1")] and sub.error is None
    sub.close()


def test_a_refusal_is_warned_once_and_retried_after_a_while(fake_redis, monkeypatch, caplog):
    faults = _Faulty(fake_redis, monkeypatch)
    sub = _subscription(fake_redis, retry_after=3600.0)
    faults.fail = redis.exceptions.NoPermissionError("NOPERM no channel rights")
    with caplog.at_level(logging.WARNING):
        assert sub.messages(0.01) == [] and sub.refused
        for _ in range(3):
            assert sub.messages(0.01) == []
    assert faults.opened == 1, "no new subscription before retry_after"
    assert len([r for r in caplog.records if "test subscription refused" in r.getMessage()]) == 1
    sub.retry_after = 0.0
    sub._refused_until = 1e-9  # retry_after has passed: the next call subscribes again
    with caplog.at_level(logging.WARNING):
        assert sub.messages(0.01) == []  # refused again: no second warning
    assert faults.opened == 2
    assert len([r for r in caplog.records if "test subscription refused" in r.getMessage()]) == 1
    faults.fail = None
    assert sub.messages(0.01) == [] and not sub.refused and sub.error is None  # allowed again
    sub.close()


def test_confirm_reports_a_refusal_and_accepts_a_subscription(fake_redis, monkeypatch):
    assert _subscription(fake_redis).confirm(1.0) is None
    faults = _Faulty(fake_redis, monkeypatch)
    faults.fail = redis.exceptions.NoPermissionError("NOPERM this user has no permissions")
    assert "NOPERM" in (_subscription(fake_redis).confirm(1.0) or "")


def test_an_unreachable_server_raises_when_subscribing():
    client = redis.Redis(port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.exceptions.ConnectionError):
        _subscription(client).open()
    assert _subscription(client).messages(0.01) == []  # a wait never raises


def test_a_watch_refused_by_the_acl_raises_rather_than_shows_nothing(server_factory, namespace):
    from redis_weights.tools.admin import Admin

    server = server_factory()
    admin_client = redis.Redis(port=server.port)
    admin_client.execute_command("ACL", "SETUSER", "nochan", "on", ">pw", "~*", "resetchannels", "+@all")
    with Admin.from_url(f"redis://nochan:pw@127.0.0.1:{server.port}/0", namespace) as admin:
        with pytest.raises(redis.exceptions.NoPermissionError):
            list(admin.watch(timeout=10))
    admin_client.close()
