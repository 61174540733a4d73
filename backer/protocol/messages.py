"""The wire messages as typed values: frozen, slotted, keyword-only dataclasses that refuse any
value the protocol does not allow, so a message that exists is a valid one.

Owns the protocol limits and `RemoteEntry`, the wire form of an index `Entry`. Knows nothing of
msgpack or framing (that is `codec`) nor of requests and answers (that is `session`). Pure: imports
only errors, ids, paths and `backer.index`; no I/O.

A constructor given a bad value raises ValueError (as `Entry` does); the codec turns that into
RemoteProtocolError, the session into LocalProtocolError.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from backer.addresses import parse_address
from backer.errors import InvalidAddressError, RemoteProtocolError
from backer.ids import HASH_SIZE, Hash
from backer.index.chunker import CHUNK_MAX, CHUNK_MIN
from backer.index.entry import (
    CHUNK_RECORD,
    GROUP_MAX,
    SIGNATURE_SIZE,
    Entry,
    Kind,
    VersionVector,
    chunk_groups,
    group_hash,
    group_list_root,
    iter_chunks,
    leaf_hash_of,
)
from backer.paths import MAX_PATH_BYTES, check_path

__all__ = [
    "MAX_ADDRESSES_PER_PEER",
    "MAX_BATCH_CHUNKS",
    "MAX_BATCH_ENTRIES",
    "MAX_BATCH_GROUPS",
    "MAX_BATCH_NODES",
    "MAX_CHUNK",
    "MAX_CHUNK_RECORDS",
    "MAX_GROUPS_PER_ENTRY",
    "MAX_GROUP_BYTES",
    "MAX_ID",
    "MAX_INLINE_CHUNKS",
    "MAX_NODE_BYTES",
    "MAX_PEERS_LISTED",
    "MAX_TEXT",
    "MAX_VECTOR",
    "PROTOCOL_VERSION",
    "Chunks",
    "Close",
    "Entries",
    "Error",
    "ErrorCode",
    "GetChunks",
    "GetEntries",
    "GetGroups",
    "GetNodes",
    "Groups",
    "Hello",
    "Message",
    "Nodes",
    "Peers",
    "RemoteEntry",
    "Root",
    "max_chunk_records",
]

# 2: chunks travel in batches (GetChunks/Chunks), where version 1 asked for one at a time.
PROTOCOL_VERSION = 3  # 3: GetEntries.inline, entry fields at their defaults left out
MAX_BATCH_NODES = 256  # hashes in one GetNodes, nodes in one Nodes
MAX_BATCH_ENTRIES = 128  # (path, leaf) pairs in one GetEntries, entries in one Entries
MAX_BATCH_GROUPS = 256  # hashes in one GetGroups, groups in one Groups
MAX_BATCH_CHUNKS = 256  # (hash, size) pairs in one GetChunks, chunks in one Chunks
MAX_CHUNK = CHUNK_MAX  # 64 KiB: the largest chunk the chunker cuts
MAX_GROUPS_PER_ENTRY = 65536  # group hashes of one entry's chunk list
# Chunk records of one entry's chunk list (144 MiB packed): groups average ~64 records, so this
# is what 65,536 groups hold in practice (a ~100 GiB file), while a list packed 256 records to
# a group, which no chunker makes, is refused at a quarter of what it would otherwise expand to.
MAX_CHUNK_RECORDS = 1 << 22
MAX_TEXT = 1024  # UTF-8 bytes of an Error text or a Close reason
MAX_INLINE_CHUNKS = 4096  # a packed chunk list up to this size travels inside its entry
MAX_NODE_BYTES = 16 * 1024  # larger than any valid tree node (merkle refuses more)
MAX_GROUP_BYTES = GROUP_MAX * CHUNK_RECORD  # one chunk-list group: at most 256 records
MAX_VECTOR = 1024  # devices in one version vector
MAX_ID = 2**63 - 1  # request ids
MAX_PEERS_LISTED = 64  # devices in one Peers message
MAX_ADDRESSES_PER_PEER = 8
MAX_VERSION = 2**32 - 1
MAX_CODE = 2**16 - 1
_MAX_UINT64 = 2**64 - 1
_MIN_INT64, _MAX_INT64 = -(2**63), 2**63 - 1
_MAX_MODE = 0o7777


def max_chunk_records(size: int) -> int:
    """The most chunk records a file of `size` bytes may have on the wire: the chunker cuts
    every chunk but the last at CHUNK_MIN bytes or more (part of the protocol, like the chunk
    sizes), and no list exceeds MAX_CHUNK_RECORDS."""
    return min(-(-size // CHUNK_MIN), MAX_CHUNK_RECORDS)


class ErrorCode:
    """Codes of the Error message. Unknown codes are valid on the wire (read as PROTOCOL)."""

    PROTOCOL = 1  # the peer broke a protocol rule
    VERSION = 2  # its Hello names a protocol version we do not speak
    FOLDER = 3  # its Hello names another folder
    SHUTDOWN = 4  # we are going away (prefer Close)


# --- messages ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """First message each way: who we are, which folder, and our current root."""

    version: int
    device: bytes
    folder: bytes
    root: Hash

    def __post_init__(self) -> None:
        check_int("version", self.version, 0, MAX_VERSION)
        check_hash("device", self.device)
        check_hash("folder", self.folder)
        check_hash("root", self.root)


@dataclass(frozen=True, slots=True, kw_only=True)
class Root:
    """The sender's current root (gossip); a peer whose root differs from its own starts a pull."""

    root: Hash

    def __post_init__(self) -> None:
        check_hash("root", self.root)


