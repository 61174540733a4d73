"""The deletion guard sees mounts (issue 14, case 3): what vanished with its filesystem (a
sub-mount unmounted, the folder's own disk unmounted under a recreated `.backer/`) is
unavailable, not deleted, and deletions in small steps add up to a mass deletion. Real tmpfs
mounts (root)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_apply_races import tmpfs
from test_scan import live, rescan, write

from backer.errors import MassDeletionError, MountGoneError
from backer.index.scan_records import DeletionWindow
from backer.index.store import IndexStore


def fill(folder: Path, prefix: str, count: int) -> None:
    for i in range(count):
        write(folder, f"{prefix}{i:02}.jpg", f"{prefix}{i}".encode())


async def test_an_unmounted_subdirectory_is_unavailable_not_deleted(
    folder: Path, store: IndexStore
) -> None:
    """Found by unmounting a sub-mount holding 20 photos beside 30 other files: 20 vanished
    paths were under the 50 % share, so all 20 were recorded deleted (and archived on peers)."""
    fill(folder, "doc-", 30)
    with tmpfs(folder / "photos", "size=4m") as photos:
        fill(photos, "", 20)
        await rescan(folder, store)
        assert len(live(store)) == 51
    # unmounted: photos/ is the bare mount point, empty, on the folder's filesystem
    assert not list((folder / "photos").iterdir())
    with pytest.raises(MountGoneError, match="gone with their disk"):
        await rescan(folder, store)
    with pytest.raises(MountGoneError):  # the watcher names a path below it
        await rescan(folder, store, paths=["photos/03.jpg"])
    assert len(live(store)) == 51  # nothing recorded as deleted
    with tmpfs(folder / "photos", "size=4m") as photos:  # back, another device number
        fill(photos, "", 20)
        report = await rescan(folder, store)
        assert report.deleted == 0
        assert len(live(store)) == 51
        (photos / "05.jpg").unlink()  # a deletion on the remounted disk is one
        report = await rescan(folder, store)
        assert report.deleted == 1


async def test_a_directory_a_disk_is_mounted_over_is_unavailable(
    folder: Path, store: IndexStore
) -> None:
    fill(folder, "doc-", 30)
    fill(folder / "photos", "", 20)
    await rescan(folder, store)
    with (
        tmpfs(folder / "photos", "size=4m"),  # hides the 20 photos
        pytest.raises(MountGoneError, match="photos was on device"),
    ):
        await rescan(folder, store)
    assert len(live(store)) == 51


async def test_a_vanished_mount_point_is_unavailable(folder: Path, store: IndexStore) -> None:
    fill(folder, "doc-", 30)
    with tmpfs(folder / "photos", "size=4m") as photos:
        fill(photos, "", 12)
        await rescan(folder, store)
    (folder / "photos").rmdir()
    with pytest.raises(MountGoneError, match="mount point and is gone"):
        await rescan(folder, store)
    assert len(live(store)) == 43
    report = await rescan(folder, store, allow_deletions=True)
    assert report.deleted == 13


async def test_a_folder_whose_disk_was_unmounted_under_a_recreated_marker_deletes_nothing(
    tmp_path: Path,
) -> None:
    """Found by unmounting the folder's disk during a pull: `.backer/` was recreated in the bare
    mount point, the marker check passed, and the 8 files (under the minimum of 10) were
    recorded deleted."""
    folder = tmp_path / "disk"
    with tmpfs(folder, "size=4m"):
        store = IndexStore.open(folder, create=True)
        fill(folder, "", 8)
        await rescan(folder, store)
    try:
        (folder / ".backer").mkdir()  # what the old temp area did
        with pytest.raises(MountGoneError, match=r"\. was on device"):
            await rescan(folder, store)
        assert len(live(store)) == 8
    finally:
        store.close()


async def test_deletions_in_small_steps_add_up_to_a_mass_deletion(
    folder: Path, store: IndexStore
) -> None:
    """The watcher hands the scanner a second's worth of paths at a time: a disk going away (or
    an `rm -rf`) that takes longer came in steps each under the minimum of 10 paths."""
    fill(folder, "doc-", 30)
    await rescan(folder, store)
    clock = [0.0]
    window = DeletionWindow(clock=lambda: clock[0])
    for step in range(2):
        for i in range(step * 6, step * 6 + 6):
            (folder / f"doc-{i:02}.jpg").unlink()
        report = await rescan(folder, store, window=window)
        assert report.deleted == 6
    for i in range(12, 18):
        (folder / f"doc-{i:02}.jpg").unlink()
    with pytest.raises(MassDeletionError, match=r"18 of 30 paths .* vanished within") as refused:
        await rescan(folder, store, window=window)
    assert refused.value.vanished == 18
    assert len(live(store)) == 18  # the last step is not recorded
    clock[0] += 3600
    report = await rescan(folder, store, window=window)
    assert report.deleted == 6  # an hour on, the first steps are history: 6 is a small deletion
