"""Building one pulled file: a temp file filled from the chunks this folder already has, the
chunks an abandoned attempt left, and the chunks fetched from peers, then sealed into place.

Owns the chunk window (how many chunk requests a pull keeps in flight), resuming from kept temp
files and progress events; the disk swaps the file in (checking what it replaces). Imports
index, events and sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from pathlib import Path

from backer.errors import BackerError
from backer.events import Emit, FileProgress
from backer.ids import Hash
from backer.index.chunker import hash_chunk
from backer.index.entry import Entry, iter_chunks
from backer.paths import parent_of
from backer.sync.disk import ChangedMeanwhile, Installed
from backer.sync.fetcher import Fetcher, PullReport
from backer.sync.replica import Replica
from backer.sync.room import make_room
from backer.sync.swap import Expected

__all__ = [
    "CHUNK_WINDOW",
    "Assembler",
    "ChangedMeanwhile",
    "ChunkGone",
    "first_leaf",
]

CHUNK_WINDOW = 64  # chunks in flight (about 1.5 MiB at the 24 KiB mean chunk)
LOCAL_BATCH = 256  # chunks this folder already has, read and written at a time (about 6 MiB)
PROGRESS_FROM = 4 * 1024 * 1024  # files this large report their progress...
PROGRESS_STEP = 4 * 1024 * 1024  # ...every this many bytes


class ChunkGone(BackerError):
    """A chunk the peer announced is no longer there: this file waits for the next pull."""


class Assembler:
    def __init__(
        self,
        replica: Replica,
        fetcher: Fetcher,
        report: PullReport,
        emit: Emit,
    ) -> None:
        self.replica = replica
        self.disk = replica.disk
        self.fetcher = fetcher
        self.report = report
        self.emit = emit
        self.label = str(replica.folder)
        self.window = asyncio.Semaphore(CHUNK_WINDOW)
        self.dirty_dirs: set[str] = set()  # directories renamed into, not yet fsynced

    async def assemble(
        self,
        entry: Entry,
        dest: str,
        source: Entry,
        expected: Expected,
        *,
        keep_old: bool = True,
    ) -> Installed:
        """Build `source`'s content into `dest` (recorded as `entry` by the caller); returns
        what `FolderDisk.install_file` did. `expected` is what must still be at `dest`;
        `keep_old=False` when what it replaces is kept elsewhere (a conflict copy) and needs
        no version."""
        fd, temp, missing = await asyncio.to_thread(self._prepare, entry, source)
        progress = _Progress(self, dest, source.size, missing)
        try:
            try:
                async with asyncio.TaskGroup() as fetches:
                    for offset, digest, size in missing:
                        await self.window.acquire()
                        fetches.create_task(self._fetch_into(fd, offset, digest, size, progress))
            except BaseExceptionGroup as group:
                # One plain exception for the caller, who decides per kind (a chunk gone, a
                # full disk...): a group would slip past its handlers and end the whole pull.
                raise first_leaf(group) from None
        except BaseException as exc:
            if _worth_keeping(exc):
                with contextlib.suppress(OSError):
                    os.close(fd)  # the verified chunks in it serve the next attempt
            else:
                _discard(fd, temp)
            raise
        return await asyncio.to_thread(
            functools.partial(
                self._finish,
                fd,
                temp,
                entry,
                dest=dest,
                size=source.size,
                expected=expected,
                keep_old=keep_old,
            )
        )

    def _prepare(
        self, entry: Entry, source: Entry
    ) -> tuple[int, Path, list[tuple[int, Hash, int]]]:
        """A temp file holding every chunk this folder (or an abandoned attempt at this very
        version) already has; what is still missing."""
        make_room(self.replica.versions, source.size)  # versions never make a pull fail
        key = entry.leaf_hash().hex()[:32]
        fd, temp = self.disk.temp_file(key, resume=True, dest=entry.path)
        try:
            return fd, temp, self._copy_local(fd, source.chunks)
        except BaseException:
            _discard(fd, temp)
            raise

    def _copy_local(self, fd: int, chunks: bytes) -> list[tuple[int, Hash, int]]:
        """Write every chunk this folder already holds; return (offset, hash, size) of the rest.
        A chunk already in place (left by an abandoned attempt) is kept if it hashes right."""
        missing = []
        offset = 0
        resumable = os.fstat(fd).st_size
        records = list(iter_chunks(chunks))
        # A batch at a time: a large file's chunks, all read at once, would all be in memory.
        for start in range(0, len(records), LOCAL_BATCH):
            batch = records[start : start + LOCAL_BATCH]
            for (digest, size), data in zip(batch, self.replica.read_chunks(batch), strict=True):
                if data is not None:
                    os.pwrite(fd, data, offset)
                    self.report.bytes_local += size
                elif (
                    offset + size <= resumable and hash_chunk(os.pread(fd, size, offset)) == digest
                ):
                    self.report.bytes_local += size
                else:
                    missing.append((offset, digest, size))
                offset += size
        return missing

    async def _fetch_into(
        self, fd: int, offset: int, digest: Hash, size: int, progress: _Progress
    ) -> None:
        try:
            data = await self.fetcher.chunk(digest, size)
        finally:
            self.window.release()
        if data is None:
            raise ChunkGone(digest.hex())
        os.pwrite(fd, data, offset)
        self.report.bytes_fetched += size
        progress.add(size)

    def _finish(
        self,
        fd: int,
        temp: Path,
        entry: Entry,
        *,
        dest: str,
        size: int,
        expected: Expected,
        keep_old: bool,
    ) -> Installed:
        """Seal the temp file into `dest`, unless `dest` changed since the pull decided."""
        try:
            os.ftruncate(fd, size)
        except BaseException:
            _discard(fd, temp)
            raise
        self.dirty_dirs.add(parent_of(dest))
        return self.disk.install_file(
            fd,
            temp,
            dest,
            mode=entry.mode,
            mtime_ns=entry.mtime_ns,
            expected=expected,
            keep_old=keep_old,
            sync_dir=False,
        )


class _Progress:
    """FileProgress events for one large file: one per PROGRESS_STEP bytes fetched."""

    def __init__(
        self, job: Assembler, path: str, total: int, missing: list[tuple[int, Hash, int]]
    ) -> None:
        self.job, self.path, self.total = job, path, total
        self.done = total - sum(size for _, _, size in missing)
        self.told = self.done
        self.enabled = total >= PROGRESS_FROM

    def add(self, size: int) -> None:
        self.done += size
        if self.enabled and (self.done - self.told >= PROGRESS_STEP or self.done == self.total):
            self.told = self.done
            self.job.emit(
                FileProgress(
                    folder=self.job.label, path=self.path, done=self.done, total=self.total
                )
            )


def first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first plain exception in a (nested) group: what a caller's handlers expect."""
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


def _worth_keeping(exc: BaseException) -> bool:
    """Whether a temp file abandoned by `exc` may serve a later attempt: yes when the transfer
    was cut (cancelled, a peer gone), no when the disk failed (it may be full)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_worth_keeping(inner) for inner in exc.exceptions)
    return not isinstance(exc, OSError)


def _discard(fd: int, temp: Path) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
    with contextlib.suppress(OSError):
        temp.unlink()
