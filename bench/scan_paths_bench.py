"""Path-list scan benchmark: what a batch of k watcher paths costs in a directory of n entries.

The watcher hands the scanner the paths that changed, among them every path a pull just wrote.
Such a scan must cost O(k log n): a stat and an indexed lookup per path, never a listing of the
directory. For n in 1k, 5k, 20k and k in 10, 100, 1000 this times (in process, page cache warm,
median of 3) a scan of k unchanged files of one directory of n files, and beside it, in the same
run, the reference: one listing of that directory as a scan of it does it (scandir, NFC names,
sorted, the directory's index records loaded). The old scanner paid that listing for every path,
so `k x listing` is what the batch used to cost; `per path` must stay flat as n grows.

    python bench/scan_paths_bench.py           # the table
    python bench/scan_paths_bench.py --quick   # tiny smoke run

Writes no docs; the table is quoted in docs/design.md's scan section.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path

from backer.index.scan import scan
from backer.index.store import IndexStore

DEVICE = 1
OLD = 1_600_000_000  # an old mtime: no file is racy
RUNS = 3


def build(root: Path, n: int) -> IndexStore:
    """A folder with one directory of n small files, fully indexed."""
    root.mkdir()
    store = IndexStore.open(root, create=True)
    big = root / "big"
    big.mkdir()
    for i in range(n):
        path = big / f"file-{i:06}"
        path.write_bytes(i.to_bytes(4, "big"))
        os.utime(path, (OLD, OLD))
    asyncio.run(scan(root, store, device=DEVICE))
    return store


def median_seconds(run: Callable[..., object], *args: object) -> float:
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        run(*args)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def listing(root: Path, store: IndexStore) -> None:
    """One directory listing as a scan of it does it (the old per-path cost)."""
    found = sorted(
        (unicodedata.normalize("NFC", d.name), d.name, d.stat(follow_symlinks=False))
        for d in os.scandir(root / "big")
    )
    known = store.children("big")
    assert len(found) == len(known)


def path_scan(root: Path, store: IndexStore, paths: list[str]) -> None:
    report = asyncio.run(scan(root, store, device=DEVICE, paths=paths))
    assert report.hashed_files == 0 and report.updated == 0


def measure(workdir: Path, sizes: list[int], batches: list[int]) -> list[str]:
    rows = [
        f"{'n':>6} {'k':>5} {'path scan ms':>12} {'per path us':>11} "
        f"{'listing ms':>10} {'k x listing ms':>14} {'k x listing / path scan':>23}"
    ]
    chooser = random.Random(13)
    for n in sizes:
        root = workdir / f"n{n}"
        store = build(root, n)
        try:
            reference = median_seconds(listing, root, store)
            for k in batches:
                if k > n:
                    continue
                paths = [f"big/file-{i:06}" for i in chooser.sample(range(n), k)]
                took = median_seconds(path_scan, root, store, paths)
                rows.append(
                    f"{n:>6} {k:>5} {took * 1e3:>12.1f} {took / k * 1e6:>11.0f} "
                    f"{reference * 1e3:>10.1f} {k * reference * 1e3:>14.0f} "
                    f"{k * reference / took:>22.0f}x"
                )
        finally:
            store.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    sizes, batches = ([50, 200], [5, 20]) if args.quick else ([1000, 5000, 20000], [10, 100, 1000])
    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        rows = measure(Path(scratch), sizes, batches)
    print("path-list scan of k unchanged files in one directory of n (median of 3):")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
