"""What every command of the CLI shares: exit codes, finding the folder a path names, numbers
for people. Imports config, keys, paths.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from backer.config import Home
from backer.errors import BackerError
from backer.index.store import IndexStore
from backer.keys import FolderKey
from backer.paths import RESERVED_DIR

__all__ = [
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_USAGE",
    "folder_key",
    "folder_path",
    "human",
    "inside_folder",
    "refuse_nested",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def folder_key(home: Home, folder: Path) -> FolderKey | None:
    configured = home.load_config().folder_for(str(folder))
    return FolderKey.parse(configured.key) if configured else None


def inside_folder(given: str) -> tuple[Path, str]:
    """The folder holding `given` (the nearest parent with a .backer/) and the path in it."""
    path = Path(given).absolute()
    for folder in path.parents:
        if (folder / RESERVED_DIR).is_dir():
            rel = path.relative_to(folder).as_posix()
            return folder, unicodedata.normalize("NFC", rel)
    raise BackerError(f"{given} is not inside a backer folder (no .backer/ above it)")


def refuse_nested(folder: Path) -> None:
    """BackerError if `folder` lies inside a shared folder or holds one: the outer share would
    send the inner one's files, and its live index, to every peer as its own."""
    for parent in folder.parents:
        if (parent / RESERVED_DIR).is_dir():
            raise BackerError(
                f"{folder} is inside the shared folder {parent}: "
                "a shared folder cannot hold another; share the outer one, or move this out"
            )
    if not folder.is_dir():
        return
    for where, dirs, _ in os.walk(folder, onerror=_ignore_unreadable):
        if RESERVED_DIR in dirs and Path(where) != folder:
            raise BackerError(
                f"{folder} holds the shared folder {where}: "
                "a shared folder cannot hold another; share them separately, side by side"
            )
        dirs[:] = [d for d in dirs if d != RESERVED_DIR]  # never into an index, ours or not


def _ignore_unreadable(_: OSError) -> None:
    """An unreadable directory cannot be checked; the scanner reports it later."""


def folder_path(home: Home, given: str, *, create: bool) -> Path:
    folder = Path(given).resolve()
    if not folder.is_dir():
        raise BackerError(f"{folder} is not a directory")
    marker = folder / RESERVED_DIR
    if not marker.is_dir():
        if home.load_config().folder_for(str(folder)) is not None:
            raise BackerError(
                f"{marker} is missing although {folder} is shared: is its disk mounted? "
                "backer will not treat a missing disk as deleted files"
            )
        if not create:
            raise BackerError(f"{folder} has no index yet; run `backer scan {given}` first")
        IndexStore.open(folder, create=True).close()
    return folder


def human(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")
