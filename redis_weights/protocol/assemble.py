"""Build the stream of one version in a buffer from what is held already and what Redis stores.

One routine for every reader: the receiver (in place, in its receive buffer), the
host cache's fetcher (from the previous shared file into a new one) and ``export``.
Per chunk ``i`` of the manifest:

* the bytes held at chunk ``i`` already have its id: nothing is downloaded;
* the chunk is stored (``{"id": F}``): it is read from Redis;
* it is chained (``base`` + the records of the manifest's packs): the packs are
  read newest first, each record for the chunk leading one id back, until the id
  the reader holds or the stored base is reached; then the base is read (if not
  held) and the records are applied oldest first, in place. A worker one version
  behind reads the newest version's packs only; a late joiner, the whole chain's
  (the trainer keeps them under ``keyframe_fraction`` of the version's size);
* a format-2 chain (``base`` + its own patches, a manifest of the previous
  release): the walk starts from the newest id of the chain the reader holds, else
  from the stored base, and applies the remaining patches in place.

Nothing is assumed: every chunk read from Redis and every patched chunk is hashed
and compared with its id, every patch with its own id, before it counts as held.
An object whose bytes do not match its id is deleted (best effort): the trainer,
which skips objects Redis holds, then uploads it again with its next push.
Work is linear in the manifest and the packs it lists (a pack is read at most
twice: packs read while walking back are kept for applying up to ``ROUND_BYTES``,
the rest read again), patches are fetched in rounds of bounded size, and any
failure raises an ``IntegrityError`` (or ``CodecError``) naming the version and chunk.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..backend.bulkread import receive_buffer
from ..errors import CodecError, IntegrityError
from ..format.manifest import Buffer, Manifest, Pack, Step, checksum
from ..format.packs import Record, parse_pack
from ..threads import INLINE, Threads
from .chunkstore import ROUND_BYTES, ChunkStore


class MissingObjectError(IntegrityError):
    """A chunk or patch the manifest needs is not in Redis (garbage-collected, evicted, deleted)."""


@dataclass
class _Todo:
    """Chunk ``index`` still to build: read the stored ``fetch`` first if set, then apply ``steps``."""

    index: int
    fetch: str | None
    steps: Sequence[Step]


class _Layout:
    """Offsets of a manifest's chunks in a buffer."""

    def __init__(self, manifest: Manifest, target: memoryview) -> None:
        self.offsets = [0]
        for size in manifest.chunk_sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.target = target

    def view(self, first: int, last: int | None = None) -> memoryview:
        """Chunks ``first..last`` (inclusive) of the target."""
        return self.target[self.offsets[first] : self.offsets[(first if last is None else last) + 1]]


def assemble(
    store: ChunkStore,
    manifest: Manifest,
    target: memoryview,
    held: list[str | None],
    source: memoryview | None = None,
    threads: Threads | None = None,
) -> int:
    """Make ``target[:total_bytes]`` hold the version's stream; returns the bytes read from Redis.

    ``held[i]`` is the id of the bytes at chunk ``i`` of ``source`` (None: unknown),
    with the manifest's chunk size. With ``source=None`` the work is done in place
    in ``target`` and ``held`` is kept up to date as chunks change (None while a
    chunk is being rebuilt), so after a failure it still tells what ``target`` holds.
    With a ``source``, unchanged chunks are copied from it and ``held`` is not touched.
    ``threads`` apply the patches of distinct chunks, and verify them, side by side.
    """
    layout = _Layout(manifest, target)
    in_place = source is None
    ids: list[str | None] = held if in_place else list(held)
    ids.extend([None] * (manifest.num_chunks - len(ids)))
    del ids[manifest.num_chunks :]
    todo: list[_Todo] = []
    chained: list[int] = []  # chained chunks not held: resolved through the packs
    for i, entry in enumerate(manifest.chunks):
        have = ids[i]
        if entry.base is not None and not entry.steps:
            if have == entry.id and source is not None:
                layout.view(i)[:] = source[layout.offsets[i] : layout.offsets[i + 1]]
            if have != entry.id:
                chained.append(i)
            continue
        chain = entry.chain
        start = chain.index(have) if have in chain else -1
        if start >= 0 and source is not None:
            layout.view(i)[:] = source[layout.offsets[i] : layout.offsets[i + 1]]
        if start == len(chain) - 1:  # held already
            continue
        if start < 0:
            todo.append(_Todo(i, chain[0], entry.steps))
        else:
            todo.append(_Todo(i, None, entry.steps[start:]))
    walk = _PackWalk(store, manifest, ids, chained) if chained else None
    if walk is not None:
        for i in chained:
            if i in walk.from_base:
                todo.append(_Todo(i, manifest.chunks[i].base, ()))
            elif source is not None:
                layout.view(i)[:] = source[layout.offsets[i] : layout.offsets[i + 1]]
        todo.sort(key=lambda t: t.index)
    stored = [t for t in todo if t.fetch is not None]
    _fetch_stored(store, manifest, layout, stored, ids)
    _apply_chains(store, manifest, layout, [t for t in todo if t.steps], ids)
    fetched = sum(len(layout.view(t.index)) for t in stored) + sum(s.size for t in todo for s in t.steps)
    if walk is not None:
        fetched += walk.apply(layout, ids, threads)
    return fetched


