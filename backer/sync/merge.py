"""Merge rules: what one path becomes when a replica pulls a peer's entry for it.

Owns `decide` (version-vector merge, the deterministic conflict winner, conflict copies), the
conflict-copy names and the rule that keeps a directory a peer deleted (or replaced by a file)
under a live child.
Every choice is a function of the two entries alone and symmetric in them, so every replica
reaches the same entries whichever side it is on and the folder roots converge.
Pure: imports only errors, ids, paths and index.entry; no I/O, no clock (time is an argument).
"""

from __future__ import annotations

import base64
import enum
import re
import unicodedata
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Literal

from backer.errors import InvalidPathError
from backer.index.entry import Entry, Kind, Ordering
from backer.paths import MAX_NAME_BYTES, MAX_PATH_BYTES, check_path, join, parent_of

__all__ = [
    "Action",
    "Decision",
    "Side",
    "conflict_path",
    "conflict_path_of",
    "decide",
    "is_conflict_copy",
    "keep_directory",
    "reclaimed_directory",
]

Side = Literal["local", "remote"]


class Action(enum.Enum):
    """What the caller must do on disk at the path (the index always records `result`)."""

    NOTHING = "nothing"  # disk stays as it is
    WRITE_REMOTE = "write_remote"  # make the path hold the remote's file/dir/symlink, or delete it
    KEEP_LOCAL_DISK = "keep_local_disk"  # the local content won over a concurrent remote one


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """The outcome for one path.

    `result` is the path's new entry (None: the entry stays as it is). `conflict_copy` is a new
    entry to create at its own path with the content of the `copy_from` side: from "local", move
    or copy the local file there before writing the winner; from "remote", fetch it there.
    """

    action: Action
    result: Entry | None
    conflict_copy: Entry | None = None
    copy_from: Side | None = None

    def __post_init__(self) -> None:
        if self.result is None and self.action is not Action.NOTHING:
            raise ValueError(f"{self.action} needs a resulting entry")
        if (self.conflict_copy is None) != (self.copy_from is None):
            raise ValueError("a conflict copy needs the side it is copied from, and only it does")
        if self.copy_from not in (None, "local", "remote"):
            raise ValueError(f"unknown side {self.copy_from!r}")
        if self.conflict_copy is not None:
            if self.result is None or self.conflict_copy.path == self.result.path:
                raise ValueError("a conflict copy sits beside a result, never on its path")
            if self.conflict_copy.deleted or self.conflict_copy.kind is Kind.DIR:
                raise ValueError("a conflict copy is a live file or symlink")


def decide(local: Entry | None, remote: Entry) -> Decision:
    """Merge the peer's entry for a path into the local one (None: the path is unknown here)."""
    if local is None:
        return Decision(
            action=Action.NOTHING if remote.deleted else Action.WRITE_REMOTE, result=remote
        )
    if local.path != remote.path:
        raise ValueError(f"cannot merge entries of {local.path!r} and {remote.path!r}")
    order = remote.version.compare(local.version)
    if order is Ordering.LESSER or (order is Ordering.EQUAL and _identical(local, remote)):
        return Decision(action=Action.NOTHING, result=None)
    if order is Ordering.GREATER:
        action = Action.NOTHING if _same_on_disk(local, remote) else Action.WRITE_REMOTE
        return Decision(action=action, result=remote)
    # Concurrent. Equal vectors on different entries (a device that lost its index and reused a
    # counter) are resolved the same way, or the two roots would differ for ever.
    merged = local.version.merge(remote.version)
    if _same_on_disk(local, remote):
        keep = remote if _by_modifier(remote) > _by_modifier(local) else local
        return Decision(action=Action.NOTHING, result=keep.with_version(merged, keep.modifier))
    if local.deleted or remote.deleted:  # the edit beats the delete
        live, action = (
            (remote, Action.WRITE_REMOTE) if local.deleted else (local, Action.KEEP_LOCAL_DISK)
        )
        return Decision(action=action, result=live.with_version(merged, live.modifier))
    remote_won = _conflict_rank(remote) > _conflict_rank(local)
    winner, loser = (remote, local) if remote_won else (local, remote)
    result = winner.with_version(merged, winner.modifier)
    action = Action.WRITE_REMOTE if remote_won else Action.KEEP_LOCAL_DISK
    if loser.kind is Kind.DIR:  # two directories: only their metadata differ
        return Decision(action=action, result=result)
    copy = replace(loser, path=conflict_path(loser), signature=b"")  # signed anew when stored
    side: Side = "local" if remote_won else "remote"
    return Decision(action=action, result=result, conflict_copy=copy, copy_from=side)


def keep_directory(local_dir: Entry, remote: Entry, device: int, now: int) -> Entry:
    """Keep a directory a peer deleted, or replaced by a file or symlink, while this replica
    holds a live entry in it the peer never saw: a new local change at unix time `now`
    (seconds), so that it wins on the peer. A peer's file or symlink there lives on in its
    `conflict_path` (see `reclaimed_directory`)."""
    if local_dir.kind is not Kind.DIR or local_dir.deleted:
        raise ValueError(f"{local_dir.path!r} is not a live directory here")
    if remote.path != local_dir.path or (not remote.deleted and remote.kind is Kind.DIR):
        raise ValueError(f"no tombstone, file or symlink of {local_dir.path!r} to overrule")
    version = local_dir.version.merge(remote.version).bump(device, now)
    return local_dir.with_version(version, device)


