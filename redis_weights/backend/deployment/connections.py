"""Per-node connections for bulk transfers: a pooled connection with its plain socket, and one
thread per node. redis-py's own sockets are touched only here."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import redis

T = TypeVar("T")


@dataclass(frozen=True)
class RawConnection:
    """A pooled redis-py connection and its plain socket, for reading replies by hand.
    ``replica``: the connection is to a replica (READONLY), so a miss may be replication lag."""

    connection: Any
    sock: socket.socket
    replica: bool = False

    def send(self, commands: list[tuple[Any, ...]]) -> None:
        """Send ``commands`` pipelined, without reading any reply."""
        self.connection.send_packed_command(self.connection.pack_commands(commands))


def _checkout(pool: Any) -> Any:
    try:
        return pool.get_connection()
    except TypeError:  # redis-py 5 requires a command name
        return pool.get_connection("GET")


@contextlib.contextmanager
def raw_connection(pool: Any, *, replica: bool = False, readonly: bool = False) -> Iterator[RawConnection | None]:
    """A connection of ``pool`` with its plain socket (None without one), back to the pool after
    the block; disconnected first if the block raised. ``replica``: the pool's node is a replica;
    ``readonly``: a cluster replica, which serves reads only after ``READONLY``."""
    connection = _checkout(pool)
    try:
        connection.connect()
        if readonly:
            connection.send_command("READONLY")
            if connection.read_response() not in (b"OK", "OK"):
                raise redis.exceptions.ConnectionError("READONLY refused by the replica")
    except BaseException:
        connection.disconnect()
        pool.release(connection)
        raise
    sock = getattr(connection, "_sock", None)  # redis-py's socket: touched only here
    if not isinstance(sock, socket.socket):
        pool.release(connection)
        yield None
        return
    try:
        yield RawConnection(connection, sock, replica)
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


def run_per_node(groups: dict[str, T], work: Callable[[T], None]) -> None:
    """``work(group)`` for every node's group: inline for one node, else one thread per node
    (socket reads and writes release the GIL, so the nodes' transfers overlap). Waits for all;
    the first error raised in any of them is raised here."""
    if len(groups) <= 1:
        for group in groups.values():
            work(group)
        return
    errors: list[BaseException] = []

    def run(group: T) -> None:
        try:
            work(group)
        except BaseException as exc:  # handed to the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(g,), name=f"redis-weights-node-{n}", daemon=True)
               for n, g in groups.items()]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
