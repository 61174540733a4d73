"""One pull: bring what a peer has newer into this replica.

Descends the peer's tree one level per round trip (merkle.PullWalk), fetches the entries that
differ and the chunk-list groups it lacks, decides each path with the merge rules, then applies:
directories first, files through temp files (local chunks copied, the rest fetched with a
bounded window), deletions last and deepest first, so that a rename or a move finds its content
still on disk. Nothing is overwritten or deleted without passing through `.backer/versions/`,
and nothing is replaced or removed that changed locally since it was indexed: the disk swaps
and checks what it takes out, and a local edit it meets wins (kept, indexed, synced).

Asks a `Fetcher` for remote data, never a connection (STYLE.md 7). Imports index, protocol,
sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import stat as stat_mod
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from backer.errors import (
    BackerError,
    DecodeError,
    FolderMissingError,
    InvalidPathError,
    RemoteProtocolError,
)
from backer.events import ConflictFound, Emit, FileUpdated, ignore
from backer.ids import Hash
from backer.index import merkle
from backer.index.entry import Entry, Kind
from backer.index.store import LocalState, Record, StatSig
from backer.paths import RESERVED_DIR, parent_of
from backer.protocol.messages import RemoteEntry, max_chunk_records
from backer.sync.assemble import Assembler, ChangedMeanwhile, ChunkGone, first_leaf
from backer.sync.fetcher import Fetcher, PeerMovedOn, PullReport
from backer.sync.merge import (
    Action,
    Decision,
    conflict_path,
    decide,
    keep_directory,
    reclaimed_directory,
)
from backer.sync.moves import MovePlanner, inline_wanted, local_groups, move_files
from backer.sync.replica import Replica
from backer.sync.swap import Expected, SymlinkTo

__all__ = ["Fetcher", "PeerMovedOn", "PullReport", "pull"]

NODE_BATCH = 256
ENTRY_BATCH = 128
GROUP_BATCH = 256
FILES_IN_FLIGHT = 64  # files being built at once: small files are sealed in batches of up to this
COMMIT_EVERY = 1000
# Chunk records one pull expands at most (36 MiB of chunk lists), counted by what each file's
# declared size allows; files beyond it wait for the next pull (one is always taken).
PULL_CHUNK_RECORDS = 1 << 20
PULL_SLICE = 5000  # differing paths whose entries a pull holds and applies at a time
_T = TypeVar("_T")
# Failures that concern one path (refused as unsafe, or the disk said no): reported, skipped.
_PATH_ERRORS = (InvalidPathError, OSError)


class _UntrustedVersion(BackerError):
    """A version not signed with the folder's signing key: a read-only device made it."""


async def pull(
    replica: Replica,
    fetcher: Fetcher,
    remote_root: Hash,
    *,
    emit: Emit = ignore,
    report: PullReport | None = None,
) -> PullReport:
    """Pull everything `remote_root` has that this replica lacks or has older, telling `emit`
    about each path written, each conflict and the progress of large files. Raises the first
    failure plainly (RemoteProtocolError, PeerMovedOn...), never an exception group."""
    async with replica.pulling():
        try:
            done = await _Pull(replica, fetcher, emit, report or PullReport()).run(remote_root)
        except BaseExceptionGroup as group:
            raise first_leaf(group) from None
        if not done.errors and not done.skipped:
            replica.store.note_covered(remote_root)  # every path of it was decided and applied
        return done


