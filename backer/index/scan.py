"""The scanner: walks a folder and brings its index up to date, in batches.

Owns the rules for what a change is: a file is re-read only when its stat (size, mtime_ns, inode,
ctime) changed or was too recent to trust; a vanished path becomes a tombstone; a file that
changes while it is read is left as it was and reported for a later rescan; names that are not
UTF-8, clash after NFC normalisation, or are special files are skipped with a reason.

A scan of named paths (the watcher's batches) costs a stat and an indexed lookup per path, not a
listing of its directory. All disk work runs in a worker thread (and hashing in a small pool), so
`scan` never blocks the event loop. What a scan writes to the index, and the deletion guard, is
`scan_records`'s. Imports only the index layer below it.
"""

from __future__ import annotations

import asyncio
import functools
import io
import os
import stat as stat_mod
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from backer.errors import FolderMissingError, InvalidPathError
from backer.ids import Hash
from backer.index.chunker import SMALL_FILE, chunk_bytes, chunk_stream
from backer.index.entry import Kind
from backer.index.ignore import IGNORE_FILE, IgnoreRules
from backer.index.scan_records import (
    MAX_DELETE_SHARE,
    Counts,
    DeletionWindow,
    Mounts,
    OnDisk,
    Recorder,
    Skipped,
)
from backer.index.store import IndexStore, Known, LocalState, StatSig
from backer.paths import RESERVED_DIR, check_name, check_path, join, parent_of

__all__ = ["ScanProgress", "ScanReport", "Skipped", "scan"]

# A file modified this close to the moment it was read may change again within the same
# timestamp tick without its stat changing; it is re-read on the next scan (git's "racy" files).
RACY_WINDOW_NS = 2_000_000_000
MAX_IN_FLIGHT = 64
INLINE_READ = 1024 * 1024  # files up to this size are hashed on the walking thread
PROGRESS_INTERVAL = 0.1


@dataclass(frozen=True, slots=True)
class ScanProgress:
    files_seen: int
    dirs_seen: int
    files_hashed: int
    bytes_hashed: int
    current: str


@dataclass(frozen=True, slots=True)
class ScanReport:
    root: Hash
    files: int  # live regular files seen
    dirs: int
    symlinks: int
    bytes: int  # total size of the files seen
    updated: int  # entries given a new version (created, changed, deleted)
    deleted: int  # of which new tombstones
    hashed_files: int
    hashed_bytes: int
    skipped: tuple[Skipped, ...]
    unstable: tuple[str, ...]  # kept changing while read; their old entry stands
    seconds: float


async def scan(
    folder: Path,
    store: IndexStore,
    *,
    device: int,
    paths: Iterable[str] | None = None,
    progress: Callable[[ScanProgress], None] | None = None,
    clock: Callable[[], float] = time.time,
    hash_workers: int = 2,
    allow_deletions: bool = False,
    max_delete_share: float = MAX_DELETE_SHARE,
    window: DeletionWindow | None = None,
) -> ScanReport:
    """Bring `store` up to date with `folder` (or just `paths` in it and below them).

    `device` is this device's short ID (the version-vector key); `clock` gives unix seconds for
    version counters; `progress` is called from the worker thread. When more than
    `max_delete_share` of the folder's paths vanish at once (and at least MASS_DELETE_MIN), the
    other changes are recorded and MassDeletionError is raised instead of the deletions, unless
    `allow_deletions`; `window` counts the paths earlier scans found vanished, towards that
    share. What vanished with its filesystem (a directory whose device changed, or a mount point
    gone) raises MountGoneError instead, unless `allow_deletions`.
    """
    job = _Scan(
        folder,
        store,
        device=device,
        progress=progress,
        clock=clock,
        workers=hash_workers,
        allow_deletions=allow_deletions,
        max_delete_share=max_delete_share,
        window=window,
    )
    return await asyncio.to_thread(job.run, None if paths is None else list(paths))


_Dir = tuple[str, str, int]  # a directory to list: its path, its path on disk, its device


@dataclass(slots=True)
class _Read:
    chunks: bytes = b""
    size: int = 0
    stat: os.stat_result | None = None
    problem: str = ""  # "" ok, "vanished", "unstable", or an error text


