"""What every command of the CLI shares: exit codes, finding the folder a path names, numbers
for people. Imports config, keys, paths.
"""

from __future__ import annotations

import argparse
import errno
import os
import unicodedata
from pathlib import Path

from backer.addresses import parse_address
from backer.config import Home
from backer.errors import BackerError
from backer.index.store import IndexStore
from backer.keys import FolderKey
from backer.paths import RESERVED_DIR

__all__ = [
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_USAGE",
    "address_arg",
    "folder_key",
    "folder_path",
    "human",
    "inside_folder",
    "os_error_text",
    "plural",
    "refuse_nested",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def address_arg(text: str) -> str:
    """An argparse `type` for HOST:PORT options: a malformed one is a usage error (exit 2)
    named by its option, not a config error about `peers[0]` found later."""
    try:
        parse_address(text)
    except BackerError as exc:
        raise argparse.ArgumentTypeError(
            f"{exc} (for example 192.168.1.20:22100, or [::1]:22100)"
        ) from exc
    return text


def os_error_text(exc: OSError) -> str:
    """One line for a filesystem failure nobody caught below: what, where, and what to do."""
    where = f"{exc.filename}: " if exc.filename else ""
    if exc.errno == errno.EROFS:
        return f"{where}read-only filesystem: backer needs to write there (its index, config)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{where}permission denied: run as the user who owns it, or choose another place"
    if exc.errno == errno.ENOSPC:
        return f"{where}no space left on the device: free some space and try again"
    return f"{where}{exc.strerror or exc}"


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
            for parent in folder.parents:  # inside a folder, as git finds its repository
                if (parent / RESERVED_DIR).is_dir():
                    return parent
            raise BackerError(
                f"{folder} is not a backer folder (no {RESERVED_DIR}/ in it or above it): "
                f"name one (`backer status DIR`), or share this one with `backer init {given}`"
            )
        IndexStore.open(folder, create=True).close()
    return folder


def plural(count: int, noun: str) -> str:
    """`1 file`, `2 files`: "received 1 files" reads as a bug."""
    if count == 1:
        return f"1 {noun}"
    return f"{count} {noun[:-1] + 'ies' if noun.endswith('y') else noun + 's'}"


def human(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")
