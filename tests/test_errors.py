"""Every exception of the library survives pickling with its message and attributes.

A trainer in a subprocess sends its error through a ``multiprocessing`` queue: an
error that cannot be unpickled there is lost to a ``TypeError``.
"""

from __future__ import annotations

import importlib
import pickle
import pkgutil

import pytest

import redis_weights
from redis_weights.errors import PushError, PushTimeoutError, RedisWeightsError


def _all_error_types() -> list[type[RedisWeightsError]]:
    for module in pkgutil.walk_packages(redis_weights.__path__, "redis_weights."):
        if ".integrations." in module.name or module.name.endswith("__main__"):
            continue  # optional extras; their errors are the core's
        importlib.import_module(module.name)
    found: list[type[RedisWeightsError]] = []
    pending = [RedisWeightsError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return sorted(set(found), key=lambda c: f"{c.__module__}.{c.__qualname__}")


ERROR_TYPES = _all_error_types()


def test_every_error_type_is_found() -> None:
    names = {c.__name__ for c in ERROR_TYPES}
    assert {"PushTimeoutError", "StoreTimeoutError", "UnsafeServerError", "RefusedError"} <= names


@pytest.mark.parametrize("cls", [c for c in ERROR_TYPES if not issubclass(c, PushError)], ids=lambda c: c.__name__)
def test_error_pickles_with_message_and_attributes(cls: type[RedisWeightsError]) -> None:
    error = cls("something went wrong")
    error.note = "kept"  # any attribute set on an instance
    restored = pickle.loads(pickle.dumps(error))
    assert type(restored) is cls
    assert str(restored) == "something went wrong"
    assert restored.args == error.args and restored.note == "kept"


@pytest.mark.parametrize("cls", [PushError, PushTimeoutError], ids=lambda c: c.__name__)
def test_push_errors_pickle_with_their_ranks(cls: type[PushError]) -> None:
    error = cls("push of version 7 failed", version=7, lagging=[2], dead=[3], errors={4: "error: bad"})
    restored = pickle.loads(pickle.dumps(error))
    assert type(restored) is cls and str(restored) == "push of version 7 failed"
    assert (restored.version, restored.lagging, restored.dead, restored.errors) == (7, [2], [3], {4: "error: bad"})
    assert isinstance(restored, TimeoutError) == (cls is PushTimeoutError)
