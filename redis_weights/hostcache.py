"""One fetch per host and version: a safetensors file in /dev/shm shared by the local workers.

The first local worker to claim a version (an exclusive ``flock`` on the version's
lock file) reads its chunks from Redis straight into a new file in shared memory
and renames it into place once every chunk matches the manifest. The other local
workers wait on the lock, then memory-map the file: Redis sends one model size per
version to the host, however many workers run there.

The file is a plain ``.safetensors`` file (its chunks concatenated). Its name
carries the version and a digest of the manifest's chunk checksums; every reader
verifies every chunk against the manifest it read from Redis anyway, so a stale,
foreign or damaged file is deleted and refetched, never applied. Files of older
versions are removed by the worker that publishes a newer one (a worker still
reading an old file keeps its mapping: unlinking does not invalidate it).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import xxhash

from .codec import Buffer, Manifest
from .errors import IntegrityError

log = logging.getLogger(__name__)

DEFAULT_DIRECTORY = "/dev/shm/redis_weights"
_FILE_RE = re.compile(r"^v(\d+)-[0-9a-f]{16}\.(safetensors|lock|tmp\.\d+)$")

Fetch = Callable[[Manifest, memoryview], list[Buffer | None]]


def scope_name(server: str, namespace: str) -> str:
    """A directory name for one (Redis server, namespace): files of others never mix in."""
    digest = xxhash.xxh3_64_hexdigest(f"{server}|{namespace}".encode())
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', namespace)[:64]}-{digest}"


class HostCache:
    """Versions of one namespace shared through files in ``directory`` (default /dev/shm)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.fetched = 0  # versions this process fetched from Redis for the host
        self.shared = 0  # versions it mapped from a file another worker fetched

    def _stem(self, manifest: Manifest) -> str:
        digest = xxhash.xxh3_64_hexdigest("|".join(manifest.checksums).encode())
        return f"v{manifest.version}-{digest}"

    @contextlib.contextmanager
    def chunks(self, manifest: Manifest, fetch: Fetch) -> Iterator[list[Buffer | None]]:
        """The chunks of ``manifest``'s version, as views of a shared file (valid inside the block).

        ``fetch(manifest, target)`` reads the chunks from Redis into ``target``. If some
        chunk is missing or wrong, the chunks are yielded as fetched (the caller's checks
        report them) and no file is published.
        """
        stem = self._stem(manifest)
        path = self.directory / f"{stem}.safetensors"
        mapped = self._map_verified(path, manifest)
        if mapped is None:
            with self._locked(self.directory / f"{stem}.lock"):
                mapped = self._map_verified(path, manifest)  # another worker fetched it meanwhile
                if mapped is None:
                    mapped = self._fetch_into_file(path, manifest, fetch)
                    self.fetched += 1
                else:
                    self.shared += 1
        else:
            self.shared += 1
        chunks, region = mapped
        try:
            yield chunks
        finally:
            _unmap(chunks, region)

    @contextlib.contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _views(region: mmap.mmap, manifest: Manifest) -> list[Buffer | None]:
        out: list[Buffer | None] = []
        offset = 0
        for size in manifest.chunk_sizes:
            out.append(memoryview(region)[offset : offset + size])
            offset += size
        return out

    def _map_verified(self, path: Path, manifest: Manifest) -> tuple[list[Buffer | None], mmap.mmap] | None:
        """Map an existing file if it holds exactly this version; delete it if it does not."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            if os.fstat(fd).st_size != manifest.total_bytes:
                raise IntegrityError(f"{path.name}: {os.fstat(fd).st_size} bytes, expected {manifest.total_bytes}")
            region = mmap.mmap(fd, manifest.total_bytes, prot=mmap.PROT_READ)
        except (IntegrityError, ValueError, OSError) as exc:
            log.warning("host cache: discarding %s (%s)", path, exc)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return None
        finally:
            os.close(fd)
        chunks = self._views(region, manifest)
        try:
            for index, chunk in enumerate(chunks):
                manifest.verify_chunk(index, chunk)
        except IntegrityError as exc:
            log.warning("host cache: discarding %s (%s)", path, exc)
            _unmap(chunks, region)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return None
        return chunks, region

    def _fetch_into_file(self, path: Path, manifest: Manifest, fetch: Fetch) -> tuple[list[Buffer | None], mmap.mmap]:
        tmp = path.with_name(f"{path.stem}.tmp.{os.getpid()}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, manifest.total_bytes)
            region = mmap.mmap(fd, manifest.total_bytes)
        finally:
            os.close(fd)
        try:
            chunks = fetch(manifest, memoryview(region))
            complete = True
            for index, chunk in enumerate(chunks):
                try:
                    manifest.verify_chunk(index, chunk)
                except IntegrityError:
                    complete = False
                    break
            if complete:
                os.replace(tmp, path)
                self._remove_older(manifest.version)
            else:
                tmp.unlink()
        except BaseException:
            _unmap([], region)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return chunks, region

    def _remove_older(self, version: int) -> None:
        """Delete the files (data, locks, leftovers of crashed fetches) of versions below ``version``."""
        for entry in os.scandir(self.directory):
            match = _FILE_RE.match(entry.name)
            if match and int(match.group(1)) < version:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def _unmap(chunks: list[Buffer | None], region: mmap.mmap) -> None:
    """Release the views, then unmap (a view still exported elsewhere: the GC unmaps later)."""
    for chunk in chunks:
        if isinstance(chunk, memoryview):
            with contextlib.suppress(BufferError):
                chunk.release()
    with contextlib.suppress(BufferError):
        region.close()
