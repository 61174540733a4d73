"""Room on the disk for what a pull writes: the versions area gives way before a pull fails.

Versions keep the blocks of every file a pull replaces or deletes, so a folder whose files are
replaced often fills its disk long before the hourly prune (nine replacements of a 20 MB file
made every pull fail with ENOSPC). Before a file is built, if the folder's filesystem has less
free space than the file needs plus a margin, versions are deleted oldest first until it has,
never a path's newest (the last copy of a deleted file is never given up). Imports versions.
"""

from __future__ import annotations

import contextlib
import logging
import os

from backer.sync.versions import Version, Versions

__all__ = ["MARGIN", "make_room"]

MARGIN = 1024 * 1024  # free bytes kept beyond what a file needs (directories, the index)

_log = logging.getLogger(__name__)


def make_room(versions: Versions, need: int) -> int:
    """Delete old versions until `need` bytes (plus MARGIN) are free on the folder's
    filesystem, or only each path's newest is left; returns how many were deleted."""
    if _free(versions) >= need + MARGIN:
        return 0
    deleted = 0
    for version in _oldest_first(versions):
        with contextlib.suppress(FileNotFoundError):
            version.stored.unlink()
            deleted += 1
        if _free(versions) >= need + MARGIN:
            break
    if deleted:
        _log.info("%s: deleted %d old versions to make room", versions.folder, deleted)
    return deleted


def _free(versions: Versions) -> int:
    st = os.statvfs(versions.folder)
    return st.f_bavail * st.f_frsize


def _oldest_first(versions: Versions) -> list[Version]:
    """Every version but each path's newest, oldest first."""
    older: list[Version] = []
    newest_seen: set[str] = set()
    for version in versions.all():  # by path, each newest first
        if version.path in newest_seen:
            older.append(version)
        else:
            newest_seen.add(version.path)
    return sorted(older, key=lambda v: v.time)