@dataclass(frozen=True, slots=True, kw_only=True)
class Peers:
    """Other devices of this folder the sender can reach, each with addresses to dial it at.
    An address with an empty host (`:port`) means "the host this connection comes from"."""

    peers: tuple[tuple[bytes, tuple[str, ...]], ...]

    def __post_init__(self) -> None:
        check_batch("peers", self.peers, MAX_PEERS_LISTED, low=0)
        for item in self.peers:
            if not isinstance(item, tuple) or len(item) != 2:
                raise ValueError("a peer is a (device, addresses) pair")
            device, addresses = item
            check_hash("peer device", device)
            check_batch("peer addresses", addresses, MAX_ADDRESSES_PER_PEER)
            for address in addresses:
                try:
                    parse_address(address, allow_any_host=True)
                except InvalidAddressError as exc:
                    raise ValueError(str(exc)) from None


@dataclass(frozen=True, slots=True, kw_only=True)
class GetNodes:
    """Ask for the tree nodes with these hashes (distinct)."""

    id: int
    hashes: tuple[Hash, ...]

    def __post_init__(self) -> None:
        check_id(self.id)
        check_hashes("hashes", self.hashes, MAX_BATCH_NODES)


@dataclass(frozen=True, slots=True, kw_only=True)
class Nodes:
    """Encoded tree nodes, in the order asked; None = "I do not have it (any more)"."""

    id: int
    nodes: tuple[bytes | None, ...]

    def __post_init__(self) -> None:
        check_id(self.id)
        check_batch("nodes", self.nodes, MAX_BATCH_NODES)
        for node in self.nodes:
            if node is not None:
                check_bytes("node", node, 1, MAX_NODE_BYTES)


@dataclass(frozen=True, slots=True, kw_only=True)
class GetEntries:
    """Ask for the entries of these (path, expected leaf hash) pairs (distinct paths).
    `inline`: small chunk lists may come inside their entries; without it, every file's list is
    named by its group hashes only (the asker has most of them: a pull that moves files)."""

    id: int
    wanted: tuple[tuple[str, Hash], ...]
    inline: bool = True

    def __post_init__(self) -> None:
        check_id(self.id)
        if type(self.inline) is not bool:
            raise ValueError("inline must be a bool")
        check_batch("wanted", self.wanted, MAX_BATCH_ENTRIES)
        for pair in self.wanted:
            if type(pair) is not tuple or len(pair) != 2:
                raise ValueError("wanted items are (path, leaf hash) pairs")
            check_text("path", pair[0], MAX_PATH_BYTES)
            check_path(pair[0])
            check_hash("leaf hash", pair[1])
        if len({path for path, _ in self.wanted}) != len(self.wanted):
            raise ValueError("wanted paths are not distinct")


@dataclass(frozen=True, slots=True, kw_only=True)
class GetGroups:
    """Ask for the chunk-list groups with these hashes (distinct)."""

    id: int
    hashes: tuple[Hash, ...]

    def __post_init__(self) -> None:
        check_id(self.id)
        check_hashes("hashes", self.hashes, MAX_BATCH_GROUPS)


