"""Safe disk access inside one folder: every path a peer names is opened from the folder root
one component at a time, never through a symlink, and files are installed atomically.

Owns the temp area (`.backer/tmp/`) and the install sequence: write to a temp file, fsync, set
mode and mtime, rename into place, fsync the directory. Imports errors, paths, index.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat as stat_mod
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

from backer.errors import BackerError, InvalidPathError
from backer.index.store import StatSig
from backer.paths import RESERVED_DIR, check_path, parent_of

__all__ = ["ChangedMeanwhile", "FolderDisk", "sig_of"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READERS_OPEN = 16  # files `reader()` keeps open at once


def sig_of(st: os.stat_result) -> StatSig:
    return StatSig(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


class FolderDisk:
    """The folder on disk, as seen by code that applies changes from peers."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.tmp = folder / RESERVED_DIR / "tmp"

    # -- directory handles -----------------------------------------------------------------

    @contextlib.contextmanager
    def directory(self, rel_dir: str, *, create: bool = False) -> Iterator[int]:
        """A file descriptor of folder/rel_dir, reached without following any symlink."""
        fd = os.open(self.folder, _DIR_FLAGS)
        try:
            for name in rel_dir.split("/") if rel_dir else ():
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(name, 0o755, dir_fd=fd)
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise InvalidPathError(
                            f"refusing {rel_dir!r}: {name!r} is a symlink or not a directory"
                        ) from exc
                    raise
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    def lstat(self, rel: str) -> os.stat_result | None:
        check_path(rel)
        try:
            with self.directory(parent_of(rel)) as fd:
                return os.stat(_name(rel), dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError, InvalidPathError):
            return None

    def read_at(self, rel: str, offset: int, size: int) -> bytes | None:
        """`size` bytes of a regular file at `offset`, or None if that is not possible."""
        with self.reader() as read:
            return read(rel, offset, size)

    @contextlib.contextmanager
    def reader(self) -> Iterator[Callable[[str, int, int], bytes | None]]:
        """`read(rel, offset, size)` like `read_at`, keeping the last few files open between
        calls: reading a file's chunks one by one then opens it (and walks its directories)
        once, not once per chunk."""
        opened: OrderedDict[str, int | None] = OrderedDict()

        def read(rel: str, offset: int, size: int) -> bytes | None:
            if rel in opened:
                opened.move_to_end(rel)
                fd = opened[rel]
            else:
                fd = opened[rel] = self._open_regular(rel)
                if len(opened) > _READERS_OPEN:
                    _, oldest = opened.popitem(last=False)
                    if oldest is not None:
                        os.close(oldest)
            if fd is None:
                return None
            try:
                data = os.pread(fd, size, offset)
            except OSError:
                return None
            return data if len(data) == size else None

        try:
            yield read
        finally:
            for fd in opened.values():
                if fd is not None:
                    os.close(fd)

    def _open_regular(self, rel: str) -> int | None:
        try:
            with self.directory(parent_of(rel)) as dir_fd:
                fd = os.open(
                    _name(rel),
                    os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                    dir_fd=dir_fd,
                )
        except (OSError, InvalidPathError):
            return None
        try:
            if stat_mod.S_ISREG(os.fstat(fd).st_mode):
                return fd
        except OSError:
            pass
        os.close(fd)
        return None

    # -- temp files and installing -----------------------------------------------------------

    def temp_file(self, key: str, *, resume: bool = False) -> tuple[int, Path]:
        """A temp file named after `key`, open for reading and writing: emptied, or with
        `resume` as an earlier, abandoned attempt left it (its bytes are checked before use)."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        path = self.tmp / f"{key}.part"
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(path, flags if resume else flags | os.O_TRUNC, 0o600)
        return fd, path

    def prune_temp(self, older_than: float, now: float) -> int:
        """Delete temp files of abandoned transfers not touched for `older_than` seconds."""
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for item in self.tmp.iterdir():
                with contextlib.suppress(OSError):
                    if item.lstat().st_mtime < now - older_than:
                        item.unlink()
                        removed += 1
        return removed

    def install_file(
        self, fd: int, temp: Path, rel: str, *, mode: int, mtime_ns: int, sync_dir: bool = True
    ) -> StatSig:
        """Seal the temp file (fsync, mode, mtime) and rename it to `rel`; returns its stat.
        With `sync_dir=False` the caller fsyncs the directory later (`sync_dirs`), once for
        many files, before it records them anywhere."""
        check_path(rel)
        try:
            os.fsync(fd)
            os.fchmod(fd, mode & 0o777)  # a peer's setuid, setgid or sticky bit is never applied
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)
        with self.directory(parent_of(rel), create=True) as dir_fd:
            self._clear_for(dir_fd, rel)
            os.rename(temp, _name(rel), dst_dir_fd=dir_fd)
            if sync_dir:
                os.fsync(dir_fd)
            # The rename changed the ctime on some filesystems: record what is there now.
            return sig_of(os.stat(_name(rel), dir_fd=dir_fd, follow_symlinks=False))

    def sync_dirs(self, rel_dirs: set[str]) -> None:
        """fsync directories, so the renames into them survive a power cut."""
        for rel_dir in rel_dirs:
            with (
                contextlib.suppress(FileNotFoundError, InvalidPathError),
                self.directory(rel_dir) as dir_fd,
            ):
                os.fsync(dir_fd)

    def install_symlink(self, rel: str, target: str) -> None:
        check_path(rel)
        self.tmp.mkdir(parents=True, exist_ok=True)
        temp = self.tmp / f"link-{os.getpid()}-{abs(hash(rel))}.part"
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        os.symlink(target, temp)
        with self.directory(parent_of(rel), create=True) as dir_fd:
            self._clear_for(dir_fd, rel)
            os.rename(temp, _name(rel), dst_dir_fd=dir_fd)
            os.fsync(dir_fd)

    def make_dir(self, rel: str, mode: int) -> None:
        check_path(rel)
        with self.directory(parent_of(rel), create=True) as dir_fd:
            name = _name(rel)
            try:
                os.mkdir(name, 0o700, dir_fd=dir_fd)
            except FileExistsError:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if not stat_mod.S_ISDIR(st.st_mode):
                    raise
            child = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                os.fchmod(child, mode & 0o777 | 0o700)  # and the owner can always enter
            finally:
                os.close(child)

    def remove_dir(self, rel: str) -> bool:
        """Remove an empty directory; False if it is not empty (something lives in it)."""
        check_path(rel)
        try:
            with self.directory(parent_of(rel)) as dir_fd:
                os.rmdir(_name(rel), dir_fd=dir_fd)
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                return False
            raise
        return True

    def copy_aside(self, rel: str, new_rel: str) -> None:
        """Copy the file or symlink at `rel` to `new_rel` (a conflict copy), leaving `rel` as
        it is: it keeps its content until its replacement is renamed over it, so a crash in
        between never leaves the path empty (a scan would read a deletion). A file is copied,
        not linked: two names of one inode would let an edit made at either change both,
        seen by the watcher under one name only. The copy is made in the temp area, fsynced,
        and linked into place, so it never replaces another file: FileExistsError if
        `new_rel` is taken. ChangedMeanwhile if `rel` changed while it was copied."""
        check_path(rel)
        check_path(new_rel)
        self.tmp.mkdir(parents=True, exist_ok=True)
        temp = f"copy-{secrets.token_hex(8)}.part"
        with (
            self.directory(parent_of(rel)) as src_fd,
            self.directory(parent_of(new_rel), create=True) as dst_fd,
            _open_dir_fd(self.tmp) as tmp_fd,
        ):
            before = os.stat(_name(rel), dir_fd=src_fd, follow_symlinks=False)
            try:
                if stat_mod.S_ISLNK(before.st_mode):  # a symlink cannot be edited in place
                    os.link(
                        _name(rel),
                        temp,
                        src_dir_fd=src_fd,
                        dst_dir_fd=tmp_fd,
                        follow_symlinks=False,
                    )
                else:
                    _copy_file(src_fd, _name(rel), tmp_fd, temp, before)
                after = os.stat(_name(rel), dir_fd=src_fd, follow_symlinks=False)
                if sig_of(after) != sig_of(before):
                    raise ChangedMeanwhile(f"{rel} changed while it was copied")
                os.link(temp, _name(new_rel), src_dir_fd=tmp_fd, dst_dir_fd=dst_fd)
                os.fsync(dst_fd)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp, dir_fd=tmp_fd)

    def _clear_for(self, dir_fd: int, rel: str) -> None:
        """Make room for a file at `rel`: an empty directory in the way is removed."""
        name = _name(rel)
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat_mod.S_ISDIR(st.st_mode):
            os.rmdir(name, dir_fd=dir_fd)  # OSError if not empty: the caller keeps it


class ChangedMeanwhile(BackerError):
    """The local file changed while it was being replaced or copied: a local edit won the race;
    keep it, index it, and let the next pull decide."""


@contextlib.contextmanager
def _open_dir_fd(path: Path) -> Iterator[int]:
    fd = os.open(path, _DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


def _copy_file(src_dir: int, name: str, dst_dir: int, temp: str, st: os.stat_result) -> None:
    """Copy a regular file's bytes, mode and mtime into a new file, fsynced."""
    source = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
    try:
        target = os.open(
            temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dst_dir
        )
        try:
            left = st.st_size
            while left > 0:
                copied = os.copy_file_range(source, target, min(left, 1 << 30))
                if copied == 0:
                    break
                left -= copied
            os.fchmod(target, stat_mod.S_IMODE(st.st_mode))
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fsync(target)
        finally:
            os.close(target)
    finally:
        os.close(source)


def _name(rel: str) -> str:
    return rel.rpartition("/")[2]
