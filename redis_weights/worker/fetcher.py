"""Where a worker's chunks come from and where they land: the one owner of the receive buffer,
of which chunks it holds, and of the bytes read from Redis.

Two places, chosen once per receiver:

- **the host cache** (``HostCache``): the workers of one host share each version's file, and
  one of them reads it from Redis;
- **the private receive buffer**: grown to the largest version seen, then reused. It remembers
  the id of every chunk it holds (``held``), so a version reads only the chunks that changed
  (``assemble``), and a staged plan only the ones it lacks (``staging.stage``).

The receiver asks for a committed version's verified chunks (``fetch``) or stages an announced
plan (``stage``); it never touches the buffer or the held ids itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from ..backend.bulkread import receive_buffer
from ..format.manifest import Buffer, Manifest
from ..protocol import staging
from ..protocol.assemble import assemble
from ..protocol.chunkstore import ChunkStore
from ..threads import Threads
from .hostcache import HostCache


class Fetcher:
    """Fetch and stage versions for one worker, into the host's shared file or its private buffer."""

    def __init__(self, chunks: ChunkStore, host_cache: HostCache | None = None, threads: int = 1) -> None:
        self.chunks = chunks
        self.host_cache = host_cache
        self.threads = Threads(threads, "redis-weights-apply")  # patches of distinct chunks side by side
        self._buffer = memoryview(b"")  # grown to the largest version seen, then reused
        self._held: list[str | None] = []  # id of each chunk in the buffer (None: unknown)
        self._held_chunk_size = 0
        self._read = 0  # bytes read from Redis into the private buffer, all versions together

    @property
    def fetched_bytes(self) -> int:
        """Bytes read from Redis so far, staging included (with the host cache: what this worker
        read for the host)."""
        return self.host_cache.fetched_bytes if self.host_cache is not None else self._read

    @property
    def buffer_size(self) -> int:
        """Bytes of the private receive buffer (0 until a version needed it)."""
        return len(self._buffer)

    def close(self) -> None:
        """Stop the apply threads; unmap the host cache's kept file."""
        self.threads.close()
        if self.host_cache is not None:
            self.host_cache.close()

    def forget(self) -> None:
        """Hold nothing: the next fetch reads every chunk again (a damaged buffer, a test of a late joiner)."""
        self._held = []

    @contextlib.contextmanager
    def fetch(self, manifest: Manifest) -> Iterator[list[Buffer]]:
        """The verified chunks of a committed version (valid inside the block): views of the host's
        shared file, or of the receive buffer built from the chunks it holds plus what Redis has."""
        if self.host_cache is not None:
            self._held = []  # the host cache's private fallback may write into the buffer
            with self.host_cache.chunks(manifest, self.chunks, self._grown, self.threads) as chunks:
                yield chunks
            return
        buffer = self._buffer_for(manifest)
        self._read += assemble(self.chunks, manifest, buffer, self._held, threads=self.threads)
        offset, views = 0, []
        for size in manifest.chunk_sizes:
            views.append(buffer[offset : offset + size])
            offset += size
        yield views

    def stage(self, plan: Manifest, current: staging.Current, committed: Callable[[], bool]) -> int:
        """Read an announced, uncommitted version's chunks while the trainer writes them; the bytes
        read. ``current`` says whether the plan is still the one to stage, ``committed`` whether its
        version was committed meanwhile (the host cache then hands over to the fetch)."""
        if self.host_cache is not None:
            self._held = []  # the host cache's private fallback may write into the buffer
            return self.host_cache.stage(plan, self.chunks, current, committed=committed, threads=self.threads)
        staged = staging.stage(self.chunks, plan, self._buffer_for(plan), self._held, current)
        self._read += staged
        return staged

    def _buffer_for(self, manifest: Manifest) -> memoryview:
        """The receive buffer, sized for ``manifest``; the held ids forgotten where they no longer apply."""
        if len(self._buffer) < manifest.total_bytes:
            self._held = []
        buffer = self._grown(manifest.total_bytes)
        if self._held_chunk_size != manifest.chunk_size:
            self._held, self._held_chunk_size = [], manifest.chunk_size
        return buffer

    def _grown(self, size: int) -> memoryview:
        """The reused receive buffer, grown to ``size`` bytes if it is smaller."""
        if len(self._buffer) < size:
            self._buffer = memoryview(b"")  # drop the old one before allocating the bigger one
            self._buffer = receive_buffer(size)
        return self._buffer
