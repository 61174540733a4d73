"""Scans of a list of paths (what the watcher hands over): each named path costs a stat and an
indexed lookup, not a listing of its directory, with every rule of a full scan kept; and the
paths a pull wrote are not read again."""

from __future__ import annotations

import os
import sys
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from benchrun import run_quick
from conftest import folder_paths
from test_scan import DEVICE, OLD, live, write

from backer.index import scan as scan_module
from backer.index.entry import Kind
from backer.index.scan import ScanReport, scan
from backer.index.store import IndexStore
from backer.sync.replica import Replica
from backer.sync.replicate import replicate


async def rescan(folder: Path, store: IndexStore, paths: list[str] | None = None) -> ScanReport:
    return await scan(folder, store, device=DEVICE, paths=paths)


class Calls:
    """Counts the calls made to a patched function, by their first argument."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> None:
        self.args: list[object] = []
        original: Callable[..., Any] = getattr(owner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.args.append(args[0] if args else None)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


async def test_named_files_in_a_large_directory_are_not_listed_nor_their_siblings_loaded(
    folder: Path, store: IndexStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(300):
        write(folder, f"big/f{i:03}", b"old")
    write(folder, "big/dir/inner", b"in")
    await rescan(folder, store)
    write(folder, "big/f001", b"changed", mtime=OLD + 1)
    (folder / "big/f002").unlink()
    write(folder, "big/new", b"new")
    write(folder, "big/newdir/deep/file", b"deep")
    listed = Calls(monkeypatch, os, "scandir")
    loaded = Calls(monkeypatch, IndexStore, "children")
    report = await rescan(
        folder, store, ["big/f001", "big/f002", "big/f003", "big/new", "big/newdir/deep/file"]
    )
    # Only the new directory is listed (its contents are new); "big" is not, nor loaded.
    assert sorted(map(str, listed.args)) == [
        str(folder / "big/newdir"),
        str(folder / "big/newdir/deep"),
    ]
    assert loaded.args == [store, store]  # the two new directories' (empty) records
    assert report.hashed_files == 3  # f001, new, deep/file: not f003, unchanged
    changed, gone = store.get("big/f001"), store.get("big/f002")
    assert changed is not None and changed.entry.size == len(b"changed")
    assert gone is not None and gone.entry.deleted
    assert {"big/new", "big/newdir", "big/newdir/deep", "big/newdir/deep/file"} <= set(live(store))
    assert len([p for p in live(store) if p.startswith("big/f")]) == 299


async def test_a_named_path_keeps_every_rule_of_a_full_scan(
    folder: Path, store: IndexStore
) -> None:
    write(folder, "d/was_file", b"1")
    write(folder, "d/was_dir/child", b"2")
    write(folder, "d/to_ignore", b"3")
    write(folder, "d/to_fifo", b"4")
    write(folder, "d/racy", b"5", mtime=int(os.path.getmtime(folder)))
    await rescan(folder, store)
    (folder / "d/was_file").unlink()
    write(folder, "d/was_file/now_inside", b"6")  # a file became a directory
    (folder / "d/was_dir/child").unlink()
    (folder / "d/was_dir").rmdir()
    write(folder, "d/was_dir", b"7")  # a directory became a file
    write(folder, ".backerignore", b"to_ignore\n")
    (folder / "d/to_fifo").unlink()
    os.mkfifo(folder / "d/to_fifo")
    report = await rescan(
        folder,
        store,
        ["d/was_file", "d/was_dir", "d/to_ignore", "d/to_fifo", "d/racy", ".backerignore"],
    )
    assert live(store) == {
        "d": Kind.DIR,
        "d/was_file": Kind.DIR,
        "d/was_file/now_inside": Kind.FILE,
        "d/was_dir": Kind.FILE,
        "d/racy": Kind.FILE,
        ".backerignore": Kind.FILE,
    }
    assert store.get("d/to_ignore") is None  # forgotten, not deleted
    child, fifo = store.get("d/was_dir/child"), store.get("d/to_fifo")
    assert child is not None and child.entry.deleted
    assert fifo is not None and fifo.entry.deleted
    assert {s.path for s in report.skipped} == {"d/to_fifo"}
    assert report.hashed_files == 4  # now_inside, was_dir, .backerignore, and racy re-read


@pytest.mark.parametrize(
    "name",
    [
        unicodedata.normalize("NFD", "café"),  # decomposed on disk, NFC in the index
        "\u212aelvin",  # KELVIN SIGN on disk, "Kelvin" after NFC
    ],
)
async def test_a_name_spelled_otherwise_on_disk_is_found_by_a_listing(
    folder: Path, store: IndexStore, name: str
) -> None:
    nfc = unicodedata.normalize("NFC", name)
    assert nfc != name
    write(folder, "d/other", b"0")
    await rescan(folder, store)
    write(folder, f"d/{name}", b"1")
    await rescan(folder, store, [f"d/{nfc}"])  # what the watcher reports: the NFC path
    record = store.get(f"d/{nfc}")
    assert record is not None and record.local.disk_name == name
    os.unlink(folder / "d" / name)
    await rescan(folder, store, [f"d/{nfc}"])
    gone = store.get(f"d/{nfc}")
    assert gone is not None and gone.entry.deleted


async def test_a_path_under_a_named_directory_is_scanned_once(
    folder: Path, store: IndexStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(folder, "a/b/c", b"1")
    reads = Calls(monkeypatch, scan_module, "_read_file")
    await rescan(folder, store, ["a", "a/b", "a/b/c"])
    assert len(reads.args) == 1
    assert set(live(store)) == {"a", "a/b", "a/b/c"}


def test_only_three_characters_become_ascii_under_nfc() -> None:
    """The premise of `_one_spelling`: an ASCII name without K, ; or ` is spelled one way."""
    images = {
        ch
        for code in range(0x80, sys.maxunicode + 1)
        if not 0xD800 <= code < 0xE000
        for ch in unicodedata.normalize("NFC", chr(code))
        if ch.isascii()
    }
    assert images == set(scan_module._ASCII_IMAGES)


async def test_the_copy_does_not_read_again_what_a_pull_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, copy = tmp_path / "source", tmp_path / "copy"
    for i in range(40):
        write(source, f"dir/f{i}", os.urandom(100 + i))
    write(source, "large", os.urandom(3 * 1024 * 1024))  # hashed in the pool, not inline
    os.symlink("dir/f1", source / "link")
    copy.mkdir()
    result = await replicate(source, copy)
    assert result.in_sync
    written = folder_paths(copy)
    assert len(written) == 43
    reads = Calls(monkeypatch, scan_module, "_read_file")
    replica = await Replica.open(copy, device=1)
    try:
        before = replica.root
        report = await replica.scan(written)  # what the watcher hands over after the pull
        assert reads.args == []
        assert (report.hashed_files, report.updated) == (0, 0)
        assert replica.root == before
    finally:
        await replica.close()


def test_the_path_scan_benchmark_runs(tmp_path: Path) -> None:
    stdout = run_quick("scan_paths_bench.py", tmp_path, timeout=120)
    assert "per path us" in stdout and "k x listing" in stdout, stdout
