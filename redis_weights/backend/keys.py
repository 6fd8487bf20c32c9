"""Every Redis key and channel name, built in one place from the namespace.

Control keys (latest, versions, manifests, ranks, GC bookkeeping) share the prefix
``rw:{<namespace>}:``. The braces are a Redis Cluster hash tag: every control key
of a namespace lives in one slot, so the commit script may touch them together.

Chunks (and patches) are content-addressed: ``rw:<namespace>:c:{<id>}``. Their hash
tag is their own id, so a Cluster spreads them over its masters; the namespace is
in the name, so each namespace has its own chunk store and GC. An ACL user needs
both patterns (``acl_key_patterns``).

``RedisStore`` addresses keys *relative* to that prefix (``"latest"``,
``"rank:1:status"``); the library itself uses the full names below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_NAMESPACE = "policy"
# Matched with ``fullmatch``: ``$`` also matches before a trailing newline.
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_LEGACY_CHUNK_RE = re.compile(r"v:[0-9]+:c:[0-9]+")
_CHUNK_ID_RE = re.compile(r"[0-9a-f]{32}")
_RANK_VERSION_RE = re.compile(r"rank:([0-9]{1,18}):version")
# Relative names the library itself builds (everything else under the prefix is the user's, via RedisStore).
_LIBRARY_NAME_RE = re.compile(
    r"latest|next|versions|plan|replicated|stall-probe|doctor:probe|gc:epoch|gc:lease|updates|acks"
    r"|index:[a-z]+|v:[0-9]+:manifest|v:[0-9]+:c:[0-9]+|staged:.*|pending:.*|rank:[0-9]+:[a-z]+"
)


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
        """Whether a relative name is a weight chunk of the old per-version layout (binary, not text)."""
        return bool(_LEGACY_CHUNK_RE.fullmatch(relative))

    @staticmethod
    def is_library_name(relative: str) -> bool:
        """Whether a relative name is one this library builds (not a key the user set through the store)."""
        return bool(_LIBRARY_NAME_RE.fullmatch(relative))

    @property
    def patterns(self) -> list[str]:
        """SCAN patterns that together match every key of the namespace: control keys and chunks."""
        return [self.pattern, self.chunk_pattern]

    @property
    def acl_key_patterns(self) -> list[str]:
        """The ACL key patterns (``~...``) a user of this namespace needs."""
        return [self.acl_pattern, f"rw:{self.namespace}:c:*"]

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

    @property
    def plan(self) -> str:
        """Hash with a TTL (``version``, ``manifest``): the version a trainer is uploading, not yet
        committed; workers stage its chunks meanwhile (``staging.py``), never apply it."""
        return self.full("plan")

    def legacy_chunks_pattern(self, version: int) -> str:
        """SCAN pattern of the chunks of ``version`` in the old per-version layout (deleted with it)."""
        return self._glob(f"v:{version}:c:*")

    # -- content-addressed chunks and patches -------------------------------------------
    def chunk(self, chunk_id: str) -> str:
        """String (bytes): the chunk or patch whose xxh3-128 digest is ``chunk_id``; no TTL."""
        if not _CHUNK_ID_RE.fullmatch(chunk_id):
            raise ValueError(f"invalid chunk id {chunk_id!r}: 32 hex digits expected")
        return f"rw:{self.namespace}:c:{{{chunk_id}}}"

    @property
    def chunk_pattern(self) -> str:
        """SCAN pattern matching every chunk and patch of the namespace."""
        return f"rw:{self.namespace}:c:*"

    def chunk_id_of(self, full: str | bytes) -> str | None:
        """The id in a chunk key name, None for any other name."""
        name = full.decode() if isinstance(full, bytes) else full
        head = f"rw:{self.namespace}:c:{{"
        if name.startswith(head) and name.endswith("}") and _CHUNK_ID_RE.fullmatch(name[len(head) : -1]):
            return name[len(head) : -1]
        return None

    # -- the namespace's index (``index.py``): what the namespace owns, never a SCAN ------
    @property
    def objects_index(self) -> str:
        """Set of object ids (chunks and patches) the namespace may hold: a superset of the
        objects in Redis (an id is added before its object is written, removed after it is deleted)."""
        return self.full("index:objects")

    @property
    def pushes_index(self) -> str:
        """Set of the tokens of pushes in flight (each names a ``pending`` record with a TTL)."""
        return self.full("index:pushes")

    @property
    def ranks_index(self) -> str:
        """Set of the ranks that have keys: added with a rank's version key, or its status key by a
        push that targets it (``known_ranks`` keeps those whose version key exists: they joined)."""
        return self.full("index:ranks")

    @property
    def names_index(self) -> str:
        """Set of the relative names written through ``RedisStore``'s mapping (the user's own keys)."""
        return self.full("index:names")

    @property
    def index_state(self) -> str:
        """Hash: ``complete`` (``1`` once every object and rank of the namespace is indexed) and
        ``cursor`` (where an interrupted ``reindex`` SCAN resumes)."""
        return self.full("index:state")

    @property
    def index_keys(self) -> list[str]:
        """Every key of the index."""
        return [self.objects_index, self.pushes_index, self.ranks_index, self.names_index, self.index_state]

    # -- garbage collection -------------------------------------------------------------
    def pending(self, token: str) -> str:
        """String with a TTL: the objects an uncommitted push relies on (GC spares them)."""
        return self.full(f"pending:{token}")

    def staged_manifest(self, token: str) -> str:
        """String with a TTL: the manifest of an uncommitted push; its commit renames it to ``manifest``."""
        return self.full(f"staged:{token}")

    @property
    def pending_pattern(self) -> str:
        """SCAN pattern of the pending records (``reindex`` and tests only: GC reads ``pushes_index``)."""
        return self._glob("pending:*")

    def legacy_chunk(self, version: int, index: int) -> str:
        """A chunk of the old per-version layout (format 1), deleted with its version."""
        return self.full(f"v:{version}:c:{index}")

    @property
    def gc_epoch(self) -> str:
        """String (int): bumped by every GC when it starts and ends; a commit checks it."""
        return self.full("gc:epoch")

    @property
    def gc_lease(self) -> str:
        """String with a TTL: held by the GC that is marking or sweeping."""
        return self.full("gc:lease")

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
    def replication_marker(self) -> str:
        """String with a short TTL: written right before a push's ``WAIT``, so that the replicas'
        acknowledgement of it covers every chunk the push wrote before (``Deployment.wait_for_replicas``)."""
        return self.full("replicated")

    def cluster_replication_marker(self, tag: str) -> str:
        """The ``WAIT`` marker of one cluster master: ``tag`` is a hash tag that master serves (the
        marker must live on the master whose replicas it counts). In the object store's keyspace
        (``rw:<ns>:c:``), so the same ACL pattern covers it; it is no object id: GC never sees it."""
        return f"rw:{self.namespace}:c:replicated:{{{tag}}}"

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
