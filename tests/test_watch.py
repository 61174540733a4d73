"""The folder watcher: batches of changed paths, debounce and max delay, the reserved directory,
and the kernel's truth about coverage: the watch limit is reproduced in a user namespace of its
own (its `/proc/sys/user/max_inotify_watches`), never by touching the machine's sysctls."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backer import inotify, watch
from backer.paths import RESERVED_DIR
from backer.watch import MAX_PENDING, Coverage, Watcher, WatchError

DEADLINE = 5.0  # seconds for anything the kernel reports in a few milliseconds


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    (root / RESERVED_DIR).mkdir(parents=True)
    return root


@pytest.fixture
async def watcher(folder: Path) -> AsyncIterator[Watcher]:
    async with Watcher(folder) as started:
        yield started


async def gather(watcher: Watcher, expected: set[str]) -> set[str]:
    """Batches until all of `expected` was reported; all that was reported."""
    seen: set[str] = set()
    async with asyncio.timeout(DEADLINE):
        while not expected <= seen:
            seen |= await watcher.changes()
    return seen


def inotify_fds() -> set[int]:
    """This process's inotify descriptors."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:inotify":
                found.add(int(name))
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor, for one)
    return found


# -- batching, pure ----------------------------------------------------------------------------


def test_batch_is_due_after_the_quiet_time_but_never_after_max_delay() -> None:
    batch = watch._Batch(debounce=0.05, max_delay=0.3)
    assert batch.due() is None
    batch.add(["a"], now=10.0)
    assert batch.due() == pytest.approx(10.05)
    batch.add(["a"], now=10.04)
    assert batch.due() == pytest.approx(10.09)
    for step in range(1, 20):  # written every 20 ms: the quiet time never comes
        batch.add(["a"], now=10.04 + step * 0.02)
    assert batch.due() == pytest.approx(10.3)
    assert batch.take() == ({"a"}, False)
    assert batch.due() is None


def test_batch_keeps_the_top_paths_and_collapses_to_the_whole_folder() -> None:
    batch = watch._Batch(debounce=0.05, max_delay=1.0, limit=5)
    batch.add(["d/x", "d", "d/y/z", "e/f", "d/x"], now=0.0)
    assert batch.take() == ({"d", "e/f"}, False)
    batch.add([f"f{i}" for i in range(6)], now=0.0)
    assert batch.take() == ({""}, False)
    batch.add(["a"], now=0.0)
    batch.lose(now=0.1)
    batch.add(["b"], now=0.2)
    assert batch.take() == ({""}, True)
    assert MAX_PENDING == 10_000


def test_coverage_is_complete_when_all_directories_are_watched() -> None:
    assert Coverage(watched_dirs=3, total_dirs=3).complete
    assert not Coverage(watched_dirs=2, total_dirs=3).complete


# -- events ------------------------------------------------------------------------------------


async def test_create_modify_delete_a_file(folder: Path, watcher: Watcher) -> None:
    target = folder / "notes.txt"
    target.write_text("one")
    assert await gather(watcher, {"notes.txt"}) == {"notes.txt"}
    with target.open("a") as file:
        file.write("two")
    assert await gather(watcher, {"notes.txt"}) == {"notes.txt"}
    target.chmod(0o600)
    assert await gather(watcher, {"notes.txt"}) == {"notes.txt"}
    target.unlink()
    assert await gather(watcher, {"notes.txt"}) == {"notes.txt"}


async def test_a_new_directory_is_reported_once_with_its_contents(
    folder: Path, watcher: Watcher
) -> None:
    (folder / "n" / "m").mkdir(parents=True)
    (folder / "n" / "m" / "a.txt").write_text("a")
    (folder / "n" / "b.txt").write_text("b")
    assert await gather(watcher, {"n"}) == {"n"}
    # Watched before it was reported: changes inside it are seen.
    (folder / "n" / "m" / "a.txt").write_text("again")
    assert await gather(watcher, {"n/m/a.txt"}) == {"n/m/a.txt"}


