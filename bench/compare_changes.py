"""The changes the comparison suite makes to a tool's source folder, and what the copy must hold
once one has arrived.

A `Mutation` plans a `Change` from the source folder as it is (seeded, so every tool gets the
same change) and applies it; the change carries `expected`, the signature of every path it
touches, computed in memory before anything is written, so that waiting for the change to
arrive costs the machine almost nothing while a tool works. Imports common, trees and
compare_data.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import blake3
from common import KIB, MIB
from compare_data import Tree, TreeSpec
from trees import file_digest

__all__ = [
    "EDIT_AFTER_INITIAL",
    "MUTATIONS",
    "Change",
    "Expectation",
    "Mutation",
    "edit_after_initial",
    "whole_tree",
]

EDIT_SIZE = 4 * KIB
EDIT_AFTER_INITIAL = "edit-after-initial"  # the mutation made as soon as an initial sync is done
FRESH_EDIT_SIZE = KIB
INSERT_SIZE = 100  # bytes an edited small file gains in its middle


# -- what a copy must hold ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Want:
    """A file as it must be: its size and BLAKE3 (None: any contents of that size)."""

    size: int
    digest: str | None = None


# A path's expected state: a file (Want), a directory (DIR) or nothing there (None).
DIR = "dir"
Expected = Want | str | None


@dataclass(slots=True)
class Expectation:
    """Paths (directories end in '/') and what must be there, checked cheaply and often: a
    file counts once it has the right size at its final path (every tool writes a temporary
    file and renames it into place) and, if a digest is wanted, hashes to it; each version of
    a file (inode, size, mtime) is hashed once at most. Paths are checked in order and a check
    stops at the first one still pending, so a poll costs little while a tool is busy."""

    root: Path
    wants: dict[str, Expected]
    _pending: list[str] = field(default_factory=list)
    _hashed: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._pending = sorted(self.wants, reverse=True)  # popped from the end

    @property
    def left(self) -> int:
        return len(self._pending)

    def met(self) -> bool:
        while self._pending:
            if not self._holds(self._pending[-1]):
                return False
            self._pending.pop()
        return True

    def _holds(self, rel: str) -> bool:
        want = self.wants[rel]
        path = self.root / rel
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return want is None
        if want is None:
            return False
        if want == DIR:
            return os.path.isdir(path)
        assert isinstance(want, Want)
        if st.st_size != want.size or not os.path.isfile(path):
            return False
        if want.digest is None:
            return True
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._hashed.get(rel) == key:
            return False  # this version was hashed already and was not it
        self._hashed[rel] = key
        return file_digest(path) == want.digest


def whole_tree(tree: Tree, root: Path) -> Expectation:
    """The expectation of an initial sync: every file at its size, every directory."""
    wants: dict[str, Expected] = {rel: Want(size) for rel, size in tree.files}
    wants.update(dict.fromkeys(tree.dirs(), DIR))
    return Expectation(root, wants)


# -- mutations ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Change:
    """One planned mutation of a source folder: `apply` writes it; `expected` is every touched
    path's state afterwards (relative paths; directories end in '/')."""

    label: str
    apply: Callable[[], None]
    expected: dict[str, Expected]

    def expectation(self, copy: Path) -> Expectation:
        return Expectation(copy, dict(self.expected))


@dataclass(frozen=True, slots=True)
class Mutation:
    """A kind of change; `plan(tree, source, step)` makes the change for one run (`step`
    seeds it, so every tool's run number k gets the same change)."""

    key: str
    title: Callable[[TreeSpec], str]  # for the report, with the tree's figures
    plan: Callable[[Tree, Path, int], Change]


def _append_byte(tree: Tree, source: Path, step: int) -> Change:
    rel = tree.large()[0]
    path = source / rel
    data = random.Random(f"append:{step}").randbytes(1)
    hasher = _file_hasher(path)
    hasher.update(data)
    want = Want(path.stat().st_size + 1, hasher.hexdigest())

    def apply() -> None:
        with path.open("ab") as out:
            out.write(data)

    return Change(f"1 byte appended to {rel}", apply, {rel: want})


def _edit_middle(tree: Tree, source: Path, step: int) -> Change:
    rel = tree.large()[1]
    data = random.Random(f"edit:{step}").randbytes(EDIT_SIZE)
    offset = (source / rel).stat().st_size // 2
    want = _overwritten(source / rel, offset, data)
    label = f"{EDIT_SIZE // KIB} KiB overwritten at {offset:,} in {rel}"
    return _overwrite(label, source, rel, offset=offset, data=data, want=want)


