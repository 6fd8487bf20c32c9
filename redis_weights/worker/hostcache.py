"""One fetch per host and version: a safetensors file in /dev/shm shared by the local workers.

The first local worker to claim a version (an exclusive ``flock`` on the version's
lock file) builds it in a file in shared memory and renames it into place once
every chunk matches the manifest. The other local workers wait on that lock, then
memory-map the file: Redis sends each version to the host once, however many
workers run there.

The fetcher builds the new file from an old version's file, recycled (fresh
shared-memory pages are expensive: allocating and zeroing them cost more than the
transfer here): it hashes the old file's chunks, keeps those the new version
shares, and reads or patches only the others (``assemble.py``). With deltas a
version costs the host its patches, not a model size.

The file is a plain ``.safetensors`` file (its chunks concatenated). Its name
carries the version and a digest of the manifest's chunk ids; every reader
verifies every chunk against the manifest it read from Redis, so a stale, foreign
or damaged file is deleted and refetched, never applied. The process that built
the file verified each chunk as it wrote it, and does not check it a second time.

With overlap (``staging.py``) the fetcher is the worker that took the version's
lock when its plan was announced: it streams the chunks into the file while the
trainer writes them, and the other local workers, woken by the commit, wait on that
lock as they would for any fetch.

A reader holds a shared ``flock`` on the file for as long as it reads it, and a
fetcher recycles only a file it can lock exclusively (so nobody is reading it),
renaming it away before writing: a reader that opened it just before checks, once
it holds its lock, that the name still points at the file it opened.

Each process keeps its last mapping between versions, without the lock: with sync
pushes a host recycles one file, version after version, so the next version is
usually the same file, and mapping and unmapping a large file (page tables, not
bytes: ~0.04 s per 520 MB here) would be paid by every worker at every version. The
mapping is read only under the lock, after the name and the size are checked; one
of a file deleted meanwhile is dropped at the process's next version (or ``close``).

The fetcher reserves the file's space before writing a byte (``posix_fallocate``):
on a filesystem too small for the version (Docker's and Kubernetes' default 64 MB
``/dev/shm``) a mapped file would otherwise turn "disk full" into ``EFAULT`` in the
middle of a socket read, at every try. When the space cannot be had, the version
is read into the worker's private buffer instead, with one warning per cause.

Every worker trusts the files of the directory (the chunk ids are xxh3, not
cryptographic), so it must be private: the default is one directory per user
(``/dev/shm/redis_weights-<uid>``), created mode 0700, and a directory owned by
another user or writable by group or others is refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from ..backend.bulkread import receive_buffer
from ..errors import CodecError, ConfigurationError, IntegrityError
from ..format.manifest import Buffer, Manifest, checksum
from ..protocol import staging
from ..protocol.assemble import assemble
from ..protocol.chunkstore import ChunkStore
from ..threads import Threads

log = logging.getLogger(__name__)

DEFAULT_DIRECTORY = f"/dev/shm/redis_weights-{os.getuid()}"  # one per user: nobody else may write there
SPARE_FILES = 1  # files of older versions kept to be recycled
_FILE_RE = re.compile(r"v([0-9]+)-[0-9a-f]{16}\.(safetensors|lock|tmp\.([0-9]+))")  # fullmatch: no "\n" after it
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # prefault the mapping in one go (Linux)

Allocate = Callable[[int], memoryview]  # a private buffer of at least n bytes (the receiver's, reused)
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOMEM)  # the filesystem cannot hold the version


def scope_name(scope: str, namespace: str) -> str:
    """A directory name for one (deployment, namespace): files of others never mix in.

    ``scope`` is the deployment's identity (``Deployment.scope()``)."""
    digest = xxhash.xxh3_64_hexdigest(f"{scope}|{namespace}".encode())
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', namespace)[:64]}-{digest}"


