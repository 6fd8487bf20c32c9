"""Write one version to a ``.safetensors`` file: the file side of ``Admin.export``.

The file is built in place in a memory map of a temporary file next to the target
(every chunk verified against its id by ``assemble``), then renamed: a reader never
sees half a file, and a failure leaves no temporary file behind. A failure raises
the error that caused it, never one of the map's own (a view into the map held by
the error's traceback must not turn it into a ``BufferError``).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import uuid
from pathlib import Path

from ..errors import ConfigurationError
from ..format.manifest import Manifest
from ..protocol.assemble import assemble
from ..protocol.chunkstore import ChunkStore


def check_target(path: str | os.PathLike[str]) -> Path:
    """``path`` as a ``Path`` a file can be written to; a ``ConfigurationError`` when it is a
    directory or its directory does not exist (checked before anything is read from Redis)."""
    target = Path(path)
    if target.is_dir():
        raise ConfigurationError(f"{path} is a directory: give a file name, e.g. {target / 'weights.safetensors'}")
    if not target.parent.is_dir():
        why = "is not a directory" if target.parent.exists() else "does not exist"
        raise ConfigurationError(f"cannot write {path}: directory {target.parent} {why}")
    return target


def write_version(chunks: ChunkStore, manifest: Manifest, target: Path) -> None:
    """Build ``manifest``'s stream in a temporary file beside ``target``, then rename it to ``target``.

    The file gets the mode of any new file (0666 less the umask). ``OSError``s name
    ``target``, never the temporary file.
    """
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to any new file
        try:
            try:
                os.ftruncate(fd, manifest.total_bytes)
                _fill(fd, chunks, manifest)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, os.fspath(target)) from exc


def _fill(fd: int, chunks: ChunkStore, manifest: Manifest) -> None:
    """Assemble the version into a shared map of ``fd``."""
    region = mmap.mmap(fd, manifest.total_bytes)
    view = memoryview(region)
    try:
        assemble(chunks, manifest, view, [])
    except BaseException:
        # The frames of the error's traceback still hold slices of the map: releasing and closing
        # it now would raise a BufferError over the real error. It is unmapped when they go.
        with contextlib.suppress(BufferError):
            view.release()
            region.close()
        raise
    view.release()
    region.close()