class _Scan:
    def __init__(
        self,
        folder: Path,
        store: IndexStore,
        *,
        device: int,
        progress: Callable[[ScanProgress], None] | None,
        clock: Callable[[], float],
        workers: int,
        allow_deletions: bool,
        max_delete_share: float,
        window: DeletionWindow | None,
    ) -> None:
        self.folder = folder
        self.root = str(folder)
        self.store = store
        self.device = device
        self.progress = progress
        self.clock = clock
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="backer-hash")
        self.counts = Counts()
        self.mounts = Mounts(store.devices())
        self.root_device = 0
        self.records = Recorder(
            folder,
            store,
            device=device,
            clock=clock,
            counts=self.counts,
            allow_deletions=allow_deletions,
            max_delete_share=max_delete_share,
            mounts=self.mounts,
            window=window,
        )
        self.in_flight: deque[tuple[str, str, bool, Future[_Read]]] = deque()
        self.rules = IgnoreRules()
        self.rules_text = b""  # the rules file as read, to tell a changed one
        self.last_progress = 0.0
        self.indexed: dict[str, Known | None] = {}  # looked up for anchors and disk names
        self.current = ""

    def run(self, paths: list[str] | None) -> ScanReport:
        started = time.monotonic()
        self._check_marker()
        self.rules = self._load_rules()
        if paths is not None and self.rules_text != self.store.ignore_rules_seen():
            paths = None  # what the new rules no longer ignore, or now do, may be anywhere
        self.root_device = self._device("", "")
        with self.pool:
            if paths is None:
                self._walk([("", "", self.root_device)])
            else:
                self._scan_paths(paths)
            self._drain(0)
            for path in self._retry_unstable():
                self.counts.unstable.append(path)
        self._check_marker()  # a disk unmounted mid-scan must not commit its "deletions"
        root = self.records.finish()
        if paths is None and self.rules_text != self.store.ignore_rules_seen():
            self.store.set_ignore_rules_seen(self.rules_text)
        c = self.counts
        return ScanReport(
            root=root,
            files=c.files,
            dirs=c.dirs,
            symlinks=c.symlinks,
            bytes=c.bytes,
            updated=c.updated,
            deleted=c.deleted,
            hashed_files=c.hashed_files,
            hashed_bytes=c.hashed_bytes,
            skipped=tuple(c.skipped),
            unstable=tuple(c.unstable),
            seconds=time.monotonic() - started,
        )

    # -- walking -------------------------------------------------------------------------------

    def _abs(self, disk_rel: str) -> str:
        return f"{self.root}/{disk_rel}" if disk_rel else self.root

    def _check_marker(self) -> None:
        if not (self.folder / RESERVED_DIR).is_dir():
            raise FolderMissingError(
                f"{self.folder / RESERVED_DIR} is missing: not scanning, so that an unmounted "
                "disk is not mistaken for deleted files"
            )

    def _load_rules(self) -> IgnoreRules:
        try:
            data = (self.folder / IGNORE_FILE).read_bytes()
            rules = IgnoreRules(data.decode("utf-8"))
            self.rules_text = data
            return rules
        except FileNotFoundError:
            return IgnoreRules()
        except (OSError, UnicodeDecodeError) as exc:
            self.counts.skipped.append(Skipped(IGNORE_FILE, f"unreadable, ignoring none: {exc}"))
            return IgnoreRules()

    def _device(self, rel: str, disk_rel: str) -> int:
        """The device of directory `rel` (the root, or the anchor of a path scan), noted."""
        device = os.stat(self._abs(disk_rel)).st_dev
        parent = os.stat(self._abs(parent_of(disk_rel))).st_dev if rel else None
        self.mounts.visit(rel, device, parent, indexed=True)
        return device

    def _walk(self, stack: list[_Dir]) -> None:
        while stack:
            stack.extend(self._scan_dir(*stack.pop(), None))

    def _scan_paths(self, paths: list[str]) -> None:
        """Rescan the named paths and what is below them, each from its nearest indexed
        directory. A name with a single possible spelling on disk costs one stat and one indexed
        lookup, whatever the size of its directory; the others cost one listing of their
        directory per batch (their disk spelling may differ from the NFC one)."""
        named = {check_path(unicodedata.normalize("NFC", path)) for path in paths}
        named = {path for path in named if not any(up in named for up in _ancestors(path))}
        self._learn({up for path in named for up in _ancestors(path)})
        groups: dict[str, set[str]] = {}
        for path in named:
            anchor, name = self._anchor(path)
            groups.setdefault(anchor, set()).add(name)
        for anchor, names in sorted(groups.items()):
            disk_anchor = self._disk_path(anchor)
            try:
                device = self._device(anchor, disk_anchor) if anchor else self.root_device
            except FileNotFoundError:
                continue  # gone since it was looked up: its parent's next scan sees it
            except OSError as exc:
                self.counts.skipped.append(Skipped(anchor, f"cannot stat directory: {exc}"))
                continue
            plain = {name for name in names if _one_spelling(name)}
            subdirs = self._scan_named(anchor, disk_anchor, device, plain) if plain else []
            if plain != names:
                subdirs += self._scan_dir(anchor, disk_anchor, device, names - plain)
            self._walk(subdirs)

    def _anchor(self, path: str) -> tuple[str, str]:
        """The nearest indexed directory above `path`, and the name in it that leads to it."""
        parent = parent_of(path)
        while parent:
            known = self.indexed.get(parent)
            if known and known.kind is Kind.DIR and not known.deleted:
                break
            path, parent = parent, parent_of(parent)
        return parent, path.rpartition("/")[2]

    def _learn(self, paths: set[str]) -> None:
        """Look up, in one batch, what the index holds of those of `paths` not looked up yet."""
        missing = paths - self.indexed.keys()
        if missing:
            self.indexed.update(dict.fromkeys(missing))
            self.indexed.update(self.store.known_many(missing))

    def _disk_path(self, rel: str) -> str:
        if not rel:
            return ""
        self._learn({rel, *_ancestors(rel)})
        known = self.indexed[rel]
        name = rel.rpartition("/")[2]
        if known and known.local.disk_name:
            name = known.local.disk_name
        return join(self._disk_path(parent_of(rel)), name)

    def _scan_dir(self, rel: str, disk_rel: str, device: int, only: set[str] | None) -> list[_Dir]:
        """Index the children of one directory (or its children named `only`) from a listing
        of it; return the subdirectories to walk."""
        self.counts.dirs += rel != ""
        try:
            listing = list(os.scandir(self._abs(disk_rel)))
        except FileNotFoundError:
            return []  # vanished since its parent was listed; the parent's next scan sees it
        except OSError as exc:
            # Unreadable is not deleted: keep what the index knows.
            self.counts.skipped.append(Skipped(rel or ".", f"cannot list directory: {exc}"))
            return []
        found = sorted(
            ((d.name, unicodedata.normalize("NFC", d.name), d) for d in listing),
            key=lambda pair: (pair[1], pair[0] != pair[1]),  # the NFC spelling wins a clash
        )
        children = [
            (disk_name, name, functools.partial(dirent.stat, follow_symlinks=False))
            for disk_name, name, dirent in found
            if only is None or name in only
        ]
        known = self.store.children(rel) if only is None else self._known_children(rel, only)
        subdirs = self._index_children(rel, disk_rel, device, children, known)
        self._report_progress(rel)
        return subdirs

    def _scan_named(self, rel: str, disk_rel: str, device: int, names: set[str]) -> list[_Dir]:
        """Index the children `names` of one directory, each spelled on disk as named, from a
        stat of each: the directory is not listed, nor its other children looked up."""
        children = [
            (name, name, functools.partial(os.lstat, self._abs(join(disk_rel, name))))
            for name in sorted(names)
        ]
        known = self._known_children(rel, names)
        return self._index_children(rel, disk_rel, device, children, known)

    def _known_children(self, rel: str, names: set[str]) -> dict[str, Known]:
        known = self.store.known_many(join(rel, name) for name in names)
        return {path.rpartition("/")[2]: state for path, state in known.items()}

    def _index_children(
        self,
        rel: str,
        disk_rel: str,
        device: int,
        children: Sequence[tuple[str, str, Callable[[], os.stat_result]]],
        known: dict[str, Known],
    ) -> list[_Dir]:
        """Index `children` (disk name, NFC name, how to stat it) of directory `rel` (on
        `device`), whose index records are `known`: what is known but not found is deleted (or,
        if ignored now, forgotten). Returns the subdirectories to walk."""
        seen: set[str] = set()
        dropped: set[str] = set()  # present but ignored: forget rather than tombstone
        subdirs: list[_Dir] = []
        for disk_name, name, stat in children:
            disk_path = join(disk_rel, disk_name)
            problem = _name_problem(disk_name, name, seen)
            if problem:
                self.counts.skipped.append(Skipped(disk_path, problem))
                continue
            path = join(rel, name)
            try:
                st = stat()
            except FileNotFoundError:
                continue
            except OSError as exc:
                self.counts.skipped.append(Skipped(path, f"cannot stat: {exc}"))
                seen.add(name)  # unknown state: neither changed nor deleted
                continue
            is_dir = stat_mod.S_ISDIR(st.st_mode)
            if self.rules.ignored(path, is_dir):
                dropped.add(name)
                continue
            seen.add(name)
            local_name = None if disk_name == name else disk_name
            old = known.get(name)
            if old and old.kind is Kind.DIR and not old.deleted and not is_dir:
                for below in self.store.descendants(path):  # a directory became a file
                    self.records.tombstone_record(below)
            if is_dir:
                live_dir = old is not None and old.kind is Kind.DIR and not old.deleted
                self.mounts.visit(path, st.st_dev, device, indexed=live_dir)
                self._directory(path, st, old, local_name)
                subdirs.append((path, disk_path, st.st_dev))
            elif stat_mod.S_ISREG(st.st_mode):
                self._file(path, disk_path, st, old, local_name)
            elif stat_mod.S_ISLNK(st.st_mode):
                self._symlink(path, disk_path, old, local_name)
            else:
                self.counts.skipped.append(Skipped(path, "not a file, directory or symlink"))
                seen.discard(name)
        for name, old in known.items():
            if name in seen:
                continue
            path = join(rel, name)
            if name in dropped:
                self.records.forget(path)
            elif not old.deleted:
                self.records.tombstone(path)
        return subdirs

    # -- one path ------------------------------------------------------------------------------

    def _directory(
        self, path: str, st: os.stat_result, old: Known | None, local: str | None
    ) -> None:
        mode = _mode(st)
        # A pull gives every directory its owner's rwx (disk.make_dir): not a local change.
        if old and old.kind is Kind.DIR and not old.deleted and old.mode | 0o700 == mode | 0o700:
            if old.local.disk_name != local:
                self.records.keep(path, LocalState(disk_name=local))
            return
        fresh = OnDisk(path, kind=Kind.DIR, mode=mode)
        self.records.update(fresh, LocalState(disk_name=local), indexed=old is not None)

    def _symlink(self, path: str, disk_path: str, old: Known | None, local: str | None) -> None:
        try:
            target = os.readlink(self._abs(disk_path))
        except OSError as exc:
            self.counts.skipped.append(Skipped(path, f"cannot read link: {exc}"))
            return
        try:
            target.encode("utf-8")
        except UnicodeEncodeError:
            self.counts.skipped.append(Skipped(path, "symlink target is not valid UTF-8"))
            return
        self.counts.symlinks += 1
        if old and old.kind is Kind.SYMLINK and not old.deleted and old.target == target:
            return
        self.records.update(
            OnDisk(path, kind=Kind.SYMLINK, target=target), LocalState(disk_name=local)
        )

    def _file(
        self, path: str, disk_path: str, st: os.stat_result, old: Known | None, local: str | None
    ) -> None:
        self.counts.files += 1
        self.counts.bytes += st.st_size
        if (
            old
            and old.kind is Kind.FILE
            and not old.deleted
            and not old.local.racy
            and old.local.stat == StatSig.of(st)
            and old.mode & 0o777 == _mode(st)
        ):
            return
        if (old is None or old.deleted) and self._moved_here(path, st, local, old is not None):
            return
        if st.st_size <= INLINE_READ:
            # Small files are read here: handing them to a thread costs more than reading them,
            # and threads that trade the GIL every few microseconds slow each other down.
            self._drain(0)
            self._file_read(path, local, _read_file(self._abs(disk_path)), indexed=old is not None)
            return
        self._drain(MAX_IN_FLIGHT - 1)
        future = self.pool.submit(_read_file, self._abs(disk_path))
        self.in_flight.append((path, local or "", old is not None, future))

    def _moved_here(self, path: str, st: os.stat_result, local: str | None, indexed: bool) -> bool:
        """Index a file new at `path` without reading it if this scan found it gone from
        another path with every stat field equal, ctime included: the trust an unchanged file
        gets (a renamed directory's files keep their whole stat; a renamed file's ctime moves,
        so it is read)."""
        moved = self.records.vanished.get(StatSig.of(st))
        if moved is None or moved.mode & 0o777 != _mode(st):
            return False
        self._index_file(path, local, st, moved.size, moved.chunks, racy=False, indexed=indexed)
        return True

    def _drain(self, keep: int) -> None:
        """Collect finished reads, oldest first, until at most `keep` remain in flight."""
        while len(self.in_flight) > keep:
            path, local, indexed, future = self.in_flight.popleft()
            self._file_read(path, local or None, future.result(), indexed=indexed)

    def _file_read(
        self, path: str, local: str | None, read: _Read, *, indexed: bool = True
    ) -> None:
        if read.problem == "vanished":
            return  # the next scan of its directory tombstones it
        if read.problem == "unstable":
            self.counts.unstable.append(path)
            return
        if read.problem or read.stat is None:
            self.counts.skipped.append(Skipped(path, read.problem))
            return
        st = read.stat
        self.counts.hashed_files += 1
        self.counts.hashed_bytes += read.size
        self.records.batch_bytes += read.size
        racy = time.time_ns() - st.st_mtime_ns < RACY_WINDOW_NS
        self._index_file(path, local, st, read.size, read.chunks, racy=racy, indexed=indexed)

    def _index_file(
        self,
        path: str,
        local: str | None,
        st: os.stat_result,
        size: int,
        chunks: bytes,
        *,
        racy: bool,
        indexed: bool,
    ) -> None:
        """Record the regular file at `path` as `st` says, with the chunk list of its bytes."""
        fresh = OnDisk(
            path,
            kind=Kind.FILE,
            size=size,
            mtime_ns=st.st_mtime_ns,
            mode=_mode(st),
            chunks=chunks,
        )
        local_state = LocalState(stat=StatSig.of(st), racy=racy, disk_name=local)
        self.records.update(fresh, local_state, indexed=indexed)

    def _retry_unstable(self) -> list[str]:
        """Read once more what changed while being read; what still moves stays unindexed."""
        retry, self.counts.unstable = self.counts.unstable, []
        for path in retry:
            record = self.store.get(path)
            disk = self._disk_path(path)
            name = record.local.disk_name if record and record.local.disk_name else None
            self._file_read(path, name, _read_file(self._abs(disk)))
        still, self.counts.unstable = self.counts.unstable, []
        return still

    def _report_progress(self, current: str) -> None:
        now = time.monotonic()
        if self.progress is None or now - self.last_progress < PROGRESS_INTERVAL:
            return
        self.last_progress = now
        c = self.counts
        self.progress(ScanProgress(c.files, c.dirs, c.hashed_files, c.hashed_bytes, current))