class _Pull:
    def __init__(self, replica: Replica, fetcher: Fetcher, emit: Emit, report: PullReport) -> None:
        self.replica = replica
        self.emit = emit
        self.label = str(replica.folder)
        self.store = replica.store
        self.disk = replica.disk
        self.fetcher = fetcher
        self.report = report  # live: the node's status reads it while the pull runs
        self.pending: list[Record] = []
        self.rescan: list[str] = []
        self.current: dict[str, Record] = {}  # local records of the pulled paths, read first
        # Pulled paths that stay a file or symlink here: a peer's live entry below one of them
        # makes it a directory again (`_reclaim`).
        self.nondirs: set[str] = set()
        self.files = asyncio.Semaphore(FILES_IN_FLIGHT)
        self.records_left = PULL_CHUNK_RECORDS  # chunk records this pull may still expand
        self.assembler = Assembler(replica, fetcher, self.report, emit)
        self.moves = MovePlanner()  # deletions whose files can become new paths by a rename

    async def run(self, remote_root: Hash) -> PullReport:
        if not (self.replica.folder / RESERVED_DIR).is_dir():
            raise FolderMissingError(f"{self.replica.folder} lost its {RESERVED_DIR}/ marker")
        found = await self._walk(remote_root)
        if not found:
            return self.report
        # Slices of the tree's differing paths, parents first: a 100,000-file pull held every
        # entry (twice, wire and whole) at once, 223 MB on the copy. Removals wait for the
        # end, so a file moved into a later slice still finds its content at its old path.
        # Plain string order keeps parents first (a path sorts before every path it prefixes)
        # without a list of components per path: those keys were 20 MB at 100,000 paths.
        found.sort()
        removals = _Removals()
        parts = list(_batches(found, PULL_SLICE))
        # The next slice's entries are fetched and their signatures checked while this one is
        # applied: both only read the peer's versions, and they were 15 % of a slice's time.
        ahead: asyncio.Task[tuple[list[RemoteEntry], dict[str, Record]]] | None = None
        try:
            for index, part in enumerate(parts):
                admitted, local = await (ahead if ahead is not None else self._admitted(part))
                ahead = None
                if index + 1 < len(parts):
                    ahead = asyncio.create_task(self._admitted(parts[index + 1]))
                entries = await self._chunk_lists(self._capped(admitted), local)
                await self._apply(entries, removals)
                await self._commit()
            await self._remove(removals)
        finally:
            if ahead is not None:
                ahead.cancel()
                await asyncio.wait([ahead])  # its end, whatever it was: a slice never applied
            await self._commit()
            if self.rescan:
                await self.replica.scan_locked(self.rescan)
        return self.report  # `Replica.pulling` announces the new root

    # -- learning what differs ---------------------------------------------------------------

    async def _walk(self, remote_root: Hash) -> list[tuple[str, Hash]]:
        walk = merkle.PullWalk(self.store.read_node, self.store.root, remote_root)
        while not walk.done:
            needed = walk.needed()
            fetched: dict[Hash, bytes] = {}
            for part in await asyncio.gather(
                *(self.fetcher.nodes(batch) for batch in _batches(needed, NODE_BATCH))
            ):
                fetched.update(part)
            if len(fetched) < len(needed):
                raise PeerMovedOn("the peer no longer has a tree node it announced")
            try:
                await asyncio.to_thread(walk.advance, fetched)
            except DecodeError as exc:
                raise RemoteProtocolError(f"the peer's tree is malformed: {exc}") from exc
        self.report.nodes = walk.nodes_fetched
        return walk.found

    async def _admitted(
        self, part: list[tuple[str, Hash]]
    ) -> tuple[list[RemoteEntry], dict[str, Record]]:
        """A slice's entries, asked with or without inline chunk lists by what is here, their
        signatures checked; and the slice's local records (read ahead of the slices before it
        are applied: they serve as content-addressed chunk-list groups, checked by hash)."""
        local = await asyncio.to_thread(self.store.get_many, [p for p, _ in part])
        asked = await self._entries(part, inline=inline_wanted(part, local))
        return await self._authorized(asked), local

    async def _entries(self, found: list[tuple[str, Hash]], *, inline: bool) -> list[RemoteEntry]:
        remote: list[RemoteEntry] = []
        for part in await asyncio.gather(
            *(self.fetcher.entries(batch, inline=inline) for batch in _batches(found, ENTRY_BATCH))
        ):
            remote.extend(part)
        self.report.entries += len(remote)
        self.report.skipped += len(found) - len(remote)  # no peer answered them: left for later
        return remote

    async def _authorized(self, remote: list[RemoteEntry]) -> list[RemoteEntry]:
        """The entries signed with the folder's key, checked on their wire form (the leaf hash
        covers the group hashes), before a chunk list is fetched or expanded."""
        trusted = await asyncio.to_thread(lambda: [self.replica.trusted(i) for i in remote])
        admitted = []
        for item, ok in zip(remote, trusted, strict=True):
            if ok:
                admitted.append(item)
            else:
                self.report.refused += 1
                self._failed(item.path, _UntrustedVersion("not signed with the folder's key"))
        return admitted

    def _capped(self, remote: list[RemoteEntry]) -> list[RemoteEntry]:
        """`remote` within this pull's chunk-record budget: files whose chunk lists must be
        fetched are taken while their declared sizes fit it; the rest wait for the next pull."""
        taken: list[RemoteEntry] = []
        for item in remote:
            if item.chunks is None and item.groups:
                records = max_chunk_records(item.size)
                if records > self.records_left and self.records_left < PULL_CHUNK_RECORDS:
                    self.report.deferred += 1
                    continue
                self.records_left -= records
            taken.append(item)
        return taken

    async def _chunk_lists(
        self, remote: list[RemoteEntry], local: dict[str, Record]
    ) -> list[Entry]:
        """Whole entries: inline chunk lists as sent, others from fetched groups and those of
        the slice's local files (a file's older version, or a moved file's own list),
        assembled in a worker thread (a long list must not hold up the event loop)."""
        need: list[RemoteEntry] = []
        entries: list[Entry] = []
        for item in remote:
            inline = item.inline_entry()  # at most MAX_INLINE_CHUNKS bytes: cheap on the loop
            if inline is not None:
                entries.append(inline)
            else:
                need.append(item)
        have = await asyncio.to_thread(local_groups, local.values()) if need else {}
        missing = list(dict.fromkeys(g for item in need for g in item.groups if g not in have))
        for part in await asyncio.gather(
            *(self.fetcher.groups(batch) for batch in _batches(missing, GROUP_BATCH))
        ):
            have.update(part)
        complete = [item for item in need if all(g in have for g in item.groups)]
        self.report.skipped += len(need) - len(complete)
        entries += await asyncio.to_thread(_assembled, complete, have)
        return entries

    # -- applying ----------------------------------------------------------------------------

    async def _apply(self, entries: list[Entry], removals: _Removals) -> None:
        """Write what `entries` bring; what they remove or replace by another kind is added
        to `removals`, for the end of the pull."""
        self.current = await self._currents([e.path for e in entries])
        self.moves.offer(entries, self.current)
        async with asyncio.TaskGroup() as files:
            for remote in sorted(entries, key=lambda e: e.path.split("/")):
                try:
                    await self._decide_and_apply(
                        remote, files, removals.deletions, removals.blocked
                    )
                except _PATH_ERRORS as exc:
                    self._failed(remote.path, exc)
            await self._move_planned(files)

    async def _remove(self, removals: _Removals) -> None:
        deletions, blocked = removals.deletions, removals.blocked
        # Deepest first: a directory's children are gone before the directory is removed.
        for decision, record in sorted(deletions, key=_result_path, reverse=True):
            try:
                await self._delete(decision, record)
            except _PATH_ERRORS as exc:
                self._failed(_result_path((decision, record)), exc)
        for decision, record, remote in blocked:
            try:
                await self._replace_kind(decision, record, remote)
            except _PATH_ERRORS as exc:
                self._failed(remote.path, exc)

    async def _decide_and_apply(
        self,
        remote: Entry,
        files: asyncio.TaskGroup,
        deletions: list[tuple[Decision, Record | None]],
        blocked: list[tuple[Decision, Record | None, Entry]],
    ) -> None:
        record = self.current.get(remote.path)
        decision = decide(record.entry if record else None, remote)
        result = decision.result
        if result is not None and not result.deleted and not await self._parents_kept(result):
            return
        if (
            decision.action is not Action.WRITE_REMOTE
            and record
            and not record.entry.deleted
            and record.entry.kind is not Kind.DIR
        ):
            self.nondirs.add(remote.path)
        kept_aside = False
        if decision.conflict_copy is not None:
            self.report.conflicts += 1
            self.emit(
                ConflictFound(folder=self.label, path=remote.path, copy=decision.conflict_copy.path)
            )
            try:
                kept_aside = await self._conflict_copy(decision, remote, files)
            except ChangedMeanwhile:
                self._changed_meanwhile(remote.path)
                return
        if result is None:
            return
        if decision.action is not Action.WRITE_REMOTE:
            self._record(result, record.local if record else LocalState())
        elif result.deleted:
            deletions.append((decision, record))
        elif result.kind is Kind.DIR:
            if (  # a file became a directory: unless it was edited meanwhile
                record
                and not record.entry.deleted
                and record.entry.kind is not Kind.DIR
                and not await self._removed(result.path, record)
            ):
                return
            made = await asyncio.to_thread(self.disk.make_dir, result.path, result.mode)
            self.replica.recent.made_dir(result.path, made)
            self._record(result, LocalState())
            self.report.dirs += 1
            self._updated(result.path, "dir")
        elif record and not record.entry.deleted and record.entry.kind is Kind.DIR:
            blocked.append((decision, record, remote))  # a directory must go first
        elif result.kind is Kind.SYMLINK:
            await self._symlink(result, _expected(record), keep_old=not kept_aside)
        elif (record is None or record.entry.deleted) and self.moves.plan(result, remote):
            return  # renamed from a deleted path with the same content, with the slice's others
        else:
            self.report.planned_files += 1
            self.report.planned_bytes += result.size
            await self.files.acquire()
            # A loser kept aside lives on in its copy: nothing to archive.
            expected, keep_old = _expected(record), not kept_aside
            files.create_task(self._file(result, result.path, remote, expected, keep_old=keep_old))

    def _updated(self, path: str, action: str) -> None:
        self.emit(FileUpdated(folder=self.label, path=path, action=action))

    def _changed_meanwhile(self, path: str) -> None:
        self.report.skipped += 1
        self.rescan.append(path)  # the local edit is indexed, and the next pull decides

    def _edit_kept(self, path: str, copy: str) -> None:
        """A local edit met the swap that installed `path`: it lives on in `copy`, indexed as
        a new local file (so it syncs) once the pull ends."""
        self.report.conflicts += 1
        self.emit(ConflictFound(folder=self.label, path=path, copy=copy))
        self.rescan.append(copy)

    def _failed(self, path: str, exc: BaseException) -> None:
        self.report.errors.append(f"{path}: {exc}")

    async def _currents(self, paths: list[str]) -> dict[str, Record]:
        """The local records of `paths`, read at once before anything is applied (a pull holds
        the folder's lock, so only the pull itself changes them afterwards); paths whose disk
        moved since they were indexed are rescanned first, so a local edit becomes a conflict
        rather than being overwritten."""

        def read() -> tuple[dict[str, Record], list[str]]:
            records = self.store.get_many(paths)
            moved = [p for p in paths if not _disk_matches(records.get(p), self.disk.lstat(p))]
            return records, moved

        records, moved = await asyncio.to_thread(read)
        if moved:
            await self.replica.scan_locked(moved)
            fresh = await asyncio.to_thread(self.store.get_many, moved)
            for path in moved:
                if path in fresh:
                    records[path] = fresh[path]
                else:
                    records.pop(path, None)
        return records

    async def _conflict_copy(
        self, decision: Decision, remote: Entry, files: asyncio.TaskGroup
    ) -> bool:
        """Make the decision's conflict copy; True if the local loser was copied aside (it
        stays at its path until the winner replaces it, and needs no version then)."""
        copy = decision.conflict_copy
        assert copy is not None
        if decision.copy_from == "local":
            if copy.kind is Kind.SYMLINK or copy.kind is Kind.FILE:
                await self._copy_aside(remote.path, copy.path)
                self._record(copy, LocalState())
                self.rescan.append(copy.path)  # its stat is recorded by reading it once more
                return True
            return False
        if copy.kind is Kind.SYMLINK:
            await self._symlink(copy, None)
        elif copy.kind is Kind.FILE:
            await self.files.acquire()
            files.create_task(self._file(copy, copy.path, remote, None))
        return False

    async def _copy_aside(self, path: str, copy: str) -> None:
        try:
            await asyncio.to_thread(self.disk.copy_aside, path, copy)
        except FileExistsError:
            # The copy's name is taken (the same conflict was resolved elsewhere and its copy
            # then edited, or a user made the file): keep that file too.
            await asyncio.to_thread(self._archive, copy)
            await asyncio.to_thread(self.disk.copy_aside, path, copy)

    async def _parents_kept(self, entry: Entry) -> bool:
        """Make a directory again of a file or symlink of ours above `entry` (this pull kept
        it), since the peer has a live entry below it; False if that failed or met an edit."""
        parts = entry.path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in self.nondirs:
                self.nondirs.discard(parent)
                await self._commit()  # its record as this pull decided it
                kept = await asyncio.to_thread(self.store.get, parent)
                if kept is None or kept.entry.deleted or kept.entry.kind is Kind.DIR:
                    return True
                return await self._reclaim(kept)
        return True

    async def _reclaim(self, kept: Record) -> bool:
        """Issue 14.4, the side that replaced a directory by a file while a peer edited in it:
        the edit wins, the directory comes back, and the file moves to its conflict copy
        (`merge.reclaimed_directory`), as the peer decides in `_keep_directory_over`."""
        path = kept.entry.path
        now = int(self.replica.clock())
        directory, copy = reclaimed_directory(kept.entry, self.replica.device, now)
        try:
            await self._copy_aside(path, copy.path)
        except ChangedMeanwhile:
            self._changed_meanwhile(path)
            return False
        self.rescan.append(copy.path)  # indexed by reading it, as any local copy aside
        if not await self._removed(path, kept):
            return False
        await asyncio.to_thread(self.disk.make_dir, path, directory.mode)
        self._record(directory, LocalState())
        self._record(copy, LocalState())
        self.report.conflicts += 1
        self.emit(ConflictFound(folder=self.label, path=path, copy=copy.path))
        return True

    async def _keep_directory_over(self, record: Record, result: Entry, remote: Entry) -> None:
        """Issue 14.4, the side that edited in a directory a peer replaced by a file or
        symlink: the directory stays (a new local change that wins on the peer), and the
        peer's file or symlink is fetched into its conflict copy, the one the peer makes."""
        now = int(self.replica.clock())
        self._record(keep_directory(record.entry, result, self.replica.device, now), record.local)
        copy = replace(result, path=conflict_path(result), signature=b"")
        self.report.conflicts += 1
        self.emit(ConflictFound(folder=self.label, path=result.path, copy=copy.path))
        if copy.kind is Kind.SYMLINK:
            await self._symlink(copy, None)
        else:
            await self.files.acquire()
            await self._file(copy, copy.path, remote, None)

    async def _symlink(self, entry: Entry, expected: Expected, *, keep_old: bool = True) -> None:
        install = functools.partial(
            self.disk.install_symlink, entry.path, entry.target, expected, keep_old=keep_old
        )
        try:
            kept = await asyncio.to_thread(install)
        except ChangedMeanwhile:
            self._changed_meanwhile(entry.path)
            return
        self._record(entry, LocalState())
        self.report.symlinks += 1
        self._updated(entry.path, "symlink")
        if kept is not None:
            self._edit_kept(entry.path, kept)

    async def _file(
        self,
        entry: Entry,
        dest: str,
        source: Entry,
        expected: Expected,
        *,
        keep_old: bool = True,
    ) -> None:
        """Assemble `source`'s content into `dest` and record it as `entry`."""
        try:
            installed = await self.assembler.assemble(
                entry, dest, source, expected, keep_old=keep_old
            )
        except ChunkGone:
            self.report.skipped += 1
            return
        except ChangedMeanwhile:
            self._changed_meanwhile(dest)
            return
        except _PATH_ERRORS as exc:
            self._failed(dest, exc)
            return
        finally:
            self.files.release()
        self._record(entry, LocalState(stat=installed.sig))
        if dest == entry.path:
            self.replica.recent.wrote_file(dest, installed.sig)
        self.report.files += 1
        self._updated(dest, "file")
        if installed.edit_kept is not None:
            self._edit_kept(dest, installed.edit_kept)
        if len(self.pending) >= COMMIT_EVERY:
            await self._commit()

    async def _move_planned(self, files: asyncio.TaskGroup) -> None:
        """Rename the files the slice moves, in one worker-thread hop; one that did not move
        (it changed, or its new path was taken) is built as usual."""
        planned = self.moves.take_planned()
        if not planned:
            return
        outcomes = await asyncio.to_thread(move_files, self.disk, planned)
        for item, outcome in zip(planned, outcomes, strict=True):
            entry = item.entry
            if isinstance(outcome, ChangedMeanwhile):
                self._changed_meanwhile(entry.path)
            elif isinstance(outcome, BaseException):
                self._failed(entry.path, outcome)
            elif outcome is None:
                self.report.planned_files += 1
                self.report.planned_bytes += entry.size
                await self.files.acquire()
                files.create_task(self._file(entry, entry.path, item.remote, None))
            else:
                self.moves.moved(item.move)
                moved_between = (parent_of(item.move.source), parent_of(entry.path))
                self.assembler.dirty_dirs.update(moved_between)
                self._record(entry, LocalState(stat=outcome))
                self.report.files += 1
                self._updated(entry.path, "file")

    async def _delete(self, decision: Decision, record: Record | None) -> None:
        result = decision.result
        assert result is not None
        if record is None or record.entry.deleted:
            self._record(result, LocalState())
            return
        if self.moves.moved_away(result.path):
            pass  # its file lives on at the path it was renamed to
        elif record.entry.kind is Kind.DIR:
            await self._commit()  # the children's tombstones are recorded first
            if not await asyncio.to_thread(self.disk.remove_dir, result.path):
                kept = keep_directory(
                    record.entry, result, self.replica.device, int(self.replica.clock())
                )
                self._record(kept, record.local)
                return
        elif not await self._removed(result.path, record, sync=False):  # fsynced by the commit
            return  # edit beats delete: the edit is indexed and wins
        self._record(result, LocalState())
        self.report.deleted += 1
        self._updated(result.path, "deleted")

    async def _replace_kind(self, decision: Decision, record: Record | None, remote: Entry) -> None:
        """A path changes between directory and file/symlink: the old one must go first."""
        result = decision.result
        assert result is not None and record is not None
        if record.entry.kind is Kind.DIR:
            await self._commit()
            if not await asyncio.to_thread(self.disk.remove_dir, result.path):
                await self._keep_directory_over(record, result, remote)  # a live entry in it
                return
        elif not await self._removed(result.path, record):
            return
        if result.kind is Kind.DIR:
            made = await asyncio.to_thread(self.disk.make_dir, result.path, result.mode)
            self.replica.recent.made_dir(result.path, made)
            self._record(result, LocalState())
        elif result.kind is Kind.SYMLINK:
            await self._symlink(result, None)
        else:
            await self.files.acquire()
            await self._file(result, result.path, remote, None)

    async def _removed(self, path: str, record: Record, *, sync: bool = True) -> bool:
        """Remove the file or symlink at `path` if it is what `record` says; False if a local
        edit is there instead (it stays, is indexed, and wins)."""
        remove = functools.partial(self.disk.remove, path, _expected(record), sync=sync)
        try:
            await asyncio.to_thread(remove)
        except ChangedMeanwhile:
            self._changed_meanwhile(path)
            return False
        return True

    def _archive(self, path: str) -> None:
        """Move what is at `path` (a file or symlink) into the versions area."""
        with contextlib.suppress(IsADirectoryError):
            self.replica.versions.archive(path, self.replica.clock())

    def _record(self, entry: Entry, local: LocalState) -> None:
        self.pending.append(Record(entry, local))

    async def _commit(self) -> None:
        if self.pending:
            batch, self.pending = self.pending, []
            dirs, self.assembler.dirty_dirs = self.assembler.dirty_dirs, set()
            await asyncio.to_thread(self._durable_commit, batch, dirs)

    def _durable_commit(self, batch: list[Record], dirs: set[str]) -> None:
        # The renames are on disk before the index says they happened.
        self.disk.sync_dirs(dirs)
        self.replica.versions.sync_pending()
        self.store.commit(batch)