@dataclass(frozen=True, slots=True, kw_only=True)
class Groups:
    """Packed chunk-list groups, in the order asked; None = "I do not have it"."""

    id: int
    groups: tuple[bytes | None, ...]

    def __post_init__(self) -> None:
        check_id(self.id)
        check_batch("groups", self.groups, MAX_BATCH_GROUPS)
        for group in self.groups:
            if group is not None:
                check_bytes("group", group, CHUNK_RECORD, MAX_GROUP_BYTES)
                check_chunk_list(group)


@dataclass(frozen=True, slots=True, kw_only=True)
class GetChunks:
    """Ask for chunks by their BLAKE3 chunk hash and exact size (distinct hashes). The chunk is
    the unit of dedup and verification, not of transfer: one request carries many."""

    id: int
    wanted: tuple[tuple[Hash, int], ...]

    def __post_init__(self) -> None:
        check_id(self.id)
        check_batch("wanted", self.wanted, MAX_BATCH_CHUNKS)
        for pair in self.wanted:
            if type(pair) is not tuple or len(pair) != 2:
                raise ValueError("wanted chunks are (hash, size) pairs")
            check_hash("hash", pair[0])
            check_int("size", pair[1], 1, MAX_CHUNK)
        if len({digest for digest, _ in self.wanted}) != len(self.wanted):
            raise ValueError("wanted chunk hashes are not distinct")


@dataclass(frozen=True, slots=True, kw_only=True)
class Chunks:
    """Chunks' bytes, in the order asked; None = "I do not have it"."""

    id: int
    chunks: tuple[bytes | None, ...]

    def __post_init__(self) -> None:
        check_id(self.id)
        check_batch("chunks", self.chunks, MAX_BATCH_CHUNKS)
        for data in self.chunks:
            if data is not None:
                check_bytes("chunk", data, 1, MAX_CHUNK)


@dataclass(frozen=True, slots=True, kw_only=True)
class Error:
    """A fatal error: the sender closes the session after it."""

    code: int
    text: str

    def __post_init__(self) -> None:
        check_int("code", self.code, 0, MAX_CODE)
        check_text("text", self.text, MAX_TEXT)


