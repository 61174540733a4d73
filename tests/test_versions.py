"""File versions on a real folder: archive (files, symlinks, refusals), list, restore, prune, and
the staggered retention rule on hand-computed cases and as properties. Time is always passed in."""

from __future__ import annotations

import errno
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backer.errors import FolderMissingError, InvalidPathError
from backer.sync import room
from backer.sync.versions import (
    SYNCTHING_SCHEDULE,
    VERSIONS_DIR,
    Schedule,
    Versions,
    plan_prune,
)

NOW = 1_795_688_100.0  # 2026-11-26 10:15:00 UTC
TAG = "20261126-101500"
MTIME = 1_600_000_000
MIN, HOUR, DAY = 60, 3600, 86_400


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    (root / ".backer").mkdir(parents=True)
    return root


def write(folder: Path, rel: str, data: bytes = b"x", mode: int = 0o644) -> Path:
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    os.utime(path, (MTIME, MTIME))
    return path


def area(folder: Path) -> Path:
    return folder / ".backer" / VERSIONS_DIR


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


# -- archive ---------------------------------------------------------------------------------------


def test_archive_moves_a_file_keeping_bytes_mode_and_mtime(folder: Path) -> None:
    write(folder, "docs/report.txt", b"draft 1", mode=0o640)
    stored = Versions(folder).archive("docs/report.txt", NOW)
    assert stored == area(folder) / "docs" / f"report~{TAG}.txt"
    assert not (folder / "docs/report.txt").exists()
    assert stored.read_bytes() == b"draft 1"
    info = stored.lstat()
    assert stat.S_IMODE(info.st_mode) == 0o640
    assert info.st_mtime == MTIME


def test_archives_whose_fsync_waits_hold_few_descriptors_and_release_them(folder: Path) -> None:
    """A pull's deletions move files into the area without an fsync each; their directories
    are fsynced once, by the commit that records the deletions. What waits is one descriptor
    per directory, never more than a bound, and none after `sync_pending`."""
    versions = Versions(folder)
    open_before = len(os.listdir("/proc/self/fd"))
    for i in range(600):
        write(folder, f"dir{i % 300}/f{i}.txt", f"{i}".encode())
        assert versions.archive(f"dir{i % 300}/f{i}.txt", NOW, sync=False) is not None
        assert len(os.listdir("/proc/self/fd")) - open_before <= 257
    versions.sync_pending()
    assert len(os.listdir("/proc/self/fd")) == open_before
    assert len(list(area(folder).rglob("f*.txt"))) == 600


def test_archive_moves_the_symlink_itself_never_its_target(folder: Path, tmp_path: Path) -> None:
    target = tmp_path / "outside.txt"
    target.write_bytes(b"not ours")
    (folder / "link").symlink_to(target)
    stored = Versions(folder).archive("link", NOW)
    assert stored is not None
    assert stored.is_symlink()
    assert os.readlink(stored) == str(target)
    assert not (folder / "link").is_symlink()
    assert target.read_bytes() == b"not ours"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.txt", f"a~{TAG}.txt"),
        ("a.tar.gz", f"a.tar~{TAG}.gz"),
        ("Makefile", f"Makefile~{TAG}"),
        (".bashrc", f".bashrc~{TAG}"),
        (".config.json", f".config~{TAG}.json"),
        ("trailing.", f"trailing~{TAG}."),
        ("x~20200101-000000.txt", f"x~20200101-000000~{TAG}.txt"),
    ],
)
def test_version_names_follow_syncthing_and_parse_back(
    folder: Path, name: str, expected: str
) -> None:
    write(folder, name)
    versions = Versions(folder)
    stored = versions.archive(name, NOW)
    assert stored is not None
    assert stored.name == expected
    [found] = versions.list(name)
    assert (found.path, found.stored, found.time) == (name, stored, at(NOW))


