"""Entries: the synced metadata of one path, with its version vector and its chunk list.

Owns the canonical encoding that a leaf hash covers. Pure: no I/O, no clock (time is an argument).
Must not import anything above `backer.index`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import msgpack

from backer.ids import HASH_SIZE, Hash, hash_bytes, keyed_hasher
from backer.paths import check_path

__all__ = [
    "CHUNK_RECORD",
    "GROUP_MAX",
    "Entry",
    "Kind",
    "Ordering",
    "VersionVector",
    "chunk_groups",
    "chunk_list_root",
    "group_hash",
    "group_list_root",
    "iter_chunks",
    "leaf_hash_of",
    "pack_chunks",
    "signed_message",
]

# One chunk in a chunk list: its BLAKE3 hash and its length (big-endian uint32).
_CHUNK_STRUCT = struct.Struct(">32sI")
CHUNK_RECORD = _CHUNK_STRUCT.size
# A chunk list is hashed in groups, so that the protocol can send only the groups that differ from
# a version the peer already has. Group ends are content-defined (after a chunk whose hash has
# its low 6 bits set, 1 in 64) so that an edit that adds or removes a chunk does not shift every
# later group; GROUP_MAX bounds a group's size whatever the hashes.
GROUP_MASK = 63
GROUP_MAX = 256
MAX_MODE = 0o7777
SIGNATURE_SIZE = 64


class Kind(enum.IntEnum):
    FILE = 0
    DIR = 1
    SYMLINK = 2


class Ordering(enum.Enum):
    EQUAL = "equal"
    GREATER = "greater"  # self dominates other
    LESSER = "lesser"  # other dominates self
    CONCURRENT = "concurrent"


@dataclass(frozen=True, slots=True)
class VersionVector:
    """Per-device update counters, sorted by device short ID.

    A device's counter is bumped to max(counter + 1, now) so that a device that lost its index
    and starts over still produces versions that beat its old ones (Syncthing does the same).
    """

    counters: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        devices = [device for device, _ in self.counters]
        if devices != sorted(set(devices)):
            raise ValueError("version vector devices must be unique and sorted")
        if any(counter <= 0 or device < 0 for device, counter in self.counters):
            raise ValueError("version vector counters must be positive")

    def counter(self, device: int) -> int:
        for dev, count in self.counters:
            if dev == device:
                return count
        return 0

    def bump(self, device: int, now: int) -> VersionVector:
        """The vector after `device` changes the entry at unix time `now` (seconds)."""
        new_count = max(self.counter(device) + 1, now)
        others = [(d, c) for d, c in self.counters if d != device]
        return VersionVector(tuple(sorted([*others, (device, new_count)])))

    def merge(self, other: VersionVector) -> VersionVector:
        merged = dict(self.counters)
        for device, count in other.counters:
            merged[device] = max(merged.get(device, 0), count)
        return VersionVector(tuple(sorted(merged.items())))

    def compare(self, other: VersionVector) -> Ordering:
        mine, theirs = dict(self.counters), dict(other.counters)
        greater = any(count > theirs.get(dev, 0) for dev, count in mine.items())
        lesser = any(count > mine.get(dev, 0) for dev, count in theirs.items())
        if greater and lesser:
            return Ordering.CONCURRENT
        if greater:
            return Ordering.GREATER
        if lesser:
            return Ordering.LESSER
        return Ordering.EQUAL


def pack_chunks(chunks: list[tuple[bytes, int]]) -> bytes:
    return b"".join(_CHUNK_STRUCT.pack(digest, length) for digest, length in chunks)


def iter_chunks(blob: bytes) -> Iterator[tuple[Hash, int]]:
    for digest, length in _CHUNK_STRUCT.iter_unpack(blob):
        yield Hash(digest), length


def chunk_groups(blob: bytes) -> list[bytes]:
    """Split a packed chunk list into its content-defined groups (each a packed chunk list)."""
    groups = []
    start = 0
    count = 0
    for end in range(CHUNK_RECORD, len(blob) + 1, CHUNK_RECORD):
        count += 1
        # The last hash byte of the record just ended (hash bytes are uniformly distributed).
        if blob[end - 5] & GROUP_MASK == GROUP_MASK or count == GROUP_MAX or end == len(blob):
            groups.append(blob[start:end])
            start, count = end, 0
    return groups


def group_hash(group: bytes) -> Hash:
    return hash_bytes("chunk group", group)


def chunk_list_root(blob: bytes) -> Hash:
    """Two-level hash of a packed chunk list: each group, then the sequence of group hashes."""
    return group_list_root(group_hash(group) for group in chunk_groups(blob))


def group_list_root(group_hashes: Iterable[bytes]) -> Hash:
    """The chunk-list root from the group hashes alone (a peer sends those, not the list)."""
    top = keyed_hasher("chunk list")
    for digest in group_hashes:
        top.update(digest)
    return Hash(top.digest())


def leaf_hash_of(
    *,
    path: str,
    kind: Kind,
    deleted: bool,
    size: int,
    mtime_ns: int,
    mode: int,
    target: str,
    chunks_root: bytes,
    version: VersionVector,
    modifier: int,
) -> Hash:
    """A leaf hash: BLAKE3 of the canonical msgpack list of every synced field, the version
    vector included, with the chunk list stood in for by its root (so a peer can check an entry
    from its group hashes, before it has the list)."""
    canonical: bytes = msgpack.packb(
        [
            path,
            int(kind),
            deleted,
            size,
            mtime_ns,
            mode,
            target,
            chunks_root,
            [list(pair) for pair in version.counters],
            modifier,
        ]
    )
    return hash_bytes("leaf", canonical)


def signed_message(leaf: bytes) -> bytes:
    """What the folder's signing key signs for one version of one path."""
    return b"backer entry v1\0" + leaf


