"""``WAIT`` before a commit: a marker write and ``WAIT`` per master, and what each master said."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import redis

from ..keys import Keys

_MARKER_TTL_MS = 60_000  # the WAIT marker is a few bytes that vanish by themselves


@dataclass(frozen=True)
class Replication:
    """What one master said to a push's ``WAIT``: how many replicas it had online, how many the
    push asked for, and how many acknowledged everything written before the marker."""

    master: str
    online: int
    wanted: int
    acknowledged: int

    @property
    def short(self) -> bool:
        """Fewer replicas acknowledged than were asked for."""
        return self.acknowledged < self.wanted


class _Masters(Protocol):
    def masters(self) -> list[tuple[str, Any]]: ...

    def marker_on(self, address: str, keyspace: Keys) -> str: ...


def online_replicas(client: redis.Redis) -> int | None:
    """How many replicas the master reports online (``INFO replication``); None when it will not say
    (fakeredis, a user without ``+info``)."""
    try:
        info = client.info("replication")
    except redis.exceptions.ResponseError:
        return None
    count = 0
    for name, value in info.items():
        if str(name).startswith("slave") and isinstance(value, dict) and value.get("state") == "online":
            count += 1
    return count


def wait_for_replicas(deployment: _Masters, keyspace: Keys, replicas: int | None, timeout: float) -> list[Replication]:
    """For each master of ``deployment``: write a marker key (``marker_on``) and send
    ``WAIT n timeout`` on the same connection (``Deployment.wait_for_replicas`` says more)."""
    results = []
    for address, client in deployment.masters():
        online = online_replicas(client)
        wanted = (online or 0) if replicas is None else replicas
        if wanted <= 0:
            results.append(Replication(address, online or 0, 0, 0))
            continue
        pipe = client.pipeline(transaction=False)  # one connection: WAIT counts from the marker
        pipe.set(deployment.marker_on(address, keyspace), "1", px=_MARKER_TTL_MS)
        pipe.execute_command("WAIT", wanted, max(1, int(timeout * 1000)))
        _, acknowledged = pipe.execute()
        results.append(Replication(address, online or 0, wanted, int(acknowledged)))
    return results
