"""The comparison suite's data: the trees it syncs, the private copies each tool starts from, the
mutations it applies, and what a copy must hold once a mutation has arrived.

A `Tree` is one or more cached `common` datasets under path prefixes (the `mixed` tree joins four:
code, an album, documents, media). Each tool gets its own source folder, made by
`materialise`: hard links to the cached files (no copying; every tool reads the same page-cache
pages), except the files a mutation will write into in place, which get private copies.

A `Mutation` plans a `Change` from the source folder as it is (seeded, so every tool gets the
same change) and applies it; the change carries `expected`, the signature of every path it
touches, computed in memory before anything is written, so that waiting for the change to
arrive costs the machine almost nothing while a tool works. Imports common only.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import blake3
from common import (
    KIB,
    MIB,
    BenchError,
    Dataset,
    DatasetSpec,
    ensure_dataset,
)
from trees import (
    file_digest,
)

__all__ = [
    "FULL_TREES",
    "MUTATIONS",
    "QUICK_TREES",
    "Change",
    "Expectation",
    "Mutation",
    "Tree",
    "TreeSpec",
    "materialise",
]

EDIT_SIZE = 4 * KIB
INSERT_SIZE = 100  # bytes an edited small file gains in its middle
# A tool's own files at the top of a folder, never part of what is compared.
TOOL_FILES = (".backer", ".stfolder", ".stversions", ".stignore")


@dataclass(frozen=True, slots=True)
class TreeSpec:
    """A tree made of cached datasets, each under its own prefix ("" for the top)."""

    name: str
    parts: tuple[tuple[str, DatasetSpec], ...]
    mutations: tuple[str, ...] = ()  # keys of the MUTATIONS applied to it, in order
    large_files: int = 0  # files >= 1 MiB the large-file mutations write into (in place)
    churn: int = 0  # small files modified, deleted and added by the churn mutation
    album: str = ""  # prefix of the part that is one directory renamed by the rename mutation


@dataclass(frozen=True, slots=True)
class Tree:
    spec: TreeSpec
    parts: tuple[tuple[str, Dataset], ...]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def files(self) -> list[tuple[str, int]]:
        """(relative path in the tree, size) of every file."""
        return [
            (f"{prefix}/{rel}" if prefix else rel, size)
            for prefix, dataset in self.parts
            for rel, size in dataset.files
        ]

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def paths(self) -> list[Path]:
        return [path for _, dataset in self.parts for path in dataset.paths()]

    def large(self) -> list[str]:
        """The files the large-file mutations write into, in place (the first few >= 1 MiB)."""
        big = sorted(rel for rel, size in self.files if size >= MIB)
        return big[: self.spec.large_files]

    def dirs(self) -> set[str]:
        """Every directory of the tree, as relative paths ending in '/'."""
        found = set()
        for rel, _ in self.files:
            parent = os.path.dirname(rel)
            while parent:
                found.add(parent + "/")
                parent = os.path.dirname(parent)
        return found

    @classmethod
    def ensure(cls, workdir: Path, spec: TreeSpec, log: Callable[[str], None] = print) -> Tree:
        return cls(spec, tuple((p, ensure_dataset(workdir, s, log=log)) for p, s in spec.parts))


def _spec(name: str, files: int, sizes: tuple[int, int], dirs: int, seed: int) -> DatasetSpec:
    low, high = sizes
    return DatasetSpec(name=name, files=files, min_size=low, max_size=high, dirs=dirs, seed=seed)


def _trees(quick: bool) -> tuple[TreeSpec, ...]:
    """The three trees of the issue: `small`, `large` (the datasets every benchmark shares) and
    `mixed`; tiny ones with the same shape for a quick run."""
    if quick:
        small = _spec("quick-small", 300, (KIB, 64 * KIB), 10, 2)
        large = _spec("quick-large", 2, (8 * MIB, 8 * MIB), 0, 1)
        code = _spec("quick-mixed-code", 200, (0, 16 * KIB), 10, 61)
        album = _spec("quick-mixed-album", 50, (16 * KIB, 64 * KIB), 0, 62)
        docs = _spec("quick-mixed-docs", 10, (64 * KIB, 512 * KIB), 2, 63)
        media = _spec("quick-mixed-media", 1, (2 * MIB, 4 * MIB), 0, 64)
        churn = 10
    else:
        small = _spec("small", 20_000, (KIB, 64 * KIB), 1000, 2)
        large = _spec("large", 4, (256 * MIB, 256 * MIB), 0, 1)
        code = _spec("mixed-code", 3000, (0, 16 * KIB), 150, 61)
        album = _spec("mixed-album", 500, (16 * KIB, 256 * KIB), 0, 62)
        docs = _spec("mixed-docs", 300, (64 * KIB, MIB), 20, 63)
        media = _spec("mixed-media", 3, (16 * MIB, 64 * MIB), 0, 64)
        churn = 100
    return (
        TreeSpec(name=small.name, parts=(("", small),)),
        TreeSpec(
            name=large.name, parts=(("", large),), mutations=("append", "edit"), large_files=2
        ),
        TreeSpec(
            name="quick-mixed" if quick else "mixed",
            parts=(("code", code), ("photos/album", album), ("docs", docs), ("media", media)),
            mutations=("churn", "rename"),
            churn=churn,
            album="photos/album",
        ),
    )


FULL_TREES = _trees(quick=False)
QUICK_TREES = _trees(quick=True)


def materialise(tree: Tree, dest: Path, *, private: Iterable[str] = ()) -> None:
    """Fill `dest` (created if missing) with the tree: hard links to the cached files
    (`cp -al`, modes and mtimes kept), the files in `private` real copies, as they will be
    written into in place. A tool's own files in a cached dataset (another benchmark may have
    indexed it) are left out."""
    dest.mkdir(parents=True, exist_ok=True)
    for prefix, dataset in tree.parts:
        target = dest / prefix
        target.mkdir(parents=True, exist_ok=True)
        children = [str(c) for c in dataset.root.iterdir() if c.name not in TOOL_FILES]
        subprocess.run(["cp", "-al", *children, str(target)], check=True)
    for rel in private:
        path = dest / rel
        copy = path.with_name(path.name + ".private")
        shutil.copy2(path, copy)
        copy.replace(path)


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
    path = source / rel
    data = random.Random(f"edit:{step}").randbytes(EDIT_SIZE)
    content = bytearray(path.read_bytes())
    offset = len(content) // 2
    content[offset : offset + EDIT_SIZE] = data
    want = Want(len(content), _digest(content))

    def apply() -> None:
        with path.open("r+b") as out:
            out.seek(offset)
            out.write(data)

    return Change(f"{EDIT_SIZE // KIB} KiB overwritten at {offset:,} in {rel}", apply, {rel: want})


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
            key="rename",
            title=lambda spec: f"rename a directory of {_album_files(spec):,} files",
            plan=_rename_dir,
        ),
    )
}


def _album_files(spec: TreeSpec) -> int:
    return next(part.files for prefix, part in spec.parts if prefix == spec.album)


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


def check_private(tree: Tree, source: Path) -> None:
    """The files written into in place must not be hard links to the cached dataset."""
    for rel in tree.large():
        if (source / rel).stat().st_nlink != 1:
            raise BenchError(f"{rel} in {source} is shared with the cached dataset")
