"""What a copy must match: a signature per file (size, mode, mtime, BLAKE3 of the contents) and
per directory, computed over a whole tree (with a cache, so an unchanged file is read once),
and how two trees differ. Imports common only.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import blake3
from common import MIB

__all__ = ["FileSig", "SigCache", "TreeDiff", "file_digest", "tree_signatures"]


@dataclass(frozen=True, slots=True)
class FileSig:
    """What a copy of a file must match: size, permission bits, mtime and contents."""

    size: int  # -1 for a directory
    mode: int
    mtime_ns: int
    content: str  # BLAKE3 hex ("" for a directory)


# (inode, size, mtime, ctime) of a file when it was hashed, and what it hashed to: any write
# changes the ctime, so a file whose key is unchanged need not be read again.
SigCache = dict[str, tuple[tuple[int, int, int, int], FileSig]]


def file_digest(path: Path | str, buffer: bytearray | None = None) -> str:
    """BLAKE3 of a file's contents, hex (every core hashing, as b3sum does)."""
    buffer = buffer if buffer is not None else bytearray(4 * MIB)
    view = memoryview(buffer)
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb", buffering=0) as stream:
        while count := stream.readinto(buffer):
            hasher.update(view[:count])
    return hasher.hexdigest()


def tree_signatures(
    root: Path, *, skip: Collection[str] = (".backer",), cache: SigCache | None = None
) -> dict[str, FileSig]:
    """Every file under `root` with its signature, the names in `skip` at the top left out (a
    tool's own index or markers); directories as entries of size -1, so that a missing empty
    directory is seen too. With a `cache`, a file unchanged since it was last hashed (same
    inode, size, mtime and ctime) is not read again."""
    found: dict[str, FileSig] = {}
    buffer = bytearray(4 * MIB)
    for directory, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(directory, root)
        if rel_dir == ".":
            dirs[:] = [d for d in dirs if d not in skip]
            files = [f for f in files if f not in skip]
            rel_dir = ""
        for name in dirs:
            found[os.path.join(rel_dir, name) + "/"] = FileSig(-1, 0, 0, "")
        for name in files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            known = cache.get(path) if cache is not None else None
            if known is not None and known[0] == key:
                sig = known[1]
            else:
                sig = FileSig(
                    st.st_size, st.st_mode & 0o7777, st.st_mtime_ns, file_digest(path, buffer)
                )
                if cache is not None:
                    cache[path] = (key, sig)
            found[os.path.join(rel_dir, name)] = sig
    return found


@dataclass(frozen=True, slots=True)
class TreeDiff:
    """How a copy's signatures differ from the original's (paths, sorted)."""

    missing: list[str]
    extra: list[str]
    content: list[str]  # in both, other sizes or contents
    meta: list[str]  # same contents, another mode or mtime

    @classmethod
    def between(cls, expected: dict[str, FileSig], found: dict[str, FileSig]) -> TreeDiff:
        both = set(expected) & set(found)
        return cls(
            missing=sorted(set(expected) - set(found)),
            extra=sorted(set(found) - set(expected)),
            content=sorted(
                p
                for p in both
                if (expected[p].size, expected[p].content) != (found[p].size, found[p].content)
            ),
            meta=sorted(p for p in both if expected[p] != found[p]),
        )

    @property
    def same_contents(self) -> bool:
        return not (self.missing or self.extra or self.content)

    def describe(self) -> str:
        return (
            f"missing {self.missing[:3]} ({len(self.missing)}), extra {self.extra[:3]} "
            f"({len(self.extra)}), other contents {self.content[:3]} ({len(self.content)})"
        )
