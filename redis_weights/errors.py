"""Exception types. Every failure of a push is a ``RuntimeError`` subclass.

Every one of them pickles with its message and attributes (a trainer in a
subprocess sends its error through a queue): unpickling restores the instance
without calling ``__init__`` again, whose keyword-only arguments ``pickle`` would
not pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _restore(cls: type[BaseException], args: tuple[Any, ...]) -> BaseException:
    """Unpickle an error: its ``args`` now, its attributes from the pickled state next."""
    for base in cls.__mro__:  # the builtin base that allocates it (OSError for a TimeoutError mix-in)
        if base.__module__ == "builtins":
            try:
                error = base.__new__(cls, *args)
            except TypeError:  # "X.__new__(cls) is not safe": not the layout-defining base
                continue
            error.args = args
            return error
    raise TypeError(f"cannot unpickle {cls.__name__}")


class RedisWeightsError(RuntimeError):
    """Base class of every error this library raises on purpose."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _restore, (type(self), self.args), dict(self.__dict__)


class ConfigurationError(RedisWeightsError):
    """Bad URL, missing server binary, unsafe server settings, wrong arguments."""


class CodecError(RedisWeightsError, ValueError):
    """Weights that cannot be encoded, or bytes that are not a valid version."""


class PatchError(CodecError):
    """A chunk patch (``redis_weights.format.patch``) that is malformed, corrupted, or meant for another chunk."""


class IntegrityError(CodecError):
    """A chunk whose checksum or size does not match the manifest (corrupted or truncated)."""


class LegacyFormatError(CodecError):
    """A version written by an older release in a format this one does not read (see the message)."""


class VersionNotFoundError(RedisWeightsError, KeyError):
    """A version (or one of its chunks) is not in Redis: never committed, or garbage-collected."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "version not found"


class StaleVersionError(RedisWeightsError):
    """A commit refused because a newer version is already the latest (two writers)."""


class WeightMismatchError(RedisWeightsError, ValueError):
    """A version whose keys, shapes or dtypes do not match the worker's policy."""


class PushError(RedisWeightsError):
    """A sync push that did not end with every targeted rank reporting ``"updated"``.

    ``lagging`` are the ranks still behind, ``dead`` those whose heartbeat expired,
    ``errors`` maps a rank to the ``"error: ..."`` status it reported.
    """

    def __init__(
        self,
        message: str,
        *,
        version: int,
        lagging: Sequence[int] = (),
        dead: Sequence[int] = (),
        errors: Mapping[int, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.version = version
        self.lagging = list(lagging)
        self.dead = list(dead)
        self.errors = dict(errors or {})


class PushTimeoutError(PushError, TimeoutError):
    """A sync push whose acks did not all arrive within the timeout."""


class BackgroundUploadError(RedisWeightsError):
    """A background upload (``RedisWeightUpdater(..., background=True)``) failed; raised on the
    trainer's thread by the next push, ``flush()`` or ``wait()``, chained to the cause."""


class ReceiveTimeoutError(RedisWeightsError, TimeoutError):
    """``RedisWeightReceiver.wait`` saw no newer version within its timeout."""


class ApplyError(RedisWeightsError):
    """Raised by a receiver's post-hook: the version is in the policy but does not run where it must.

    E.g. a TorchRL collector's worker processes did not take it. The receiver then
    reports ``"error: version N: <message>"`` for the rank instead of ``"updated"``
    (a sync push fails, naming the rank); any other exception of a hook is logged
    and the rank acks as usual.
    """
