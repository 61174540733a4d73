"""What this node's own pulls just wrote, so that the watcher's report of those very writes
costs a stat, not a scan.

A pull installs files and makes directories; moments later the watcher reports them as
changes. Scanning them found nothing new but cost an index load per directory (a directory
the pull made is walked whole: its files were written before any watch covered it), under
the replica's lock, while the next edit's pull waited: 0.5 s after a 20,000-file pull. Here
each reported path is compared with what the pull left there (a file's full stat, a
directory's inode and mode, its children one by one); what still matches needs no scan, and
anything else -- a user's edit, a file the pull did not write, a path gone -- is scanned as
before. What was written stays remembered after a match (the same path may be reported again
by a later event of the same writes); a later edit changes the stat, so it is never mistaken
for ours.

Reports of a directory can come long after the pull made it, so a whole large pull is
remembered, compactly: a file is two integers (the hashes of its path and of its stat), and a
directory the pull made keeps a count of the names it put there, so that one of them gone
from the listing (deleted before any watch covered the directory: no event will ever name it)
sends the directory to a full scan. Imports index and sync.disk.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from backer.errors import InvalidPathError
from backer.index.store import StatSig
from backer.paths import join, parent_of
from backer.sync.disk import FolderDisk
from backer.sync.swap import lstat_at

__all__ = ["MAX_REMEMBERED", "RecentWrites"]

# Paths remembered at most (about 100 bytes each); past it all is forgotten, and then scanned
# when reported, as it would have been anyway. A 100,000-file pull fits.
MAX_REMEMBERED = 120_000


class RecentWrites:
    def __init__(self, disk: FolderDisk, *, limit: int = MAX_REMEMBERED) -> None:
        self._disk = disk
        self._limit = limit
        # Notes come from the event loop, reports are checked in a worker thread: each dict
        # operation is atomic under the GIL, and no lock is held across disk work.
        self._files: dict[int, int] = {}  # hash of the path -> hash of its StatSig
        self._dirs: dict[str, tuple[int, int]] = {}  # inode, mode
        self._placed: dict[str, int] = {}  # names the pull put in each directory, counted once

    def __len__(self) -> int:
        return len(self._files) + len(self._dirs)

    def wrote_file(self, path: str, sig: StatSig) -> None:
        self._trim()
        self._dirs.pop(path, None)
        key = hash(path)
        if key not in self._files:
            self._count(path)
        self._files[key] = hash(sig)

    def made_dir(self, path: str, st: os.stat_result) -> None:
        self._trim()
        if path not in self._dirs and self._files.pop(hash(path), None) is None:
            self._count(path)
        self._dirs[path] = (st.st_ino, st.st_mode)

    def forget(self) -> None:
        """A full scan looks at everything anyway."""
        self._files.clear()
        self._dirs.clear()
        self._placed.clear()

    def unseen(self, paths: Iterable[str]) -> list[str]:
        """Of the paths the watcher reported, those that still need a scan (in order), plus the
        children of a directory the pull made that the pull did not put there. Blocking."""
        left: list[str] = []
        files: dict[str, list[str]] = {}  # files we wrote, by directory: one walk to each
        for path in paths:
            if hash(path) in self._files:
                files.setdefault(parent_of(path), []).append(path)
            elif (made := self._dirs.get(path)) is None or not self._dir_matches(path, made, left):
                left.append(path)
        for parent, named in files.items():
            left += self._changed_files(parent, named)
        return list(dict.fromkeys(left))  # a directory's child may be reported by itself too

    def _changed_files(self, parent: str, paths: list[str]) -> list[str]:
        """Those of `paths` (in `parent`, each written by a pull) that are not as written."""
        try:
            with self._disk.directory(parent) as dir_fd:
                return [path for path in paths if not self._is_ours(dir_fd, path)]
        except (OSError, InvalidPathError):  # the directory is gone or not one now
            return paths

    def _is_ours(self, dir_fd: int, path: str) -> bool:
        st = lstat_at(dir_fd, path.rpartition("/")[2])
        return st is not None and hash(StatSig.of(st)) == self._files.get(hash(path))

    def _dir_matches(self, path: str, made: tuple[int, int], left: list[str]) -> bool:
        """Whether the directory is still the one the pull made, with everything the pull put
        in it; its children that are not what the pull wrote go to `left`."""
        subdirs: list[tuple[str, tuple[int, int]]] = []
        ours = 0
        try:
            with self._disk.directory(path) as dir_fd:
                st = os.fstat(dir_fd)
                if (st.st_ino, st.st_mode) != made:
                    return False
                for name in os.listdir(dir_fd):
                    child = join(path, name)
                    if hash(child) in self._files:
                        ours += 1
                        if not self._is_ours(dir_fd, child):
                            left.append(child)
                    elif (child_made := self._dirs.get(child)) is not None:
                        ours += 1
                        subdirs.append((child, child_made))
                    else:
                        left.append(child)
        except (OSError, InvalidPathError):  # gone, or a symlink now: scan it
            return False
        if ours < self._placed.get(path, 0):
            return False  # something the pull put here is gone: a full scan records it
        for child, child_made in subdirs:
            if not self._dir_matches(child, child_made, left):
                left.append(child)
        return True

    def _count(self, path: str) -> None:
        parent = parent_of(path)
        self._placed[parent] = self._placed.get(parent, 0) + 1

    def _trim(self) -> None:
        # All at once: a directory whose children are partly forgotten could not tell what
        # vanished from it. What is forgotten is scanned as it would have been anyway.
        if len(self._files) + len(self._dirs) >= self._limit:
            self.forget()
