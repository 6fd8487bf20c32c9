"""The receiver options an engine's ``init_info`` may carry, by name: the fields of ``ReceiveOptions``.

They come from the one place they are declared, so a new receiver option reaches vLLM
engines with no edit here; an unknown name is refused with the list of valid ones.
"""

from __future__ import annotations

from typing import Any

from ...options import ReceiveOptions, names

ENGINE_FIELDS = ("url", "namespace", "rank")


def split_receive_options(init: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``init`` as (the engine's fields, the receiver's options, top level or under ``"receiver"``);
    a name that is neither is a ``ValueError`` (what vLLM's ``parse_init_info`` raises)."""
    known = names(ReceiveOptions)
    fields = {k: v for k, v in init.items() if k in ENGINE_FIELDS}
    options = dict(init.get("receiver") or {})
    options.update({k: v for k, v in init.items() if k not in ENGINE_FIELDS and k != "receiver"})
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} in the redis backend's init_info "
                         f"(receiver options: {', '.join(sorted(known))})")  # fmt: skip
    return fields, options
