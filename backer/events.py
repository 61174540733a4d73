"""What a running node tells its watchers: typed events, and their JSON form.

Owns the event types that the sync engine, the mesh, the watcher and the node emit, and that the
CLI (`backer run --events json`), the web dashboard and the tests consume. Events are values:
frozen, slotted, keyword-only dataclasses. Layers below the node emit them through an `Emit`
callable and never see the stream that carries them (`backer.node.bus`). Pure: imports nothing
from backer; no clock (the stream stamps the time).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ConflictFound",
    "Emit",
    "ErrorOccurred",
    "Event",
    "FileProgress",
    "FileUpdated",
    "FolderPaused",
    "FolderResumed",
    "FolderScanned",
    "LocalChangesKept",
    "NodeStarted",
    "NodeStopping",
    "PeerConnected",
    "PeerDisconnected",
    "PeerFound",
    "PullFinished",
    "PullStarted",
    "WatchIncomplete",
    "event_name",
    "ignore",
    "to_json",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeStarted:
    device: str  # this node's device ID
    listen: str  # the address it accepts connections on ("" when it does not listen)
    folders: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeStopping:
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerFound:
    """An address of a folder's peer, new to this node."""

    folder: str
    device: str
    address: str
    via: str  # "mdns", "beacon", "dht"


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerConnected:
    folder: str
    device: str
    address: str
    outgoing: bool  # we dialled it (False: it dialled us)


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerDisconnected:
    folder: str
    device: str  # "" when the peer never proved who it is (a failed handshake)
    address: str
    reason: str
    clean: bool  # an orderly goodbye (False: an error, a timeout, a violation)


@dataclass(frozen=True, slots=True, kw_only=True)
class FolderScanned:
    folder: str
    changed: int  # paths whose index entry changed (deletions included)
    deleted: int
    root: str  # the folder's root hash after the scan, hex


@dataclass(frozen=True, slots=True, kw_only=True)
class PullStarted:
    folder: str
    peers: tuple[str, ...]  # the devices the pull may fetch from
    root: str  # the root it pulls towards, hex


@dataclass(frozen=True, slots=True, kw_only=True)
class PullFinished:
    folder: str
    peers: tuple[str, ...]
    root: str  # the folder's root after the pull, hex
    files: int
    dirs: int
    symlinks: int
    deleted: int
    conflicts: int
    bytes_fetched: int
    bytes_local: int  # copied from this device's own files (renames, moves, resumed transfers)
    errors: tuple[str, ...]  # paths refused or failed, with the reason
    reason: str = ""  # why it ended early ("" when it ran to the end)


@dataclass(frozen=True, slots=True, kw_only=True)
class FileProgress:
    folder: str
    path: str
    done: int  # bytes in place so far
    total: int


@dataclass(frozen=True, slots=True, kw_only=True)
class FileUpdated:
    folder: str
    path: str
    action: str  # "file", "dir", "symlink" (written from a peer) or "deleted"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConflictFound:
    folder: str
    path: str
    copy: str  # where the losing version was kept


@dataclass(frozen=True, slots=True, kw_only=True)
class FolderPaused:
    folder: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class FolderResumed:
    folder: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchIncomplete:
    """The filesystem watcher covers only part of the folder (the inotify watch limit); changes
    outside it are found by periodic full scans only."""

    folder: str
    watched_dirs: int
    total_dirs: int
    fix: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalChangesKept:
    """A read-only device changed files of its folder: they stay here (peers refuse them
    unsigned) until `backer revert` undoes them. Said when they appear, not at every scan."""

    folder: str
    count: int  # paths this device changed


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorOccurred:
    folder: str  # "" for the node itself
    message: str


Event = (
    NodeStarted
    | NodeStopping
    | PeerFound
    | PeerConnected
    | PeerDisconnected
    | FolderScanned
    | PullStarted
    | PullFinished
    | FileProgress
    | FileUpdated
    | ConflictFound
    | FolderPaused
    | FolderResumed
    | WatchIncomplete
    | LocalChangesKept
    | ErrorOccurred
)
Emit = Callable[[Event], None]


def ignore(event: Event) -> None:
    """An `Emit` that drops everything: the default of code that may run without a node."""


def event_name(event: Event) -> str:
    """`PeerConnected` -> `peer_connected`: the `type` of its JSON form."""
    return _name_of(type(event))


def to_json(event: Event, **extra: Any) -> dict[str, Any]:
    """A JSON-ready dict: `{"type": ..., **fields, **extra}`. Every field is a str, an int, a
    bool or a tuple of them, so a shallow read is the whole event (a pull of many small files
    prints one per file: `dataclasses.asdict`'s deep copy cost the node 5 % of its CPU)."""
    fields = {name: getattr(event, name) for name in _field_names(type(event))}
    return {"type": event_name(event), **fields, **extra}


def _name_of(kind: type) -> str:
    name = _NAMES.get(kind)
    if name is None:
        name = _NAMES[kind] = _snake(kind.__name__)
    return name


def _field_names(kind: type) -> tuple[str, ...]:
    names = _FIELDS.get(kind)
    if names is None:
        names = _FIELDS[kind] = tuple(field.name for field in dataclasses.fields(kind))
    return names


_NAMES: dict[type, str] = {}
_FIELDS: dict[type, tuple[str, ...]] = {}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
