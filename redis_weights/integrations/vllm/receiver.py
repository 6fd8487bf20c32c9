"""``EngineReceiver``: a ``RedisWeightReceiver`` whose "policy" is a vLLM model.

The library's receiver does everything up to the install, unchanged: it reads the
manifest, checks the names, shapes and dtypes against the checkpoint's (``spec``), reads
the chunks into its receive buffer or the host's shared file (patches applied, every
chunk verified against its id), checks the safetensors header, and acks as its rank.
Only the install differs (``_install``): the version's tensors go through the model's
own ``load_weights`` (Hugging Face names), and only the decoder layers where a tensor
changed since the installed version are loaded (``layerwise_groups``: a fused vLLM
layer, qkv or gate_up, always gets all of its sources).

A thread stages each new committed version (and each announced plan, see
``staging.py``) while the engine generates: fetched, verified and hashed, not
installed. The update then costs the load of what changed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import xxhash

from ...errors import CodecError, WeightMismatchError
from ...format.codec import check_compatible
from ...format.header import Buffer, TensorEntry
from ...format.manifest import Manifest
from ...worker.receiver import _WAKE_SLICE, RedisWeightReceiver

log = logging.getLogger(__name__)

Loader = Callable[[list[tuple[str, torch.Tensor]], bool], None]  # (weights, every tensor) -> None


class LoadError(RuntimeError):
    """The model's loader failed part-way: the engine may hold a mix until it is restored."""