def _assembled(remote: list[RemoteEntry], groups: dict[Hash, bytes]) -> list[Entry]:
    """The whole entries, each chunk list counted before it is joined (RemoteProtocolError
    for one that would exceed what its size allows)."""
    entries = []
    for item in remote:
        item.check_groups(groups)
        entries.append(item.to_entry(b"".join(groups[g] for g in item.groups)))
    return entries


@dataclass(slots=True)
class _Removals:
    """What a pull removes, kept for its end: deletions, and paths whose kind changes to or
    from a directory (the old one must go first)."""

    deletions: list[tuple[Decision, Record | None]] = field(default_factory=list)
    blocked: list[tuple[Decision, Record | None, Entry]] = field(default_factory=list)


def _expected(record: Record | None) -> Expected:
    """What must still be at a record's path when it is replaced or removed: the file's stat,
    the symlink's target, or nothing."""
    if record is None or record.entry.deleted:
        return None
    if record.entry.kind is Kind.SYMLINK:
        return SymlinkTo(record.entry.target)
    return record.local.stat if record.entry.kind is Kind.FILE else None


def _disk_matches(record: Record | None, st: os.stat_result | None) -> bool:
    """Whether the disk still holds what the index says (else: a local edit not yet scanned)."""
    if record is None or record.entry.deleted:
        return st is None
    if st is None:
        return False
    kind = record.entry.kind
    if kind is Kind.FILE:
        return record.local.stat == StatSig.of(st)
    return (kind is Kind.DIR) == stat_mod.S_ISDIR(st.st_mode) and (
        kind is not Kind.SYMLINK or stat_mod.S_ISLNK(st.st_mode)
    )


def _result_path(item: tuple[Decision, Record | None]) -> str:
    result = item[0].result
    return "" if result is None else result.path


def _batches(items: Iterable[_T], size: int) -> list[list[_T]]:
    listed = list(items)
    return [listed[i : i + size] for i in range(0, len(listed), size)]