def private_directory(path: str | os.PathLike[str]) -> Path:
    """``path`` as a directory that only this user can write to, symlinks resolved.

    Missing directories (parents included) are created mode 0700; an existing one
    must belong to this user and not be writable by group or others, since another
    local user could otherwise plant files that workers apply. Raises
    ``ConfigurationError`` (with the path and the fix) rather than a raw ``OSError``.
    """
    directory = Path(os.path.abspath(path))
    missing = []
    for level in (directory, *directory.parents):
        if os.path.lexists(level):
            break
        missing.append(level)
    try:
        for level in reversed(missing):
            with contextlib.suppress(FileExistsError):  # created meanwhile: checked below like any
                os.mkdir(level, 0o700)
        directory = directory.resolve(strict=True)
        st = os.stat(directory)
    except OSError as exc:
        raise ConfigurationError(f"cannot create the host cache directory {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigurationError(f"host cache directory {path} is not a directory")
    if st.st_uid != os.getuid():
        raise ConfigurationError(
            f"host cache directory {directory} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}): "
            "pass host_cache=<a directory of your own>"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigurationError(
            f"host cache directory {directory} is writable by group or others (mode {stat.S_IMODE(st.st_mode):03o}), "
            f"so another user could plant weights in it: chmod 700 {directory}, or use another directory"
        )
    return directory


@dataclass
class _Mapping:
    """The views of a version's chunks (in a kept mapping, or a private buffer); ``fd`` holds the lock."""

    chunks: list[Buffer]
    fd: int | None = None

    def close(self) -> None:
        """Release the views, then drop the lock (the mapping stays: see ``_KeptMap``)."""
        for chunk in self.chunks:
            if isinstance(chunk, memoryview):
                with contextlib.suppress(BufferError):
                    chunk.release()
        self.chunks = []
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass
class _KeptMap:
    """A process's mapping of one file (read and write, populated), kept between versions."""

    region: mmap.mmap
    fd: int  # a descriptor of its own, never locked: tells whether the file was deleted meanwhile
    key: tuple[int, int]  # (st_dev, st_ino)
    size: int

    def close(self) -> None:
        """Unmap (a view still held elsewhere, e.g. a reader of the version inside its block: GC unmaps)."""
        with contextlib.suppress(BufferError):
            self.region.close()
        os.close(self.fd)


def _views(region: mmap.mmap | memoryview, manifest: Manifest) -> list[Buffer]:
    """Read-only views of the version's chunks: the fetcher's own mapping is writable (it built the
    file through it), yet nothing that applies a version may write into the file other workers map."""
    out: list[Buffer] = []
    whole = memoryview(region).toreadonly()
    offset = 0
    for size in manifest.chunk_sizes:
        out.append(whole[offset : offset + size])
        offset += size
    return out


def _same_file(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


class HostCache:
    """Versions of one namespace shared through files in ``directory`` (a private one, see ``private_directory``)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = private_directory(directory)
        self.fetched = 0  # versions this process fetched from Redis for the host
        self.shared = 0  # versions it mapped from a file another worker fetched
        self.recycled = 0  # files of old versions it reused for a new one
        self.fetched_bytes = 0  # bytes it read from Redis to build them
        self.private = 0  # versions it read into a private buffer: the directory had no room for them
        self._no_room: str | None = None  # the last "no room" cause warned about
        self._built: tuple[Path, int, int, list[str]] | None = None  # the file this process built and verified
        self._kept: _KeptMap | None = None  # the last file mapped (one thread uses a cache)
        self.mapped = 0  # files this process mapped (a version in the file it mapped last costs none)

    def close(self) -> None:
        """Unmap the kept file (the cache can still be used: it maps again)."""
        if self._kept is not None:
            self._kept.close()
            self._kept = None

    def _map(self, fd: int, path: Path) -> mmap.mmap:
        """The whole file behind ``fd`` (locked, named ``path``) mapped: the kept mapping when it is
        the same file at the same size, else a new mapping that is kept instead of the old one.

        The mapping is made through a descriptor of its own: ``mmap`` keeps a duplicate of the
        descriptor it is given, and a duplicate of ``fd`` would hold ``fd``'s ``flock`` as long as
        the mapping lives."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        kept = self._kept
        if kept is not None and kept.key == key and kept.size == st.st_size:
            return kept.region
        self.close()
        own = os.open(f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else path, os.O_RDWR)
        try:
            mine = os.fstat(own)
            if (mine.st_dev, mine.st_ino) != key:  # only without /proc, if the name moved: never under the lock
                raise OSError(errno.ESTALE, f"{path} is no longer the file being read")
            region = mmap.mmap(own, st.st_size, flags=mmap.MAP_SHARED | _POPULATE)
        except BaseException:
            os.close(own)
            raise
        self._kept = _KeptMap(region, own, key, st.st_size)
        self.mapped += 1
        return region

    def _drop_deleted(self) -> None:
        """Unmap the kept file if it was deleted since (its memory is freed only once nobody maps it)."""
        if self._kept is not None and os.fstat(self._kept.fd).st_nlink == 0:
            self.close()

    @classmethod
    def scoped(cls, base: str | os.PathLike[str], scope: str, namespace: str) -> HostCache:
        """The cache of one (deployment scope, namespace) in its own subdirectory of ``base`` (both private)."""
        return cls(private_directory(base) / scope_name(scope, namespace))

    def _stem(self, manifest: Manifest) -> str:
        digest = xxhash.xxh3_64_hexdigest("|".join(manifest.ids).encode())
        return f"v{manifest.version}-{digest}"

    @contextlib.contextmanager
    def chunks(
        self, manifest: Manifest, store: ChunkStore, allocate: Allocate = receive_buffer, threads: Threads | None = None
    ) -> Iterator[list[Buffer]]:
        """The verified chunks of ``manifest``'s version, as views of a shared file (valid inside the block).

        What the file lacks is read from ``store`` (and patched, on ``threads``: the other local
        workers wait for the file meanwhile). If some object is missing or wrong, the error
        propagates and no file is published. When the directory has no room for the version, it
        is built in ``allocate(total_bytes)`` instead (a private buffer).
        """
        self._drop_deleted()
        stem = self._stem(manifest)
        path = self.directory / f"{stem}.safetensors"
        mapping = self._open_shared(path, manifest)
        if mapping is not None:
            self.shared += 1
        else:
            with self._locked(self.directory / f"{stem}.lock"):
                mapping = self._open_shared(path, manifest)  # another worker fetched it meanwhile
                if mapping is not None:
                    self.shared += 1
                else:
                    self.fetched += 1
                    mapping = self._fetch_into_file(path, manifest, store, allocate, threads)
        try:
            yield mapping.chunks
        finally:
            mapping.close()

    @contextlib.contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _open_shared(self, path: Path, manifest: Manifest) -> _Mapping | None:
        """Map the file under a shared lock if it holds exactly this version; delete it if it does not."""
        try:
            fd = os.open(path, os.O_RDWR)  # read-write: the mapping is kept, and may be recycled here later
        except FileNotFoundError:
            return None
        mapping = _Mapping([], fd=fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if not _same_file(path, fd):  # recycled or replaced between open and lock
                mapping.close()
                return None
            size = os.fstat(fd).st_size
            if size != manifest.total_bytes:
                raise IntegrityError(f"{size} bytes, expected {manifest.total_bytes}")
            mapping.chunks = _views(self._map(fd, path), manifest)
            own = os.fstat(fd)
            if self._built == (path, own.st_dev, own.st_ino, manifest.ids):  # built here: verified already
                self._built = None  # once: an inode number may be reused after the file is gone
            else:
                for index, chunk in enumerate(mapping.chunks):
                    manifest.verify_chunk(index, chunk)
        except (IntegrityError, ValueError, OSError) as exc:
            log.warning("host cache: discarding %s (%s)", path, exc)
            if _same_file(path, fd):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            mapping.close()
            self._drop_deleted()
            return None
        return mapping

    def _fetch_into_file(
        self, path: Path, manifest: Manifest, store: ChunkStore, allocate: Allocate, threads: Threads | None
    ) -> _Mapping:
        """Build the version in a (recycled) file and publish it; then map it like any reader does.
        Without room for the file, build it in a private buffer."""

        def fill(view: memoryview, held: list[str | None]) -> bool:
            self.fetched_bytes += assemble(store, manifest, view, held, threads=threads)
            return True

        try:
            mapping = self._build(path, manifest, fill)
        except _NoRoom as exc:
            return self._private(manifest, store, allocate, exc.cause)
        if mapping is None:  # recycled already by a fetcher of a newer version: build it privately
            log.info("host cache: %s vanished right after publishing; reading it privately", path.name)
            mapping = self._build_private(manifest, store, allocate)
        return mapping

    def stage(
        self,
        plan: Manifest,
        store: ChunkStore,
        current: staging.Current,
        committed: Callable[[], bool],
        threads: Threads | None = None,
    ) -> int:
        """Stream an announced, uncommitted version into its shared file while the trainer writes it
        (``staging.py``); returns the bytes read. Skipped when the file exists, when another local
        worker holds the version's lock (it stages or fetches it), or without room for it.

        The file is published once every chunk matches the plan; it is applied only after the
        commit, from the committed manifest (whose chunk ids name the same file). What staging cannot
        read (patched chunks, chunks not written yet) is fetched and patched, on ``threads``, once the
        version is committed (``staging.wait_for_commit``), still under the lock the other local
        workers wait on; when the plan is abandoned (the trainer died, a newer plan), the file is dropped.
        """
        stem = self._stem(plan)
        path = self.directory / f"{stem}.safetensors"
        if path.exists():
            return 0
        staged = 0

        def fill(view: memoryview, held: list[str | None]) -> bool:
            nonlocal staged
            staged += staging.stage(store, plan, view, held, current)
            if held == plan.ids:
                return True
            stored_in = all(held[i] == e.id for i, e in enumerate(plan.chunks) if e.base is None)
            if not (staging.wait_for_commit(committed, current) if stored_in else committed()):
                return False  # abandoned, or stalled (the trainer died?) with stored chunks missing
            try:  # committed meanwhile: fetch (or patch) the rest now, under the lock
                staged += assemble(store, plan, view, held, threads=threads)
            except (IntegrityError, CodecError) as exc:
                log.info("host cache: staged version %d could not be completed (%s); dropped", plan.version, exc)
                return False
            return True

        fd = os.open(self.directory / f"{stem}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0
            if path.exists():
                return 0
            try:
                mapping = self._build(path, plan, fill)
                if mapping is not None:
                    mapping.close()  # the workers map it after the commit, this one too
                    self.fetched += 1
            except _NoRoom:
                return 0  # the commit reads it privately (and warns)
        finally:
            os.close(fd)  # releases the lock
        self.fetched_bytes += staged
        return staged

    def _build(
        self, path: Path, manifest: Manifest, fill: Callable[[memoryview, list[str | None]], bool]
    ) -> _Mapping | None:
        """Write ``manifest``'s version into a (recycled) file with ``fill(view, held)`` and publish it
        under ``path`` when ``fill`` says it is complete (every chunk verified). Returns the published
        file as a reader holds it (the build's own mapping, under a shared lock: not mapped, nor read,
        a second time), or None when it was not published or a newer version's fetcher recycled it
        meanwhile. Raises ``_NoRoom`` when the directory cannot hold the version."""
        fd, tmp = self._writable_file(manifest.version, path)
        published = False
        try:
            old_size = os.fstat(fd).st_size
            no_room = _reserve(fd, manifest.total_bytes, allocated=old_size)
            if no_room is not None:
                raise _NoRoom(no_room)
            region = self._map(fd, tmp)  # the file it read last, usually: no new mapping
            view = memoryview(region)
            try:
                held = _held_ids(view, manifest, min(old_size, manifest.total_bytes))
                complete = fill(view, held)
            finally:
                view.release()
            if not complete:
                return None
            os.replace(tmp, path)
            published = True
            own = os.fstat(fd)
            self._built = (path, own.st_dev, own.st_ino, manifest.ids)
            fcntl.flock(fd, fcntl.LOCK_SH)  # a reader of it now (the conversion is not atomic: check the name)
            if not _same_file(path, fd):
                return None
            mapping = _Mapping(_views(region, manifest), fd=fd)
            fd = -1
            return mapping
        finally:
            if not published:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                self._drop_deleted()
            if fd >= 0:
                os.close(fd)  # drops the lock: readers may map the published file
            if published:
                self._remove_older(manifest.version)
                self._remove_stale(manifest)

    def _build_private(self, manifest: Manifest, store: ChunkStore, allocate: Allocate) -> _Mapping:
        """The version built in a private buffer (nothing held: every object read from Redis)."""
        private = allocate(manifest.total_bytes)
        self.fetched_bytes += assemble(store, manifest, private, [None] * manifest.num_chunks)
        return _Mapping(_views(private, manifest))

    def _private(self, manifest: Manifest, store: ChunkStore, allocate: Allocate, no_room: OSError) -> _Mapping:
        """Fetch a version the directory has no room for into a private buffer (one warning per cause)."""
        self.private += 1
        cause = no_room.strerror or str(no_room)
        if cause != self._no_room:
            self._no_room = cause
            log.warning(
                "host cache: no room for version %d (%d bytes) in %s (%s); reading versions into a private buffer "
                "until there is (give the directory a bigger filesystem, e.g. docker run --shm-size)",
                manifest.version, manifest.total_bytes, self.directory, cause,
            )  # fmt: skip
        return self._build_private(manifest, store, allocate)

    def _writable_file(self, version: int, path: Path) -> tuple[int, Path]:
        """An exclusively locked file to write ``version`` into: an old version's if none reads it."""
        tmp = path.with_name(f"{path.stem}.tmp.{os.getpid()}")
        for old in self._data_files(below=version):
            try:
                fd = os.open(old, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _same_file(old, fd):
                    os.rename(old, tmp)  # no reader holds it, and no new one can find it
                    self.recycled += 1
                    return fd, tmp
            except (BlockingIOError, FileNotFoundError):
                pass
            os.close(fd)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd, tmp

    def _data_files(self, below: int) -> list[Path]:
        """Data files of versions below ``below``, oldest first."""
        found = []
        for entry in os.scandir(self.directory):
            match = _FILE_RE.fullmatch(entry.name)
            if match and match.group(2) == "safetensors" and int(match.group(1)) < below:
                found.append((int(match.group(1)), Path(entry.path)))
        return [p for _, p in sorted(found)]

    def _remove_stale(self, manifest: Manifest) -> None:
        """Delete data files of *higher* versions written before ``manifest``'s commit: leftovers
        of an earlier life of the Redis data (flushed or lost, so version numbers restarted).
        A real newer version is committed, hence written, after this one was committed."""
        for entry in os.scandir(self.directory):
            match = _FILE_RE.fullmatch(entry.name)
            if match and match.group(2) == "safetensors" and int(match.group(1)) > manifest.version:
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime < manifest.created:
                        os.unlink(entry.path)

    def _remove_older(self, version: int) -> None:
        """Delete locks of versions below ``version``, leftovers of dead fetchers, and data files
        beyond the ``SPARE_FILES`` newest older ones (kept to be recycled)."""
        for old in self._data_files(below=version)[:-SPARE_FILES]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        for entry in os.scandir(self.directory):
            match = _FILE_RE.fullmatch(entry.name)
            if not match or int(match.group(1)) >= version:
                continue
            if match.group(2) == "lock" or (match.group(3) and not _alive(int(match.group(3)))):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


class _NoRoom(Exception):
    """The host cache's filesystem cannot hold a version (``cause``: the error reserving it)."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _held_ids(region: memoryview, manifest: Manifest, valid: int) -> list[str | None]:
    """Ids of the chunks (at the manifest's chunk size) that the first ``valid`` bytes of a
    recycled file hold: an older version's, mostly shared with the new one."""
    held: list[str | None] = []
    offset = 0
    for size in manifest.chunk_sizes:
        held.append(checksum(region[offset : offset + size]) if offset + size <= valid else None)
        offset += size
    return held


def _reserve(fd: int, size: int, allocated: int = 0) -> OSError | None:
    """Size the file to ``size`` bytes and reserve its storage now; the error when the filesystem
    has no room for it (None: reserved, or a filesystem that cannot reserve, left sparse).
    ``allocated``: bytes the file holds already (a recycled file, written whole), not reserved again."""
    os.ftruncate(fd, size)
    if size <= allocated:
        return None
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in _NO_ROOM:
            return exc
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
