"""A folder whose disk vanished, or most of whose files vanished at once, does not replicate
the loss: it pauses and says why, and its peers keep every file."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

from nodes import FAST, cluster, eventually, file_is

from backer.events import FolderPaused, FolderResumed


def fill(folder: Path, count: int) -> dict[str, bytes]:
    files = {f"doc-{i:02}.txt": os.urandom(1000 + i) for i in range(count)}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def intact(folder: Path, files: dict[str, bytes]) -> bool:
    return all((folder / name).read_bytes() == data for name, data in files.items())


async def test_most_files_vanishing_pauses_the_folder_and_peers_keep_them(
    tmp_path: Path,
) -> None:
    async with cluster(tmp_path, 2) as (a, b):
        events = b.node.bus.subscribe()
        files = fill(a.folder, 30)
        await eventually(lambda: all((b.folder / n).exists() for n in files))
        await eventually(lambda: a.root == b.root)
        for name in list(files)[:25]:  # an unmounted disk looks like this
            (b.folder / name).unlink()
        paused = await asyncio.wait_for(events.next_of(FolderPaused), 20)
        assert "vanished" in paused.reason and paused.folder == str(b.folder)
        assert a.root == b.root  # b recorded no deletion, so it has none to offer
        assert intact(a.folder, files)  # nothing was deleted on the peer
        assert b.node.status()["folders"][0]["state"].startswith("paused")


async def test_a_folder_whose_root_vanished_pauses_and_peers_keep_everything(
    tmp_path: Path,
) -> None:
    async with cluster(tmp_path, 2) as (a, b):
        events = b.node.bus.subscribe()
        files = fill(a.folder, 5)
        await eventually(lambda: all((b.folder / n).exists() for n in files))
        b.folder.rename(tmp_path / "unplugged")  # the disk went away
        next(iter(b.node.folders.values())).rescan()
        paused = await asyncio.wait_for(events.next_of(FolderPaused), 20)
        assert "missing" in paused.reason and "unmounted disk" in paused.reason, paused.reason
        assert intact(a.folder, files)
        assert a.root == b.root  # b recorded no deletion to offer


async def test_a_folder_back_from_a_lost_disk_is_watched_again(tmp_path: Path) -> None:
    """A disk unmounted and mounted again takes its watches along: the folder stayed paused
    until the hourly rescan, and its watcher heard nothing of the new mount's root after it.
    Here the folder comes back as another directory (other inodes, as a new mount's are) with
    the same content, and only a full rescan (hourly here) or a watcher armed anew finds
    what is written in it next."""
    options = dataclasses.replace(FAST, recheck_gone=0.1)
    async with cluster(tmp_path, 2, options=options) as (a, b):
        events = b.node.bus.subscribe()
        files = fill(a.folder, 3)
        await eventually(lambda: all((b.folder / n).exists() for n in files))
        away = tmp_path / "unplugged"
        b.folder.rename(away)
        next(iter(b.node.folders.values())).rescan()
        await asyncio.wait_for(events.next_of(FolderPaused), 20)
        b.folder.mkdir()
        for child in list(away.iterdir()):
            child.rename(b.folder / child.name)
        await asyncio.wait_for(events.next_of(FolderResumed), 20)
        (b.folder / "new.txt").write_bytes(b"written after the disk came back")
        await eventually(file_is(a.folder / "new.txt", b"written after the disk came back"))
        assert intact(a.folder, files)