def edit_after_initial(tree: Tree) -> Callable[[Path], Change]:
    """The edit made right after the initial sync: 1 KiB written in place into the middle of
    `Tree.edit_target` (a file of the most crowded directory). Planned once per tree, from the
    cached file (the same bytes as in every tool's source), so that making the change for a
    source folder reads nothing and it can be applied the moment the initial sync is done."""
    rel, cached = tree.edit_target()
    data = random.Random(f"{EDIT_AFTER_INITIAL}:{tree.name}").randbytes(FRESH_EDIT_SIZE)
    offset = max(0, (cached.stat().st_size - len(data)) // 2)
    want = _overwritten(cached, offset, data)
    crowd = sum(os.path.dirname(path) == os.path.dirname(rel) for path, _ in tree.files)
    label = (
        f"{len(data) // KIB} KiB written at {offset:,} in {rel} (a directory of {crowd:,} "
        "files), right after the initial sync"
    )
    return lambda source: _overwrite(label, source, rel, offset=offset, data=data, want=want)


def _overwritten(path: Path, offset: int, data: bytes) -> Want:
    """What `path` is once `data` is written at `offset` (read now, not written)."""
    content = bytearray(path.read_bytes())
    content[offset : offset + len(data)] = data
    return Want(len(content), _digest(content))


def _overwrite(
    label: str, source: Path, rel: str, *, offset: int, data: bytes, want: Want
) -> Change:
    """`data` written in place at `offset` of the source's `rel` (a private copy)."""
    path = source / rel

    def apply() -> None:
        with path.open("r+b") as out:
            out.seek(offset)
            out.write(data)

    return Change(label, apply, {rel: want})


def _churn(tree: Tree, source: Path, step: int) -> Change:
    """`churn` small files of the code part edited (saved anew, as an editor does: a new file
    renamed over the old), as many others deleted and as many new ones added beside them."""
    count = tree.spec.churn
    rng = random.Random(f"churn:{step}")
    code = sorted(_files_under(source, "code"))
    chosen = rng.sample(code, 2 * count)
    edited, deleted = chosen[:count], chosen[count:]
    writes: dict[str, bytes] = {}
    for rel in edited:
        old = (source / rel).read_bytes()
        at = rng.randrange(len(old) + 1)
        writes[rel] = old[:at] + rng.randbytes(INSERT_SIZE) + old[at:]
    dirs = sorted({os.path.dirname(rel) for rel in code})
    for index in range(count):
        rel = f"{rng.choice(dirs)}/new-{step:03d}-{index:04d}.dat"
        writes[rel] = rng.randbytes(rng.randint(KIB, 16 * KIB))
    expected: dict[str, Expected] = {rel: Want(len(d), _digest(d)) for rel, d in writes.items()}
    expected.update(dict.fromkeys(deleted))

    def apply() -> None:
        for rel, data in writes.items():
            path = source / rel
            temp = path.with_name(f".{path.name}.saving")
            temp.write_bytes(data)
            temp.replace(path)
        for rel in deleted:
            (source / rel).unlink()

    label = f"{count} small files edited, {count} deleted, {count} added"
    return Change(label, apply, expected)


def _rename_dir(tree: Tree, source: Path, step: int) -> Change:
    """The album directory (one directory of files) renamed, in place."""
    parent = source / os.path.dirname(tree.spec.album)
    base = os.path.basename(tree.spec.album)
    current = next(p for p in parent.iterdir() if p.name.startswith(base))
    new = parent / f"{base}-{step:03d}"
    old_rel = current.relative_to(source).as_posix()
    new_rel = new.relative_to(source).as_posix()
    expected: dict[str, Expected] = {old_rel + "/": None, new_rel + "/": DIR}
    names = sorted(p.name for p in current.iterdir())
    for name in names:
        path = current / name
        expected[f"{old_rel}/{name}"] = None
        expected[f"{new_rel}/{name}"] = Want(path.stat().st_size, file_digest(path))

    def apply() -> None:
        current.rename(new)

    return Change(f"directory {old_rel} of {len(names)} files renamed", apply, expected)


MUTATIONS = {
    mutation.key: mutation
    for mutation in (
        Mutation(
            key="append",
            title=lambda spec: "append 1 byte to a large file",
            plan=_append_byte,
        ),
        Mutation(
            key="edit",
            title=lambda spec: f"overwrite {EDIT_SIZE // KIB} KiB in the middle of a large file",
            plan=_edit_middle,
        ),
        Mutation(
            key="churn",
            title=lambda spec: (
                f"edit {spec.churn}, delete {spec.churn} and add {spec.churn} small files"
            ),
            plan=_churn,
        ),
        Mutation(
            key=EDIT_AFTER_INITIAL,
            # The file, and the size of its directory, are in each run's label.
            title=lambda spec: f"edit {FRESH_EDIT_SIZE // KIB} KiB right after the initial sync",
            plan=lambda tree, source, step: edit_after_initial(tree)(source),
        ),
        Mutation(
            key="rename",
            title=lambda spec: f"rename a directory of {_album_files(spec):,} files",
            plan=_rename_dir,
        ),
    )
}


def _album_files(spec: TreeSpec) -> int:
    return next(len(part.layout()) for prefix, part in spec.parts if prefix == spec.album)


def _files_under(root: Path, prefix: str) -> list[str]:
    found = []
    for directory, _dirs, files in os.walk(root / prefix):
        rel_dir = os.path.relpath(directory, root)
        found += [f"{rel_dir}/{name}" for name in files]
    return found


def _file_hasher(path: Path) -> blake3.blake3:
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with path.open("rb", buffering=0) as stream:
        while block := stream.read(4 * MIB):
            hasher.update(block)
    return hasher


def _digest(data: bytes | bytearray) -> str:
    return blake3.blake3(bytes(data), max_threads=blake3.blake3.AUTO).hexdigest()