def spec_tensors(spec: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    """A dict of tensors with the spec's shapes and dtypes and no storage to speak of (one
    element, expanded): what the receiver checks a manifest against."""
    return {name: torch.empty((), dtype=dtype).expand(shape) for name, (shape, dtype) in spec.items()}


def _pieces(chunks: Sequence[Buffer], manifest: Manifest, entry: TensorEntry) -> Iterator[memoryview]:
    """The bytes of one tensor, as views of the chunks it spans (no copy)."""
    begin, end = manifest.header_len + entry.begin, manifest.header_len + entry.end
    size = manifest.chunk_size
    for index in range(begin // size, (end - 1) // size + 1):
        start = index * size
        view = memoryview(chunks[index]).cast("B")
        yield view[max(begin - start, 0) : min(end - start, len(view))]


def tensor_digests(chunks: Sequence[Buffer], manifest: Manifest) -> dict[str, str]:
    """xxh3-128 of every tensor's bytes, with its dtype and shape: equal digests, equal tensors."""
    digests = {}
    for entry in manifest.tensors:
        h = xxhash.xxh3_128(f"{entry.dtype}{entry.shape}".encode())
        for piece in _pieces(chunks, manifest, entry):
            h.update(piece)
        digests[entry.name] = h.hexdigest()
    return digests


def read_tensor(chunks: Sequence[Buffer], manifest: Manifest, entry: TensorEntry) -> torch.Tensor:
    """A copy of one tensor of the version (the chunks are views of a buffer the next fetch reuses)."""
    out = torch.empty(entry.nbytes, dtype=torch.uint8)
    flat, at = out.numpy(), 0
    for piece in _pieces(chunks, manifest, entry):
        flat[at : at + len(piece)] = memoryview(piece)
        at += len(piece)
    return out.view(entry.torch_dtype).view(entry.shape)


def changed_groups(groups: list[list[str]], loaded: dict[str, str], incoming: dict[str, str]) -> list[str]:
    """The names of every group in which some tensor differs from what is loaded."""
    return [name for group in groups if any(loaded.get(n) != incoming[n] for n in group) for name in group]


class EngineReceiver(RedisWeightReceiver):
    """A receiver that installs into a vLLM model through ``load(weights, full)``.

    ``spec``: the checkpoint's ``{name: (shape, dtype)}``; ``groups``: the names in
    load units (a unit is loaded whole or not at all). Receiver options by name.
    """

    def __init__(self, store: Any, rank: int, spec: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 groups: list[list[str]], load: Loader, **options: Any) -> None:  # fmt: skip
        options.setdefault("allow_cast", True)  # vLLM's loaders cast to the model's dtype, as from any checkpoint
        super().__init__(store, rank, spec_tensors(spec), **options)
        self.groups = groups
        self.load_into_engine = load
        self.loaded: dict[str, str] = {}  # digest of each tensor the model holds from a version ({}: unknown)
        self.loaded_names: list[str] = []  # what the last install loaded
        self._staged: tuple[list[str], dict[str, str]] | None = None  # chunk ids and digests of the staged version
        self.staged_version = 0
        self._unstageable = 0  # the last version whose staging was refused: the update reports why

    @property
    def fetched_bytes(self) -> int:
        """Bytes this engine read from Redis so far (staging included; with the host cache, what it fetched for the
        host)."""
        return self._fetcher.fetched_bytes

    # -- install --------------------------------------------------------------------------
    def _install(self, chunks: list[Buffer], manifest: Manifest, targets: dict[str, Any]) -> None:
        digests = self._digests(chunks, manifest)
        names = changed_groups(self.groups, self.loaded, digests)
        full = len(names) == len(digests)
        entries = {e.name: e for e in manifest.tensors}
        weights = [(name, read_tensor(chunks, manifest, entries[name])) for name in names]
        self.loaded = {}  # from here on the model may hold a mix until the load returns
        try:
            if weights:
                self.load_into_engine(weights, full)
        except Exception as exc:
            raise LoadError(f"vLLM's load_weights failed: {type(exc).__name__}: {exc}") from exc
        self.loaded, self.loaded_names = digests, names

    def _digests(self, chunks: list[Buffer], manifest: Manifest) -> dict[str, str]:
        if self._staged is not None and self._staged[0] == manifest.ids:
            return self._staged[1]
        return tensor_digests(chunks, manifest)

    # -- staging ahead of the update ------------------------------------------------------------
    def prefetch(self, version: int) -> None:
        """Fetch, verify and hash ``version`` into the receive buffer (or the host's file), not installed."""
        manifest = self.registry.read_manifest(version, max_bytes=self._max_manifest)
        check_compatible(manifest, self._targets, allow_cast=self.allow_cast)
        with self._poll_lock, self._fetcher.fetch(manifest) as chunks:
            self._staged = (manifest.ids, tensor_digests(chunks, manifest))
            self.staged_version = version

    def start_staging(self) -> None:
        """Stage every new committed version (and every announced plan) from a daemon thread, in the place of
        the receiver's applying thread (``stop()`` and ``close()`` end it)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._updates.open()
        self._thread = threading.Thread(target=self._stage_loop, name=f"redis-weights-stage-{self.rank}", daemon=True)
        self._thread.start()

    def _stage_loop(self) -> None:
        last_check, wake = 0.0, True
        while not self._stop.is_set():
            try:
                if self._plan_hint > max(self.version, self.staged_version):
                    hinted, self._plan_hint = self._plan_hint, 0
                    with self._poll_lock:
                        self._stage(hinted)
                if wake or time.monotonic() - last_check >= self.poll_interval:
                    last_check = time.monotonic()
                    if self._unsent is not None:  # a status Redis did not take (it was down): sent again
                        self._report(*self._unsent)
                    latest = self.registry.latest()
                    if latest and latest not in (self.version, self.staged_version, self._unstageable):
                        try:
                            self.prefetch(latest)
                        except (CodecError, WeightMismatchError) as exc:  # the update reports it as the rank's status
                            self._unstageable = latest
                            log.info("rank %d: not staging version %d: %s", self.rank, latest, exc)
            except Exception as exc:  # Redis away, a version collected meanwhile: the update fetches itself
                log.debug("rank %d: staging failed (%s: %s)", self.rank, type(exc).__name__, exc)
                self._stop.wait(self.poll_interval)
            wake = self._next_update(_WAKE_SLICE)
