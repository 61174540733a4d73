"""Building one pulled file: a temp file filled from the chunks this folder already has, the
chunks an abandoned attempt left, and the chunks fetched from peers, then sealed into place.

Owns the pull's byte window and the runs a file's missing chunks are asked in (the chunk is
the unit of dedup and verification, the run of transfer), resuming from kept temp
files and progress events; the disk swaps the file in (checking what it replaces). Imports
index, events and sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from backer.errors import BackerError
from backer.events import Emit, FileProgress
from backer.ids import Hash
from backer.index.chunker import hash_chunk
from backer.index.entry import Entry, iter_chunks
from backer.index.store import StatSig, chunk_key
from backer.paths import parent_of
from backer.protocol.messages import MAX_BATCH_CHUNKS
from backer.sync.batch import ThreadBatcher
from backer.sync.disk import ChangedMeanwhile, Installed, seal
from backer.sync.fetcher import Fetcher, PullReport
from backer.sync.joined import JoinedChunks
from backer.sync.replica import Replica
from backer.sync.room import make_room
from backer.sync.swap import Expected, start_writeback, sync_filesystems

__all__ = [
    "RUN_BYTES",
    "WINDOW_BYTES",
    "Assembler",
    "ChangedMeanwhile",
    "ChunkGone",
    "first_leaf",
]

WINDOW_BYTES = 8 * 1024 * 1024  # chunks of one pull asked and not yet received
RUN_BYTES = 1024 * 1024  # the missing chunks of a file are asked for this much at a time
DISK_BATCH = 64  # files started, or sealed and swapped in, with one worker-thread hop
LOCAL_BATCH = 256  # chunks this folder already has, looked up at a time
VERIFY_BLOCK = 4 * 1024 * 1024  # chunks copied from local files are read back this much at a time
WRITE_ON_LOOP = 64 * 1024  # a run is written in a worker thread, unless this little
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}
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
        self.window = _Window(WINDOW_BYTES)
        self.joined = JoinedChunks(fetcher)  # small files' runs, fetched together
        self.dirty_dirs: set[str] = set()  # directories renamed into, not yet fsynced
        # Files started or finished together share one worker-thread hop, and a batch of
        # finished files one durability barrier (STYLE.md 17): with thousands of small files
        # the hops and fsyncs, not the bytes, set the pace.
        self._preparing: ThreadBatcher[tuple[Entry, Entry], _Prepared] = ThreadBatcher(
            lambda items: _each(lambda item: self._prepare(*item), items),
            max_items=DISK_BATCH,
            unclaimed=lambda prepared: _discard(prepared[0], prepared[1]),
        )
        self._finishing: ThreadBatcher[_Built, Installed] = ThreadBatcher(
            self._finish_batch, max_items=DISK_BATCH
        )

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
        fd, temp, missing = await self._preparing.submit((entry, source))
        progress = _Progress(self, dest, source.size, missing)
        try:
            runs = _runs(missing)
            try:
                if len(runs) == 1:  # most files: no task group, no task
                    await self.window.take(_bytes_of(runs[0]))
                    await self._fetch_run(fd, runs[0], progress)
                else:
                    async with asyncio.TaskGroup() as fetches:
                        for run in runs:
                            await self.window.take(_bytes_of(run))
                            fetches.create_task(self._fetch_run(fd, run, progress))
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
        built = _Built(fd, temp, entry, dest, source.size, expected, keep_old)
        return await self._finishing.submit(built)

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
        """Copy every chunk this folder already holds into the temp file, in the kernel
        (`copy_file_range`; neighbouring chunks of one file in one call), then check each
        copied chunk against its hash; return (offset, hash, size) of the rest. A chunk
        already in place (left by an abandoned attempt) is kept if it hashes right."""
        records = list(_placed(chunks))
        resumable = os.fstat(fd).st_size
        runs, unplaced = self._plan_runs(records)
        copied: list[tuple[int, Hash, int]] = []
        trusted = self.replica.store.trusted_stats({run.path for run in runs})
        with self.disk.opener() as open_regular:
            for run in runs:
                source_fd = open_regular(run.path)
                if source_fd is None:
                    unplaced += run.records
                    continue
                before = StatSig.of(os.fstat(source_fd))
                if _copy_range(source_fd, fd, run) != run.length:
                    unplaced += run.records
                elif trusted.get(run.path) == before == StatSig.of(os.fstat(source_fd)):
                    # Unchanged since its scan by the scanner's own test: the bytes copied
                    # are the chunks the index lists, as a rescan would have trusted them.
                    self.report.bytes_local += run.length
                else:
                    copied += run.records
        unplaced += _unverified(fd, copied, self.report)  # local files changed since their scan
        missing = []
        for offset, digest, size in sorted(unplaced):
            if offset + size <= resumable and hash_chunk(os.pread(fd, size, offset)) == digest:
                self.report.bytes_local += size
            else:
                missing.append((offset, digest, size))
        return missing

    def _plan_runs(
        self, records: list[tuple[int, Hash, int]]
    ) -> tuple[list[_Run], list[tuple[int, Hash, int]]]:
        """Where each chunk can be copied from (the index's hints), in runs of chunks that lie
        one after another in one local file; the chunks found nowhere."""
        runs: list[_Run] = []
        unplaced = []
        # In batches: a large file's chunk places, looked up all at once, would fill memory.
        for start in range(0, len(records), LOCAL_BATCH):
            batch = records[start : start + LOCAL_BATCH]
            places = self.replica.store.find_chunks(digest for _, digest, _ in batch)
            for offset, digest, size in batch:
                candidates = [p for p in places.get(chunk_key(digest), ()) if p.size == size]
                if not candidates:
                    unplaced.append((offset, digest, size))
                    continue
                last = runs[-1] if runs else None
                follows = (
                    None
                    if last is None or offset != last.offset + last.length
                    else next(
                        (p for p in candidates if (p.path, p.offset) == last.source_end),
                        None,
                    )
                )
                if last is not None and follows is not None:
                    last.length += size
                    last.records.append((offset, digest, size))
                else:
                    place = candidates[0]
                    runs.append(
                        _Run(place.path, place.offset, offset, size, [(offset, digest, size)])
                    )
        return runs, unplaced

    async def _fetch_run(
        self, fd: int, run: list[tuple[int, Hash, int]], progress: _Progress
    ) -> None:
        """Fetch a run of a file's missing chunks with one request and write them."""
        size = _bytes_of(run)
        try:
            fetch = self.joined.chunks if size < WRITE_ON_LOOP else self.fetcher.chunks
            found = await fetch([(digest, length) for _, digest, length in run])
        finally:
            self.window.give(size)
        if len(found) < len({digest for _, digest, _ in run}):
            raise ChunkGone(next(d.hex() for _, d, _ in run if d not in found))
        writes = [(offset, found[digest]) for offset, digest, _ in run]
        if size < WRITE_ON_LOOP:
            _write_all(fd, writes)  # a small file's chunk or two: cheaper than a thread hop
        else:
            await asyncio.to_thread(_write_and_start_writeback, fd, writes)
        self.report.bytes_fetched += size
        progress.add(size)

    def _finish_batch(self, batch: Sequence[_Built]) -> list[Installed | BaseException]:
        """Seal each built file into its place, unless its place changed since the pull
        decided: every file sized and given its mode and mtime, then one durability barrier
        for all of them (their data is on disk before any is renamed), then each swapped in."""
        sealed: list[_Built] = []
        results: dict[int, Installed | BaseException] = {}
        for index, built in enumerate(batch):
            try:
                os.ftruncate(built.fd, built.size)
                seal(built.fd, mode=built.entry.mode, mtime_ns=built.entry.mtime_ns)
                sealed.append(built)
            except OSError as exc:
                _discard(built.fd, built.temp)
                results[index] = exc
        try:
            sync_filesystems([built.fd for built in sealed])
        except OSError as exc:
            for built in sealed:
                _discard(built.fd, built.temp)
            return [exc] * len(batch)
        for index, built in enumerate(batch):
            if index in results:
                continue
            self.dirty_dirs.add(parent_of(built.dest))
            try:
                results[index] = self.disk.install_file(
                    built.fd,
                    built.temp,
                    built.dest,
                    mode=built.entry.mode,
                    mtime_ns=built.entry.mtime_ns,
                    expected=built.expected,
                    keep_old=built.keep_old,
                    sync_dir=False,
                    sealed=True,
                )
            except Exception as exc:  # that file's alone: ChangedMeanwhile, a path refused...
                results[index] = exc
        return [results[index] for index in range(len(batch))]


@dataclass(frozen=True, slots=True)
class _Built:
    """A temp file holding every chunk of `entry`, to be sealed into `dest`."""

    fd: int
    temp: Path
    entry: Entry
    dest: str
    size: int
    expected: Expected
    keep_old: bool


_Prepared = tuple[int, Path, list[tuple[int, Hash, int]]]
_T = TypeVar("_T")
_R = TypeVar("_R")


def _each(work: Callable[[_T], _R], items: Sequence[_T]) -> list[_R | BaseException]:
    """`work` over each item, each failure kept as that item's result."""
    results: list[_R | BaseException] = []
    for item in items:
        try:
            results.append(work(item))
        except Exception as exc:
            results.append(exc)
    return results


@dataclass(slots=True)
class _Run:
    """Chunks that lie one after another both in a local file and in the file being built."""

    path: str  # the local file
    source_offset: int
    offset: int  # in the file being built
    length: int
    records: list[tuple[int, Hash, int]]

    @property
    def source_end(self) -> tuple[str, int]:
        return self.path, self.source_offset + self.length


def _placed(chunks: bytes) -> Iterator[tuple[int, Hash, int]]:
    """(offset, hash, size) of each chunk of a packed chunk list."""
    offset = 0
    for digest, size in iter_chunks(chunks):
        yield offset, digest, size
        offset += size


def _copy_range(source_fd: int, fd: int, run: _Run) -> int:
    """Copy a run in the kernel; by reads and writes where the kernel cannot (another
    filesystem on an older kernel). Returns the bytes copied: fewer if the source is shorter
    now than its index says."""
    done = 0
    while done < run.length:
        at, to, left = run.source_offset + done, run.offset + done, run.length - done
        try:
            copied = os.copy_file_range(source_fd, fd, left, at, to)
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
            data = os.pread(source_fd, min(left, VERIFY_BLOCK), at)
            copied = os.pwrite(fd, data, to) if data else 0
        if copied == 0:
            break
        done += copied
    return done


def _unverified(
    fd: int, copied: list[tuple[int, Hash, int]], report: PullReport
) -> list[tuple[int, Hash, int]]:
    """Read the copied chunks back a block at a time and hash each (the index's places are
    hints: a local file may have changed since its last scan); those that do not match."""
    wrong: list[tuple[int, Hash, int]] = []
    if not copied:
        return wrong
    last_offset, _, last_size = copied[-1]
    view = memoryview(bytearray(min(VERIFY_BLOCK, last_offset + last_size - copied[0][0])))
    start = 0
    while start < len(copied):
        first = copied[start][0]
        end = start + 1  # one chunk always fits: VERIFY_BLOCK > MAX_CHUNK
        while (
            end < len(copied)
            and copied[end][0] == copied[end - 1][0] + copied[end - 1][2]
            and copied[end][0] + copied[end][2] - first <= len(view)
        ):
            end += 1
        last_offset, _, last_size = copied[end - 1]
        got = os.preadv(fd, [view[: last_offset + last_size - first]], first)
        for offset, digest, size in copied[start:end]:
            at = offset - first
            if at + size <= got and hash_chunk(view[at : at + size]) == digest:
                report.bytes_local += size
            else:
                wrong.append((offset, digest, size))
        start = end
    return wrong


class _Window:
    """Bytes of chunks asked and not yet received, for one pull: a run waits for room (a run
    larger than the whole window waits for an empty one)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free = capacity
        self._changed = asyncio.Event()

    async def take(self, size: int) -> None:
        while self.free < min(size, self.capacity):
            self._changed.clear()
            await self._changed.wait()
        self.free -= size

    def give(self, size: int) -> None:
        self.free += size
        self._changed.set()


def _runs(missing: list[tuple[int, Hash, int]]) -> list[list[tuple[int, Hash, int]]]:
    """The missing chunks of a file, in requests of up to RUN_BYTES (the chunk is the unit of
    dedup and verification, the run the unit of transfer)."""
    runs: list[list[tuple[int, Hash, int]]] = []
    size = 0
    for record in missing:
        if not runs or size + record[2] > RUN_BYTES or len(runs[-1]) == MAX_BATCH_CHUNKS:
            runs.append([])
            size = 0
        runs[-1].append(record)
        size += record[2]
    return runs


def _bytes_of(run: list[tuple[int, Hash, int]]) -> int:
    return sum(size for _, _, size in run)


# Linux's limit on buffers per vectored write (os.sysconf('SC_IOV_MAX')).
_IOV_MAX = 1024


def _write_all(fd: int, items: list[tuple[int, bytes]]) -> None:
    """Write (offset, data) pieces; pieces that follow one another go out in one `pwritev`:
    a run of 64 chunks was 64 system calls, each giving up and winning back the GIL against a
    busy event loop."""
    start = 0
    while start < len(items):
        offset = items[start][0]
        end = start + 1
        while end < len(items) and end - start < _IOV_MAX:
            previous_offset, previous = items[end - 1]
            if items[end][0] != previous_offset + len(previous):
                break
            end += 1
        buffers = [data for _, data in items[start:end]]
        written = os.pwritev(fd, buffers, offset)
        if written < sum(len(data) for data in buffers):  # short write: finish byte by byte
            rest = memoryview(b"".join(buffers))[written:]
            offset += written
            while rest:
                done = os.pwrite(fd, rest, offset)
                rest, offset = rest[done:], offset + done
        start = end


def _write_and_start_writeback(fd: int, items: list[tuple[int, bytes]]) -> None:
    _write_all(fd, items)
    start = min(offset for offset, _ in items)
    start_writeback(fd, start, max(offset + len(data) for offset, data in items) - start)


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
