"""Overlap: workers read a version's chunks while the trainer still writes them, and apply after the commit.

The one owner of the *plan* protocol:

* the trainer, once it knows the manifest of the version it is about to upload
  (after ``VersionRegistry.begin``, so its objects are safe from GC) and when the
  upload is big enough to gain from it (``DEFAULT_OVERLAP_MIN_BYTES``), writes the
  manifest-to-be under ``rw:{ns}:plan`` (a hash: ``version``, ``manifest``; TTL
  ``PLAN_TTL``) and publishes ``plan:<N>`` on the updates channel (``announce``);
* a worker woken by that hint reads the plan (``read_plan``: sizes and values
  checked like a committed manifest's), and ``stage`` reads into its receive buffer
  (or the host's shared file) whatever stored chunk of the plan Redis already
  holds, verifying each against its id, again and again until every chunk is in,
  any version is committed (``latest`` moved), the plan is superseded or gone,
  or no new chunk appeared for ``STALL_SECONDS`` (a trainer that died mid-upload).

Anyone with a worker's rights can write a plan, so a plan costs bounded work and never
delays an apply: one for a version no push allocated (above the namespace's counter) is
ignored; each read round asks for at most ``WINDOW_CHUNKS`` chunks (``WINDOW_BYTES``),
the next ones in upload order, so a plan whose chunks never come costs at most
``WINDOW_CHUNKS`` GETs per pause for ``STALL_SECONDS``, whatever its size; staging stops
at the first commit of any version (checked between rounds: the commit is applied at
once); and a receiver stages each version once.

A plan is never applied: the receiver applies only what ``latest`` points at,
from the committed manifest, and staged chunks only spare it downloads (they count
as held because their bytes match their ids). Patched chunks (deltas) are not
staged: they need their parent's chunk, and are fetched after the commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from ..backend.keys import Keys
from ..backend.values import MAX_VERSION, parse_int, text
from ..errors import CodecError
from ..format.manifest import MAX_MANIFEST_BYTES, Manifest, checksum
from ..units import milliseconds
from .chunkstore import ChunkStore

log = logging.getLogger(__name__)

DEFAULT_OVERLAP_MIN_BYTES = 16 * 1024 * 1024  # smaller uploads are not announced: no extra round trip
PLAN_TTL = 60.0  # seconds a plan lives (the commit needs no cleanup; a dead trainer's plan expires)
STALL_SECONDS = 3.0  # a stager gives up when no new chunk appeared for this long (the trainer died?)
_PAUSE_MIN = 0.002  # seconds between reads while chunks are still missing (doubled up to _PAUSE_MAX)
_PAUSE_MAX = 0.02
_HINT_PREFIX = "plan:"
WINDOW_CHUNKS = 32  # chunks asked for per read round (the next missing ones: the trainer writes in order)
WINDOW_BYTES = 32 * 1024 * 1024  # and at most this many bytes (at least one chunk), so latest is checked often

Current = Callable[[], bool]  # whether the plan being staged is still the one to stage


def announce(client: redis.Redis, keyspace: Keys, manifest: Manifest, ttl: float = PLAN_TTL) -> None:
    """Write ``manifest`` (not committed) as the plan, then wake the workers (the PUBLISH on its own:
    a cluster pipeline refuses it; one more round trip, only for pushes of ``overlap_min_bytes``)."""
    pipe = client.pipeline(transaction=False)
    pipe.hset(keyspace.plan, mapping={"version": manifest.version, "manifest": manifest.to_bytes()})
    pipe.pexpire(keyspace.plan, milliseconds(ttl))
    pipe.execute()
    client.publish(keyspace.updates_channel, f"{_HINT_PREFIX}{manifest.version}")


def hinted_version(message: str) -> int | None:
    """The version a ``plan:<N>`` message announces, None for any other message (checked, never trusted)."""
    if not message.startswith(_HINT_PREFIX):
        return None
    return parse_int(message[len(_HINT_PREFIX) :], minimum=1, maximum=MAX_VERSION)


def still_planned(client: redis.Redis, keyspace: Keys, version: int, since: int | None = None) -> bool:
    """Whether ``version`` is still the announced plan and not committed (nor passed by a commit),
    in one round trip; False for a ``latest`` that is no version number. With ``since`` (``latest``
    when staging began), False as soon as any version is committed: a plan never delays an apply."""
    pipe = client.pipeline(transaction=False)
    pipe.get(keyspace.latest)
    pipe.hget(keyspace.plan, "version")
    raw_latest, planned = pipe.execute()
    latest = 0 if raw_latest is None else parse_int(raw_latest, minimum=0, maximum=MAX_VERSION)
    if latest is None or latest >= version or (since is not None and latest != since):
        return False
    return parse_int(planned, minimum=1, maximum=MAX_VERSION) == version


def read_plan(client: redis.Redis, keyspace: Keys, max_bytes: int = MAX_MANIFEST_BYTES) -> Manifest | None:
    """The announced manifest, validated like a committed one; None when there is none or it is
    unusable (too big: ``HSTRLEN`` first, not JSON, another version's manifest, a version no push
    allocated: above the namespace's counter...)."""
    pipe = client.pipeline(transaction=False)
    pipe.hget(keyspace.plan, "version")
    pipe.hstrlen(keyspace.plan, "manifest")
    pipe.get(keyspace.counter)
    raw_version, length, raw_counter = pipe.execute()
    version = parse_int(raw_version, minimum=1, maximum=MAX_VERSION)
    if version is None or not length:
        return None
    counter = parse_int(raw_counter, minimum=0, maximum=MAX_VERSION) if raw_counter is not None else 0
    if counter is None or version > counter:
        log.warning("%s: a plan for version %d, which no push allocated (counter %s; ignored)", keyspace.plan, version,
                    text(raw_counter)[:20])  # fmt: skip
        return None
    if length > min(max_bytes, MAX_MANIFEST_BYTES):
        log.warning("%s: a plan of %d bytes, more than the limit of %d (ignored)", keyspace.plan, length, max_bytes)
        return None
    raw = client.hget(keyspace.plan, "manifest")
    if raw is None:
        return None
    try:
        return Manifest.from_bytes(raw, version)
    except CodecError as exc:
        log.warning("%s: unusable plan for version %s (%s; ignored)", keyspace.plan, text(raw_version)[:20], exc)
        return None


def stage(
    store: ChunkStore,
    plan: Manifest,
    target: memoryview,
    held: list[str | None],
    current: Current,
    *,
    stall: float | None = None,
) -> int:
    """Read the plan's stored chunks into place in ``target`` as they appear; returns the bytes read.

    ``held[i]`` is the id of the bytes at chunk ``i`` of ``target`` (None: unknown) and
    is kept up to date (None while a chunk is overwritten), as ``assemble`` does in
    place. Each round reads the next ``WINDOW_CHUNKS`` missing chunks (``WINDOW_BYTES``),
    then asks ``current()``. Returns when every stored chunk is held, when ``current()``
    turns False, or after ``stall`` seconds (default ``STALL_SECONDS``) without a new chunk.
    """
    stall = STALL_SECONDS if stall is None else stall
    offsets = [0]
    for size in plan.chunk_sizes:
        offsets.append(offsets[-1] + size)
    held.extend([None] * (plan.num_chunks - len(held)))
    del held[plan.num_chunks :]
    todo = [i for i, entry in enumerate(plan.chunks) if entry.base is None and held[i] != entry.id]
    fetched = 0
    pause = _PAUSE_MIN
    progress = time.monotonic()
    while todo:
        found = 0
        for run in _runs(_window(todo, offsets)):
            for i in run:
                held[i] = None  # being overwritten
            ids = [plan.chunks[i].id for i in run]
            view = target[offsets[run[0]] : offsets[run[-1] + 1]]
            for i, data in zip(run, store.read_into(ids, [offsets[i + 1] - offsets[i] for i in run], view), strict=True):
                if data is None:
                    continue  # not written yet
                if len(data) == offsets[i + 1] - offsets[i] and checksum(data) == plan.chunks[i].id:
                    held[i] = plan.chunks[i].id
                    fetched += len(data)
                    found += 1
                    _chunk_staged(plan.version, i)
                else:  # left to the apply after the commit, which reports (and deletes) a corrupt object
                    held[i] = plan.chunks[i].id + "!"  # never an id: not retried here
        # still to read: a chunk not found yet (None) and any beyond the window (it may still hold
        # an older version's id: only the plan's own id, or a mismatch marked "!", takes it off)
        todo = [i for i in todo
                if held[i] is None or held[i] != plan.chunks[i].id and not str(held[i]).endswith("!")]
        if not todo or not current():
            break
        now = time.monotonic()
        if found:
            progress, pause = now, _PAUSE_MIN
        elif now - progress >= stall:
            log.info("plan of version %d: no new chunk for %.1fs; staging stopped (%d chunk(s) missing)",
                     plan.version, stall, len(todo))  # fmt: skip
            break
        else:
            time.sleep(pause)
            pause = min(2 * pause, _PAUSE_MAX)
    for i, chunk_id in enumerate(held):
        if chunk_id is not None and chunk_id.endswith("!"):
            held[i] = None
    return fetched


def wait_for_commit(committed: Callable[[], bool], current: Current, stall: float | None = None) -> bool:
    """After staging, wait for the staged version's commit (checked every 2-20 ms): True once it
    is committed; False when the plan stops being current without it (superseded, abandoned) or
    after ``stall`` seconds (default ``STALL_SECONDS``). A stager with the patches of a delta
    version still to apply finishes its file after the commit instead of dropping it."""
    deadline = time.monotonic() + (STALL_SECONDS if stall is None else stall)
    pause = _PAUSE_MIN
    while not committed():
        if not current() or time.monotonic() >= deadline:
            return committed()  # the commit is what ends a plan's currency, too
        time.sleep(pause)
        pause = min(2 * pause, _PAUSE_MAX)
    return True


def _window(todo: list[int], offsets: list[int]) -> list[int]:
    """The first missing chunks of ``todo`` a round reads: ``WINDOW_CHUNKS`` at most, ``WINDOW_BYTES``
    at most (but at least one chunk)."""
    window: list[int] = []
    size = 0
    for i in todo[:WINDOW_CHUNKS]:
        size += offsets[i + 1] - offsets[i]
        if window and size > WINDOW_BYTES:
            break
        window.append(i)
    return window


def _runs(indices: list[int]) -> list[list[int]]:
    """Runs of consecutive indices (one pipelined read into one place each)."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] + 1 == i:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _chunk_staged(version: int, index: int) -> None:
    """Called for every chunk staged (tests hook here to see the overlap happen)."""