def _ancestors(path: str) -> Iterator[str]:
    """The directories above `path`, nearest first, the folder's root excluded."""
    parent = parent_of(path)
    while parent:
        yield parent
        parent = parent_of(parent)


# The only characters other than themselves whose NFC form is ASCII: KELVIN SIGN,
# GREEK QUESTION MARK, GREEK VARIA. An ASCII name without their images has one spelling.
_ASCII_IMAGES = frozenset("K;`")


def _one_spelling(name: str) -> bool:
    """Whether `name` (NFC) can only be spelled one way on disk, so a stat finds it."""
    return name.isascii() and _ASCII_IMAGES.isdisjoint(name)


def _name_problem(disk_name: str, name: str, seen: set[str]) -> str:
    try:
        disk_name.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not valid UTF-8"
    if name in seen:
        return f"name clashes with {name!r} after Unicode normalisation"
    try:
        check_name(name)
    except InvalidPathError as exc:
        return str(exc)
    return ""


def _read_file(path: str) -> _Read:
    """Chunk and hash one file; report it unstable if it changed while being read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return _Read(problem="vanished")
    except OSError as exc:
        # ELOOP: replaced by a symlink since it was listed.
        return _Read(problem="unstable" if exc.errno == 40 else f"cannot open: {exc}")
    try:
        before = os.fstat(fd)
        if not stat_mod.S_ISREG(before.st_mode):
            return _Read(problem="unstable")
        with io.FileIO(fd, "rb", closefd=False) as stream:
            if before.st_size <= SMALL_FILE:
                data = stream.readall()
                chunks, size = chunk_bytes(data), len(data)
            else:
                chunks, size = chunk_stream(stream)
        after = os.fstat(fd)
    except OSError as exc:
        return _Read(problem=f"cannot read: {exc}")
    finally:
        os.close(fd)
    if StatSig.of(before) != StatSig.of(after) or size != before.st_size:
        return _Read(problem="unstable")
    return _Read(chunks=chunks, size=size, stat=before)


def _mode(st: os.stat_result) -> int:
    """The permission bits a folder shares: rwx for owner, group and others. Setuid, setgid
    and sticky never travel (a pull drops them, as Syncthing does), so they are not recorded:
    a file a pull wrote without them is unchanged, not a local edit to send back."""
    return stat_mod.S_IMODE(st.st_mode) & 0o777
