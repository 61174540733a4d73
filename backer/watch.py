"""The filesystem watcher of one folder: which paths changed, shortly after they changed, and
whether the kernel really watches the whole folder.

Owns the inotify observer (watchdog) of one folder, the debounced batches of changed
folder-relative paths, and the kernel's own count of watched directories. Imports errors and
paths only; must not import sync, mesh, node or cli (the node decides what a change triggers).

Linux only (inotify); watchdog >= 7.1, whose per-observer `InotifyFD` we subclass.

What watchdog does not say, and how we find out:

- Watch limit. Past the user's inotify watch limit (`fs.inotify.max_user_watches`, and since
  Linux 5.11 `/proc/sys/user/max_inotify_watches` per user namespace) watchdog swallows the
  ENOSPC of every directory below the root and watches only part of the tree; it neither raises
  nor logs. Only the root's ENOSPC (or EMFILE, out of inotify instances) reaches the caller:
  `start` raises WatchError. `coverage()` therefore asks the kernel: `/proc/self/fdinfo/<fd>` of
  this watcher's inotify descriptor lists one `inotify wd:.. ino:..` line per watch, and every
  directory of the folder whose inode number is among them counts as watched. Matching inodes,
  not counting lines, keeps out the watches on `.backer/` and stale watches on directories moved
  out of the folder. Only the inode number is compared: fdinfo's `sdev` is the superblock's and
  differs from `st_dev` on btrfs subvolumes. We log the first refused subdirectory ourselves.
  The tests lower the limit in a user namespace of their own (its root may write its
  `/proc/sys/user/max_inotify_watches`), never the machine's sysctl.
- Which descriptor. Each watcher creates its own `InotifyFD` (watchdog's reader thread), so the
  descriptor holds this folder's watches only. We take its number from the object
  (`_inotify_fd`, private) if it is one of the inotify descriptors that appeared in
  `/proc/self/fd` while we created it, else the single one that appeared; if neither is certain,
  `coverage()` reports nothing watched (so the caller keeps full rescans). After `start` the
  kernel must hold a watch on the root, else `start` fails (watchdog ignores EACCES silently).
- Overflow. watchdog handles IN_Q_OVERFLOW itself (it rebuilds its watches and logs); our
  `InotifyFD` subclass sees the event first, so `overflowed` turns True and the batch becomes
  `{""}`, the whole folder.

Batches: a path stands for itself and everything below it. Paths are NFC like the index's;
names the scanner never indexes (not UTF-8, a backslash) are dropped, as is everything under
the reserved `.backer/`. A move reports source and destination; the contents of a moved or
created directory are covered by the directory's path. Events on the root itself are dropped,
except its deletion, reported as `""`: the caller rescans the whole folder. Files opened or
closed without writing are not watched at all, so the scanner's own reads cause no batches.
`.backerignore` is not applied here; the scanner applies it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import threading
import time
import types
import unicodedata
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyEmitter
from watchdog.observers.inotify_c import (
    CallbackId,
    InotifyEvent,
    InotifyFD,
    Mask,
    WatchCallback,
    WatchDescriptor,
)

from backer.errors import BackerError, InvalidPathError
from backer.paths import RESERVED_DIR, check_name

__all__ = ["MAX_PENDING", "Coverage", "WatchError", "Watcher"]

MAX_PENDING = 10_000  # distinct pending paths; beyond this a batch is the whole folder, {""}

log = logging.getLogger(__name__)

# What we ask watchdog for; the inotify mask follows from it. No IN_OPEN or IN_CLOSE_NOWRITE:
# reads (the scanner's own) are not changes. DirModifiedEvent is left out: watchdog makes one
# for the parent of every create, delete or move, which the child's own event already covers.
_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    FileMovedEvent,
    DirMovedEvent,
    FileModifiedEvent,  # IN_MODIFY and IN_ATTRIB: a file kept open and written to, a chmod
    FileClosedEvent,  # IN_CLOSE_WRITE
    FileAttribEvent,
    DirAttribEvent,
]
# watchdog 7.1 adds a watch twice when `mkdir -p a/b` is seen as the creation of `a` (walked,
# so `a/b` is watched) and then of `a/b`, and warns each time; the second add is harmless.
warnings.filterwarnings(
    "ignore",
    message="Callback with id .* already exists for watch",
    category=RuntimeWarning,
    module=__name__,
)
_WATCH_LINE = re.compile(r"^inotify wd:[0-9a-f]+ ino:([0-9a-f]+) ", re.MULTILINE)


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
        self._lock = threading.Lock()  # guards _batch and _wake_scheduled (watchdog threads)
        self._wake_scheduled = False
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lost_last = False  # the batch changes() last returned had lost events
        self._refused_logged = False
        # start/stop run in worker threads, one at a time:
        self._life = threading.Lock()
        self._observer: _Observer | None = None
        self._fd: int | None = None
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
        self._loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(self._start_blocking)
        except BaseException:
            self._stopped = True  # a failed watcher stays failed; changes() says so
            # Also when cancelled: waits for the start to finish, then stops what it started.
            await asyncio.to_thread(self._stop_blocking)
            raise

    async def stop(self) -> None:
        """Stop watching and join watchdog's threads. Idempotent; a waiting `changes()` raises
        WatchError."""
        self._stopped = True
        self._wake.set()
        await asyncio.to_thread(self._stop_blocking)

    async def changes(self) -> set[str]:
        """Wait for the next batch of changed paths (see the module docstring for what a path
        means; `""` is the whole folder)."""
        if not self._started:
            raise WatchError(f"the watcher of {self._folder} is not started")
        while True:
            with self._lock:
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
        with self._lock:
            return self._lost_last or self._batch.lost

    def coverage(self) -> Coverage:
        """Count the folder's directories and those the kernel watches for this watcher.
        Blocking (walks the folder); thread-safe."""
        inodes = _directory_inodes(self._root or os.path.realpath(self._folder))
        fd = self._fd if self._started and not self._stopped else None
        watched = _kernel_watches(fd) if fd is not None else set()
        return Coverage(
            watched_dirs=sum(1 for ino in inodes if ino in watched), total_dirs=len(inodes)
        )

    # -- worker threads ------------------------------------------------------------------------

    def _start_blocking(self) -> None:
        """On failure, the caller stops what was started."""
        with self._life:
            if self._stopped:
                return
            self._root = root = os.path.realpath(self._folder)
            if not os.path.isdir(root):
                raise WatchError(f"cannot watch {self._folder}: it is not a directory")
            before = _inotify_fds()
            try:
                inotify = _KernelInotify(lost=self._lost_from_thread, refused=self._refused)
            except OSError as exc:
                raise _watch_error(self._folder, exc) from exc
            inotify.start()
            self._observer = observer = _Observer(inotify)
            self._fd = _own_fd(inotify, before)
            if self._fd is None:
                log.warning("cannot tell which inotify descriptor watches %s", self._folder)
            handler = _Handler(root, self._changed_from_thread)
            observer.schedule(handler, root, recursive=True, event_filter=_EVENTS)
            try:
                observer.start()
                root_inode = os.stat(root).st_ino
            except OSError as exc:
                raise _watch_error(self._folder, exc) from exc
            if self._fd is not None and root_inode not in _kernel_watches(self._fd):
                raise WatchError(
                    f"cannot watch {self._folder}: the kernel holds no watch on it "
                    "(permission denied?)"
                )

    def _stop_blocking(self) -> None:
        with self._life:
            self._stopped = True
            self._stop_locked()

    def _stop_locked(self) -> None:
        observer, self._observer = self._observer, None
        self._fd = None
        if observer is not None:
            observer.stop()  # unschedules, joins the emitter, stops and joins the inotify reader
            if observer.ident is not None:
                observer.join()

    # -- watchdog's threads --------------------------------------------------------------------

    def _changed_from_thread(self, paths: list[str]) -> None:
        with self._lock:
            self._batch.add(paths, now=time.monotonic())
        self._wake_loop()

    def _lost_from_thread(self) -> None:
        with self._lock:
            self._batch.lose(now=time.monotonic())
        self._wake_loop()

    def _refused(self, path: bytes) -> None:
        if os.fsdecode(path) != self._root and not self._refused_logged:  # start says the root's
            self._refused_logged = True
            log.warning(
                "the inotify watch limit is reached: %s and other directories of %s are not "
                "watched; only full scans find their changes",
                os.fsdecode(path),
                self._folder,
            )

    def _wake_loop(self) -> None:
        with self._lock:
            if self._wake_scheduled or self._loop is None:
                return
            self._wake_scheduled = True
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for changes
            self._loop.call_soon_threadsafe(self._woken)

    def _woken(self) -> None:
        with self._lock:
            self._wake_scheduled = False
        self._wake.set()


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


class _Handler(FileSystemEventHandler):
    """Turns watchdog's events into folder-relative paths, in watchdog's dispatch thread."""

    def __init__(self, root: str, deliver: Callable[[list[str]], None]) -> None:
        self._root = root
        self._prefix = root.rstrip("/") + "/"
        self._deliver = deliver

    def dispatch(self, event: FileSystemEvent) -> None:
        if event.is_synthetic:
            return  # the contents of a moved or created directory: its own path covers them
        paths: list[str] = []
        for raw in (event.src_path, event.dest_path):
            if not raw:
                continue
            path = os.fsdecode(raw)
            if path == self._root:
                if isinstance(event, DirDeletedEvent):
                    paths.append("")  # the folder itself is gone
                continue
            relative = _relative(path, self._prefix)
            if relative is not None:
                paths.append(relative)
        if paths:
            self._deliver(paths)


def _relative(path: str, prefix: str) -> str | None:
    """The folder-relative NFC path, or None for paths we never report."""
    if not path.startswith(prefix):
        return None
    relative = unicodedata.normalize("NFC", path[len(prefix) :])
    parts = relative.split("/")
    if parts[0] == RESERVED_DIR:
        return None
    try:
        for part in parts:
            check_name(part)
    except InvalidPathError:
        return None  # a name the scanner skips: nothing in the index changes because of it
    return relative


class _KernelInotify(InotifyFD):
    """watchdog's inotify reader thread, telling us the two things watchdog keeps to itself: a
    queue overflow and a watch the kernel refused for lack of watches (ENOSPC)."""

    def __init__(self, *, lost: Callable[[], None], refused: Callable[[bytes], None]) -> None:
        self._backer_lost = lost
        self._backer_refused = refused
        super().__init__()

    def handle_event(self, event: InotifyEvent) -> None:
        if event.is_queue_overflow:
            self._backer_lost()
        super().handle_event(event)

    def add_callback(
        self, path: bytes, mask: Mask, callback: WatchCallback, id_: CallbackId
    ) -> WatchDescriptor:
        try:
            return super().add_callback(path, mask, callback, id_)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self._backer_refused(path)
            raise


class _Observer(BaseObserver):
    """watchdog's InotifyObserver, with our InotifyFD."""

    def __init__(self, inotify: _KernelInotify) -> None:
        super().__init__(InotifyEmitter, inotify_fd=inotify)
        self._backer_inotify = inotify

    def on_thread_stop(self) -> None:
        super().on_thread_stop()
        self._backer_inotify.stop()
        self._backer_inotify.join()


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


def _inotify_fds() -> set[int]:
    """This process's inotify descriptors."""
    found: set[int] = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:inotify":
                found.add(int(name))
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor, for one)
    return found


def _own_fd(inotify: InotifyFD, before: set[int]) -> int | None:
    """The descriptor of `inotify`, created after `before` was taken (see the module docstring)."""
    appeared = _inotify_fds() - before
    fd = getattr(inotify, "_inotify_fd", None)
    if isinstance(fd, int) and fd in appeared:
        return fd
    return appeared.pop() if len(appeared) == 1 else None


def _kernel_watches(fd: int) -> set[int]:
    """Inode numbers the kernel watches through inotify descriptor `fd`."""
    try:
        if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
            return set()
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as info:
            text = info.read()
    except OSError:
        return set()
    return {int(match, 16) for match in _WATCH_LINE.findall(text)}


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
