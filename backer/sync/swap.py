"""The atomic steps a pull changes the folder with, and the check of what they take out.

`renameat2(2)` through ctypes (the os module lacks it): RENAME_EXCHANGE swaps a new file in and
the old one out in one step, so there is no instant where a user's save can land between the
last look at a path and its replacement; RENAME_NOREPLACE never replaces what a user just made.
`Expected` says what a pull means to replace or remove; `is_expected` compares it with what a
swap actually took out. `sync_filesystems` is the batch's durability barrier (`syncfs(2)`, also
missing from the os module). Linux only, with fallbacks where a filesystem refuses the flags.
Imports errors and index.store only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import stat as stat_mod
from collections.abc import Callable
from dataclasses import dataclass

from backer.index.store import StatSig

__all__ = [
    "NO_LINKS",
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "UNSUPPORTED",
    "Expected",
    "SymlinkTo",
    "is_expected",
    "lstat_at",
    "move_noreplace",
    "renameat2",
    "start_writeback",
    "sync_filesystems",
]

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
# What a filesystem (or an old kernel or C library) answers to flags it cannot do.
UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
NO_LINKS = frozenset({errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.EXDEV})

_log = logging.getLogger("backer.sync.disk")


@dataclass(frozen=True, slots=True)
class SymlinkTo:
    """A symlink to `target` is expected (a symlink cannot be edited in place)."""

    target: str


# What a pull expects at a path it replaces or removes: a regular file with this stat, a
# symlink to this target, or nothing.
Expected = StatSig | SymlinkTo | None


def is_expected(
    st: os.stat_result | None,
    expected: Expected,
    read_link: Callable[[], str],
    *,
    renamed: bool = False,
) -> bool:
    """Whether `st` (of a path, or of what a swap took out of it) is what was expected.
    `renamed`: the file was just renamed, which sets its ctime; its inode, size and mtime
    still tell an edit apart (an edit in place changes the mtime, a save makes a new inode)."""
    if expected is None or st is None:
        return expected is None and st is None
    if isinstance(expected, SymlinkTo):
        return stat_mod.S_ISLNK(st.st_mode) and read_link() == expected.target
    if not stat_mod.S_ISREG(st.st_mode):
        return False
    found = StatSig.of(st)
    if renamed:
        return (found.size, found.mtime_ns, found.ino) == (
            expected.size,
            expected.mtime_ns,
            expected.ino,
        )
    return found == expected


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def renameat2(src_dir: int, src: str, dst_dir: int, dst: str, flags: int) -> None:
    """renameat2(2); OSError (of the errno's own subclass) when it fails."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not in this C library", dst)
    if _renameat2(src_dir, os.fsencode(src), dst_dir, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), dst)


def move_noreplace(src_dir: int, src: str, dst_dir: int, dst: str) -> None:
    """Move `src` to `dst`, never replacing anything there (FileExistsError). Where the
    filesystem refuses RENAME_NOREPLACE, a hard link does the same, then the old name goes."""
    try:
        renameat2(src_dir, src, dst_dir, dst, RENAME_NOREPLACE)
        return
    except OSError as exc:
        if exc.errno not in UNSUPPORTED:
            raise
    try:
        os.link(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in NO_LINKS:
            raise
        if lstat_at(dst_dir, dst) is not None:  # neither links nor NOREPLACE: look, then move
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from exc
        os.rename(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(src, dir_fd=src_dir)


def sync_filesystems(fds: list[int]) -> None:
    """Make every file open at `fds` durable with one `syncfs(2)` per filesystem they are on
    (one journal commit for a batch of files, where an fsync each costs one each); fsync each
    where the C library has no syncfs."""
    if _syncfs is None:
        for fd in fds:
            os.fsync(fd)
        return
    one_per_device = {os.fstat(fd).st_dev: fd for fd in fds}
    for fd in one_per_device.values():
        if _syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"syncfs: {os.strerror(code)}")


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing this range to disk now, without waiting
    (`sync_file_range(2)` with SYNC_FILE_RANGE_WRITE): a large file's bytes then reach the
    disk while the rest of it is still arriving, and the barrier before its rename
    (`sync_filesystems`) finds little left to write. A hint only: durability still comes
    from that barrier, so failures are ignored."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _load() -> Callable[..., int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        _log.warning("this C library has no renameat2: pulled files are installed unatomically")
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    function.argtypes += [ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _load()


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_syncfs = _load_syncfs()


_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()
