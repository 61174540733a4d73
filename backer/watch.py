"""The filesystem watcher of one folder: which paths changed, shortly after they changed, and
whether the kernel really watches the whole folder.

Owns one inotify descriptor per folder (backer.inotify), the tree of watched directories, the
debounced batches of changed folder-relative paths, and the kernel's own count of watched
directories. Imports errors, paths and inotify only; must not import sync, mesh, node or cli
(the node decides what a change triggers). Linux only.

- Read on the event loop. The descriptor is non-blocking and read with `loop.add_reader`, up to
  64 KiB of events per wakeup, parsed and applied there: no reader thread, no thread hop per
  event. Walking the whole folder (at start, and after lost events) runs in a worker thread
  while the descriptor is not read, so the tree of watches is never shared between threads.
  The walk of a directory created or moved in later runs on the loop: it costs less than the
  scan the batch is about to cause (a tree of 1,000 directories moved in: ~25 ms).
- `.backer/` is never watched, so the temp files, the index and its WAL cause no events at all.
- Watch limit. Past the user's inotify watch limit (`fs.inotify.max_user_watches`, and since
  Linux 5.11 `/proc/sys/user/max_inotify_watches` per user namespace) the kernel refuses a
  watch with ENOSPC. For a directory below the root we watch what we can, log the first
  refused one, and `coverage()` reports the rest as unwatched (so the node rescans them). The
  root's ENOSPC, or EMFILE (out of inotify instances), make `start` raise WatchError and leave
  no descriptor behind. `coverage()` asks the kernel: `/proc/self/fdinfo/<fd>` of our
  descriptor lists one `inotify wd:.. ino:..` line per watch, and every directory of the folder
  whose inode number is among them counts as watched. The tests lower the limit in a user
  namespace of their own (its root may write its `/proc/sys/user/max_inotify_*`).
- Lost events. IN_Q_OVERFLOW, or a watch found where the tree says it cannot be (a directory
  renamed and replaced faster than we read), turn `overflowed` True and the batch into `{""}`,
  the whole folder; then the folder is walked again (watches the kernel still has are returned
  as they are, missing ones added, those no longer in the folder removed) and reading goes on.

Batches: a path stands for itself and everything below it. Paths are NFC like the index's;
names the scanner never indexes (not UTF-8, a backslash) are dropped. A move reports source and
destination; the contents of a moved or created directory are covered by the directory's path.
Events on the root itself are dropped, except its deletion or move, reported as `""`: the caller
rescans the whole folder. Files opened or closed without writing are not watched at all, so the
scanner's own reads cause no batches. `.backerignore` is not applied here; the scanner applies it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
import time
import types
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from backer import inotify
from backer.errors import BackerError
from backer.paths import RESERVED_DIR

__all__ = ["MAX_PENDING", "Coverage", "WatchError", "Watcher"]

MAX_PENDING = 10_000  # distinct pending paths; beyond this a batch is the whole folder, {""}

log = logging.getLogger(__name__)


class WatchError(BackerError):
    """The folder cannot be watched (or the watcher is not running): fall back to full scans."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Coverage:
    """How much of a folder the kernel watches. Directories count the root and everything below
    it except `.backer/`."""

    watched_dirs: int  # directories the kernel actually watches for this folder
    total_dirs: int  # directories that exist under the folder (excluding .backer/)

    @property
    def complete(self) -> bool:
        return self.watched_dirs >= self.total_dirs


