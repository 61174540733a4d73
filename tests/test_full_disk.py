"""A folder on a disk that fills up: a clear error event, no partial file at its path, and
the sync completes by itself once space is freed (a small tmpfs; root)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodes import FAST, eventually, file_is, make_member

from backer.events import PullFinished
from backer.keys import FolderKey
from backer.node.node import Node, NodeOptions

MIB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        raise AssertionError("the full-disk test mounts a tmpfs: it needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_disk_is_reported_and_the_sync_resumes_when_space_is_freed(
    tmp_path: Path, small_disk: Path
) -> None:
    key = FolderKey.generate()
    data = os.urandom(10 * MIB)  # more than the small disk holds
    a_home, a_config, a_folder = make_member(tmp_path, "a", key)
    (a_folder / "big.bin").write_bytes(data)
    (a_folder / "small.txt").write_bytes(b"fits")
    async with Node(a_home, a_config, options=NodeOptions(folder=FAST)) as a:
        b_home, b_config, b_folder = make_member(small_disk, "b", key, [a.listen_address])
        async with Node(b_home, b_config, options=NodeOptions(folder=FAST)) as b:
            events = b.bus.subscribe()
            failed = await events.next_of(
                PullFinished, lambda e: any("No space left" in err for err in e.errors)
            )
            assert any(err.startswith("big.bin") for err in failed.errors), failed.errors
            await eventually(file_is(b_folder / "small.txt", b"fits"))
            assert not (b_folder / "big.bin").exists()  # never a partial file at its path
            subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
            await eventually(file_is(b_folder / "big.bin", data), deadline=60)