def reclaimed_directory(local: Entry, device: int, now: int) -> tuple[Entry, Entry]:
    """A file or symlink of this replica's at a path where a peer still has a directory with a
    live entry in it this replica never saw (it replaced the directory while the peer edited
    inside): the path becomes a directory again, as a new local change, and the file or symlink
    moves to its conflict copy, the same one the peer makes of it (`keep_directory`). Returns
    (directory, conflict copy)."""
    if local.deleted or local.kind is Kind.DIR:
        raise ValueError(f"{local.path!r} is not a live file or symlink here")
    directory = Entry(
        path=local.path,
        kind=Kind.DIR,
        mode=0o755,
        version=local.version.bump(device, now),
        modifier=device,
    )
    return directory, replace(local, path=conflict_path(local), signature=b"")


_MARKER = ".sync-conflict-"
_CONFLICT_NAME = re.compile(r"\.sync-conflict-\d{8}-\d{6}-[A-Z2-7]{7}(?:\.[^.]*)?\Z", re.ASCII)


def conflict_path(entry: Entry) -> str:
    """Where the losing side of a conflict is kept, Syncthing-style:
    `dir/stem.sync-conflict-YYYYMMDD-HHMMSS-DEVICE.ext`, with the loser's mtime (UTC) and the
    first 7 base32 characters of its modifier, so every replica names the copy alike.

    The stem is shortened (whole characters) to keep the name within 255 UTF-8 bytes; an
    "extension" too long to fit beside the marker is treated as part of the stem. Raises
    InvalidPathError only if the parent directory leaves no room under the path length limit.
    """
    return conflict_path_of(entry.path, entry.mtime_ns, entry.modifier)


def conflict_path_of(path: str, mtime_ns: int, modifier: int) -> str:
    """`conflict_path` of a version of `path` with this mtime, made by device `modifier`."""
    name, parent = path.rpartition("/")[2], parent_of(path)
    marker = f"{_MARKER}{_stamp(mtime_ns)}-{_device(modifier)}"
    dot = name.rfind(".")
    stem, ext = (name[:dot], name[dot:]) if dot > 0 else (name, "")
    if _size(marker + ext) > MAX_NAME_BYTES:
        stem, ext = name, ""
    room = MAX_NAME_BYTES - _size(marker + ext)
    if parent:
        room = min(room, MAX_PATH_BYTES - _size(parent) - 1 - _size(marker + ext))
    if room < 0:
        raise InvalidPathError(f"no room for a conflict copy of {path!r}")
    return check_path(join(parent, _shorten(stem, room) + marker + ext))


def is_conflict_copy(path: str) -> bool:
    """Whether the path's name is a conflict copy's (ours, or Syncthing's)."""
    return _CONFLICT_NAME.search(path.rpartition("/")[2]) is not None


# Helpers.

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)
# The seconds a datetime can show (years 1 to 9999): mtimes outside are clamped, never refused.
_MIN_SECONDS = (datetime.min.replace(tzinfo=UTC) - _EPOCH) // _SECOND
_MAX_SECONDS = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // _SECOND
_U64 = (1 << 64) - 1


def _identical(a: Entry, b: Entry) -> bool:
    return a.same_content(b) and a.modifier == b.modifier


def _same_on_disk(a: Entry, b: Entry) -> bool:
    """Nothing to change on disk to go from one to the other (any two tombstones are alike)."""
    return a.same_content(b) or (a.deleted and b.deleted)


# Ranks order two entries the same way on every replica. Each ends with every field that
# `same_content` compares, so entries that rank equal give the same result whichever is taken.
_Content = tuple[int, bool, int, int, int, str, bytes]


def _content_key(e: Entry) -> _Content:
    return (int(e.kind), e.deleted, e.size, e.mtime_ns, e.mode, e.target, e.chunks)


def _by_modifier(e: Entry) -> tuple[int, _Content]:
    return (e.modifier, _content_key(e))


def _conflict_rank(e: Entry) -> tuple[bool, int, int, _Content]:
    # A directory beats a file or symlink (children are at stake); then the newer mtime, then the
    # larger modifier.
    return (e.kind is Kind.DIR, e.mtime_ns, e.modifier, _content_key(e))


def _stamp(mtime_ns: int) -> str:
    seconds = min(max(mtime_ns // 1_000_000_000, _MIN_SECONDS), _MAX_SECONDS)
    t = _EPOCH + timedelta(seconds=seconds)
    return f"{t.year:04d}{t.month:02d}{t.day:02d}-{t.hour:02d}{t.minute:02d}{t.second:02d}"


def _device(modifier: int) -> str:
    # The same 7 characters as DeviceId.short_str: the first 35 bits of the ID.
    return base64.b32encode((modifier & _U64).to_bytes(8, "big")).decode("ascii")[:7]


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def _shorten(stem: str, room: int) -> str:
    """`stem` cut to at most `room` UTF-8 bytes on a character boundary, still NFC."""
    if _size(stem) <= room:
        return stem
    cut = stem.encode("utf-8")[:room].decode("utf-8", "ignore")
    while cut and not unicodedata.is_normalized("NFC", cut):
        cut = cut[:-1]
    return cut
