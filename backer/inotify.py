"""Linux inotify for one folder: the system calls (ctypes on libc), the binary `struct
inotify_event` records, the kernel's own list of what a descriptor watches, and the tree of
watched directories that turns events into changed folder-relative paths.

Owns the descriptor's watches and where each watched directory is. Knows nothing of batches,
timing or the event loop (backer.watch reads the descriptor and batches the paths). Imports
errors and paths only. `.backer/` is never watched.

The tree follows the events: a created or moved-in directory is watched with everything in it;
a move within the folder re-paths the moved directory's node (moved from and moved to share a
cookie); a directory moved out of the folder loses its watches, which would otherwise report
its later changes under its old path. When the tree cannot be trusted (a watch turns out to be
known at another place, after events were lost) `apply` says so and the caller walks the
folder again into a new tree.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import struct
import threading
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from backer.errors import InvalidPathError
from backer.paths import RESERVED_DIR, check_path

__all__ = ["READ_SIZE", "Event", "Inotify", "WatchedTree", "kernel_watches", "parse"]

# <sys/inotify.h>
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC

READ_SIZE = 64 * 1024  # one read; a record is 16 bytes plus its name, padded (NAME_MAX 255)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_inotify_init1 = _libc.inotify_init1
_inotify_init1.argtypes = [ctypes.c_int]
_inotify_init1.restype = ctypes.c_int
_inotify_add_watch = _libc.inotify_add_watch
_inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_inotify_add_watch.restype = ctypes.c_int
_inotify_rm_watch = _libc.inotify_rm_watch
_inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
_inotify_rm_watch.restype = ctypes.c_int

_HEADER = struct.Struct("=iIII")  # wd, mask, cookie, len (of the NUL-padded name that follows)
_WATCH_LINE = re.compile(r"^inotify wd:[0-9a-f]+ ino:([0-9a-f]+) ", re.MULTILINE)


class Event(NamedTuple):
    """One `struct inotify_event`. `name` is empty for an event on the watched directory itself
    (and for IN_Q_OVERFLOW, whose wd is -1)."""

    wd: int
    mask: int
    cookie: int
    name: bytes


class Inotify:
    """One inotify instance (IN_NONBLOCK | IN_CLOEXEC). Raises OSError as the kernel does:
    EMFILE when the user has no inotify instances left, ENOSPC when no watches are left."""

    def __init__(self) -> None:
        fd: int = _inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise _os_error()
        self._fd = fd

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("the inotify descriptor is closed")
        return self._fd

    def add_watch(self, path: bytes, mask: int) -> int:
        """The watch descriptor of `path`; the same one again for an inode already watched."""
        wd: int = _inotify_add_watch(self.fileno(), path, mask)
        if wd < 0:
            raise _os_error(path)
        return wd

    def rm_watch(self, wd: int) -> None:
        """Remove a watch; one the kernel already dropped (EINVAL) is not an error."""
        if _inotify_rm_watch(self.fileno(), wd) < 0:
            error = _os_error()
            if error.errno != errno.EINVAL:
                raise error

    def read(self) -> list[Event]:
        """The events queued now (up to READ_SIZE bytes of them); [] if none."""
        try:
            data = os.read(self.fileno(), READ_SIZE)
        except BlockingIOError:
            return []
        return parse(data)

    def watched_inodes(self) -> set[int]:
        """Inode numbers the kernel watches through this descriptor (see kernel_watches)."""
        return kernel_watches(self._fd) if self._fd >= 0 else set()

    def close(self) -> None:
        """Close the descriptor: the kernel drops every watch. Idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


# No IN_OPEN or IN_CLOSE_NOWRITE: reads (the scanner's own) are not changes. IN_MODIFY and
# IN_ATTRIB: a file kept open and written to, a chmod.
_MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_CREATE
    | IN_DELETE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
    | IN_DONT_FOLLOW
    | IN_EXCL_UNLINK
)
_ROOT_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT
_RESERVED = os.fsencode(RESERVED_DIR)
_MISSING_TRIES = 3  # see WatchedTree._watch_unseen


class _Dir:
    """One watched directory: its watch descriptor and where it is (parent and name), so that
    moving a directory re-paths its whole subtree by changing one node."""

    __slots__ = ("children", "name", "parent", "wd")

    def __init__(self, wd: int) -> None:
        self.wd = wd
        self.parent: _Dir | None = None
        self.name = b""
        self.children: dict[bytes, _Dir] = {}


