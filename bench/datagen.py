"""Deterministic datasets for the benchmarks: what a tree of files is (a spec: names, sizes and
bytes all follow from it and its seed), the shared specs, and the cache under a workdir that
generates a dataset only when it is missing or no longer what its spec says.

Two shapes: `DatasetSpec`, files of seeded random bytes spread evenly over directories (every
benchmark's `small`, `large` and `many`), and `SourceSpec`, a tree shaped like a source checkout
(packages of text-like files, `__pycache__` directories of binary .pyc-like files beside the
Python ones, a few flat directories of a thousand or more entries, a few files of 100 KiB and
more). `common` re-exports everything here; this module imports nothing from bench/.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

__all__ = [
    "KIB",
    "LARGE",
    "MANY",
    "MIB",
    "OLD_MTIME",
    "QUICK_LARGE",
    "QUICK_MANY",
    "QUICK_SMALL",
    "SMALL",
    "Dataset",
    "DatasetSpec",
    "Shape",
    "SourceSpec",
    "describe",
    "ensure_dataset",
    "warm_page_cache",
]

# Bump when the layout or content of generated data changes: cached datasets are then rebuilt.
GENERATOR_VERSION = 1
# Every generated file and directory gets this mtime (2020-09-13), far outside any "racy" window,
# so a rescan measures the steady state and not files re-read because they looked too recent.
OLD_MTIME = 1_600_000_000
_WRITE_BLOCK = 4 * 1024 * 1024
KIB = 1024
MIB = 1024 * KIB


class Shape(Protocol):
    """What the cache needs of a spec (a dataclass, recorded whole in the manifest)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def name(self) -> str: ...

    @property
    def seed(self) -> int: ...

    def layout(self) -> list[tuple[str, int]]:
        """(relative path, size) of every file, in the order they are generated."""
        ...

    def contents(self, rng: random.Random, rel: str, size: int) -> Iterator[bytes]:
        """The bytes of one file, in blocks, from the generator shared by the whole dataset."""
        ...

    def describe(self, *, short: bool = False) -> str: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetSpec:
    """A deterministic tree of files: the same spec always yields the same names and bytes.

    Files are spread at random (seeded) over `dirs` leaf directories, grouped under about
    sqrt(dirs) parents; `dirs=0` puts every file at the top. Sizes are uniform in
    [min_size, max_size]; contents come from the same seeded generator.
    """

    name: str
    files: int
    min_size: int
    max_size: int
    dirs: int
    seed: int

    def layout(self) -> list[tuple[str, int]]:
        rng = random.Random(f"{self.seed}:layout")
        parents = max(1, round(self.dirs**0.5))
        result = []
        for index in range(self.files):
            size = rng.randint(self.min_size, self.max_size)
            if self.dirs:
                leaf = rng.randrange(self.dirs)
                result.append((f"p{leaf % parents:03d}/d{leaf:05d}/f{index:07d}.dat", size))
            else:
                result.append((f"f{index:07d}.dat", size))
        return result

    def contents(self, rng: random.Random, rel: str, size: int) -> Iterator[bytes]:
        left = size
        while left:
            block = min(left, _WRITE_BLOCK)
            yield rng.randbytes(block)
            left -= block

    def describe(self, *, short: bool = False) -> str:
        """The dataset in words, for tables and reports."""
        if self.min_size == self.max_size:
            sizes = f"{self.min_size / MIB:g} MiB"
        else:
            sizes = f"{self.min_size / KIB:g}-{self.max_size / KIB:g} KiB"
        where = f" in {self.dirs:,} directories" if self.dirs else ""
        if short:
            return f"{self.files:,} x {sizes}"
        return f"`{self.name}`: {self.files:,} files of {sizes}{where}"


# The datasets every benchmark shares (and caches in its workdir): one definition, so that the
# scan, sync and encryption figures are always about the same bytes.
LARGE = DatasetSpec(name="large", files=4, min_size=256 * MIB, max_size=256 * MIB, dirs=0, seed=1)
SMALL = DatasetSpec(name="small", files=20_000, min_size=KIB, max_size=64 * KIB, dirs=1000, seed=2)
MANY = DatasetSpec(name="many", files=100_000, min_size=0, max_size=2 * KIB, dirs=1000, seed=3)
QUICK_LARGE = DatasetSpec(
    name="quick-large", files=2, min_size=8 * MIB, max_size=8 * MIB, dirs=0, seed=1
)
QUICK_SMALL = DatasetSpec(
    name="quick-small", files=300, min_size=KIB, max_size=64 * KIB, dirs=10, seed=2
)
QUICK_MANY = DatasetSpec(
    name="quick-many", files=2000, min_size=0, max_size=2 * KIB, dirs=20, seed=3
)


