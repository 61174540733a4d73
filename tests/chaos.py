"""What the chaos test does to the folders, and the ledger that proves nothing was lost.

Every byte string the test ever writes is new (a counter leads it), so a content is known by
its hash wherever it ends up: at its path, at another path after a rename, in a conflict copy,
or in a versions area. The ledger records each one.

A user's own overwrite or delete destroys the content on that machine; backer cannot keep what
it never saw leave. So when the test overwrites or deletes a content on one node, the ledger
looks at the other nodes: if the content is there (live or as a version), backer owes it from
then on and must still have it somewhere at the end; if it is nowhere else, the user destroyed
the only copy and it is excused. The decision at the content's last destruction stands.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

RESERVED = ".backer"
KEPT_AREAS = ("versions",)  # of the reserved directory: where replaced content is kept
RACY_NS = 2_000_000_000


def digest(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


class Hashes:
    """Content hashes of files, remembered by inode and stat so a tree is read once."""

    def __init__(self) -> None:
        self._known: dict[tuple[int, int, int, int], str] = {}

    def of(self, path: Path) -> str | None:
        try:
            with path.open("rb") as file:
                st = os.fstat(file.fileno())
                key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                found = self._known.get(key)
                if found is None:
                    found = digest(file.read())
                    # File times tick coarsely (a few ms): a file changed within the same tick
                    # keeps its stat, so only what has been still a while is remembered.
                    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS:
                        self._known[key] = found
                return found
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def live(self, folder: Path) -> dict[str, str]:
        """What a user sees: relative path -> content hash, outside the reserved directory."""
        seen: dict[str, str] = {}
        for rel in live_files(folder):
            found = self.of(folder / rel)
            if found is not None:
                seen[rel] = found
        return seen

    def kept(self, folder: Path) -> set[str]:
        """Every content a folder holds: live, conflict copies and versions."""
        held = set(self.live(folder).values())
        for area in KEPT_AREAS:
            for dirpath, _, names in os.walk(folder / RESERVED / area):
                for name in names:
                    found = self.of(Path(dirpath) / name)
                    if found is not None:
                        held.add(found)
        return held


def live_files(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, names in os.walk(folder):
        if dirpath == str(folder):
            dirnames[:] = [d for d in dirnames if d != RESERVED]
        rel_dir = os.path.relpath(dirpath, folder)
        for name in names:
            found.append(name if rel_dir == "." else f"{rel_dir}/{name}")
    return sorted(found)


@dataclass
class Ledger:
    written: dict[str, int] = field(default_factory=dict)  # hash -> size
    excused: set[str] = field(default_factory=set)
    operations: Counter[str] = field(default_factory=Counter)
    history: dict[str, list[str]] = field(default_factory=dict)  # hash -> what befell it
    paths: dict[str, set[str]] = field(default_factory=dict)  # hash -> paths it was written at

    def note(self, h: str, what: str, path: str) -> None:
        self.history.setdefault(h, []).append(what)
        self.paths.setdefault(h, set()).add(path)

    def lost(self, held: set[str]) -> dict[str, int]:
        """Owed contents that are nowhere: hash -> size (must be empty)."""
        return {
            h: size for h, size in self.written.items() if h not in held and h not in self.excused
        }


class Chaos:
    """Random user activity on `folders` (by index), logged in `ledger`."""

    def __init__(self, folders: list[Path], rng: random.Random) -> None:
        self.folders = folders
        self.rng = rng
        self.ledger = Ledger()
        self.hashes = Hashes()
        self.serial = 0
        self.round = 0

    # -- contents --------------------------------------------------------------------------

    def fresh(self) -> bytes:
        self.serial += 1
        size = (
            self.rng.randint(1 << 20, 3 << 20)
            if self.rng.random() < 0.05
            else self.rng.randint(0, 48 << 10)
        )
        return f"#{self.serial}\n".encode() + self.rng.randbytes(size)

    def _wrote(self, data: bytes, node: int, rel: str, how: str) -> None:
        h = digest(data)
        self.ledger.written[h] = len(data)
        self.ledger.note(h, f"round {self.round}: written on node {node} at {rel} ({how})", rel)

    def _destroying(self, node: int, old: bytes | None, rel: str = "") -> None:
        """A content at a path of `node` is about to be overwritten or deleted by the user."""
        if old is not None:
            self._destroying_hash(node, digest(old), rel)

    def _destroying_hash(self, node: int, h: str, rel: str) -> None:
        if h not in self.ledger.written:
            return
        holders = [
            i
            for i, folder in enumerate(self.folders)
            if i != node and h in self.hashes.kept(folder)
        ]
        elsewhere = bool(holders)
        self.ledger.note(
            h, f"round {self.round}: destroyed on node {node} at {rel}; also on {holders}", rel
        )
        if elsewhere:
            self.ledger.excused.discard(h)
        else:
            self.ledger.excused.add(h)

    def edited_at_swap(self, node: int, edit: dict[str, Any]) -> None:
        """A user's edit a node made at the very step a pull swapped the path (tests/
        chaos_node.py journals them): what it wrote is owed like any write."""
        self._destroying_hash(node, edit["old"], edit["path"])
        self.ledger.written[edit["new"]] = edit["size"]
        what = f"round {self.round}: {edit['how']} on node {node} at {edit['path']}"
        self.ledger.note(edit["new"], what, edit["path"])
        self.ledger.operations["edit at the swap"] += 1

    # -- operations ------------------------------------------------------------------------

    def step(self, node: int) -> None:
        """One random user action on `node`'s folder."""
        files = live_files(self.folders[node])
        roll = self.rng.random()
        if not files or roll < 0.30:
            self.create(node)
        elif roll < 0.55:
            self.edit(node, self.rng.choice(files))
        elif roll < 0.63:
            self.delete(node, self.rng.choice(files))
        elif roll < 0.65:
            self.wipe_directory(node)
        elif roll < 0.78:
            self.rename(node, self.rng.choice(files))
        elif roll < 0.83:
            self.move_directory(node)
        else:
            self.concurrent(node, self.rng.choice(files))

    def create(self, node: int) -> None:
        depth = self.rng.randint(0, 2)
        parts = [f"d{self.rng.randint(0, 4)}" for _ in range(depth)]
        rel = "/".join([*parts, f"f{self.serial + 1}.bin"])
        self.write(node, rel, self.fresh())
        self.ledger.operations["create"] += 1

    def edit(self, node: int, rel: str) -> None:
        path = self.folders[node] / rel
        how = self.rng.random()
        if how < 0.4:
            self.write(node, rel, self.fresh())
        else:
            self._edit_in_place(node, path, append=how < 0.7)
        self.ledger.operations["edit"] += 1

    def _edit_in_place(self, node: int, path: Path, *, append: bool) -> None:
        """Append, or change bytes in the middle, through one descriptor: what is destroyed
        and what is written are exactly that inode's before and after, whatever backer
        renames around it meanwhile."""
        try:
            fd = os.open(path, os.O_RDWR)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return
        try:
            old = _read_all(fd)
            self._destroying(node, old, str(path))
            self.serial += 1
            patch = f"#{self.serial}\n".encode() + self.rng.randbytes(self.rng.randint(1, 4096))
            at = len(old) if append or not old else self.rng.randrange(len(old))
            os.pwrite(fd, patch, at)
            self._wrote(_read_all(fd), node, str(path), "appended" if append else "patched")
        finally:
            os.close(fd)

    def write(self, node: int, rel: str, data: bytes) -> None:
        """Write a whole new content at `rel`: in place, or as editors do (temp, rename)."""
        path = self.folders[node] / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            return
        if self.rng.random() < 0.5:
            self._wrote(data, node, rel, "temp and rename")
            temp = path.with_name(f".{path.name}.~{self.serial}")
            temp.write_bytes(data)
            self._destroying(node, _read_or_none(path), rel)
            os.replace(temp, path)
            return
        self._wrote(data, node, rel, "in place")
        with path.open("ab+") as file:
            file.seek(0)
            self._destroying(node, file.read(), rel)
            file.seek(0)
            file.truncate()
            file.write(data)

    def delete(self, node: int, rel: str) -> None:
        path = self.folders[node] / rel
        self._destroying(node, _read_or_none(path), rel)
        try:
            path.unlink()
        except (FileNotFoundError, IsADirectoryError):
            return
        self.ledger.operations["delete"] += 1

    def rename(self, node: int, rel: str) -> None:
        folder = self.folders[node]
        target = folder / f"d{self.rng.randint(0, 4)}" / f"moved{self.serial}-{Path(rel).name}"
        self.serial += 1
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(folder / rel, target)
        except OSError:  # gone, or across a sub-mount (EXDEV): a user would copy instead
            return
        moved = self.hashes.of(target)
        if moved is not None and moved in self.ledger.written:
            self.ledger.note(
                moved, f"round {self.round}: renamed on node {node}: {rel} -> {target}", rel
            )
        self.ledger.operations["rename"] += 1

    def move_directory(self, node: int) -> None:
        folder = self.folders[node]
        dirs = [p for p in folder.glob("d*/*") if p.is_dir()] + list(folder.glob("d*"))
        dirs = [d for d in dirs if d.is_dir()]
        if not dirs:
            self.create(node)
            return
        source = self.rng.choice(dirs)
        self.serial += 1
        try:
            os.rename(source, folder / f"d{self.rng.randint(0, 4)}x{self.serial}")
        except OSError:
            return
        self.ledger.operations["rename directory"] += 1

    def concurrent(self, node: int, rel: str) -> None:
        """The same path edited on two machines before either hears of the other."""
        other = self.rng.choice([i for i in range(len(self.folders)) if i != node])
        self.write(node, rel, self.fresh())
        self.write(other, rel, self.fresh())
        self.ledger.operations["concurrent edit"] += 1

    def wipe_directory(self, node: int) -> None:
        """Delete a small directory with what is in it (kept small: a mass deletion would
        rightly pause the folder)."""
        folder = self.folders[node]
        small = [d for d in folder.glob("d*") if d.is_dir() and len(live_files(d)) <= 5]
        if not small:
            return
        victim = self.rng.choice(small)
        for rel in live_files(victim):
            self._destroying(node, _read_or_none(victim / rel), f"{victim.name}/{rel}")
        shutil.rmtree(victim, ignore_errors=True)
        self.ledger.operations["delete directory"] += 1


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