class _PackWalk:
    """The records that lead each chained chunk from what the reader holds (or its base) to its id.

    ``__init__`` reads the packs newest first until every chunk is resolved; ``apply``
    applies the records oldest first."""

    def __init__(self, store: ChunkStore, manifest: Manifest, ids: list[str | None], chained: list[int]) -> None:
        self.store, self.manifest = store, manifest
        self.from_base: set[int] = set()
        self.uses: dict[int, list[Record]] = {}  # pack position -> records to apply, in chunk order
        self.kept: dict[int, Buffer] = {}  # packs read while walking, kept for applying
        self.fetched = 0
        chunks = manifest.chunks
        pending: dict[int, str] = {i: chunks[i].id for i in chained}  # chunk -> the id still to explain
        packs = manifest.packs
        kept_bytes = 0
        for group in _by_version_newest_first(packs):  # a worker one version behind reads one group
            group_ids, sizes = [packs[p].id for p in group], [packs[p].size for p in group]
            values: Iterable[Buffer | None]
            if kept_bytes + sum(sizes) <= ROUND_BYTES:  # all kept if used: read from the socket into place
                values = store.read_into(group_ids, sizes, receive_buffer(sum(sizes)))
            else:
                values = (v for part in store.read(group_ids, sizes) for v in part)
            for p, data in zip(group, values, strict=True):
                used = []
                records, data = self._records(p, data)
                for r in records:
                    wanted = pending.get(r.index)
                    if wanted is None:
                        continue
                    if r.target != wanted:
                        raise IntegrityError(
                            f"version {manifest.version}: chunk {r.index}: pack {packs[p].id} leads to {r.target}, "
                            f"not to {wanted} (a pack of another chain?)"
                        )
                    used.append(r)
                    if r.source == ids[r.index]:
                        del pending[r.index]
                    elif r.source == chunks[r.index].base:
                        del pending[r.index]
                        self.from_base.add(r.index)
                    else:
                        pending[r.index] = r.source
                if used:
                    self.uses[p] = used
                    if kept_bytes + len(data) <= ROUND_BYTES:
                        self.kept[p] = data
                        kept_bytes += len(data)
            if not pending:
                break
        if pending:
            index = min(pending)
            raise IntegrityError(
                f"version {manifest.version}: chunk {index}: its packs do not lead from its base "
                f"{chunks[index].base} to its id (a pack is missing from the manifest?)"
            )

    def _records(self, position: int, data: Buffer | None) -> tuple[list[Record], Buffer]:
        """The records of the pack at ``position`` and its bytes, read and checked against its id."""
        pack: Pack = self.manifest.packs[position]
        where = f"version {self.manifest.version}: pack {pack.id}"
        if data is None:
            raise MissingObjectError(f"{where} is missing from Redis")
        self.fetched += len(data)
        if len(data) != pack.size or checksum(data) != pack.id:
            self.store.discard_corrupt(pack.id)
            raise IntegrityError(f"{where} does not match its id (corrupted in Redis; deleted)")
        try:
            return parse_pack(data, self.manifest.chunk_sizes, where), data
        except CodecError as exc:
            raise IntegrityError(str(exc)) from exc

    def apply(self, layout: _Layout, ids: list[str | None], threads: Threads | None = None) -> int:
        """Apply the records oldest first, in place; check every chunk rebuilt; the pack bytes read.
        One version's records patch distinct chunks: they are applied side by side on ``threads``, in
        batches of at most ``ROUND_BYTES`` of packs, one version after the other."""
        from ..format.patch import apply_patch  # numpy-only; imported when a version has patches

        manifest = self.manifest
        threads = threads or INLINE
        touched = sorted({r.index for used in self.uses.values() for r in used})
        for i in touched:
            ids[i] = None  # being patched
        ascending = sorted(self.uses)
        again = [p for p in ascending if p not in self.kept]
        reread = (data for values in self.store.read([manifest.packs[p].id for p in again],
                                                     [manifest.packs[p].size for p in again]) for data in values)

        def patch(job: tuple[int, list[tuple[int, Buffer, Record]], bool]) -> bool:
            """Apply a chunk's records; after its last ones, whether it matches its id (hashed while
            the chunk is still in the cache: xxhash holds the GIL, so a pass of its own on the
            threads would only queue behind it)."""
            index, records, last = job
            chunk = layout.view(index)
            for p, data, r in records:
                try:
                    apply_patch(chunk, memoryview(data)[r.offset : r.offset + r.length], chunk)
                except CodecError as exc:
                    raise IntegrityError(
                        f"version {manifest.version}: the patch of chunk {r.index} in pack {manifest.packs[p].id} "
                        f"cannot be applied: {exc}"
                    ) from exc
            return not last or checksum(chunk) == manifest.chunks[index].id

        batches = _batches(manifest.packs, ascending)
        final = {r.index: n for n, batch in enumerate(batches) for p in batch for r in self.uses[p]}  # last batch
        for n, batch in enumerate(batches):
            jobs: dict[int, list[tuple[int, Buffer, Record]]] = {}
            for p in batch:
                data = self.kept.pop(p, None)
                if data is None:
                    _, data = self._records(p, next(reread))  # checked again: it was read anew
                for r in self.uses[p]:
                    jobs.setdefault(r.index, []).append((p, data, r))
            matches = threads.map(patch, [(i, records, final[i] == n) for i, records in jobs.items()])
            for i, match in zip(jobs, matches, strict=True):
                if not match:
                    raise IntegrityError(
                        f"version {manifest.version}: chunk {i} does not match its id after patching "
                        "(a wrong base or a corrupted patch)"
                    )
                if final[i] == n:
                    ids[i] = manifest.chunks[i].id
        return self.fetched


