"""What a pull wrote is known as ours when the watcher reports it: a stat, not a scan. Anything
else at those paths (a user's edit, a file the pull did not write, a directory made anew) is
still scanned."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from conftest import folder_paths

from backer.index.store import StatSig
from backer.sync.disk import FolderDisk
from backer.sync.link import memory_pipe
from backer.sync.peer import run_session
from backer.sync.recent import RecentWrites
from backer.sync.replica import Replica
from backer.sync.replicate import PLAIN_FOLDER


def _wrote(disk: FolderDisk, recent: RecentWrites, rel: str, content: bytes) -> None:
    path = disk.folder / rel
    path.write_bytes(content)
    st = disk.lstat(rel)
    assert st is not None
    recent.wrote_file(rel, StatSig.of(st))


def test_files_and_directories_the_pull_wrote_need_no_scan(tmp_path: Path) -> None:
    disk = FolderDisk(tmp_path)
    recent = RecentWrites(disk)
    recent.made_dir("d", disk.make_dir("d", 0o755))
    recent.made_dir("d/e", disk.make_dir("d/e", 0o755))
    for rel in ("top", "d/one", "d/two", "d/e/three"):
        _wrote(disk, recent, rel, rel.encode())
    reported = ["d", "d/e/three", "d/one", "top"]
    assert recent.unseen(reported) == []
    assert recent.unseen(reported) == []  # reported again by later events of the same writes


def test_anything_else_at_those_paths_is_scanned(tmp_path: Path) -> None:
    disk = FolderDisk(tmp_path)
    recent = RecentWrites(disk)
    recent.made_dir("d", disk.make_dir("d", 0o755))
    recent.made_dir("gone", disk.make_dir("gone", 0o755))
    for rel in ("a", "b", "d/ours", "d/edited"):
        _wrote(disk, recent, rel, b"pulled")
    (tmp_path / "a").write_bytes(b"the user's")  # an edit after the install
    (tmp_path / "b").unlink()
    (tmp_path / "d/edited").write_bytes(b"edited")
    (tmp_path / "d/theirs").write_bytes(b"made before the watch")
    shutil.rmtree(tmp_path / "gone")
    os.mkdir(tmp_path / "gone", 0o700)  # made anew, with another mode
    recent.made_dir("linked", disk.make_dir("linked", 0o755))
    os.rmdir(tmp_path / "linked")
    os.symlink("d", tmp_path / "linked")  # a directory replaced by a symlink
    reported = ["a", "b", "c", "d", "gone", "linked"]
    assert sorted(recent.unseen(reported)) == [
        "a",
        "b",
        "c",
        "d/edited",
        "d/theirs",
        "gone",
        "linked",
    ]


def test_what_vanished_from_a_directory_the_pull_made_is_scanned(tmp_path: Path) -> None:
    """A file or directory the pull put in a directory it made, deleted before any watch
    covered that directory: no event will ever name it, so the directory is scanned whole."""
    disk = FolderDisk(tmp_path)
    recent = RecentWrites(disk)
    recent.made_dir("d", disk.make_dir("d", 0o755))
    recent.made_dir("d/sub", disk.make_dir("d/sub", 0o755))
    for rel in ("d/kept", "d/deleted", "d/sub/deep"):
        _wrote(disk, recent, rel, b"pulled")
    (tmp_path / "d/deleted").unlink()
    shutil.rmtree(tmp_path / "d/sub")
    assert recent.unseen(["d"]) == ["d"]
    (tmp_path / "d/deleted").write_bytes(b"made again by the user")
    assert "d" in recent.unseen(["d"])  # another file by that name is not ours either


def test_memory_is_bounded_and_a_full_scan_forgets(tmp_path: Path) -> None:
    disk = FolderDisk(tmp_path)
    recent = RecentWrites(disk, limit=10)
    for i in range(25):
        _wrote(disk, recent, f"f{i}", b"x")
    assert len(recent) <= 10
    assert recent.unseen(["f24"]) == [] and recent.unseen(["f0"]) == ["f0"]
    recent.forget()
    assert len(recent) == 0


async def test_the_copy_knows_every_path_its_pull_wrote(tmp_path: Path) -> None:
    source, copy = tmp_path / "source", tmp_path / "copy"
    for i in range(30):
        path = source / f"dir{i % 3}/sub/f{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(100 + i))
    copy.mkdir()
    a = await Replica.open(source, device=1, create=True)
    b = await Replica.open(copy, device=2, create=True)
    try:
        await a.scan()
        await b.scan()
        end_a, end_b = memory_pipe()
        ids = (bytes([1]) * 32, bytes([2]) * 32)
        result, _ = await asyncio.gather(
            run_session(a, end_a, device=ids[0], folder=PLAIN_FOLDER, until_in_sync=True),
            run_session(b, end_b, device=ids[1], folder=PLAIN_FOLDER),
        )
        assert result.in_sync
        written = folder_paths(copy)
        assert len(written) == 36
        assert b.recent.unseen(written) == []
        (copy / "dir1/sub/f1").write_bytes(b"a user's edit")
        assert b.recent.unseen(written) == ["dir1/sub/f1"]
    finally:
        await a.close()
        await b.close()
