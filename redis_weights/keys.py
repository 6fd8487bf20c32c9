"""Every Redis key and channel name, built in one place from the namespace.

All names share the prefix ``rw:{<namespace>}:``. The braces are a Redis Cluster
hash tag: every key of a namespace lives in one slot, so the commit script and
MULTI/EXEC may touch them together.

``RedisStore`` addresses keys *relative* to that prefix (``"latest"``,
``"rank:1:status"``); the library itself uses the full names below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_NAMESPACE = "policy"
# Matched with ``fullmatch``: ``$`` also matches before a trailing newline.
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_CHUNK_RE = re.compile(r"v:[0-9]+:c:[0-9]+")
_RANK_VERSION_RE = re.compile(r"rank:([0-9]{1,18}):version")


def validate_namespace(namespace: str) -> str:
    """Refuse names that would break the hash tag or key parsing (braces, colons, spaces)."""
    if not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
        raise ValueError(
            f"invalid namespace {namespace!r}: use 1-128 characters from [A-Za-z0-9_.-]"
        )
    return namespace


@dataclass(frozen=True)
class Keys:
    """Names of the keys and channels of one namespace."""

    namespace: str = DEFAULT_NAMESPACE

    def __post_init__(self) -> None:
        validate_namespace(self.namespace)

    # -- prefix <-> relative names (used by RedisStore) ---------------------------------
    @property
    def prefix(self) -> str:
        return f"rw:{{{self.namespace}}}:"

    def full(self, relative: str) -> str:
        return self.prefix + relative

    def relative(self, full: str | bytes) -> str:
        name = full.decode() if isinstance(full, bytes) else full
        if not name.startswith(self.prefix):
            raise ValueError(f"{name!r} is not in namespace {self.namespace!r}")
        return name[len(self.prefix) :]

    @property
    def pattern(self) -> str:
        """SCAN pattern matching every key of the namespace (braces escaped for glob)."""
        return self._glob("*")

    def _glob(self, relative: str) -> str:
        """SCAN pattern of the namespace's names matching ``relative`` (a glob)."""
        return f"rw:\\{{{self.namespace}\\}}:{relative}"

    @property
    def acl_pattern(self) -> str:
        """ACL key (``~``) and channel (``&``) pattern that covers every name of the namespace."""
        return f"{self.prefix}*"

    @staticmethod
    def is_blob(relative: str) -> bool:
        """Whether a relative name is a weight chunk (binary, not text)."""
        return bool(_CHUNK_RE.fullmatch(relative))

    # -- versions ---------------------------------------------------------------------
    @property
    def latest(self) -> str:
        """String (int): newest committed version, the truth workers follow."""
        return self.full("latest")

    @property
    def counter(self) -> str:
        """String (int): version numbers are allocated from it with INCR."""
        return self.full("next")

    @property
    def versions(self) -> str:
        """Sorted set of committed versions (score = version)."""
        return self.full("versions")

    def manifest(self, version: int) -> str:
        return self.full(f"v:{version}:manifest")

    def chunk(self, version: int, index: int) -> str:
        return self.full(f"v:{version}:c:{index}")

    def chunks(self, version: int, count: int) -> list[str]:
        return [self.chunk(version, i) for i in range(count)]

    def chunk_pattern(self, version: int) -> str:
        """SCAN pattern matching every chunk of ``version`` (finds them without a manifest)."""
        return self._glob(f"v:{version}:c:*")

    # -- ranks ------------------------------------------------------------------------
    def rank_status(self, rank: int) -> str:
        """``"pending"``, ``"updated"`` or ``"error: <reason>"``."""
        return self.full(f"rank:{rank}:status")

    def rank_version(self, rank: int) -> str:
        """Version that the rank has applied (0: none yet). Its presence marks a rank that has joined."""
        return self.full(f"rank:{rank}:version")

    def rank_alive(self, rank: int) -> str:
        """Heartbeat of the rank: a string with a TTL."""
        return self.full(f"rank:{rank}:alive")

    def rank_acked(self, rank: int) -> str:
        """Wall time (seconds) of the rank's last ``"updated"`` ack; with the version's ``created``, its ack latency."""
        return self.full(f"rank:{rank}:acked")

    @property
    def rank_version_pattern(self) -> str:
        """SCAN pattern matching every rank's version key (finds the ranks that ever joined)."""
        return self._glob("rank:*:version")

    def rank_of(self, full: str | bytes) -> int | None:
        """The rank of a ``rank:<r>:version`` key name, None for any other key."""
        match = _RANK_VERSION_RE.fullmatch(self.relative(full))
        return int(match.group(1)) if match and int(match.group(1)) >= 1 else None

    # -- admin ------------------------------------------------------------------------
    @property
    def probe(self) -> str:
        """Short-lived key that ``health`` writes to test the user's rights (expires by itself)."""
        return self.full("doctor:probe")

    @property
    def stall_probe(self) -> str:
        """A key that never exists: the trainer's write probe PEXPIREs it to time a server stall (``ranks``)."""
        return self.full("stall-probe")

    # -- pub/sub ----------------------------------------------------------------------
    @property
    def updates_channel(self) -> str:
        """Wake-up hint for workers: carries the new version number, never weights."""
        return self.full("updates")

    @property
    def acks_channel(self) -> str:
        """Wake-up hint for the trainer: a rank acknowledged (``"<rank>:<version>"``)."""
        return self.full("acks")
