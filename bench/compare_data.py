"""The comparison suite's data: the trees it syncs and the source folders each tool starts from
(the changes it makes to them are `compare_changes`').

A `Tree` is one or more cached `common` datasets under path prefixes: the `mixed` tree joins four
(code, an album, documents, media); `many` one directory of 20,000 files and two spreads of
directories of about 125 and 750 files; `source` is one dataset shaped like a source checkout.
Each tool gets its own source folder, made by `materialise`: hard links to the cached files (no
copying; every tool reads the same page-cache pages), except the files a mutation will write
into in place, which get private copies. Imports common only.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from common import (
    KIB,
    MIB,
    BenchError,
    Dataset,
    DatasetSpec,
    Shape,
    SourceSpec,
    ensure_dataset,
)

__all__ = [
    "FULL_TREES",
    "QUICK_TREES",
    "TOOL_FILES",
    "Tree",
    "TreeSpec",
    "check_private",
    "materialise",
]

# A tool's own files at the top of a folder, never part of what is compared.
TOOL_FILES = (".backer", ".stfolder", ".stversions", ".stignore")


@dataclass(frozen=True, slots=True)
class TreeSpec:
    """A tree made of cached datasets, each under its own prefix ("" for the top)."""

    name: str
    parts: tuple[tuple[str, Shape], ...]
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

    def private(self) -> list[str]:
        """Every file some mutation writes into in place: each tool's source holds a copy of
        its own, not a link to the cache."""
        return sorted({*self.large(), self.edit_target()[0]})

    def edit_target(self) -> tuple[str, Path]:
        """The file the edit right after the initial sync writes into (its path in the tree,
        and the cached file): one of the directory holding the most files (ties: the first by
        name), picked by a seed, so a tool busy with that directory is caught."""
        counts = Counter(os.path.dirname(rel) for rel, _ in self.files)
        crowded = min(counts, key=lambda d: (-counts[d], d))
        candidates = sorted(
            (joined, dataset.root / rel)
            for prefix, dataset in self.parts
            for rel, _ in dataset.files
            if os.path.dirname(joined := f"{prefix}/{rel}" if prefix else rel) == crowded
        )
        return random.Random(f"edit target:{self.name}").choice(candidates)

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


def _source(name: str, packages: int, big_dirs: tuple[int, ...], large: int) -> SourceSpec:
    return SourceSpec(
        name=name,
        packages=packages,
        package_files=(4, 30),
        max_size=16 * KIB,
        big_dirs=big_dirs,
        large=large,
        large_sizes=(100 * KIB, MIB if large > 2 else 256 * KIB),
        seed=71,
    )


def _trees(quick: bool) -> tuple[TreeSpec, ...]:
    """The trees of the issues: `small`, `large` (the datasets every benchmark shares), `mixed`,
    `source` (shaped like a source checkout: about 7,600 files in 300 directories, two of 1,100
    and 1,400 entries) and `many` (100,000 files of 256 B-4 KiB, 20,000 of them in `big/`, the
    rest in directories of about 125 and 750); tiny ones with the same shapes for a quick run
    (`many` and `source` with one directory of 250-300 files)."""
    tiny = (256, 4 * KIB)
    if quick:
        small = _spec("quick-small", 300, (KIB, 64 * KIB), 10, 2)
        large = _spec("quick-large", 2, (8 * MIB, 8 * MIB), 0, 1)
        code = _spec("quick-mixed-code", 200, (0, 16 * KIB), 10, 61)
        album = _spec("quick-mixed-album", 50, (16 * KIB, 64 * KIB), 0, 62)
        docs = _spec("quick-mixed-docs", 10, (64 * KIB, 512 * KIB), 2, 63)
        media = _spec("quick-mixed-media", 1, (2 * MIB, 4 * MIB), 0, 64)
        churn = 10
        source = _source("quick-source", 10, (250,), 2)
        crowd = _spec("quick-many-big", 300, tiny, 0, 81)
        spread: tuple[tuple[str, Shape], ...] = (
            ("dirs", _spec("quick-many-dirs", 300, tiny, 3, 82)),
        )
    else:
        small = _spec("small", 20_000, (KIB, 64 * KIB), 1000, 2)
        large = _spec("large", 4, (256 * MIB, 256 * MIB), 0, 1)
        code = _spec("mixed-code", 3000, (0, 16 * KIB), 150, 61)
        album = _spec("mixed-album", 500, (16 * KIB, 256 * KIB), 0, 62)
        docs = _spec("mixed-docs", 300, (64 * KIB, MIB), 20, 63)
        media = _spec("mixed-media", 3, (16 * MIB, 64 * MIB), 0, 64)
        churn = 100
        source = _source("source", 190, (1400, 1100), 8)
        crowd = _spec("many-big", 20_000, tiny, 0, 81)
        spread = (
            ("dirs125", _spec("many-dirs125", 20_000, tiny, 160, 82)),
            ("dirs750", _spec("many-dirs750", 60_000, tiny, 80, 83)),
        )
    prefix = "quick-" if quick else ""
    return (
        TreeSpec(name=small.name, parts=(("", small),)),
        TreeSpec(
            name=large.name, parts=(("", large),), mutations=("append", "edit"), large_files=2
        ),
        TreeSpec(
            name=f"{prefix}mixed",
            parts=(("code", code), ("photos/album", album), ("docs", docs), ("media", media)),
            mutations=("churn", "rename"),
            churn=churn,
            album="photos/album",
        ),
        TreeSpec(name=source.name, parts=(("", source),)),
        TreeSpec(name=f"{prefix}many", parts=(("big", crowd), *spread)),
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


def check_private(tree: Tree, source: Path) -> None:
    """The files written into in place must not be hard links to the cached dataset."""
    for rel in tree.private():
        if (source / rel).stat().st_nlink != 1:
            raise BenchError(f"{rel} in {source} is shared with the cached dataset")