async def test_moves_report_source_and_destination(folder: Path, tmp_path: Path) -> None:
    (folder / "a" / "d" / "e").mkdir(parents=True)
    (folder / "a" / "d" / "e" / "f.txt").write_text("f")
    (folder / "one.txt").write_text("1")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "in.txt").write_text("in")
    async with Watcher(folder) as watcher:
        (folder / "one.txt").rename(folder / "a" / "two.txt")
        assert await gather(watcher, {"one.txt", "a/two.txt"}) == {"one.txt", "a/two.txt"}
        (folder / "a" / "d").rename(folder / "b")
        assert await gather(watcher, {"a/d", "b"}) == {"a/d", "b"}
        (folder / "b" / "e" / "f.txt").write_text("still watched after the move")
        assert await gather(watcher, {"b/e/f.txt"}) == {"b/e/f.txt"}
        (outside / "in.txt").rename(folder / "in.txt")
        assert await gather(watcher, {"in.txt"}) == {"in.txt"}
        (folder / "a" / "two.txt").rename(outside / "gone.txt")
        assert await gather(watcher, {"a/two.txt"}) == {"a/two.txt"}


async def test_the_reserved_directory_is_never_reported(folder: Path, watcher: Watcher) -> None:
    reserved = folder / RESERVED_DIR
    for i in range(20):
        (reserved / f"index-{i}.db").write_text("x" * i)
    (reserved / "versions" / "a").mkdir(parents=True)
    (reserved / "index-0.db").rename(reserved / "versions" / "a" / "moved.db")
    (reserved / "index-1.db").rename(folder / "out-of-reserved.db")  # the destination counts
    (folder / "last.txt").write_text("after everything in .backer")
    seen = await gather(watcher, {"out-of-reserved.db", "last.txt"})
    assert seen == {"out-of-reserved.db", "last.txt"}


