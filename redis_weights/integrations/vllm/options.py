"""The receiver options an engine's ``init_info`` may carry, by name.

They are exactly the keyword arguments of ``RedisWeightReceiver`` (the fields of
``ReceiveOptions`` where that exists): read from the one place they are declared,
so a new receiver option reaches vLLM engines with no edit here.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from ...receiver import RedisWeightReceiver

ENGINE_FIELDS = ("url", "namespace", "rank")


def receive_option_names() -> frozenset[str]:
    """Names of the receiver's options: ``ReceiveOptions``' fields, else its keyword-only arguments."""
    try:
        from ...options import ReceiveOptions  # type: ignore[attr-defined]
    except ImportError:
        params = inspect.signature(RedisWeightReceiver.__init__).parameters.values()
        return frozenset(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
    return frozenset(f.name for f in dataclasses.fields(ReceiveOptions))


def split_receive_options(init: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``init`` as (the engine's fields, the receiver's options); a name that is neither is a ``ValueError``."""
    known = receive_option_names()
    fields = {k: v for k, v in init.items() if k in ENGINE_FIELDS}
    options = dict(init.get("receiver") or {})
    options.update({k: v for k, v in init.items() if k not in ENGINE_FIELDS and k != "receiver"})
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} in the redis backend's init_info "
                         f"(receiver options: {', '.join(sorted(known))})")  # fmt: skip
    return fields, options
