"""Read big string values straight into a caller's buffer (reused receive buffers, /dev/shm files).

redis-py (with hiredis) builds a fresh ``bytes`` object per reply: a second copy of
every byte, and page faults on memory that is new at every version. Here the GET
commands are pipelined on one pooled connection per node (on a Redis Cluster, every
master's keys on its own connection, in parallel threads) and each bulk reply is read
with ``recv_into`` directly into its place in ``target``: one copy, from the kernel,
into memory that stays mapped from version to version.

Only the replies GET can give are parsed: ``$<n>`` + payload, ``$-1`` or RESP3's
``_`` (no such key), ``-ERR ...``. On anything unexpected, or any socket error, the
connection is dropped (never returned half-read to the pool). The connection and
its socket come from the ``Deployment`` (the one module that touches redis-py's
connections); a client without a plain socket (fakeredis) takes the ordinary path
and the values are copied into ``target``.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Sequence

import redis

from ..format.manifest import Buffer
from .deployment import LOST, Deployment, RawConnection, run_per_node

ROUND_BYTES = 64 * 1024 * 1024  # bytes of values per pipelined write round (bounds a trainer's queued SETs)
# Bytes of replies per round trip of a read. Redis runs a round's GETs back to back and
# buffers all their replies before writing any: with 64 MiB rounds every GET copied into
# fresh memory (page faults: a 2 MiB GET's median 1.25 ms instead of 0.24 ms) and other
# clients waited for the whole round; 8 MiB rounds reuse the same buffers.
READ_ROUND_BYTES = 8 * 1024 * 1024
_READ_SIZE = 1 << 16

log = logging.getLogger(__name__)


def receive_buffer(size: int) -> memoryview:
    """``size`` writable, uninitialized bytes to read a version into.

    Not ``bytearray(size)``: that zero-fills every page while holding the GIL (about
    a second per GB here, several under load), long enough to starve the receiver's
    heartbeat thread, so a worker fetching a big model looked dead to the trainer.
    ``numpy.empty`` maps fresh pages lazily; they are faulted in by the socket reads,
    which release the GIL.
    """
    import numpy as np  # not at module level: operator tools import this module without numpy's cost

    return np.empty(size, dtype=np.uint8).data


class _Reader:
    """A minimal RESP reader over a socket: header lines buffered, payloads read in place."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        data = self.sock.recv(_READ_SIZE)
        if not data:
            raise redis.exceptions.ConnectionError("connection closed by the server while reading chunks")
        self.buf += data

    def line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                out = bytes(self.buf[:end])
                del self.buf[: end + 2]
                return out
            self._fill()

    def read_into(self, view: memoryview) -> None:
        have = min(len(self.buf), len(view))
        view[:have] = self.buf[:have]
        del self.buf[:have]
        while have < len(view):
            n = self.sock.recv_into(view[have:])
            if n == 0:
                raise redis.exceptions.ConnectionError("connection closed by the server while reading chunks")
            have += n

    def crlf(self) -> None:
        while len(self.buf) < 2:
            self._fill()
        if self.buf[:2] != b"\r\n":
            raise redis.exceptions.InvalidResponse("bulk reply not followed by CRLF")
        del self.buf[:2]


Span = tuple[int, int]  # (start, end) of a value's place in the target


def read_values_into(
    deployment: Deployment,
    keys: Sequence[str],
    sizes: Sequence[int],
    target: memoryview,
    round_bytes: int = READ_ROUND_BYTES,
) -> list[Buffer | None]:
    """GET ``keys``; value i, if it has ``sizes[i]`` bytes, lands at its offset in ``target``.

    Returns per key a view of ``target`` (the value is there), None (no such key), or
    the value as ``bytes`` when its size is not the expected one (a verifier reports it).
    On a cluster the keys are read from every master at once, each on its own
    connection (``Deployment.group_by_node``); with replica reads, from a replica of
    each, and what a replica lacks (replication lag) or refuses is read from its primary.
    """
    if len(target) < sum(sizes):
        raise ValueError(f"target has {len(target)} bytes, the values need {sum(sizes)}")
    spans: list[Span] = []
    offset = 0
    for size in sizes:
        spans.append((offset, offset + size))
        offset += size
    out: list[Buffer | None] = [None] * len(keys)

    def read(indices: list[int]) -> None:
        _read_node(deployment, keys, spans, target, round_bytes, indices, out)

    run_per_node(deployment.group_by_node(keys), read)
    return out


