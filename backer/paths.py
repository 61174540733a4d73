"""Folder-relative paths: the one definition of a valid name, used by the scanner and by every
decoder of peer input.

A valid path is relative, uses `/`, is NFC-normalised, has no empty, `.` or `..` component, no
NUL, no backslash, and has no component named `.backer` in any case, at any depth: `.Backer/` is
`.backer/` on a case-insensitive filesystem, and `sub/.backer/` is another share's own state.
Pure; imports only errors.
"""

from __future__ import annotations

import unicodedata

from backer.errors import InvalidPathError

__all__ = [
    "MAX_NAME_BYTES",
    "MAX_PATH_BYTES",
    "RESERVED_DIR",
    "check_name",
    "check_path",
    "is_reserved",
    "join",
    "parent_of",
]

RESERVED_DIR = ".backer"
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096


def check_name(name: str) -> str:
    """Return `name` if it is one valid path component, else raise InvalidPathError."""
    if name in ("", ".", ".."):
        raise InvalidPathError(f"invalid path component {name!r}")
    if "/" in name or "\\" in name or "\x00" in name:
        raise InvalidPathError(f"path component {name!r} holds a separator or NUL")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidPathError(f"path component {name!r} is not valid UTF-8") from exc
    if len(encoded) > MAX_NAME_BYTES:
        raise InvalidPathError(f"path component longer than {MAX_NAME_BYTES} bytes")
    if not unicodedata.is_normalized("NFC", name):
        raise InvalidPathError(f"path component {name!r} is not NFC-normalised")
    return name


def is_reserved(name: str) -> bool:
    """Whether `name` is the reserved directory's, in any case."""
    return name.casefold() == RESERVED_DIR


def check_path(path: str, *, indexed: bool = False) -> str:
    """Return `path` if it is a valid folder-relative path, else raise InvalidPathError.

    `indexed=True` for a path already in this device's index: an index made before reserved
    names were refused at every depth may still hold `sub/.backer/...`, which must load so
    that the next scan can forget it."""
    if not path:
        raise InvalidPathError("empty path")
    if path.startswith("/"):
        raise InvalidPathError(f"absolute path {path!r}")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise InvalidPathError(f"path longer than {MAX_PATH_BYTES} bytes")
    parts = path.split("/")
    for part in parts:
        check_name(part)
    if parts[0] == RESERVED_DIR or (not indexed and any(map(is_reserved, parts))):
        raise InvalidPathError(f"path {path!r} has the reserved name {RESERVED_DIR}")
    return path


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def parent_of(path: str) -> str:
    head, _, _ = path.rpartition("/")
    return head
