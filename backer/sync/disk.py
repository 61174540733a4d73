"""Safe disk access inside one folder: every path a peer names is opened from the folder root
one component at a time, never through a symlink, and files are installed atomically.

Owns the temp area (`.backer/tmp/`) and the install sequence: write to a temp file, fsync, set
mode and mtime, swap into place (`swap.py`), check what came out, fsync the directory. What a
pull replaces or removes goes to the versions area only if it is what the pull expected: a
user's edit made at that very moment stays in the folder. Imports errors, paths, index and
sync's swap, merge (conflict names) and versions.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat as stat_mod
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from backer.errors import BackerError, FolderMissingError, InvalidPathError
from backer.index.store import StatSig
from backer.paths import RESERVED_DIR, check_path, parent_of
from backer.sync import swap
from backer.sync.merge import conflict_path_of
from backer.sync.swap import NO_LINKS, Expected, is_expected, lstat_at, move_noreplace
from backer.sync.versions import Versions

__all__ = ["ChangedMeanwhile", "FolderDisk", "Installed", "seal"]

_AT_FDCWD = -100
_COPY_NAMES = 60  # conflict copy names tried for one local edit (one a second of its mtime)
_CHECKED = "checked-"  # a copy of what a swap replaces, checked against the pull's expectation
_log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READERS_OPEN = 16  # files `reader()` keeps open at once


def seal(fd: int, *, mode: int, mtime_ns: int) -> None:
    """Give a built temp file the mode and mtime it is installed with."""
    os.fchmod(fd, mode & 0o777)  # a peer's setuid, setgid or sticky bit is never applied
    os.utime(fd, ns=(mtime_ns, mtime_ns))


class Installed(NamedTuple):
    sig: StatSig  # the installed file's stat
    edit_kept: str | None  # the conflict copy of a local edit the install took out, if any


class FolderDisk:
    """The folder on disk, as seen by code that applies changes from peers."""

    def __init__(
        self,
        folder: Path,
        versions: Versions | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.folder = folder
        self.tmp = folder / RESERVED_DIR / "tmp"
        self.versions = versions or Versions(folder)
        self.clock = clock
        self.device = 0  # names the conflict copies of local edits (the replica keeps it)
        self._told_no_exchange = False

    # -- directory handles -----------------------------------------------------------------

    @contextlib.contextmanager
    def directory(
        self, rel_dir: str, *, create: bool = False, nearest: bool = False
    ) -> Iterator[int]:
        """A file descriptor of folder/rel_dir, reached without following any symlink; with
        `nearest`, of its deepest directory that exists."""
        fd = os.open(self.folder, _DIR_FLAGS)
        try:
            for name in rel_dir.split("/") if rel_dir else ():
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if nearest:
                        break
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
        with self.opener() as open_regular:

            def read(rel: str, offset: int, size: int) -> bytes | None:
                fd = open_regular(rel)
                if fd is None:
                    return None
                try:
                    data = os.pread(fd, size, offset)
                except OSError:
                    return None
                return data if len(data) == size else None

            yield read

    @contextlib.contextmanager
    def opener(self) -> Iterator[Callable[[str], int | None]]:
        """`open_regular(rel)`: a read-only descriptor of the regular file at `rel` (None if
        there is none), reached without following symlinks; the last few stay open between
        calls and all are closed at the end."""
        opened: OrderedDict[str, int | None] = OrderedDict()

        def open_regular(rel: str) -> int | None:
            if rel in opened:
                opened.move_to_end(rel)
                return opened[rel]
            fd = opened[rel] = self._open_regular(rel)
            if len(opened) > _READERS_OPEN:
                _, oldest = opened.popitem(last=False)
                if oldest is not None:
                    os.close(oldest)
            return fd

        try:
            yield open_regular
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

    def temp_file(
        self, key: str, *, resume: bool = False, dest: str | None = None
    ) -> tuple[int, Path]:
        """A temp file named after `key`, open for reading and writing: emptied, or with
        `resume` as an earlier, abandoned attempt left it (its bytes are checked before use).
        For a `dest` on another filesystem than the folder's (a subdirectory that is its own
        mount), an unnamed file on that filesystem instead, which `install_file` names beside
        `dest` just before it swaps it in (a rename cannot cross filesystems)."""
        if dest is not None and (fd := self._unnamed_beside(dest)) is not None:
            return fd, self.folder / parent_of(dest) / f".backer-{secrets.token_hex(8)}.part"
        path = self.tmp / f"{key}.part"
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(path, flags if resume else flags | os.O_TRUNC, 0o600)
        except FileNotFoundError:
            self._temp_area()
            fd = os.open(path, flags if resume else flags | os.O_TRUNC, 0o600)
        return fd, path

    def _temp_area(self) -> None:
        """Make `.backer/tmp`, but never `.backer/` itself: a folder whose `.backer/` is gone
        is unmounted or deleted, and files written there would land on whatever is beneath."""
        try:
            self.tmp.mkdir(exist_ok=True)
        except FileNotFoundError as exc:
            raise FolderMissingError(
                f"{self.tmp.parent} is gone (is the folder's disk mounted?)"
            ) from exc

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
        self,
        fd: int,
        temp: Path,
        rel: str,
        *,
        mode: int,
        mtime_ns: int,
        expected: Expected = None,
        keep_old: bool = True,
        sync_dir: bool = True,
        sealed: bool = False,
    ) -> Installed:
        """Seal the temp file (`seal`, then fsync) and swap it in at `rel`, where `expected`
        must be (else ChangedMeanwhile, and nothing changes). What the swap takes out goes to
        the versions area (or away, with `keep_old=False`: it is kept elsewhere), unless it
        is not what was expected: a user's edit made at that very moment, kept in the folder
        as a conflict copy (`Installed.edit_kept`). With `sync_dir=False` the caller fsyncs
        the directory later (`sync_dirs`), once for many files, before it records them; with
        `sealed` the caller has sealed the file and made it durable (a batch's
        `swap.sync_filesystems`)."""
        check_path(rel)
        with contextlib.ExitStack() as stack:
            try:
                if not sealed:
                    seal(fd, mode=mode, mtime_ns=mtime_ns)
                    os.fsync(fd)
                dir_fd = stack.enter_context(self.directory(parent_of(rel), create=True))
                if os.fstat(fd).st_nlink == 0:  # unnamed, on the destination's filesystem
                    os.link(f"/proc/self/fd/{fd}", temp.name, dst_dir_fd=dir_fd)
                    tmp_fd = dir_fd
                else:
                    tmp_fd = stack.enter_context(_open_dir_fd(temp.parent))
            finally:
                os.close(fd)
            out = self._swap_in(tmp_fd, temp.name, dir_fd, rel, expected)
            if sync_dir:
                os.fsync(dir_fd)
            # The rename changed the ctime on some filesystems: record what is there now.
            sig = StatSig.of(os.stat(_name(rel), dir_fd=dir_fd, follow_symlinks=False))
            if out is None:
                return Installed(sig, None)
            return Installed(
                sig, self._dispose(tmp_fd, out, rel, expected, keep_old=keep_old, sync=sync_dir)
            )

    def install_symlink(
        self, rel: str, target: str, expected: Expected = None, *, keep_old: bool = True
    ) -> str | None:
        """Swap a symlink to `target` in at `rel`, as `install_file` swaps a file; returns the
        conflict copy of a local edit it took out, if any."""
        check_path(rel)
        self._temp_area()
        temp = f"link-{secrets.token_hex(8)}.part"
        with _open_dir_fd(self.tmp) as tmp_fd:
            os.symlink(target, temp, dir_fd=tmp_fd)
            with self.directory(parent_of(rel), create=True) as dir_fd:
                out = self._swap_in(tmp_fd, temp, dir_fd, rel, expected)
                os.fsync(dir_fd)
                if out is None:
                    return None
                return self._dispose(tmp_fd, out, rel, expected, keep_old=keep_old, sync=True)

    def remove(self, rel: str, expected: Expected, *, sync: bool = True) -> None:
        """Move the file or symlink at `rel` into the versions area if it is what the pull
        expected to remove. Anything else is a local edit, which wins over the deletion: it
        stays (ChangedMeanwhile), and one made while it is moved out is moved back."""
        check_path(rel)
        with contextlib.ExitStack() as stack:
            try:
                dir_fd = stack.enter_context(self.directory(parent_of(rel)))
            except FileNotFoundError:
                return  # its directory is gone, and the file with it
            name = _name(rel)
            found = lstat_at(dir_fd, name)
            if not is_expected(found, expected, lambda: os.readlink(name, dir_fd=dir_fd)):
                raise ChangedMeanwhile(f"{rel} changed since the pull decided")
            self.before_swap(rel)
            if os.fstat(dir_fd).st_dev != _device_of(self.versions.root, self.tmp.parent):
                self._remove_elsewhere(dir_fd, rel, expected)
                return
            try:
                stored = self.versions.archive_from(dir_fd, name, rel, self.clock(), sync=sync)
            except FileNotFoundError:
                return  # gone meanwhile, as the pull wanted
            if is_expected(os.lstat(stored), expected, lambda: os.readlink(stored), renamed=True):
                return
            with contextlib.suppress(FileExistsError):  # the user made a newer one: it wins
                move_noreplace(_AT_FDCWD, str(stored), dir_fd, name)
                os.fsync(dir_fd)
            raise ChangedMeanwhile(f"{rel} was edited while it was removed")

    def _remove_elsewhere(self, dir_fd: int, rel: str, expected: Expected) -> None:
        """`remove` on another filesystem: moved out beside itself (a rename cannot reach the
        versions area), checked there, then copied into the area or moved back."""
        name, out = _name(rel), f".backer-{secrets.token_hex(8)}.part"
        try:
            os.rename(name, out, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except FileNotFoundError:
            return
        st = os.stat(out, dir_fd=dir_fd, follow_symlinks=False)
        if is_expected(st, expected, lambda: os.readlink(out, dir_fd=dir_fd), renamed=True):
            self.versions.archive_from(dir_fd, out, rel, self.clock())
            return
        try:
            move_noreplace(dir_fd, out, dir_fd, name)
            os.fsync(dir_fd)
        except FileExistsError:  # the user made a newer one: it wins
            self.versions.archive_from(dir_fd, out, rel, self.clock())
        raise ChangedMeanwhile(f"{rel} was edited while it was removed")

    def before_swap(self, rel: str) -> None:
        """The instant between the last look at what is at `rel` and the step that replaces or
        removes it. Nothing happens here: tests make a user's edit happen at this exact step."""

    def sync_dirs(self, rel_dirs: set[str]) -> None:
        """fsync directories, so the renames into them survive a power cut."""
        for rel_dir in rel_dirs:
            with (
                contextlib.suppress(FileNotFoundError, InvalidPathError),
                self.directory(rel_dir) as dir_fd,
            ):
                os.fsync(dir_fd)

    def _unnamed_beside(self, dest: str) -> int | None:
        """An unnamed temp file (O_TMPFILE) on the filesystem `dest` will be created on, if
        that is not the folder's own (None then)."""
        try:
            with self.directory(parent_of(dest), nearest=True) as fd:
                if os.fstat(fd).st_dev == _device_of(self.tmp, self.tmp.parent):
                    return None
                return os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=fd)
        except InvalidPathError:
            return None  # install_file refuses the path

    def _swap_in(
        self, tmp_fd: int, temp: str, dir_fd: int, rel: str, expected: Expected
    ) -> str | None:
        """Put `temp` (in the temp area) at `rel` in one step, if `expected` is there; returns
        the temp-area name of what came out (at `temp` after an exchange), None if nothing did.
        On failure `temp` is deleted and the path is as it was."""
        name = _name(rel)
        try:
            found = lstat_at(dir_fd, name)
            if not is_expected(found, expected, lambda: os.readlink(name, dir_fd=dir_fd)):
                raise ChangedMeanwhile(f"{rel} changed since the pull decided")
            self.before_swap(rel)
            if expected is None:
                self._place(tmp_fd, temp, dir_fd, rel)
                return None
            try:
                swap.renameat2(tmp_fd, temp, dir_fd, name, swap.RENAME_EXCHANGE)
            except FileNotFoundError:
                if lstat_at(tmp_fd, temp) is None:
                    raise
                self._place(tmp_fd, temp, dir_fd, rel)  # deleted meanwhile: edit beats delete
                return None
            except OSError as exc:
                if exc.errno not in swap.UNSUPPORTED:
                    raise
                return self._replace_unatomically(tmp_fd, temp, dir_fd, rel, expected)
            return temp
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=tmp_fd)
            raise

    def _place(self, tmp_fd: int, temp: str, dir_fd: int, rel: str) -> None:
        """Where nothing is expected, never replace what a user just made there."""
        try:
            move_noreplace(tmp_fd, temp, dir_fd, _name(rel))
        except FileExistsError:
            raise ChangedMeanwhile(f"{rel} was made here meanwhile") from None

    def _replace_unatomically(
        self, tmp_fd: int, temp: str, dir_fd: int, rel: str, expected: Expected
    ) -> str:
        """Where the filesystem cannot exchange: link the old file into the temp area, then
        rename the new one over it. A save landing between the two steps is lost there. Where
        it cannot link either (exFAT, some FUSE filesystems), the old file is copied, not
        renamed away: a crash between two renames left the path empty, which the next scan
        read as a deletion (and the old file in the temp area, pruned a day later)."""
        name = _name(rel)
        if not self._told_no_exchange:
            self._told_no_exchange = True
            _log.warning(
                "%s: the filesystem refuses RENAME_EXCHANGE; a file saved at the very moment "
                "a pulled version replaces it can be lost here",
                self.folder,
            )
        out = f"out-{secrets.token_hex(8)}.part"
        try:
            os.link(name, out, src_dir_fd=dir_fd, dst_dir_fd=tmp_fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in NO_LINKS:
                raise
            out = f"{_CHECKED}{secrets.token_hex(8)}.part"
            _copy_checked(dir_fd, rel, tmp_fd, out, expected)
        try:
            os.rename(temp, name, src_dir_fd=tmp_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(out, dir_fd=tmp_fd)
            raise
        return out

    def _dispose(
        self, tmp_fd: int, out: str, rel: str, expected: Expected, *, keep_old: bool, sync: bool
    ) -> str | None:
        """What a swap took out of `rel`: a version (or nothing, without `keep_old`) if it is
        what the pull expected; else a local edit, kept in the folder as a conflict copy whose
        path is returned."""
        st = os.stat(out, dir_fd=tmp_fd, follow_symlinks=False)
        if out.startswith(_CHECKED) or is_expected(
            st, expected, lambda: os.readlink(out, dir_fd=tmp_fd), renamed=True
        ):
            if keep_old:
                self.versions.archive_from(tmp_fd, out, rel, self.clock(), sync=sync)
            else:
                os.unlink(out, dir_fd=tmp_fd)
            return None
        try:
            return self._keep_edit(tmp_fd, out, rel, st.st_mtime_ns)
        except BaseException:
            # Never left in the temp area, which is pruned: the versions area keeps it.
            self.versions.archive_from(tmp_fd, out, rel, self.clock())
            raise

    def _keep_edit(self, tmp_fd: int, out: str, rel: str, mtime_ns: int) -> str:
        """Move a local edit a swap took out back into the folder, as a conflict copy of `rel`
        named as every replica names this device's copies."""
        with self.directory(parent_of(rel)) as dir_fd:
            for second in range(_COPY_NAMES):
                copy = conflict_path_of(rel, mtime_ns + second * 1_000_000_000, self.device)
                try:
                    move_noreplace(tmp_fd, out, dir_fd, _name(copy))
                except FileExistsError:
                    continue
                os.fsync(dir_fd)
                return copy
        raise FileExistsError(errno.EEXIST, f"no free conflict copy name for {rel!r}")

    def make_dir(self, rel: str, mode: int) -> os.stat_result:
        """Make (or keep) the directory `rel` with `mode`; its stat once made."""
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
                return os.fstat(child)
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
        it is: it keeps its content until its replacement is swapped in, so a crash in
        between never leaves the path empty (a scan would read a deletion). A file is copied,
        not linked: two names of one inode would let an edit made at either change both,
        seen by the watcher under one name only. The copy is made in the temp area, fsynced,
        and linked into place, so it never replaces another file: FileExistsError if
        `new_rel` is taken. ChangedMeanwhile if `rel` changed while it was copied."""
        check_path(rel)
        check_path(new_rel)
        self._temp_area()
        with (
            self.directory(parent_of(rel)) as src_fd,
            self.directory(parent_of(new_rel), create=True) as dst_fd,
            _open_dir_fd(self.tmp) as area_fd,
        ):
            # A link cannot cross filesystems: on a sub-mount the copy is made beside its
            # destination under a hidden name, as `remove` does there.
            if os.fstat(dst_fd).st_dev == os.fstat(area_fd).st_dev:
                tmp_fd, temp = area_fd, f"copy-{secrets.token_hex(8)}.part"
            else:
                tmp_fd, temp = dst_fd, f".backer-{secrets.token_hex(8)}.part"
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
                if StatSig.of(after) != StatSig.of(before):
                    raise ChangedMeanwhile(f"{rel} changed while it was copied")
                os.link(temp, _name(new_rel), src_dir_fd=tmp_fd, dst_dir_fd=dst_fd)
                os.fsync(dst_fd)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp, dir_fd=tmp_fd)


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


def _copy_checked(dir_fd: int, rel: str, tmp_fd: int, out: str, expected: Expected) -> None:
    """Copy the file or symlink `name` to `out`, if it is what the pull expected there and it
    does not change while it is copied (else ChangedMeanwhile, and no copy)."""
    name = _name(rel)
    before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not is_expected(before, expected, lambda: os.readlink(name, dir_fd=dir_fd)):
        raise ChangedMeanwhile(f"{rel} changed since the pull decided")
    if stat_mod.S_ISLNK(before.st_mode):
        os.symlink(os.readlink(name, dir_fd=dir_fd), out, dir_fd=tmp_fd)
    else:
        _copy_file(dir_fd, name, tmp_fd, out, before)
    if StatSig.of(os.stat(name, dir_fd=dir_fd, follow_symlinks=False)) != StatSig.of(before):
        os.unlink(out, dir_fd=tmp_fd)
        raise ChangedMeanwhile(f"{rel} changed while it was copied")


def _copy_file(src_dir: int, name: str, dst_dir: int, temp: str, st: os.stat_result) -> None:
    """Copy a regular file's bytes, mode and mtime into a new file, fsynced."""
    source = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
    try:
        target = os.open(
            temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dst_dir
        )
        try:
            try:
                left = st.st_size
                while left > 0:
                    copied = os.copy_file_range(source, target, min(left, 1 << 30))
                    if copied == 0:
                        break
                    left -= copied
            except OSError as exc:  # across filesystems, or where the kernel cannot
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                os.lseek(source, 0, os.SEEK_SET)
                os.lseek(target, 0, os.SEEK_SET)
                os.ftruncate(target, 0)
                while chunk := os.read(source, 1 << 20):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(target, view) :]
            os.fchmod(target, stat_mod.S_IMODE(st.st_mode))
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fsync(target)
        finally:
            os.close(target)
    finally:
        os.close(source)


def _device_of(*paths: Path) -> int:
    """The filesystem of the first of `paths` that exists (a rename cannot leave it)."""
    for path in paths[:-1]:
        with contextlib.suppress(FileNotFoundError):
            return os.stat(path).st_dev
    return os.stat(paths[-1]).st_dev


def _name(rel: str) -> str:
    return rel.rpartition("/")[2]