@dataclass(frozen=True, slots=True, kw_only=True)
class Close:
    """An orderly goodbye: the sender sends nothing after it."""

    reason: str

    def __post_init__(self) -> None:
        check_text("reason", self.reason, MAX_TEXT)


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteEntry:
    """An entry as it travels: every synced field of an `Entry` except the chunk list, which is
    named by its group hashes (in order) and sent inline (`chunks`) only when it is small.

    Validated like an Entry, and more: an inline chunk list must split into exactly `groups`.
    """

    path: str
    kind: Kind
    version: VersionVector
    modifier: int
    deleted: bool = False
    size: int = 0
    mtime_ns: int = 0
    mode: int = 0
    target: str = ""
    groups: tuple[Hash, ...] = ()
    chunks: bytes | None = b""
    signature: bytes = b""  # empty, or 64 bytes by the folder's signing key

    def __post_init__(self) -> None:
        check_text("path", self.path, MAX_PATH_BYTES)
        check_path(self.path)
        if not isinstance(self.kind, Kind):
            raise ValueError(f"unknown kind {self.kind!r}")
        check_vector(self.version)
        check_int("modifier", self.modifier, 0, _MAX_UINT64)
        if type(self.deleted) is not bool:
            raise ValueError("deleted must be a bool")
        check_int("size", self.size, 0, _MAX_INT64)
        check_int("mtime_ns", self.mtime_ns, _MIN_INT64, _MAX_INT64)
        check_int("mode", self.mode, 0, _MAX_MODE)
        check_text("target", self.target, MAX_PATH_BYTES)
        if "\x00" in self.target:
            raise ValueError("symlink target holds NUL")
        if self.kind is not Kind.SYMLINK and self.target:
            raise ValueError("only a symlink has a target")
        if type(self.groups) is not tuple or len(self.groups) > MAX_GROUPS_PER_ENTRY:
            raise ValueError(f"groups is a tuple of at most {MAX_GROUPS_PER_ENTRY} hashes")
        for digest in self.groups:
            check_hash("group hash", digest)
        check_bytes("signature", self.signature, 0, SIGNATURE_SIZE)
        if len(self.signature) not in (0, SIGNATURE_SIZE):
            raise ValueError(f"a signature is empty or {SIGNATURE_SIZE} bytes")
        if self.chunks is not None:
            check_bytes("inline chunks", self.chunks, 0, MAX_INLINE_CHUNKS)
        if self.deleted or self.kind is not Kind.FILE:
            if self.size or self.groups or self.chunks:
                raise ValueError("only a live file has content")
        elif (self.size == 0) != (not self.groups):
            raise ValueError("a file has groups exactly when it has bytes")
        elif self.size > len(self.groups) * GROUP_MAX * MAX_CHUNK:
            raise ValueError("size is larger than its groups can hold")
        elif len(self.groups) > max_chunk_records(self.size):
            # Every group holds a record at least: more groups than the size allows records is
            # a chunk list that would expand far beyond what the file could need.
            raise ValueError(f"{len(self.groups)} groups are more than a {self.size}-byte file has")
        if self.chunks is not None:
            check_chunk_list(self.chunks)
            if _group_hashes(self.chunks) != self.groups:
                raise ValueError("inline chunk list does not match the group hashes")
            if sum(length for _, length in iter_chunks(self.chunks)) != self.size:
                raise ValueError("inline chunk lengths do not add up to the size")
            if len(self.chunks) // CHUNK_RECORD > max_chunk_records(self.size):
                raise ValueError("inline chunk list has more chunks than its size allows")

    @classmethod
    def from_entry(cls, entry: Entry) -> RemoteEntry:
        """The wire form of `entry`; ValueError if it exceeds a protocol limit."""
        if entry.chunk_count > MAX_CHUNK_RECORDS:
            raise ValueError(f"{entry.path!r} has more than {MAX_CHUNK_RECORDS} chunks")
        return cls(
            path=entry.path,
            kind=entry.kind,
            version=entry.version,
            modifier=entry.modifier,
            deleted=entry.deleted,
            size=entry.size,
            mtime_ns=entry.mtime_ns,
            mode=entry.mode,
            target=entry.target,
            groups=_group_hashes(entry.chunks),
            chunks=entry.chunks if len(entry.chunks) <= MAX_INLINE_CHUNKS else None,
            signature=entry.signature,
        )

    def leaf_hash(self) -> Hash:
        """Equal to `Entry.leaf_hash()` of the entry this was made from."""
        return leaf_hash_of(
            path=self.path,
            kind=self.kind,
            deleted=self.deleted,
            size=self.size,
            mtime_ns=self.mtime_ns,
            mode=self.mode,
            target=self.target,
            chunks_root=group_list_root(self.groups),
            version=self.version,
            modifier=self.modifier,
        )

    def check_groups(self, fetched: Mapping[Hash, bytes]) -> None:
        """Before the chunk list is assembled from `fetched` (each group verified by its hash):
        RemoteProtocolError unless it would hold at most `max_chunk_records(size)` records whose
        lengths add up to the size. Costs one step per group hash, never the expanded list."""
        counted: dict[Hash, tuple[int, int]] = {}
        records = total = 0
        for digest in self.groups:
            known = counted.get(digest)
            if known is None:
                group = fetched[digest]
                known = (len(group) // CHUNK_RECORD, sum(n for _, n in iter_chunks(group)))
                counted[digest] = known
            records += known[0]
            total += known[1]
        if records > max_chunk_records(self.size):
            raise RemoteProtocolError(
                f"chunk list of {self.path!r}: {records} chunks are more than "
                f"{max_chunk_records(self.size)} for {self.size} bytes"
            )
        if total != self.size:
            raise RemoteProtocolError(f"chunk list of {self.path!r} does not add up to its size")

    def to_entry(self, chunks: bytes) -> Entry:
        """The full entry, given its packed chunk list (assembled from fetched groups).

        RemoteProtocolError if `chunks` does not split into exactly `groups`: the groups were
        verified by hash, so what is left to be wrong is what the peer claimed.
        """
        try:
            check_chunk_list(chunks)
        except ValueError as exc:
            raise RemoteProtocolError(f"chunk list of {self.path!r}: {exc}") from exc
        if _group_hashes(chunks) != self.groups:
            raise RemoteProtocolError(f"chunk list of {self.path!r} does not match its groups")
        try:
            return Entry(
                path=self.path,
                kind=self.kind,
                version=self.version,
                modifier=self.modifier,
                deleted=self.deleted,
                size=self.size,
                mtime_ns=self.mtime_ns,
                mode=self.mode,
                target=self.target,
                chunks=chunks,
                signature=self.signature,
            )
        except ValueError as exc:
            raise RemoteProtocolError(f"entry {self.path!r}: {exc}") from exc

    def inline_entry(self) -> Entry | None:
        """The full entry if its chunk list came inline (verified on construction) or is empty;
        None if its groups must be fetched first."""
        if self.chunks is None and self.groups:
            return None
        return self.to_entry(self.chunks or b"")


@dataclass(frozen=True, slots=True, kw_only=True)
class Entries:
    """Entries in the order asked; None = "that path no longer has that leaf here"."""

    id: int
    entries: tuple[RemoteEntry | None, ...]

    def __post_init__(self) -> None:
        check_id(self.id)
        check_batch("entries", self.entries, MAX_BATCH_ENTRIES)
        for entry in self.entries:
            if entry is not None and not isinstance(entry, RemoteEntry):
                raise ValueError("entries are RemoteEntry or None")


Message = (
    Hello
    | Root
    | Peers
    | GetNodes
    | Nodes
    | GetEntries
    | Entries
    | GetGroups
    | Groups
    | GetChunks
    | Chunks
    | Error
    | Close
)


# --- validators (shared with codec and session; not part of the public surface) -----------------


def check_int(name: str, value: object, low: int, high: int) -> None:
    """An int (never a bool) in [low, high]."""
    if type(value) is not int:
        raise ValueError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} {value} is outside [{low}, {high}]")


