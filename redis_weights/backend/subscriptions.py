"""Pub/sub with one policy for every subscriber: the updater's acks, the receiver's updates,
``Admin.watch`` and the server check.

Pub/sub here is only a wake-up hint (at-most-once: a reconnect or a full output
buffer drops messages); the truth is always read from keys. So a subscriber never
fails on pub/sub trouble, it falls back to polling:

- a lost connection is closed, and the subscription is made again at the next call
  (after a short pause, so a dead server is not hammered);
- a refusal (``NOPERM``: the user lacks the channel rights) is logged once, and the
  subscription is tried again after ``retry_after`` seconds; meanwhile each wait
  just sleeps ``poll_every`` seconds, and the caller polls.

Sending SUBSCRIBE itself (``open()``) raises when the server cannot be reached:
callers that subscribe before they commit want to know.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence

import redis

from .deployment import LOST
from .values import text

log = logging.getLogger(__name__)

RETRY_AFTER = 5.0  # seconds before a refused subscription is tried again
_LOST_PAUSE = 0.1  # seconds to wait after a lost connection before the caller goes on

Message = tuple[str, str]  # (channel, data) as text


class Subscription:
    """A subscription to ``channels`` on ``client``, kept alive under the policy above.

    Args:
        client: the redis-py client to subscribe with (one connection of its pool).
        channels: the channels.
        what: names the subscription in log messages (e.g. ``"acks subscription"``).
        poll_every: seconds a wait sleeps while there is no subscription.
        retry_after: seconds before a refused subscription is tried again.
    """

    def __init__(
        self,
        client: redis.Redis,
        channels: Sequence[str],
        *,
        what: str,
        poll_every: float,
        retry_after: float = RETRY_AFTER,
    ) -> None:
        self.client = client
        self.channels = list(channels)
        self.what = what
        self.poll_every = poll_every
        self.retry_after = retry_after
        self.error: redis.exceptions.RedisError | None = None  # what ended the last wait, if anything did
        self._pubsub: redis.client.PubSub | None = None
        self._refused_until = 0.0  # 0: not refused

    @property
    def refused(self) -> bool:
        """Whether the server refused the subscription and it has not been accepted since."""
        return self._refused_until > 0

    def open(self) -> bool:
        """Subscribe, unless subscribed already or refused less than ``retry_after`` ago.

        True when subscribed. A server that cannot be reached raises (redis-py's error).
        """
        if self._pubsub is None and time.monotonic() >= self._refused_until:
            pubsub = self.client.pubsub()
            try:
                pubsub.subscribe(*self.channels)
            except BaseException:
                _close_quietly(pubsub)
                raise
            self._pubsub = pubsub
        return self._pubsub is not None

    def messages(self, timeout: float) -> list[Message]:
        """Wait up to ``timeout`` seconds for a message, then take every one already queued.

        Returns them (possibly none). Never raises for pub/sub trouble: see the module
        docstring; ``error`` says what went wrong, None when the wait worked.
        """
        deadline = time.monotonic() + timeout
        try:
            if not self.open():
                time.sleep(min(timeout, self.poll_every))
                return []
            assert self._pubsub is not None
            out: list[Message] = []
            while True:
                wait = 0.0 if out else max(0.0, deadline - time.monotonic())
                message = self._pubsub.get_message(timeout=wait)
                if message is None:
                    break
                if message["type"] == "message":  # not a subscribe confirmation
                    out.append((text(message["channel"]), text(message["data"])))
        except LOST as exc:
            log.debug("%s lost (%s); resubscribing", self.what, exc)
            self.error = exc
            self.close()
            time.sleep(min(timeout, self.poll_every, _LOST_PAUSE))
            return []
        except redis.exceptions.RedisError as exc:  # e.g. NOPERM: the user lacks (or lost) its channel rights
            if not self.refused:
                log.warning("%s refused (%s); going on without it, subscribing again every %gs",
                            self.what, exc, self.retry_after)  # fmt: skip
            self.error = exc
            self._refused_until = time.monotonic() + self.retry_after
            self.close()
            time.sleep(min(timeout, self.poll_every))
            return []
        self.error = None
        self._refused_until = 0.0
        return out

    def confirm(self, timeout: float) -> str | None:
        """Subscribe and wait up to ``timeout`` for the server to confirm every channel.

        Returns the server's refusal (e.g. ``NOPERM ...``), None when it accepted (or
        gave no answer in time). For checks of the user's rights; nothing is logged.
        """
        self.open()
        assert self._pubsub is not None
        deadline = time.monotonic() + timeout
        confirmed = 0
        try:
            while confirmed < len(self.channels):
                message = self._pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
                if message is None:
                    break
                confirmed += message["type"] == "subscribe"
        except redis.exceptions.ResponseError as exc:
            self.close()
            return str(exc)
        return None

    def close(self) -> None:
        """Drop the subscription (the next wait subscribes again, unless refused recently)."""
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            _close_quietly(pubsub)


def _close_quietly(pubsub: redis.client.PubSub) -> None:
    """Close a pub/sub connection; one already lost with Redis closes quietly."""
    with contextlib.suppress(redis.exceptions.ConnectionError, OSError):
        pubsub.close()