def test_archives_in_one_second_get_distinct_names(folder: Path) -> None:
    versions = Versions(folder)
    names = []
    for content in (b"one", b"two", b"three"):
        write(folder, "f.txt", content)
        stored = versions.archive("f.txt", NOW + 0.5)
        assert stored is not None
        names.append(stored.name)
    assert names == [f"f~{TAG}.txt", f"f~{TAG}~1.txt", f"f~{TAG}~2.txt"]
    assert [v.stored.read_bytes() for v in versions.list("f.txt")] == [b"three", b"two", b"one"]


def test_a_new_version_in_a_busy_second_goes_past_the_highest(folder: Path) -> None:
    versions = Versions(folder)
    for _ in range(3):
        write(folder, "f")
        versions.archive("f", NOW)
    (area(folder) / f"f~{TAG}~1").unlink()
    write(folder, "f", b"latest")
    stored = versions.archive("f", NOW)
    assert stored is not None
    assert stored.name == f"f~{TAG}~3"
    assert versions.list("f")[0].stored.read_bytes() == b"latest"


def test_archive_refuses_a_symlinked_parent_and_moves_nothing(folder: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside, "secret.txt", b"keep me")
    (folder / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidPathError, match="symlink"):
        Versions(folder).archive("sub/secret.txt", NOW)
    assert (outside / "secret.txt").read_bytes() == b"keep me"
    assert not area(folder).exists() or not any(area(folder).rglob("*"))


def test_archive_refuses_a_parent_that_is_a_file(folder: Path) -> None:
    write(folder, "plain")
    with pytest.raises(InvalidPathError):
        Versions(folder).archive("plain/child", NOW)
    assert (folder / "plain").is_file()


def test_archive_of_a_missing_file_gives_none(folder: Path) -> None:
    versions = Versions(folder)
    assert versions.archive("nothing.txt", NOW) is None
    assert versions.archive("no/such/dir/file", NOW) is None


def test_archive_refuses_a_directory(folder: Path) -> None:
    (folder / "dir").mkdir()
    with pytest.raises(IsADirectoryError, match="one by one"):
        Versions(folder).archive("dir", NOW)
    assert (folder / "dir").is_dir()


@pytest.mark.parametrize("bad", ["../escape", "/abs", ".backer/index.db", "a//b", ""])
def test_invalid_paths_are_refused(folder: Path, bad: str) -> None:
    versions = Versions(folder)
    with pytest.raises(InvalidPathError):
        versions.archive(bad, NOW)
    with pytest.raises(InvalidPathError):
        versions.list(bad)