class WatchedTree:
    """The watched directories of one folder, kept in step with the events read. Belongs to
    one thread at a time: the walking thread until it returns the tree, then the loop."""

    def __init__(
        self, inotify_fd: Inotify, root_path: bytes, *, refused: Callable[[bytes], None]
    ) -> None:
        self._inotify = inotify_fd
        self._refused = refused
        self.root_path = root_path
        self.root = _Dir(inotify_fd.add_watch(root_path, _MASK))  # raises: the root's errors
        self.by_wd = {self.root.wd: self.root}
        self._moved_out: dict[int, _Dir] = {}  # cookie -> directory moved away, destination unseen
        # Directories to watch (and list) at the end of `apply`, with how often their path was
        # missing there: (parent, name) for a new one, (its parent, its name) to list again.
        self._unseen: dict[tuple[_Dir, bytes], int] = {}

    def grow(self, top: _Dir, abort: threading.Event | None = None) -> bool:
        """Watch every directory below `top`, a watched one. False if a watch turned out to be
        in the tree already, elsewhere: the tree was wrong."""
        consistent = True
        top_path = self._absolute(top)
        stack = [] if top_path is None else [(top, top_path)]
        while stack and not (abort is not None and abort.is_set()):
            node, path = stack.pop()
            try:
                with os.scandir(path) as listing:
                    names = [entry.name for entry in listing if _is_dir(entry)]
            except OSError as exc:
                if exc.errno == errno.ENOENT and node.parent is not None:
                    self._unseen.setdefault((node.parent, node.name), 0)  # moved meanwhile?
                continue  # else unreadable: the scanner cannot list it either
            for name in names:
                if node is self.root and name == _RESERVED:
                    continue
                child_path = path + b"/" + name
                try:
                    wd = self._inotify.add_watch(child_path, _MASK)
                except OSError as exc:
                    self._not_watched(node, name, child_path, exc)
                    continue
                child, placed = self._place(node, name, wd)
                consistent = consistent and placed
                if child is not None:
                    stack.append((child, child_path))
        return consistent

    def apply(self, events: Iterable[Event]) -> tuple[list[str], bool]:
        """Follow `events` (directories created, moved, deleted) and return the changed paths
        and whether events were lost (the tree must then be rebuilt)."""
        touched: dict[tuple[_Dir, bytes], None] = {}  # ordered and without repeats
        whole = False
        for event in events:
            if event.mask & IN_Q_OVERFLOW:
                return self._paths(touched), True
            node = self.by_wd.get(event.wd)
            if node is None:
                continue  # a watch we removed; its last events are still queued
            if event.mask & IN_IGNORED:
                self.by_wd.pop(node.wd, None)
                _detach(node)
            elif not event.name:  # the watched directory itself: its parent reports it
                if node is self.root and event.mask & _ROOT_GONE:
                    whole = True
                    self._unwatch(self.root)
            elif node is self.root and event.name == _RESERVED:
                moved = self._moved_out.pop(event.cookie, None)
                if moved is not None:  # moved into .backer/: out of the folder
                    self._unwatch(moved)
            else:
                if event.mask & IN_ISDIR:
                    self._follow(node, event)
                touched[(node, event.name)] = None
        for moved in self._moved_out.values():  # moved out of the folder
            self._unwatch(moved)
        self._moved_out.clear()
        consistent = self._watch_unseen()
        paths = self._paths(touched)
        if whole:
            paths.append("")
        return paths, not consistent

    def unwatch_except(self, kept: WatchedTree) -> None:
        """Remove the watches that `kept`, a new walk of the same folder, no longer holds."""
        for wd in self.by_wd.keys() - kept.by_wd.keys():
            with contextlib.suppress(OSError):
                self._inotify.rm_watch(wd)

    def _follow(self, parent: _Dir, event: Event) -> None:
        """Keep the tree in step with a directory event. New directories are watched only at
        the end of the events read: by then the tree knows where their parent has moved since,
        and a name created and renamed or deleted meanwhile needs no walk."""
        key = (parent, event.name)
        if event.mask & IN_MOVED_FROM:
            self._unseen.pop(key, None)
            moved = parent.children.get(event.name)
            if moved is not None:
                _detach(moved)
                self._moved_out[event.cookie] = moved
        elif event.mask & IN_MOVED_TO:
            moved = self._moved_out.pop(event.cookie, None)
            if moved is None:  # moved in from outside the folder
                self._unseen.setdefault(key, 0)
            else:
                _attach(parent, event.name, moved)
        elif event.mask & IN_CREATE:
            self._unseen.setdefault(key, 0)
        elif event.mask & IN_DELETE:
            self._unseen.pop(key, None)
            if (gone := parent.children.get(event.name)) is not None:
                _detach(gone)  # its IN_IGNORED follows

    def _watch_unseen(self) -> bool:
        """Watch the new directories and list the ones to list again. A path missing though
        no event said why is tried again after the next events (an ancestor's move may be
        among them), then given up as a sign the tree is wrong."""
        consistent = True
        for key, missed in list(self._unseen.items()):
            parent, name = key
            parent_path = self._absolute(parent)
            del self._unseen[key]
            if parent_path is None or parent.wd not in self.by_wd:
                continue  # moved out or gone with its parent
            path = parent_path + b"/" + name
            try:
                wd = self._inotify.add_watch(path, _MASK)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    self._not_watched(parent, name, path, exc)
                elif missed < _MISSING_TRIES:
                    self._unseen[key] = missed + 1
                else:
                    consistent = False
                continue
            child, placed = self._place(parent, name, wd)
            # A known one (placed where it is) is listed again: a walk may have missed in it.
            if not placed or not self.grow(child or parent.children[name]):
                consistent = False
        return consistent

    def _place(self, parent: _Dir, name: bytes, wd: int) -> tuple[_Dir | None, bool]:
        """A new node for watch `wd` of `name` in `parent`, attached (None if the watch is
        known already), and False if it is known at another place: the tree was wrong."""
        known = self.by_wd.get(wd)
        if known is not None:
            return None, known.parent is parent and known.name == name
        child = self.by_wd[wd] = _Dir(wd)
        _attach(parent, name, child)
        return child, True

    def _not_watched(self, parent: _Dir, name: bytes, path: bytes, exc: OSError) -> None:
        if exc.errno == errno.ENOSPC:
            self._refused(path)
        elif exc.errno == errno.ENOENT:
            self._unseen.setdefault((parent, name), 0)  # gone, or an ancestor moved meanwhile
        # else no longer a directory, or unreadable: the scanner cannot list it either

    def _unwatch(self, top: _Dir) -> None:
        _detach(top)
        for node in _subtree(top):
            self.by_wd.pop(node.wd, None)
            with contextlib.suppress(OSError):
                self._inotify.rm_watch(node.wd)

    def _path(self, node: _Dir) -> bytes | None:
        """Folder-relative path of a watched directory (b"" for the root); None if detached."""
        names = []
        while node is not self.root:
            if node.parent is None:
                return None
            names.append(node.name)
            node = node.parent
        return b"/".join(reversed(names))

    def _absolute(self, node: _Dir) -> bytes | None:
        path = self._path(node)
        if path is None:
            return None
        return self.root_path + b"/" + path if path else self.root_path

    def _paths(self, touched: Iterable[tuple[_Dir, bytes]]) -> list[str]:
        """The folder-relative NFC paths of `touched` names, but those we never report."""
        paths = []
        for parent, name in touched:
            parent_path = self._path(parent)
            if parent_path is None:
                continue
            raw = parent_path + b"/" + name if parent_path else name
            try:
                paths.append(check_path(unicodedata.normalize("NFC", os.fsdecode(raw))))
            except InvalidPathError:
                continue  # a name the scanner skips: nothing in the index changes because of it
        return paths