def _read_node(
    deployment: Deployment,
    keys: Sequence[str],
    spans: Sequence[Span],
    target: memoryview,
    round_bytes: int,
    indices: list[int],
    out: list[Buffer | None],
    *,
    primary: bool = False,
) -> None:
    """Read ``keys[i]`` for ``i`` in ``indices`` (all on one node) into ``out[i]``; with replica
    reads, what a replica lacks or refuses, or all of it when the replica cannot be reached
    (down, silent), is read from the primary."""
    mine = [keys[i] for i in indices]
    places = [spans[i] for i in indices]
    try:
        values, from_replica = _get_on_node(deployment, mine, places, target, round_bytes, primary)
    except LOST as exc:
        if primary or not deployment.replica_reads:
            raise
        log.warning("reading chunks from a replica failed (%s); reading them from the primary", exc)
        values, from_replica = _get_on_node(deployment, mine, places, target, round_bytes, True)
    again = []
    for i, value in zip(indices, values, strict=True):
        if from_replica and (value is None or isinstance(value, redis.exceptions.ResponseError)):
            again.append(i)
        else:
            out[i] = value  # type: ignore[assignment]
    if again:
        log.debug("%d of %d chunks missing on a replica: reading them from its primary", len(again), len(indices))
        _read_node(deployment, keys, spans, target, round_bytes, again, out, primary=True)


def _get_on_node(
    deployment: Deployment, keys: Sequence[str], places: Sequence[Span], target: memoryview, round_bytes: int,
    primary: bool,
) -> tuple[list[Buffer | redis.exceptions.ResponseError | None], bool]:
    """The replies to GET ``keys`` (one node's) on one bulk connection, and whether a replica gave them."""
    with deployment.bulk_connection(keys[0], primary=primary) as raw:
        if raw is None:
            values: list[Buffer | redis.exceptions.ResponseError | None] = list(
                _read_copying(deployment.client, keys, places, target))
        else:
            try:
                values = _read_direct(deployment.client, raw, keys, places, target, round_bytes)
            except OSError as exc:
                if exc.errno == errno.EFAULT:  # the kernel could not write into ``target``: not the network's fault
                    raise OSError(exc.errno, f"the chunks cannot be written into the receive buffer ({exc.strerror}; "
                                             "a memory-mapped file on a full filesystem?)") from exc  # fmt: skip
                raise redis.exceptions.ConnectionError(f"reading chunks failed: {exc}") from exc  # timeout, reset
        from_replica = raw is not None and raw.replica
        if not from_replica:
            refused = next((v for v in values if isinstance(v, redis.exceptions.ResponseError)), None)
            if refused is not None:  # every reply was read: the connection is clean, but the caller must know
                raise refused
    return values, from_replica


def _send_round(client: redis.Redis, raw: RawConnection, keys: Sequence[str]) -> None:
    """Send the GETs of one round (fault tests hook here to act between rounds)."""
    raw.send([("GET", k) for k in keys])


def _read_direct(
    client: redis.Redis,
    raw: RawConnection,
    keys: Sequence[str],
    spans: Sequence[Span],
    target: memoryview,
    round_bytes: int,
) -> list[Buffer | redis.exceptions.ResponseError | None]:
    """Every reply is read, an error reply included (it is returned in its key's place)."""
    reader = _Reader(raw.sock)
    out: list[Buffer | redis.exceptions.ResponseError | None] = []
    start = 0
    while start < len(keys):
        end, queued = start + 1, spans[start][1] - spans[start][0]
        while end < len(keys) and queued + spans[end][1] - spans[end][0] <= round_bytes:
            queued += spans[end][1] - spans[end][0]
            end += 1
        _send_round(client, raw, keys[start:end])
        for i in range(start, end):
            header = reader.line()
            if header.startswith(b"-"):
                out.append(redis.exceptions.ResponseError(header[1:].decode(errors="replace")))
                continue
            if header == b"_":  # RESP3 null
                out.append(None)
                continue
            if not header.startswith(b"$"):
                raise redis.exceptions.InvalidResponse(f"unexpected reply to GET: {header[:40]!r}")
            length = int(header[1:])
            if length < 0:
                out.append(None)
                continue
            first, last = spans[i]
            if length == last - first:
                view = target[first:last]
                reader.read_into(view)
                out.append(view)
            else:  # not the size the manifest promises: keep it for the verifier to report
                value = bytearray(length)
                reader.read_into(memoryview(value))
                out.append(bytes(value))
            reader.crlf()
        start = end
    return out


def _read_copying(
    client: redis.Redis, keys: Sequence[str], spans: Sequence[Span], target: memoryview
) -> list[Buffer | None]:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.get(key)
    out: list[Buffer | None] = []
    for (first, last), value in zip(spans, pipe.execute(), strict=True):
        if value is not None and len(value) == last - first:
            view = target[first:last]
            view[:] = value
            out.append(view)
        else:
            out.append(value)
    return out