def test_a_missing_marker_is_not_an_empty_folder(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    write(bare, "f")
    with pytest.raises(FolderMissingError):
        Versions(bare).archive("f", NOW)
    with pytest.raises(FolderMissingError):
        Versions(tmp_path / "unmounted").list("f")
    assert (bare / "f").exists()


def test_os_errors_leave_with_a_plain_message(folder: Path) -> None:
    name = "n" * 250 + ".txt"  # fits the folder, but not once tagged
    write(folder, name)
    with pytest.raises(OSError, match=r"^cannot archive 'n+\.txt': File name too long$") as info:
        Versions(folder).archive(name, NOW)
    assert info.value.errno == errno.ENAMETOOLONG
    assert (folder / name).exists()


# -- list ------------------------------------------------------------------------------------------


def test_list_is_newest_first_with_times_and_sizes(folder: Path) -> None:
    versions = Versions(folder)
    for offset, content in [(0, b"a"), (HOUR, b"cc"), (DAY, b"bbbb")]:
        write(folder, "d/f.bin", content)
        versions.archive("d/f.bin", NOW + offset)
    write(folder, "d/other.bin")
    versions.archive("d/other.bin", NOW)
    found = versions.list("d/f.bin")
    assert [(v.path, v.time, v.size) for v in found] == [
        ("d/f.bin", at(NOW + DAY), 4),
        ("d/f.bin", at(NOW + HOUR), 2),
        ("d/f.bin", at(NOW), 1),
    ]
    assert versions.list("d/nothing") == []
    assert versions.list("nowhere/f") == []


def test_all_walks_the_area_and_skips_strangers(folder: Path) -> None:
    versions = Versions(folder)
    for rel in ("top", "a/b/deep.txt", "a/mid"):
        write(folder, rel)
        versions.archive(rel, NOW)
    (area(folder) / "a" / "not-a-version.txt").write_bytes(b"junk")
    assert [v.path for v in versions.all()] == ["top", "a/mid", "a/b/deep.txt"]


def test_all_of_a_folder_without_versions_is_empty(folder: Path) -> None:
    assert list(Versions(folder).all()) == []


# -- restore ---------------------------------------------------------------------------------------


def test_restore_brings_back_exact_bytes_and_loses_nothing(folder: Path) -> None:
    versions = Versions(folder)
    write(folder, "notes.md", b"old words", mode=0o600)
    versions.archive("notes.md", NOW)
    write(folder, "notes.md", b"new words")
    restored = versions.restore("notes.md", None, NOW + 60)
    assert restored.time == at(NOW)
    path = folder / "notes.md"
    assert path.read_bytes() == b"old words"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_mtime == MTIME
    kept = {v.stored.read_bytes(): v.time for v in versions.list("notes.md")}
    assert kept == {b"new words": at(NOW + 60), b"old words": at(NOW)}  # the version stays too
    assert list((folder / ".backer" / "tmp").iterdir()) == []


def test_restore_picks_a_version_by_time(folder: Path) -> None:
    versions = Versions(folder)
    for offset, content in [(0, b"first"), (HOUR, b"second"), (DAY, b"third")]:
        write(folder, "f", content)
        versions.archive("f", NOW + offset)
    versions.restore("f", at(NOW + HOUR).replace(tzinfo=None), NOW + 2 * DAY)
    assert (folder / "f").read_bytes() == b"second"
    assert len(versions.list("f")) == 3  # nothing was at f, so nothing new was archived


def test_restore_recreates_missing_parents(folder: Path) -> None:
    versions = Versions(folder)
    write(folder, "gone/deeper/file.txt", b"data")
    versions.archive("gone/deeper/file.txt", NOW)
    (folder / "gone" / "deeper").rmdir()
    (folder / "gone").rmdir()
    versions.restore("gone/deeper/file.txt", None, NOW + 1)
    assert (folder / "gone/deeper/file.txt").read_bytes() == b"data"


def test_restore_of_a_symlink_makes_a_symlink(folder: Path) -> None:
    versions = Versions(folder)
    (folder / "link").symlink_to("some/target")
    versions.archive("link", NOW)
    write(folder, "link", b"a file took its place")
    versions.restore("link", None, NOW + 5)
    assert os.readlink(folder / "link") == "some/target"
    [replaced] = [v for v in versions.list("link") if not v.stored.is_symlink()]
    assert replaced.stored.read_bytes() == b"a file took its place"


def test_restore_of_a_missing_version_says_so(folder: Path) -> None:
    versions = Versions(folder)
    with pytest.raises(FileNotFoundError, match=r"^no version of 'nope\.txt' is kept$"):
        versions.restore("nope.txt", None, NOW)
    write(folder, "f")
    versions.archive("f", NOW)
    with pytest.raises(FileNotFoundError, match="from 2026-11-26 10:16:00 UTC"):
        versions.restore("f", at(NOW + 60), NOW)
    assert not (folder / "f").exists()


def test_restore_refuses_to_replace_a_directory(folder: Path) -> None:
    versions = Versions(folder)
    write(folder, "d")
    versions.archive("d", NOW)
    (folder / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        versions.restore("d", None, NOW)
    assert (folder / "d").is_dir()
    assert list((folder / ".backer" / "tmp").iterdir()) == []


# -- retention: plan_prune -------------------------------------------------------------------------


def ago(now: datetime, *seconds: float) -> list[datetime]:
    return [now - timedelta(seconds=s) for s in seconds]


def test_many_versions_within_an_hour_keep_one_per_30_seconds() -> None:
    now = at(NOW)
    times = ago(now, *range(0, 3001, 10))  # every 10 s for 50 minutes
    kept = set(times) - plan_prune(times, now)
    assert kept == set(ago(now, *range(0, 3001, 30)))


def test_versions_over_days_keep_one_per_day_then_one_per_hour() -> None:
    now = at(NOW)
    times = ago(now, *range(0, 241 * HOUR, HOUR))  # hourly for ten days
    kept = set(times) - plan_prune(times, now)
    expected = ago(now, *range(240 * HOUR, 23 * HOUR, -DAY)) + ago(now, *range(0, 24 * HOUR, HOUR))
    assert kept == set(expected)
    assert len(kept) == 10 + 24


def test_versions_older_than_max_age_are_deleted_but_the_newest_stays() -> None:
    now = at(NOW)
    times = ago(now, 400 * DAY, 366 * DAY, 364 * DAY, 10 * DAY)
    assert plan_prune(times, now) == set(ago(now, 400 * DAY, 366 * DAY))
    lone = ago(now, 400 * DAY)
    assert plan_prune(lone, now) == set()  # the last copy of a long-deleted file is kept


def test_weekly_step_for_old_versions() -> None:
    now = at(NOW)
    times = ago(now, *range(100 * DAY, 40 * DAY, -DAY))  # daily, 100 to 41 days ago
    kept = set(times) - plan_prune(times, now)
    newest = now - timedelta(days=41)
    assert kept == set(ago(now, *range(100 * DAY, 40 * DAY, -7 * DAY))) | {newest}


def test_matches_syncthing_staggered_table_except_the_newest() -> None:
    # The times of Syncthing's TestStaggeredVersioningVersionCount (lib/versioner).
    now = datetime(2016, 4, 15, 14, 0, 0, tzinfo=UTC)
    stamps = [0, 1, 2, 60, 61, 90, 91, 180, 210, 1800, 1860, 2100, 2400, 3600, 4800, 6000, 10800]
    deleted = plan_prune(ago(now, *stamps), now)
    # Syncthing also deletes the 0 s one (1 s after a kept one); backer keeps the newest.
    assert deleted == set(ago(now, 1, 60, 90, 3600, 4800))


def test_schedule_validates_itself() -> None:
    with pytest.raises(ValueError, match="step"):
        Schedule(steps=(), max_age=10)
    with pytest.raises(ValueError, match="growing"):
        Schedule(steps=((10, 100), (20, 50)), max_age=1000)
    assert SYNCTHING_SCHEDULE.interval_at(10 * 365 * DAY) == 7 * DAY


steps = st.dictionaries(st.integers(1, 400 * DAY), st.integers(1, 10 * DAY), min_size=1)
schedules = st.one_of(
    st.just(SYNCTHING_SCHEDULE),
    st.builds(
        Schedule,
        steps=steps.map(lambda d: tuple((step, until) for until, step in sorted(d.items()))),
        max_age=st.integers(1, 500 * DAY),
    ),
)
# Whole seconds, as in version names, and some with microseconds, as callers may pass.
moments = st.integers(-500 * DAY, 5 * DAY).map(lambda s: at(NOW + s)) | st.datetimes(
    min_value=datetime(2025, 1, 1), max_value=datetime(2027, 1, 1), timezones=st.just(UTC)
)


@given(times=st.lists(moments, min_size=1, max_size=60), schedule=schedules)
def test_prune_plan_properties(times: list[datetime], schedule: Schedule) -> None:
    now = at(NOW)
    deleted = plan_prune(times, now, schedule)
    assert deleted <= set(times)
    assert max(times) not in deleted
    kept = set(times) - deleted
    assert plan_prune(kept, now, schedule) == set()


# -- prune -----------------------------------------------------------------------------------------


def test_prune_removes_versions_and_empty_directories(folder: Path) -> None:
    versions = Versions(folder)
    for offset in range(0, 300, 10):  # 30 versions, 10 s apart, 2 days ago
        write(folder, "a/b/f.txt", str(offset).encode())
        versions.archive("a/b/f.txt", NOW - 2 * DAY + offset)
    write(folder, "keep.txt")
    versions.archive("keep.txt", NOW - 400 * DAY)
    (area(folder) / "empty" / "deeper").mkdir(parents=True)
    assert versions.prune(NOW) == 28  # one per day that old: the oldest, and the newest kept
    left = [v.stored.read_bytes() for v in versions.list("a/b/f.txt")]
    assert left == [b"290", b"0"]
    assert [v.path for v in versions.list("keep.txt")] == ["keep.txt"]
    assert not (area(folder) / "empty").exists()
    assert (area(folder) / "a" / "b").is_dir()
    assert versions.prune(NOW) == 0


def test_prune_keeps_the_first_and_the_newest_of_one_second(folder: Path) -> None:
    versions = Versions(folder)
    for content in (b"first", b"middle", b"newest"):
        write(folder, "f", content)
        versions.archive("f", NOW)
    assert versions.prune(NOW + 10) == 1
    assert [v.stored.read_bytes() for v in versions.list("f")] == [b"newest", b"first"]


# -- room for a pull ---------------------------------------------------------------------------


@pytest.mark.parametrize(("need", "deleted"), [(2500, 3), (10**9, 3), (1500, 2), (0, 0)])
def test_room_is_made_oldest_first_never_from_a_paths_newest(
    folder: Path, monkeypatch: pytest.MonkeyPatch, need: int, deleted: int
) -> None:
    """Each deleted version frees 1000 bytes here (a fake filesystem)."""
    versions = Versions(folder)
    for path, hours in [("a.txt", 0), ("b.txt", 0.5), ("a.txt", 1), ("b.txt", 1.5), ("a.txt", 2)]:
        write(folder, path, f"{path} {hours}".encode())
        versions.archive(path, NOW + hours * HOUR)

    def kept() -> list[str]:
        return sorted(f"{v.path} {v.time:%H%M}" for v in versions.all())

    monkeypatch.setattr(room, "MARGIN", 0)
    monkeypatch.setattr(room, "_free", lambda _: 1000 * (5 - len(kept())))
    assert room.make_room(versions, need) == deleted
    expected = ["a.txt 1015", "a.txt 1115", "a.txt 1215", "b.txt 1045", "b.txt 1145"]
    for gone in ["a.txt 1015", "b.txt 1045", "a.txt 1115"][:deleted]:  # the oldest first
        expected.remove(gone)
    assert kept() == expected


def test_a_clock_set_back_never_names_the_newest_version_as_older(folder: Path) -> None:
    """Names are wall-clock times and a path's newest is the one with the latest name: with the
    clock set back two years, the newest version was named as the oldest, and once the clock
    was right again the yearly limit pruned it (and `make_room` deleted it first)."""
    versions = Versions(folder)
    write(folder, "f", b"first")
    versions.archive("f", NOW)
    write(folder, "f", b"second")
    versions.archive("f", NOW - 2 * 365 * DAY)  # the clock went back
    write(folder, "f", b"third")
    Versions(folder).archive("f", NOW - 2 * 365 * DAY + 5)  # and a restart
    assert [v.stored.read_bytes() for v in versions.list("f")] == [b"third", b"second", b"first"]
    versions.prune(NOW + 400 * DAY)  # the clock is right again, long after
    assert [v.stored.read_bytes() for v in versions.list("f")] == [b"third"]