class Watcher:
    """Watches one folder; `changes()` returns batches of changed folder-relative paths.

    A batch is released `debounce` seconds after its last event, but never later than
    `max_delay` after its first. Runs once: `start`, then `changes()` as often as wanted, then
    `stop` (or `async with Watcher(folder) as watcher:`).
    """

    def __init__(self, folder: Path, *, debounce: float = 0.05, max_delay: float = 1.0) -> None:
        if debounce < 0 or max_delay < debounce:
            raise ValueError("need 0 <= debounce <= max_delay")
        self._folder = folder
        self._root = ""  # the folder's real path, set by start
        self._batch = _Batch(debounce=debounce, max_delay=max_delay)
        self._wake = asyncio.Event()
        self._lost_last = False  # the batch changes() last returned had lost events
        self._refused_logged = False
        self._inotify: inotify.Inotify | None = None
        self._tree: inotify.WatchedTree | None = None
        self._reading = False  # the descriptor is registered with the loop
        # A whole-folder walk in a worker thread, which adds watches to our descriptor:
        self._walking: asyncio.Future[inotify.WatchedTree] | None = None
        self._abort_walk = threading.Event()
        self._rearming: asyncio.Task[None] | None = None
        self._started = False
        self._stopped = False

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Watch the folder and everything below it. Raises WatchError if the folder cannot be
        watched at all (missing, out of inotify instances, watch limit reached at the root)."""
        if self._started or self._stopped:
            raise WatchError(f"the watcher of {self._folder} was already started")
        self._started = True
        try:
            self._root = os.path.realpath(self._folder)
            if not os.path.isdir(self._root):
                raise WatchError(f"cannot watch {self._folder}: it is not a directory")
            try:
                self._inotify = inotify.Inotify()
                tree = await self._walk()
            except OSError as exc:
                raise _watch_error(self._folder, exc) from exc
            if not self._stopped:  # else stopped meanwhile: changes() says so
                self._read(tree)
        except BaseException:
            # Also when cancelled: waits for the walk to end, then closes what was opened.
            await self.stop()  # a failed watcher stays failed; changes() says so
            raise

    async def stop(self) -> None:
        """Stop watching and close the descriptor. Idempotent; a waiting `changes()` raises
        WatchError."""
        self._stopped = True
        self._wake.set()
        self._abort_walk.set()
        self._pause()
        for pending in (self._walking, self._rearming):
            if pending is not None and not pending.done():
                await asyncio.wait([pending])  # a thread still adding watches to our descriptor
        if self._walking is not None and self._walking.done() and not self._walking.cancelled():
            self._walking.exception()  # retrieved: its failure was handled by whoever awaited it
        self._tree = None
        if self._inotify is not None:
            self._inotify.close()

    async def changes(self) -> set[str]:
        """Wait for the next batch of changed paths (see the module docstring for what a path
        means; `""` is the whole folder)."""
        if not self._started:
            raise WatchError(f"the watcher of {self._folder} is not started")
        while True:
            now = time.monotonic()
            due = self._batch.due()
            if due is not None and now >= due:
                paths, self._lost_last = self._batch.take()
                return paths
            if self._stopped:
                raise WatchError(f"the watcher of {self._folder} was stopped")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if due is None else due - now):
                    await self._wake.wait()

    @property
    def overflowed(self) -> bool:
        """True when the kernel dropped events (IN_Q_OVERFLOW) after the batch before the one
        `changes()` last returned was handed out: that batch, or the one gathering now, misses
        events, so rescan the whole folder. Such a batch is `{""}` anyway."""
        return self._lost_last or self._batch.lost

    def coverage(self) -> Coverage:
        """Count the folder's directories and those the kernel watches for this watcher.
        Blocking (walks the folder); thread-safe."""
        inodes = _directory_inodes(self._root or os.path.realpath(self._folder))
        running = self._inotify if self._started and not self._stopped else None
        watched = running.watched_inodes() if running is not None else set()
        return Coverage(
            watched_dirs=sum(1 for ino in inodes if ino in watched), total_dirs=len(inodes)
        )

    # -- on the event loop ---------------------------------------------------------------------

    def _read(self, tree: inotify.WatchedTree) -> None:
        assert self._inotify is not None
        self._tree = tree
        asyncio.get_running_loop().add_reader(self._inotify.fileno(), self._readable)
        self._reading = True

    def _pause(self) -> None:
        if self._reading and self._inotify is not None:
            asyncio.get_running_loop().remove_reader(self._inotify.fileno())
        self._reading = False

    def _readable(self) -> None:
        assert self._inotify is not None and self._tree is not None
        try:
            events = self._inotify.read()
        except OSError as exc:  # unheard of; treated as lost events, which it may be
            log.warning("reading the inotify events of %s failed: %s", self._folder, exc)
            paths: list[str] = []
            lost = True
        else:
            if not events:
                return
            paths, lost = self._tree.apply(events)
        now = time.monotonic()
        self._batch.add(paths, now=now)
        if lost:
            self._batch.lose(now=now)
            self._pause()
            self._rearming = asyncio.get_running_loop().create_task(self._rearm())
        if paths or lost:
            self._wake.set()

    async def _rearm(self) -> None:
        """After lost events the tree may be wrong anywhere: walk the folder again."""
        old = self._tree
        try:
            tree = await self._walk()
        except OSError as exc:  # the root is gone or cannot be watched any more
            log.warning("cannot watch %s again after lost events: %s", self._folder, exc)
            self._batch.add([""], now=time.monotonic())
            self._wake.set()
            return
        except Exception:
            log.exception("watching %s again after lost events failed", self._folder)
            return
        if self._stopped or old is None:
            return
        old.unwatch_except(tree)
        self._read(tree)

    async def _walk(self) -> inotify.WatchedTree:
        """Watch the whole folder, in a worker thread; the descriptor is not read meanwhile.
        Raises OSError if the root cannot be watched."""
        inotify_fd = self._inotify
        assert inotify_fd is not None and not self._reading

        def walk() -> inotify.WatchedTree:
            tree = inotify.WatchedTree(inotify_fd, os.fsencode(self._root), refused=self._refused)
            tree.grow(tree.root, abort=self._abort_walk)
            return tree

        self._walking = asyncio.get_running_loop().run_in_executor(None, walk)
        return await asyncio.shield(self._walking)  # cancelled: stop() waits for the thread

    def _refused(self, path: bytes) -> None:
        if not self._refused_logged:  # in the walk's thread or on the loop; once is enough
            self._refused_logged = True
            log.warning(
                "the inotify watch limit is reached: %s and other directories of %s are not "
                "watched; only full scans find their changes",
                os.fsdecode(path),
                self._folder,
            )


class _Batch:
    """The pending paths of one batch and when it is due. Pure: time is passed in."""

    def __init__(self, *, debounce: float, max_delay: float, limit: int = MAX_PENDING) -> None:
        self.debounce = debounce
        self.max_delay = max_delay
        self.limit = limit
        self.paths: set[str] = set()
        self.whole = False  # the whole folder: {""}
        self.lost = False  # the kernel dropped events
        self.first: float | None = None
        self.last = 0.0

    def add(self, paths: Iterable[str], *, now: float) -> None:
        added = False
        for path in paths:
            added = True
            if self.whole:
                break
            if not path:
                self.whole = True
                self.paths.clear()
            elif path not in self.paths and not _under_any(path, self.paths):
                self.paths.add(path)
                if len(self.paths) > self.limit:
                    self.whole = True
                    self.paths.clear()
        if added:
            self._stamp(now)

    def lose(self, *, now: float) -> None:
        self.lost = self.whole = True
        self.paths.clear()
        self._stamp(now)

    def due(self) -> float | None:
        if self.first is None:
            return None
        return min(self.last + self.debounce, self.first + self.max_delay)

    def take(self) -> tuple[set[str], bool]:
        """The batch (no path below another one in it) and whether events were lost."""
        paths = {""} if self.whole else {p for p in self.paths if not _under_any(p, self.paths)}
        taken = (paths, self.lost)
        self.paths = set()
        self.whole = self.lost = False
        self.first = None
        return taken

    def _stamp(self, now: float) -> None:
        if self.first is None:
            self.first = now
        self.last = now


def _under_any(path: str, paths: set[str]) -> bool:
    """Whether a proper ancestor of `path` is in `paths`."""
    cut = path.rfind("/")
    while cut > 0:
        if path[:cut] in paths:
            return True
        cut = path.rfind("/", 0, cut)
    return False


def _watch_error(folder: Path, exc: OSError) -> WatchError:
    if exc.errno == errno.EMFILE:
        why = "this user has used up its inotify instances (fs.inotify.max_user_instances)"
    elif exc.errno == errno.ENOSPC:
        why = "the inotify watch limit is reached (fs.inotify.max_user_watches)"
    elif exc.errno in (errno.ENOENT, errno.ENOTDIR):
        why = "it is not a directory"
    else:
        why = exc.strerror or str(exc)
    return WatchError(f"cannot watch {folder}: {why}")


def _directory_inodes(root: str) -> list[int]:
    """The inode numbers of `root` and every directory below it but `.backer/`; symlinks are
    not followed. A root that is gone still counts (as unwatched)."""
    try:
        inodes = [os.stat(root).st_ino]
    except OSError:
        return [-1]
    stack = [root]
    while stack:
        current = stack.pop()
        try:
            with os.scandir(current) as listing:
                for entry in listing:
                    if current == root and entry.name == RESERVED_DIR:
                        continue
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            inodes.append(entry.stat(follow_symlinks=False).st_ino)
                            stack.append(entry.path)
                    except OSError:
                        continue  # vanished meanwhile
        except OSError:
            continue  # unreadable or vanished: counted, not entered
    return inodes