async def test_the_reserved_directory_causes_no_events_at_all(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[inotify.Event] = []
    read_events = inotify.Inotify.read

    def recorded(self: inotify.Inotify) -> list[inotify.Event]:
        events = read_events(self)
        read.extend(events)
        return events

    monkeypatch.setattr(inotify.Inotify, "read", recorded)
    reserved = folder / RESERVED_DIR
    (reserved / "tmp").mkdir()
    before = inotify_fds()
    async with Watcher(folder) as watcher:
        (fd,) = inotify_fds() - before
        for i in range(100):
            (reserved / "tmp" / f"{i}.part").write_bytes(b"chunk")
        (reserved / "index.db-wal").write_bytes(b"wal")
        (folder / "marker").touch()
        assert await gather(watcher, {"marker"}) == {"marker"}
        watched = inotify.kernel_watches(fd)
        assert folder.stat().st_ino in watched
        assert reserved.stat().st_ino not in watched
        assert (reserved / "tmp").stat().st_ino not in watched
        assert {event.name for event in read} == {b"marker"}


async def test_directories_moved_out_of_the_folder_are_no_longer_watched(
    folder: Path, tmp_path: Path
) -> None:
    (folder / "d" / "e").mkdir(parents=True)
    (folder / "f").mkdir()
    away = tmp_path / "away"
    before = inotify_fds()
    async with Watcher(folder) as watcher:
        (fd,) = inotify_fds() - before
        (folder / "d").rename(away)
        (folder / "f").rename(folder / RESERVED_DIR / "f")
        assert await gather(watcher, {"d", "f"}) == {"d", "f"}
        (away / "e" / "x.txt").write_text("not in the folder: not d/e/x.txt")
        (folder / RESERVED_DIR / "f" / "y.txt").write_text("in .backer: not f/y.txt")
        (folder / "marker").touch()
        assert await gather(watcher, {"marker"}) == {"marker"}
        watched = inotify.kernel_watches(fd)
        assert away.stat().st_ino not in watched
        assert (away / "e").stat().st_ino not in watched
        assert (folder / RESERVED_DIR / "f").stat().st_ino not in watched


async def test_a_directory_renamed_and_replaced_before_it_is_read(
    folder: Path, watcher: Watcher
) -> None:
    # No await in between: the watcher reads all four events at once, when `a` is the new one.
    (folder / "a").mkdir()
    (folder / "a").rename(folder / "b")
    (folder / "a").mkdir()
    (folder / "a" / "sub").mkdir()
    seen: set[str] = set()
    async with asyncio.timeout(DEADLINE):
        while "" not in seen and not {"a", "b"} <= seen:
            seen |= await watcher.changes()
    (folder / "b" / "in-b.txt").write_text("b")
    assert await gather(watcher, {"b/in-b.txt"}) == {"b/in-b.txt"}
    (folder / "a" / "sub" / "in-a.txt").write_text("a")
    assert await gather(watcher, {"a/sub/in-a.txt"}) == {"a/sub/in-a.txt"}
    assert await asyncio.to_thread(watcher.coverage) == Coverage(watched_dirs=4, total_dirs=4)


async def test_a_directory_made_in_one_that_moves_right_after(
    folder: Path, watcher: Watcher
) -> None:
    (folder / "p").mkdir()
    await gather(watcher, {"p"})
    # Read together: when `new` is seen, its parent is no longer at p/.
    (folder / "p" / "new").mkdir()
    (folder / "p").rename(folder / "q")
    await gather(watcher, {"p", "q"})
    (folder / "q" / "new" / "x.txt").write_text("x")
    assert await gather(watcher, {"q/new/x.txt"}) == {"q/new/x.txt"}


async def test_names_are_reported_nfc_and_unindexable_names_dropped(
    folder: Path, watcher: Watcher
) -> None:
    os.mkdir(os.path.join(os.fsencode(folder), b"bad-\xff"))
    (folder / "back\\slash").write_text("x")
    (folder / "Cafe\u0301.txt").write_text("decomposed on disk")
    assert await gather(watcher, {"Caf\u00e9.txt"}) == {"Caf\u00e9.txt"}


async def test_the_folder_itself_vanishing_means_rescan_everything(
    folder: Path, watcher: Watcher
) -> None:
    (folder / "a").mkdir()
    shutil.rmtree(folder)
    assert "" in await gather(watcher, {""})
    assert watcher.coverage() == Coverage(watched_dirs=0, total_dirs=1)


async def test_quick_writes_to_one_file_come_as_one_batch(folder: Path) -> None:
    async with Watcher(folder, debounce=0.2, max_delay=2.0) as watcher:
        target = folder / "busy.txt"
        for i in range(10):
            target.write_text(str(i))
        async with asyncio.timeout(DEADLINE):
            assert await watcher.changes() == {"busy.txt"}
        # Nothing of those writes is left over for a second batch.
        (folder / "marker.txt").write_text("m")
        async with asyncio.timeout(DEADLINE):
            assert await watcher.changes() == {"marker.txt"}


async def test_a_file_written_all_the_time_is_still_reported(folder: Path) -> None:
    stop = asyncio.Event()

    async def write_every_20ms() -> None:
        with (folder / "log.txt").open("w") as log:
            for i in range(75):  # 1.5 s, unless told to stop
                log.write(f"line {i}\n")
                log.flush()
                if stop.is_set():
                    return
                await asyncio.sleep(0.02)

    async with Watcher(folder, debounce=0.1, max_delay=0.3) as watcher, asyncio.TaskGroup() as tg:
        writer = tg.create_task(write_every_20ms())
        async with asyncio.timeout(1.2):
            assert await watcher.changes() == {"log.txt"}
        assert not writer.done(), "the batch came only after the writes stopped"
        stop.set()


# -- coverage and the watch limit --------------------------------------------------------------


async def test_coverage_is_complete_on_a_normal_tree(folder: Path) -> None:
    for i in range(10):
        for j in range(4):
            (folder / f"d{i}" / f"e{j}").mkdir(parents=True)
    (folder / RESERVED_DIR / "versions" / "x").mkdir(parents=True)  # watched, not counted
    (folder / "link").symlink_to(folder / "d0")  # not followed
    async with Watcher(folder) as watcher:
        coverage = await asyncio.to_thread(watcher.coverage)
        assert coverage == Coverage(watched_dirs=51, total_dirs=51)
        assert coverage.complete
        (folder / "d0" / "new").mkdir()
        await gather(watcher, {"d0/new"})
        assert await asyncio.to_thread(watcher.coverage) == Coverage(watched_dirs=52, total_dirs=52)
    assert watcher.coverage() == Coverage(watched_dirs=0, total_dirs=52)


# Runs as root of a fresh user namespace: its inotify limits are its own (Linux >= 5.11).
LIMITED = """
import asyncio, json, os, sys
from pathlib import Path
from backer.watch import Watcher, WatchError

def inotify_fds():
    return {fd for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")
            and os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"}

def limit(name, value):
    path = Path(f"/proc/sys/user/max_inotify_{name}")
    try:
        path.write_text(f"{value}\\n")
    except OSError as exc:
        sys.exit(f"cannot set {path} in a new user namespace: {exc}")

async def refused(root):
    before = inotify_fds()
    try:
        await Watcher(root).start()
    except WatchError as exc:
        return f"{exc}; descriptors left: {len(inotify_fds() - before)}"
    return None

async def main(root):
    (root / ".backer").mkdir()
    for i in range(60):
        (root / f"d{i}").mkdir()
    limit("watches", 20)
    async with Watcher(root) as watcher:
        coverage = await asyncio.to_thread(watcher.coverage)
    result = {"watched": coverage.watched_dirs, "total": coverage.total_dirs,
              "complete": coverage.complete}
    limit("watches", 0)
    result["no_watches"] = await refused(root)
    limit("watches", 100)
    limit("instances", 0)
    result["no_instances"] = await refused(root)
    print(json.dumps(result))

asyncio.run(main(Path(sys.argv[1])))
"""


def test_the_watch_limit_shows_in_coverage(tmp_path: Path) -> None:
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is needed to give the test its own inotify limits"
    result = subprocess.run(
        [unshare, "--user", "--map-root-user", sys.executable, "-c", LIMITED, str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, (
        "the limited run failed (does the kernel allow unprivileged user namespaces with "
        f"per-namespace inotify limits, Linux >= 5.11?):\n{result.stderr}"
    )
    found = json.loads(result.stdout)
    assert found["total"] == 61
    assert found["watched"] == 20
    assert found["complete"] is False
    assert "watch limit" in found["no_watches"]
    assert "inotify instances" in found["no_instances"]
    assert found["no_watches"].endswith("descriptors left: 0")
    assert found["no_instances"].endswith("descriptors left: 0")
    assert "directories of" in result.stderr  # the refused subdirectories were logged


async def test_a_queue_overflow_asks_for_a_full_rescan(folder: Path) -> None:
    # The watcher reads on the event loop, and this test does not yield to it while it fills
    # the kernel's queue: the queue overflows, and what happens meanwhile is lost.
    a, b = folder / "a", folder / "b"
    a.touch()
    b.touch()
    queued = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    async with Watcher(folder) as watcher:
        for i in range(queued + 100):  # alternating, so the kernel cannot merge them
            os.utime(a if i % 2 else b, ns=(i, i))
        (folder / "made-meanwhile" / "deeper").mkdir(parents=True)  # its creation is lost
        async with asyncio.timeout(DEADLINE):
            while await watcher.changes() != {""}:
                pass  # a batch from before the overflow
        assert watcher.overflowed
        (folder / "later").touch()
        assert await gather(watcher, {"later"}) == {"later"}
        assert not watcher.overflowed
        # Watched again after the overflow, though its creation was never seen.
        (folder / "made-meanwhile" / "deeper" / "new.txt").write_text("x")
        assert await gather(watcher, {"made-meanwhile/deeper/new.txt"}) == {
            "made-meanwhile/deeper/new.txt"
        }


# -- life cycle --------------------------------------------------------------------------------


async def test_stop_is_idempotent_and_leaves_no_descriptor(folder: Path) -> None:
    before = inotify_fds()
    watcher = Watcher(folder)
    await watcher.start()
    (fd,) = inotify_fds() - before
    waiting = asyncio.create_task(watcher.changes())
    await asyncio.sleep(0)  # let it start waiting
    await watcher.stop()
    await watcher.stop()
    assert inotify_fds() == before
    assert not asyncio.get_running_loop().remove_reader(fd), "still read after stop"
    with pytest.raises(WatchError, match="stopped"):
        await waiting
    with pytest.raises(WatchError, match="stopped"):
        await watcher.changes()
    with pytest.raises(WatchError, match="already started"):
        await watcher.start()


async def test_start_fails_in_plain_words(tmp_path: Path) -> None:
    before = inotify_fds()
    missing = Watcher(tmp_path / "missing")
    with pytest.raises(WatchError, match="not a directory"):
        await missing.start()
    with pytest.raises(WatchError, match="stopped"):
        await missing.changes()
    with pytest.raises(WatchError, match="not started"):
        await Watcher(tmp_path).changes()
    with pytest.raises(ValueError, match="debounce"):
        Watcher(tmp_path, debounce=2.0, max_delay=1.0)
    assert inotify_fds() == before