def _attach(parent: _Dir, name: bytes, node: _Dir) -> None:
    _detach(node)
    if (replaced := parent.children.get(name)) is not None:
        replaced.parent = None  # renamed over (an empty directory): its IN_IGNORED follows
    node.parent, node.name = parent, name
    parent.children[name] = node


def _detach(node: _Dir) -> None:
    parent = node.parent
    if parent is not None and parent.children.get(node.name) is node:
        del parent.children[node.name]
    node.parent = None


def _subtree(top: _Dir) -> Iterator[_Dir]:
    stack = [top]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children.values())


def _is_dir(entry: os.DirEntry[bytes]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False  # vanished meanwhile


def parse(data: bytes) -> list[Event]:
    """The `struct inotify_event` records of one read (the kernel never splits a record)."""
    events = []
    offset, end, header = 0, len(data), _HEADER.size
    while offset + header <= end:
        wd, mask, cookie, length = _HEADER.unpack_from(data, offset)
        offset += header
        events.append(Event(wd, mask, cookie, data[offset : offset + length].rstrip(b"\0")))
        offset += length
    return events


def kernel_watches(fd: int) -> set[int]:
    """Inode numbers the kernel watches through inotify descriptor `fd`: one `inotify wd:..
    ino:..` line per watch in `/proc/self/fdinfo/<fd>`. Empty if `fd` is not an inotify
    descriptor (any more). Only the inode is given: `sdev` is the superblock's device, which
    differs from `st_dev` on btrfs subvolumes."""
    try:
        if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
            return set()
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as info:
            text = info.read()
    except OSError:
        return set()
    return {int(match, 16) for match in _WATCH_LINE.findall(text)}


def _os_error(path: bytes | None = None) -> OSError:
    code = ctypes.get_errno()
    if path is None:
        return OSError(code, os.strerror(code))
    return OSError(code, os.strerror(code), os.fsdecode(path))