_EMPTY_CHUNKS_ROOT = chunk_list_root(b"")


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """What every replica agrees on for one path. Local-only facts (inode, ctime) live elsewhere."""

    path: str
    kind: Kind
    version: VersionVector
    modifier: int  # short ID of the device that made this version
    deleted: bool = False
    size: int = 0
    mtime_ns: int = 0
    mode: int = 0
    target: str = ""  # symlink target, stored as text and never followed
    chunks: bytes = b""  # packed (hash, length) records, see pack_chunks
    # Ed25519 signature by the folder's signing key over the leaf hash (see `signed_message`);
    # empty when unsigned. Not part of the leaf: every read-write device signs alike.
    signature: bytes = field(default=b"", compare=False)

    def __post_init__(self) -> None:
        check_path(self.path, indexed=True)  # a peer's paths were checked on the wire
        if not isinstance(self.kind, Kind):
            raise ValueError(f"unknown kind {self.kind!r}")
        if self.size < 0 or not 0 <= self.mode <= MAX_MODE:
            raise ValueError("negative size or mode outside permission bits")
        if len(self.chunks) % CHUNK_RECORD:
            raise ValueError("chunk list is not a whole number of records")
        if self.kind is not Kind.SYMLINK and self.target:
            raise ValueError("only a symlink has a target")
        if self.deleted or self.kind is not Kind.FILE:
            if self.chunks or self.size:
                raise ValueError("only a live file has content")
        elif sum(length for _, length in iter_chunks(self.chunks)) != self.size:
            raise ValueError("chunk lengths do not add up to the file size")
        if not self.version.counters:
            raise ValueError("an entry needs a version")
        if len(self.signature) not in (0, SIGNATURE_SIZE):
            raise ValueError(f"a signature is {SIGNATURE_SIZE} bytes")

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]

    @property
    def chunk_count(self) -> int:
        return len(self.chunks) // CHUNK_RECORD

    def leaf_hash(self) -> Hash:
        return leaf_hash_of(
            path=self.path,
            kind=self.kind,
            deleted=self.deleted,
            size=self.size,
            mtime_ns=self.mtime_ns,
            mode=self.mode,
            target=self.target,
            chunks_root=_EMPTY_CHUNKS_ROOT if not self.chunks else chunk_list_root(self.chunks),
            version=self.version,
            modifier=self.modifier,
        )

    def same_content(self, other: Entry) -> bool:
        """Equal in everything but version and modifier: a change that needs no new version."""
        return (
            self.kind == other.kind
            and self.deleted == other.deleted
            and self.size == other.size
            and self.mtime_ns == other.mtime_ns
            and self.mode == other.mode
            and self.target == other.target
            and self.chunks == other.chunks
        )

    def with_version(self, version: VersionVector, modifier: int) -> Entry:
        return replace(self, version=version, modifier=modifier, signature=b"")


assert len(_EMPTY_CHUNKS_ROOT) == HASH_SIZE
