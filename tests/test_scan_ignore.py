"""A changed `.backerignore` rescans what it changes (issue 14, case 6): the watcher names only
the ignore file, and a scan of that one path left un-ignored files out until the hourly rescan."""

from __future__ import annotations

from pathlib import Path

from nodes import cluster, eventually, file_is
from test_scan import OLD, live, rescan, write

from backer.index.store import IndexStore


async def test_a_scan_of_the_changed_ignore_file_picks_up_what_it_no_longer_ignores(
    folder: Path, store: IndexStore
) -> None:
    write(folder, ".backerignore", b"*.log\n")
    write(folder, "x.log", b"log")
    write(folder, "deep/y.log", b"deep log")
    write(folder, "deep/keep.txt", b"kept")
    await rescan(folder, store)
    assert "x.log" not in live(store)
    write(folder, ".backerignore", b"*.txt\n", mtime=OLD + 1)
    await rescan(folder, store, paths=[".backerignore"])  # what the watcher hands over
    assert {"x.log", "deep/y.log"} <= set(live(store))
    assert "deep/keep.txt" not in live(store)  # ignored now: forgotten, not deleted
    assert not any(e.deleted for e in store.entries())
    report = await rescan(folder, store, paths=["x.log"])  # the rules did not change since
    assert report.files == 1


async def test_a_running_node_sends_an_un_ignored_file_promptly(tmp_path: Path) -> None:
    """Found with two nodes: after `*.log` was removed from `.backerignore`, x.log had not
    reached the peer 45 s later (the full rescan is hourly with a working watcher)."""
    async with cluster(tmp_path, 2) as (a, b):
        write(a.folder, ".backerignore", b"*.log\n")
        write(a.folder, "x.log", b"now wanted")
        await eventually(file_is(b.folder / ".backerignore", b"*.log\n"))
        (a.folder / ".backerignore").write_bytes(b"# nothing ignored\n")
        await eventually(file_is(b.folder / "x.log", b"now wanted"), deadline=15)