def check_id(value: object) -> None:
    check_int("id", value, 0, MAX_ID)


def check_hash(name: str, value: object) -> None:
    if type(value) is not bytes or len(value) != HASH_SIZE:
        raise ValueError(f"{name} must be {HASH_SIZE} bytes")


def check_bytes(name: str, value: object, low: int, high: int) -> None:
    if type(value) is not bytes:
        raise ValueError(f"{name} must be bytes, not {type(value).__name__}")
    if not low <= len(value) <= high:
        raise ValueError(f"{name} of {len(value)} bytes is outside [{low}, {high}]")


def check_text(name: str, value: object, max_bytes: int) -> None:
    if type(value) is not str:
        raise ValueError(f"{name} must be a str, not {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} is not valid UTF-8") from exc
    if size > max_bytes:
        raise ValueError(f"{name} longer than {max_bytes} bytes")


def check_batch(name: str, value: object, limit: int, *, low: int = 1) -> None:
    if type(value) is not tuple or not low <= len(value) <= limit:
        raise ValueError(f"{name} must be a tuple of {low} to {limit} items")


def check_hashes(name: str, value: object, limit: int) -> None:
    check_batch(name, value, limit)
    assert isinstance(value, tuple)
    for digest in value:
        check_hash("hash", digest)
    if len(set(value)) != len(value):
        raise ValueError(f"{name} are not distinct")


def check_vector(version: object) -> None:
    if not isinstance(version, VersionVector):
        raise ValueError("version must be a VersionVector")
    counters = version.counters
    if type(counters) is not tuple or not 1 <= len(counters) <= MAX_VECTOR:
        raise ValueError(f"a version vector has 1 to {MAX_VECTOR} counters")
    for device, counter in counters:
        check_int("version device", device, 0, _MAX_UINT64)
        check_int("version counter", counter, 1, _MAX_UINT64)


def check_chunk_list(blob: bytes) -> None:
    """Whole (hash, length) records, each chunk 1 to MAX_CHUNK bytes long."""
    if len(blob) % CHUNK_RECORD:
        raise ValueError("chunk list is not a whole number of records")
    for _, length in iter_chunks(blob):
        if not 1 <= length <= MAX_CHUNK:
            raise ValueError(f"chunk length {length} is outside [1, {MAX_CHUNK}]")


def _group_hashes(chunks: bytes) -> tuple[Hash, ...]:
    return tuple(group_hash(group) for group in chunk_groups(chunks))