# -- a source checkout ---------------------------------------------------------------------------

_TOPS = ("src", "lib", "tests", "tools", "docs")
_OTHER_EXTENSIONS = (".c", ".h", ".js", ".md", ".txt")
# Flat directories of many entries, in the order `SourceSpec.big_dirs` fills them: (path, file
# name extension, largest size); the binary ones hold random bytes.
_BIG_DIRS = (
    ("tests/fixtures", ".txt", 4 * KIB),
    ("assets/icons", ".png", 8 * KIB),
    ("locale/messages", ".po", 16 * KIB),
)
_BINARY = (".pyc", ".png", ".bin")
_KEYWORDS = (
    "def", "return", "if", "else", "for", "in", "import", "from", "class", "self", "None",
    "True", "with", "as", "not", "and", "yield", "raise", "try", "except", "lambda", "pass",
)  # fmt: skip
_PUNCTUATION = ("(", ")", ":", ", ", " = ", ".", "[", "]", "\n", "\n    ", "\n        ", "#")


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceSpec:
    """A tree shaped like a source checkout, deterministic like `DatasetSpec`.

    `packages` directories (under src/, lib/, tests/, tools/ and docs/, some nested in others)
    hold `package_files` (uniform range) text-like files each, sized 0-`max_size` with most of
    them small (exponential, mean `max_size` / 4); three packages in four (none under docs/) are
    Python ones and get a `__pycache__` directory with a binary .pyc-like file per module. The
    flat directories of `big_dirs` (entries each: test fixtures, icons, message catalogues) and
    `large` files of `large_sizes` (a bundled script or a data blob in some package) complete it.
    Text is made of code-like tokens: compressible, but no two files alike.
    """

    name: str
    packages: int
    package_files: tuple[int, int]
    max_size: int
    big_dirs: tuple[int, ...]
    large: int
    large_sizes: tuple[int, int]
    seed: int

    def layout(self) -> list[tuple[str, int]]:
        rng = random.Random(f"{self.seed}:layout")
        result: list[tuple[str, int]] = []
        packages: list[str] = []
        for index in range(self.packages):
            top = _TOPS[index % len(_TOPS)]
            nested = [p for p in packages if p.startswith(f"{top}/")]
            parent = rng.choice(nested) if nested and rng.random() < 0.4 else top
            package = f"{parent}/pkg{index:03d}"
            packages.append(package)
            python = top != "docs" and rng.random() < 0.75
            modules = []
            for number in range(rng.randint(*self.package_files)):
                size = min(self.max_size, int(rng.expovariate(4 / self.max_size)))
                if python:
                    # A package's __init__.py first, empty as often as not.
                    stem = "__init__" if number == 0 else f"m{number:04d}"
                    size = 0 if number == 0 and rng.random() < 0.5 else size
                    modules.append((stem, size))
                    result.append((f"{package}/{stem}.py", size))
                else:
                    extension = rng.choice(_OTHER_EXTENSIONS)
                    result.append((f"{package}/m{number:04d}{extension}", size))
            for stem, size in modules:
                compiled = 128 + size // 2 + rng.randrange(512)
                result.append((f"{package}/__pycache__/{stem}.cpython-311.pyc", compiled))
        for (where, extension, largest), entries in zip(_BIG_DIRS, self.big_dirs, strict=False):
            for number in range(entries):
                result.append((f"{where}/e{number:05d}{extension}", rng.randint(64, largest)))
        for number in range(self.large):
            extension = ".bin" if number % 2 else ".min.js"
            size = rng.randint(*self.large_sizes)
            result.append((f"{rng.choice(packages)}/bundle{number:02d}{extension}", size))
        return result

    def contents(self, rng: random.Random, rel: str, size: int) -> Iterator[bytes]:
        if rel.endswith(_BINARY) or not size:
            yield rng.randbytes(size)
            return
        # Identifiers of this file's own (so no two files share chunks), keywords, punctuation.
        names = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz_", k=rng.randint(3, 12)))]
        names += [f"{names[0]}_{rng.randrange(1000)}" for _ in range(40)]
        pieces = [*names, *_KEYWORDS, *_PUNCTUATION, " "]
        made = 0
        while made < size:
            want = min(size - made, _WRITE_BLOCK)
            text = " ".join(rng.choices(pieces, k=want // 6 + 8)).encode()[:want]
            made += len(text)
            yield text

    def describe(self, *, short: bool = False) -> str:
        files = len(self.layout())
        text = (
            f"{files:,} files shaped like a source checkout: {self.packages} packages of "
            f"{self.package_files[0]}-{self.package_files[1]} text files of 0-"
            f"{self.max_size / KIB:g} KiB with __pycache__ beside the Python ones, directories "
            f"of {', '.join(f'{n:,}' for n in self.big_dirs)} entries, {self.large} files of "
            f"{self.large_sizes[0] / KIB:g}-{self.large_sizes[1] / KIB:g} KiB"
        )
        return text if short else f"`{self.name}`: {text}"


def describe(spec: Shape, *, short: bool = False) -> str:
    """A dataset in words, for tables and reports."""
    return spec.describe(short=short)


# -- the cache -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dataset:
    spec: Shape
    root: Path
    files: tuple[tuple[str, int], ...]  # relative path, size

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def paths(self) -> list[Path]:
        return [self.root / rel for rel, _ in self.files]


def ensure_dataset(workdir: Path, spec: Shape, log: Callable[[str], None] = print) -> Dataset:
    """The dataset for `spec` under `workdir/data/`, generated only if the cached one is missing,
    was made from another spec or generator version, or no longer matches its manifest (a size
    or an mtime differs)."""
    data = workdir / "data"
    root = data / spec.name
    manifest = data / f"{spec.name}.json"
    files = tuple(spec.layout())
    dataset = Dataset(spec, root, files)
    expected = {
        "generator": GENERATOR_VERSION,
        "spec": asdict(spec),
        "files": len(files),
        "bytes": dataset.total_bytes,
        "mtime": OLD_MTIME,
    }
    try:
        cached = json.loads(manifest.read_text())
    except (OSError, ValueError):
        cached = None
    # JSON has no tuples: compare the manifest as it reads back.
    if cached == json.loads(json.dumps(expected)) and _intact(dataset):
        return dataset
    log(f"generating dataset {spec.name}: {len(files):,} files, {_mb(dataset.total_bytes)} ...")
    started = time.perf_counter()
    manifest.unlink(missing_ok=True)
    shutil.rmtree(root, ignore_errors=True)
    _generate(dataset)
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps(expected, indent=1) + "\n")
    tmp.replace(manifest)
    log(f"  done in {time.perf_counter() - started:.1f} s")
    return dataset


def _generate(dataset: Dataset) -> None:
    rng = random.Random(f"{dataset.spec.seed}:content")
    dirs: set[Path] = {dataset.root}
    dataset.root.mkdir(parents=True)
    for rel, size in dataset.files:
        path = dataset.root / rel
        if path.parent not in dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            dirs.update(path.parents)
        with path.open("wb") as out:
            for block in dataset.spec.contents(rng, rel, size):
                out.write(block)
        os.utime(path, (OLD_MTIME, OLD_MTIME))
    for directory in sorted(d for d in dirs if d.is_relative_to(dataset.root)):
        os.utime(directory, (OLD_MTIME, OLD_MTIME))


def _intact(dataset: Dataset) -> bool:
    mtime_ns = OLD_MTIME * 1_000_000_000
    try:
        for path, (_, size) in zip(dataset.paths(), dataset.files, strict=True):
            st = os.stat(path)
            if st.st_size != size or st.st_mtime_ns != mtime_ns:
                return False
    except OSError:
        return False
    return True


def warm_page_cache(paths: Sequence[Path]) -> None:
    """Read every file once, so timed runs read from memory and compare computation."""
    buffer = bytearray(_WRITE_BLOCK)
    for path in paths:
        with path.open("rb", buffering=0) as stream:
            while stream.readinto(buffer):
                pass


def _mb(count: int) -> str:
    return f"{count / 1e6:,.0f} MB"