def _batches(packs: Sequence[Pack], positions: list[int]) -> list[list[int]]:
    """``positions`` (ascending) in runs of one version's packs of at most ``ROUND_BYTES`` each (a
    single larger pack alone)."""
    batches: list[list[int]] = []
    size = 0
    for p in positions:
        if batches and packs[batches[-1][0]].version == packs[p].version and size + packs[p].size <= ROUND_BYTES:
            batches[-1].append(p)
            size += packs[p].size
        else:
            batches.append([p])
            size = packs[p].size
    return batches


def _by_version_newest_first(packs: Sequence[Pack]) -> list[list[int]]:
    """Positions of the packs, grouped by the version that added them, newest version first."""
    groups: list[list[int]] = []
    for p in range(len(packs) - 1, -1, -1):
        if groups and packs[groups[-1][0]].version == packs[p].version:
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


def _fetch_stored(
    store: ChunkStore, manifest: Manifest, layout: _Layout, todo: list[_Todo], ids: list[str | None]
) -> None:
    """Read the stored chunks (or chain bases) into place, one pipelined read per run of consecutive chunks."""
    runs: list[list[_Todo]] = []
    for t in todo:
        if runs and runs[-1][-1].index + 1 == t.index:
            runs[-1].append(t)
        else:
            runs.append([t])
    for run in runs:
        for t in run:
            ids[t.index] = None  # being overwritten
        sizes = [len(layout.view(t.index)) for t in run]
        got = store.read_into([t.fetch for t in run if t.fetch], sizes, layout.view(run[0].index, run[-1].index))
        for t, data in zip(run, got, strict=True):
            what = "chunk" if t.fetch == manifest.chunks[t.index].id else "base chunk"
            if data is None:
                raise MissingObjectError(
                    f"version {manifest.version}: {what} {t.fetch} of chunk {t.index} is missing from Redis"
                )
            if len(data) != len(layout.view(t.index)) or checksum(data) != t.fetch:
                store.discard_corrupt(t.fetch)
                raise IntegrityError(
                    f"version {manifest.version}: {what} {t.fetch} of chunk {t.index} does not match its id "
                    "(corrupted in Redis; deleted, so the next push uploads it again)"
                )
            ids[t.index] = t.fetch


def _apply_chains(
    store: ChunkStore, manifest: Manifest, layout: _Layout, todo: list[_Todo], ids: list[str | None]
) -> None:
    """Fetch the patches (rounds of ~64 MiB), check each against its id, apply them in place,
    and check every patched chunk against its id."""
    if not todo:
        return
    from ..format.patch import apply_patch  # numpy-only; imported when a version has patches

    start = 0
    while start < len(todo):
        end, queued = start, 0
        while end < len(todo) and (end == start or queued + sum(s.size for s in todo[end].steps) <= ROUND_BYTES):
            queued += sum(s.size for s in todo[end].steps)
            end += 1
        batch = todo[start:end]
        steps = [s for t in batch for s in t.steps]
        values: list[bytes | None] = []
        for part in store.read([s.patch for s in steps], [s.size for s in steps]):
            values.extend(part)
        position = 0
        for t in batch:
            chunk = layout.view(t.index)
            ids[t.index] = None  # being patched
            for step in t.steps:
                patch = values[position]
                position += 1
                where = f"version {manifest.version}: patch {step.patch} of chunk {t.index}"
                if patch is None:
                    raise MissingObjectError(f"{where} is missing from Redis")
                if len(patch) != step.size or checksum(patch) != step.patch:
                    store.discard_corrupt(step.patch)
                    raise IntegrityError(f"{where} does not match its id (corrupted in Redis; deleted)")
                try:
                    apply_patch(chunk, patch, chunk)
                except CodecError as exc:
                    raise IntegrityError(f"{where} cannot be applied: {exc}") from exc
            if checksum(chunk) != manifest.chunks[t.index].id:
                raise IntegrityError(
                    f"version {manifest.version}: chunk {t.index} does not match its id after patching "
                    "(a wrong base or a corrupted patch)"
                )
            ids[t.index] = manifest.chunks[t.index].id
        start = end
