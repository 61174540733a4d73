"""Moves: a pull that deletes a file and creates another with the same content renames it.

A renamed file or directory reaches a copy as deletions of the old paths and creations of new
ones. Rebuilding each new file from the old one's chunks and archiving the old one costs a full
read and write of every byte, and fills the versions area with files that were never lost.
`MovePlanner` pairs each creation with a deletion of the same pull whose local file holds the
same content (same chunk list, size, mtime and mode); `move_files` then renames it, if it still
is what the index says (the same stat check as an install: a user's edit that races it is
never lost). Nothing is archived for a moved file: its content lives on at its new path.

Imports index and sync's disk, merge and swap.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from backer.errors import InvalidPathError
from backer.ids import Hash
from backer.index.entry import Entry, Kind, chunk_groups, group_hash
from backer.index.store import Record, StatSig
from backer.paths import check_path, parent_of
from backer.sync.disk import ChangedMeanwhile, FolderDisk
from backer.sync.merge import Action, decide
from backer.sync.swap import is_expected, lstat_at, move_noreplace

__all__ = [
    "Move",
    "MovePlanner",
    "PlannedMove",
    "inline_wanted",
    "local_groups",
    "move_files",
]

# What makes a local file a move's source for a new entry: exactly the content and metadata
# the new entry asks for, so the renamed file needs no byte changed.
_ContentKey = tuple[bytes, int, int, int]


@dataclass(frozen=True, slots=True)
class Move:
    """Rename the local file `source` (indexed as `record`) to the new entry's path."""

    source: str
    record: Record


@dataclass(frozen=True, slots=True)
class PlannedMove:
    """Make `entry` (the merge's result for a new path; `remote` as the peer sent it) by
    renaming `move`'s file."""

    entry: Entry
    remote: Entry
    move: Move


@dataclass(slots=True)
class MovePlanner:
    """Pairs a pull's creations with its deletions of the same content. Deletions are offered
    slice by slice as the pull learns them; a creation takes one offered so far."""

    _offered: dict[_ContentKey, list[Move]] = field(default_factory=dict)
    _moved_away: set[str] = field(default_factory=set)
    _planned: list[PlannedMove] = field(default_factory=list)

    def offer(self, entries: list[Entry], current: dict[str, Record]) -> None:
        """Offer the files `entries` delete that are indexed here with a stat to check and
        whose deletion the merge rules would apply as it is (no conflict, no local edit)."""
        for remote in entries:
            record = current.get(remote.path)
            if (
                not remote.deleted
                or record is None
                or record.entry.deleted
                or record.entry.kind is not Kind.FILE
                or record.local.stat is None
                or not record.entry.size
            ):
                continue
            decision = decide(record.entry, remote)
            result = decision.result
            if (
                decision.action is Action.WRITE_REMOTE
                and decision.conflict_copy is None
                and result is not None
                and result.deleted
            ):
                self._offered.setdefault(_key(record.entry), []).append(Move(remote.path, record))

    def plan(self, new: Entry, remote: Entry) -> bool:
        """Plan to make `new` (a new file here) from a deletion's local file of the same
        content; False if none was offered."""
        if new.kind is not Kind.FILE or new.deleted or not new.size:
            return False
        sources = self._offered.get(_key(new))
        if not sources:
            return False
        self._planned.append(PlannedMove(new, remote, sources.pop()))
        return True

    def take_planned(self) -> list[PlannedMove]:
        planned, self._planned = self._planned, []
        return planned

    def moved(self, move: Move) -> None:
        """`move` happened: its source's deletion has nothing left to remove."""
        self._moved_away.add(move.source)

    def moved_away(self, path: str) -> bool:
        return path in self._moved_away


def inline_wanted(wanted: Iterable[tuple[str, Hash]], local: dict[str, Record]) -> bool:
    """Whether a pull should take small chunk lists inline for these differing paths (their
    local records given): not when it both adds paths and may delete local files, as a move
    does. Its new files' lists are then named by group hashes, which the deleted files' own
    lists provide here: a renamed directory of 500 photos sent 127 kB of lists the copy had."""
    adds = any(local.get(path) is None or local[path].entry.deleted for path, _ in wanted)
    return not adds or not any(_movable(record) for record in local.values())


def local_groups(records: Iterable[Record]) -> dict[Hash, bytes]:
    """The chunk-list groups of these local records, by group hash."""
    return {
        group_hash(group): group
        for record in records
        for group in chunk_groups(record.entry.chunks)
    }


def _movable(record: Record) -> bool:
    entry = record.entry
    return entry.kind is Kind.FILE and not entry.deleted and entry.size > 0


def move_files(disk: FolderDisk, planned: list[PlannedMove]) -> list[StatSig | Exception | None]:
    """Rename each planned move's file to its new path if it still is what its record says,
    never replacing anything there; each directory is opened once for all. In each one's
    place: the moved file's stat; None if nothing moved (the source changed, vanished, or
    the new path was taken: build it as usual, and the source's deletion meets the change);
    ChangedMeanwhile if the file was edited while it moved and could not go back (the edit
    is then at the new path, to be indexed there); or another failure."""
    outcomes: list[StatSig | Exception | None] = []
    with contextlib.ExitStack() as stack:
        directories = _Directories(disk, stack)
        for item in planned:
            try:
                outcomes.append(_move(disk, directories, item.move, item.entry.path))
            except (ChangedMeanwhile, InvalidPathError, OSError) as exc:
                outcomes.append(exc)
    return outcomes


@dataclass(slots=True)
class _Directories:
    """Descriptors of the folder's directories, each reached once without following a
    symlink, open until `stack` closes."""

    disk: FolderDisk
    stack: contextlib.ExitStack
    _open: dict[str, int] = field(default_factory=dict)

    def fd(self, rel_dir: str, *, create: bool = False) -> int:
        if rel_dir not in self._open:
            directory = self.disk.directory(rel_dir, create=create)
            self._open[rel_dir] = self.stack.enter_context(directory)
        return self._open[rel_dir]


def _move(disk: FolderDisk, directories: _Directories, move: Move, dest: str) -> StatSig | None:
    check_path(move.source)
    check_path(dest)
    expected = move.record.local.stat
    try:
        src_fd = directories.fd(parent_of(move.source))
    except FileNotFoundError:
        return None  # gone with its directory: the new path is built
    dst_fd = directories.fd(parent_of(dest), create=True)
    name, new_name = _name(move.source), _name(dest)
    if not is_expected(lstat_at(src_fd, name), expected, _no_link):
        return None
    disk.before_swap(move.source)
    try:
        move_noreplace(src_fd, name, dst_fd, new_name)
    except (FileExistsError, FileNotFoundError):
        return None
    st = lstat_at(dst_fd, new_name)
    if st is not None and is_expected(st, expected, _no_link, renamed=True):
        return StatSig.of(st)
    # Edited while it moved: it goes back, where the deletion meets the edit and keeps it.
    with contextlib.suppress(FileExistsError, FileNotFoundError):
        move_noreplace(dst_fd, new_name, src_fd, name)
        os.fsync(src_fd)
        return None
    raise ChangedMeanwhile(f"{move.source} was edited while it moved to {dest}")


def _key(entry: Entry) -> _ContentKey:
    return (entry.chunks, entry.size, entry.mtime_ns, entry.mode)


def _no_link() -> str:
    return ""  # a file is expected: is_expected never reads a link for one


def _name(rel: str) -> str:
    return rel.rpartition("/")[2]
