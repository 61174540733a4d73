"""Two replicas reconcile over an in-memory pipe and over TCP: content, renames without
transfer, deletions into versions, every conflict case, and nothing lost."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from backer.errors import FolderMissingError
from backer.ids import Hash
from backer.index.merkle import EMPTY_ROOT
from backer.sync import assemble as assemble_module
from backer.sync import disk as disk_module
from backer.sync.disk import FolderDisk
from backer.sync.fetcher import PullReport
from backer.sync.merge import is_conflict_copy
from backer.sync.peer import SessionResult
from backer.sync.replica import Replica
from backer.sync.replicate import ReplicateResult, replicate, sync_stream

OLD = 1_600_000_000


def write(folder: Path, rel: str, data: bytes, mtime: int = OLD) -> None:
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))


def snapshot(folder: Path) -> dict[str, tuple[str, bytes | str, int]]:
    """Everything a user sees in the folder: kind, content or target, permission bits."""
    seen: dict[str, tuple[str, bytes | str, int]] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        rel_dir = os.path.relpath(dirpath, folder)
        if rel_dir == ".backer" or rel_dir.startswith(".backer/"):
            continue
        for name in dirnames + filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel == ".backer":
                continue
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                seen[rel] = ("link", os.readlink(full), 0)
            elif stat.S_ISDIR(st.st_mode):
                seen[rel] = ("dir", b"", stat.S_IMODE(st.st_mode))
            else:
                seen[rel] = ("file", Path(full).read_bytes(), stat.S_IMODE(st.st_mode))
    return seen


def mtimes(folder: Path) -> dict[str, int]:
    return {
        p: os.lstat(folder / p).st_mtime_ns
        for p, (kind, _, _) in snapshot(folder).items()
        if kind == "file"
    }


def fetched(result: ReplicateResult) -> int:
    return sum(p.bytes_fetched for r in (result.a, result.b) for p in r.pulls)


async def replicate_tcp(a: Path, b: Path) -> ReplicateResult:
    """`replicate`, but over a real TCP connection on loopback."""
    one = await Replica.open(a, device=0, create=True)
    two = await Replica.open(b, device=0, create=True)
    try:
        for replica in (one, two):
            replica.device = replica.store.local_device()
            await replica.scan()
        served: asyncio.Future[SessionResult] = asyncio.get_running_loop().create_future()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            served.set_result(
                await sync_stream(two, reader, writer, device=b"b" * 32, until_in_sync=False)
            )

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", server.sockets[0].getsockname()[1]
            )
            result_a = await sync_stream(one, reader, writer, device=b"a" * 32)
            result_b = await asyncio.wait_for(served, 30)
        finally:
            server.close()
            await server.wait_closed()
        return ReplicateResult(one.root, two.root, result_a, result_b)
    finally:
        await one.close()
        await two.close()


@pytest.fixture(params=["memory", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def converge(a: Path, b: Path) -> ReplicateResult:
    result = await asyncio.wait_for(TRANSPORTS[TRANSPORT[0]](a, b), 120)
    assert result.in_sync, (result.a.reason, result.b.reason)
    assert result.root_a != EMPTY_ROOT
    assert snapshot(a) == snapshot(b)
    return result


Replicator = Callable[[Path, Path], Awaitable[ReplicateResult]]
TRANSPORTS: dict[str, Replicator] = {"memory": replicate, "tcp": replicate_tcp}
TRANSPORT = ["memory"]  # which one `converge` uses: set by the `pair` fixture per test


@pytest.fixture
def pair(tmp_path: Path, transport: str) -> tuple[Path, Path]:
    TRANSPORT[0] = transport
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    return a, b


async def test_initial_sync_of_every_kind(pair: tuple[Path, Path]) -> None:
    a, b = pair
    big = os.urandom(3 * 1024 * 1024 + 7)
    write(a, "docs/big.bin", big)
    write(a, "docs/small.txt", b"hello")
    write(a, "empty", b"")
    write(a, "ünïcode/名前.txt", b"unicode")
    (a / "emptydir").mkdir()
    os.chmod(a / "docs/small.txt", 0o600)
    os.symlink("docs/small.txt", a / "link")
    os.symlink("/nowhere", a / "dangling")
    result = await converge(a, b)
    assert mtimes(a) == mtimes(b)
    assert fetched(result) == len(big) + 5 + len(b"unicode")
    again = await converge(a, b)
    assert fetched(again) == 0 and not any(p.entries for p in again.a.pulls + again.b.pulls)


async def test_edit_in_the_middle_of_a_large_file_moves_little(pair: tuple[Path, Path]) -> None:
    a, b = pair
    data = bytearray(os.urandom(8 * 1024 * 1024))
    write(a, "large", bytes(data))
    await converge(a, b)
    data[4_000_000 : 4_000_000 + 4096] = os.urandom(4096)
    write(b, "large", bytes(data), mtime=OLD + 10)
    result = await converge(a, b)
    assert 0 < fetched(result) <= 3 * 64 * 1024
    assert (a / "large").read_bytes() == bytes(data)


async def test_delete_goes_to_versions(pair: tuple[Path, Path]) -> None:
    a, b = pair
    write(a, "keep", b"k")
    write(a, "gone", b"precious")
    write(a, "dir/inner", b"i")
    await converge(a, b)
    (a / "gone").unlink()
    (a / "dir/inner").unlink()
    (a / "dir").rmdir()
    await converge(a, b)
    assert set(snapshot(b)) == {"keep"}
    kept = [p for p in (b / ".backer/versions").rglob("*") if p.is_file()]
    assert sorted(p.read_bytes() for p in kept) == [b"i", b"precious"]


async def test_rename_and_directory_move_transfer_no_content(pair: tuple[Path, Path]) -> None:
    a, b = pair
    for i in range(1000):
        write(a, f"project/src/file{i:04d}.txt", f"content of file {i}\n".encode() * 20)
    write(a, "single.bin", os.urandom(200_000))
    await converge(a, b)
    os.rename(a / "project", a / "moved")
    os.rename(a / "single.bin", a / "renamed.bin")
    result = await converge(a, b)
    assert fetched(result) == 0
    assert not (b / "project").exists()
    assert len(list((b / "moved/src").iterdir())) == 1000


async def test_a_pull_in_slices_still_moves_without_transfer(
    pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pull applies its paths a slice at a time (memory stays bounded with 100,000 files);
    removals wait for the end, so files moved into a later slice still copy their content
    from where they were."""
    monkeypatch.setattr("backer.sync.pull.PULL_SLICE", 7)
    a, b = pair
    for i in range(40):
        write(a, f"a-first/file{i:02d}.txt", os.urandom(2000))
    await converge(a, b)
    os.rename(a / "a-first", a / "z-last")
    result = await converge(a, b)
    assert fetched(result) == 0
    assert sorted(p.name for p in (b / "z-last").iterdir()) == [
        f"file{i:02d}.txt" for i in range(40)
    ]


async def test_concurrent_edits_keep_both_copies(pair: tuple[Path, Path]) -> None:
    a, b = pair
    write(a, "notes.txt", b"base")
    await converge(a, b)
    write(a, "notes.txt", b"edited on a", mtime=OLD + 100)
    write(b, "notes.txt", b"edited on b, later", mtime=OLD + 200)
    await converge(a, b)
    files = snapshot(a)
    assert files["notes.txt"][1] == b"edited on b, later"  # the newer mtime wins
    copies = [p for p in files if is_conflict_copy(p)]
    assert len(copies) == 1 and copies[0].startswith("notes.sync-conflict-")
    assert copies[0].endswith(".txt") and files[copies[0]][1] == b"edited on a"
    await converge(a, b)  # stable: no new copies
    assert len([p for p in snapshot(b) if is_conflict_copy(p)]) == 1


async def _losing_edit_on_a(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    write(a, "notes.txt", b"base")
    await converge(a, b)
    write(a, "notes.txt", b"edited on a", mtime=OLD + 100)
    write(b, "notes.txt", b"edited on b, later", mtime=OLD + 200)
    return a, b


async def test_a_losing_local_edit_is_kept_aside_in_the_same_pull(tmp_path: Path) -> None:
    a, b = await _losing_edit_on_a(tmp_path)
    result = await converge(a, b)
    assert sum(p.skipped for p in result.a.pulls) == 0  # the winner was not fetched in vain
    assert sum(p.files for p in result.a.pulls) == 1
    # The loser lives in its copy; a version of it would only be a second name of that file.
    assert not [p for p in (a / ".backer/versions").rglob("*") if p.is_file()]


async def test_a_crash_after_the_conflict_copy_leaves_the_local_edit_at_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loser gets its conflict copy as a second name and stays at its path until the winner
    is renamed over it: a crash right after the copy is made leaves the local version in place
    (not an empty path, which the next scan would read as a deletion), and the retry ends with
    that one copy, not a second."""
    a, b = await _losing_edit_on_a(tmp_path)
    original = FolderDisk.copy_aside
    crashed: list[str] = []
    left_behind: list[bytes] = []

    def copy_then_crash(disk: FolderDisk, rel: str, new_rel: str) -> None:
        original(disk, rel, new_rel)
        if not crashed:
            crashed.append(new_rel)
            left_behind.extend([(a / rel).read_bytes(), (a / new_rel).read_bytes()])
            raise OSError("simulated crash after the conflict copy was made")

    monkeypatch.setattr(FolderDisk, "copy_aside", copy_then_crash)
    await converge(a, b)  # a's first attempt fails after the copy; the retry succeeds
    assert left_behind == [b"edited on a", b"edited on a"]
    files = snapshot(a)
    assert files["notes.txt"][1] == b"edited on b, later"
    assert [p for p in files if is_conflict_copy(p)] == [crashed[0]]
    assert files[crashed[0]][1] == b"edited on a"


async def test_an_edit_in_place_while_the_copy_is_made_reaches_the_copy_everywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the chaos test: the copy was a hard link at first, so an edit made in place
    at the path changed the copy too while the watcher named only the path. The copy is now a
    copy: the edit stays at the path (the winner's install sees it and backs off), the copy
    keeps the loser, and both replicas end with every version."""
    a, b = await _losing_edit_on_a(tmp_path)
    original = FolderDisk.copy_aside

    def copy_then_edit(disk: FolderDisk, rel: str, new_rel: str) -> None:
        original(disk, rel, new_rel)
        if disk.folder == a:
            with (a / rel).open("ab") as file:
                file.write(b", and more")

    monkeypatch.setattr(FolderDisk, "copy_aside", copy_then_edit)
    await converge(a, b)  # the same files, byte for byte, on both
    for folder in (a, b):
        contents = {content for _, content, _ in snapshot(folder).values()}
        assert {b"edited on a", b"edited on a, and more", b"edited on b, later"} <= contents


async def test_a_conflict_copy_never_replaces_a_file_already_at_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the chaos test (seed 202): copy names are decided the same way on every node,
    so the same conflict resolved on two nodes names one copy, which a user may then edit;
    the edit reached a node that resolved the conflict later, and its copy replaced the edited
    file without keeping it. A file at the copy's name now goes to the versions first."""
    a, b = await _losing_edit_on_a(tmp_path)
    original = FolderDisk.copy_aside
    squatted: list[str] = []

    def squat_then_copy(disk: FolderDisk, rel: str, new_rel: str) -> None:
        if not squatted:  # a file arrives at the copy's name just before the copy is made
            squatted.append(new_rel)
            (disk.folder / new_rel).write_bytes(b"an edit of the copy, made elsewhere")
        original(disk, rel, new_rel)

    monkeypatch.setattr(FolderDisk, "copy_aside", squat_then_copy)
    await converge(a, b)
    kept = [p.read_bytes() for p in (a / ".backer/versions").rglob("*") if p.is_file()]
    assert b"an edit of the copy, made elsewhere" in kept
    assert (a / squatted[0]).read_bytes() == b"edited on a"


async def test_a_loser_edited_while_it_is_copied_aside_is_indexed_and_decided_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy made while the file changed would hold neither version: it is thrown away, the
    edit is indexed, and the next round decides with it (as a changed file meets a winner)."""
    a, b = await _losing_edit_on_a(tmp_path)
    original = disk_module._copy_file
    edits: list[Path] = []

    def copy_while_edited(src_dir: int, name: str, *rest: Any) -> None:
        original(src_dir, name, *rest)
        if not edits:
            edits.append(a / "notes.txt")
            with (a / "notes.txt").open("ab") as file:
                file.write(b", and more")

    monkeypatch.setattr(disk_module, "_copy_file", copy_while_edited)
    await converge(a, b)
    assert edits
    for folder in (a, b):
        contents = {content for _, content, _ in snapshot(folder).values()}
        assert {b"edited on a, and more", b"edited on b, later"} <= contents
    assert not list((a / ".backer" / "tmp").glob("copy-*"))


async def test_identical_concurrent_edits_are_not_conflicts(pair: tuple[Path, Path]) -> None:
    a, b = pair
    write(a, "same", b"one")
    await converge(a, b)
    write(a, "same", b"both wrote this", mtime=OLD + 5)
    write(b, "same", b"both wrote this", mtime=OLD + 5)
    await converge(a, b)
    assert not any(is_conflict_copy(p) for p in snapshot(a))


async def test_edit_beats_delete_both_ways(pair: tuple[Path, Path]) -> None:
    a, b = pair
    write(a, "x", b"x0")
    write(a, "y", b"y0")
    await converge(a, b)
    (a / "x").unlink()
    write(b, "x", b"x edited", mtime=OLD + 1)
    write(a, "y", b"y edited", mtime=OLD + 1)
    (b / "y").unlink()
    await converge(a, b)
    files = snapshot(a)
    assert files["x"][1] == b"x edited" and files["y"][1] == b"y edited"


async def test_deleted_directory_with_a_new_file_is_kept(pair: tuple[Path, Path]) -> None:
    a, b = pair
    write(a, "dir/old", b"old")
    await converge(a, b)
    (a / "dir/old").unlink()
    (a / "dir").rmdir()
    write(b, "dir/new", b"added meanwhile")
    await converge(a, b)
    files = snapshot(a)
    assert files["dir/new"][1] == b"added meanwhile"
    assert "dir/old" not in files


async def test_kind_changes(pair: tuple[Path, Path]) -> None:
    a, b = pair
    write(a, "was_file", b"f")
    write(a, "was_dir/child", b"c")
    os.symlink("target", a / "was_link")
    await converge(a, b)
    (a / "was_file").unlink()
    write(a, "was_file/now_inside", b"inside")
    (a / "was_dir/child").unlink()
    (a / "was_dir").rmdir()
    write(a, "was_dir", b"now a file")
    (a / "was_link").unlink()
    write(a, "was_link", b"now a file too")
    await converge(a, b)
    files = snapshot(b)
    assert files["was_file"][0] == "dir" and files["was_dir"] == ("file", b"now a file", 0o644)


async def test_local_edit_not_yet_scanned_is_not_overwritten(pair: tuple[Path, Path]) -> None:
    a, b = pair
    write(a, "f", b"v1")
    await converge(a, b)
    write(a, "f", b"v2 from a", mtime=OLD + 10)
    replica_b = await Replica.open(b, device=0)
    try:
        replica_b.device = replica_b.store.local_device()
        await replica_b.scan()
    finally:
        await replica_b.close()
    write(b, "f", b"edited on b after its last scan", mtime=OLD + 20)
    await converge(a, b)
    contents = {v[1] for v in snapshot(a).values() if v[0] == "file"}
    assert {b"v2 from a", b"edited on b after its last scan"} <= contents


async def test_sync_over_tcp(pair: tuple[Path, Path]) -> None:
    a, b = pair
    write(a, "over/tcp.bin", os.urandom(500_000))
    write(b, "from_b", b"b side")
    server_replica = await Replica.open(a, device=0, create=True)
    client_replica = await Replica.open(b, device=0, create=True)
    server_replica.device = server_replica.store.local_device()
    client_replica.device = client_replica.store.local_device()
    await server_replica.scan()
    await client_replica.scan()
    finished = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        result = await sync_stream(
            server_replica, reader, writer, device=b"s" * 32, until_in_sync=False
        )
        finished.set_result(result)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        result = await sync_stream(client_replica, reader, writer, device=b"c" * 32)
        server_result = await asyncio.wait_for(finished, 30)
    finally:
        server.close()
        await server.wait_closed()
        await server_replica.close()
        await client_replica.close()
    assert result.in_sync and server_result.clean
    assert snapshot(a) == snapshot(b)


async def test_a_small_change_in_a_large_file_copies_the_rest_in_the_kernel(
    pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 4 KiB change in a 24 MiB file: the unchanged ranges are copied from the old file by
    copy_file_range, a few calls for the whole file (runs of neighbouring chunks), never read
    into memory at once (the side-by-side benchmark once saw peaks of 335-867 MB)."""
    a, b = pair
    big = os.urandom(24 * 1024 * 1024)
    write(a, "big.bin", big)
    await converge(a, b)
    calls: list[int] = []
    original = os.copy_file_range

    def counting(src: int, dst: int, count: int, *offsets: int | None) -> int:
        calls.append(count)
        return original(src, dst, count, *offsets)

    monkeypatch.setattr(os, "copy_file_range", counting)
    changed = big[:12_000_000] + os.urandom(4096) + big[12_004_096:]
    write(a, "big.bin", changed, mtime=OLD + 5)
    result = await converge(a, b)
    assert (b / "big.bin").read_bytes() == changed
    assert fetched(result) < 200_000  # the rest came from the old file
    assert 2 <= len(calls) <= 4 and sum(calls) > 23 * 1024 * 1024


async def test_local_chunks_that_changed_since_their_scan_are_fetched(
    pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index's places are hints: what is copied from a local file whose stat no longer
    matches its index entry is hashed before it is used, and a chunk that does not match is
    fetched from the peer instead."""
    a, b = pair
    big = os.urandom(4 * 1024 * 1024)
    write(a, "big.bin", big)
    await converge(a, b)
    original = assemble_module._copy_range

    def stale(source_fd: int, fd: int, run: assemble_module._Run) -> int:
        st = os.fstat(source_fd)
        os.utime(source_fd, ns=(st.st_atime_ns, st.st_mtime_ns))  # its ctime moves on
        done = original(source_fd, fd, run)
        os.pwrite(fd, b"\0" * 100, run.offset)  # as if the local file had been edited there
        return done

    monkeypatch.setattr(assemble_module, "_copy_range", stale)
    grown = big + b"tail"
    write(a, "grown.bin", grown, mtime=OLD + 5)
    result = await converge(a, b)
    assert (b / "grown.bin").read_bytes() == grown
    assert 0 < fetched(result) < 200_000


async def test_chunks_copied_from_a_file_unchanged_since_its_scan_are_not_read_back(
    pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local file whose stat still matches its index entry, before and after the kernel
    copy, is trusted as a rescan would trust it: a 1-byte append to a large file does not
    read the whole file back to hash it."""
    a, b = pair
    big = os.urandom(8 * 1024 * 1024)
    write(a, "big.bin", big)
    await converge(a, b)
    checked: list[int] = []
    original = assemble_module._unverified

    def counting(fd: int, copied: list[tuple[int, Hash, int]], report: PullReport) -> Any:
        checked.append(sum(size for _, _, size in copied))
        return original(fd, copied, report)

    monkeypatch.setattr(assemble_module, "_unverified", counting)
    write(a, "big.bin", big + b"x", mtime=OLD + 5)
    result = await converge(a, b)
    assert (b / "big.bin").read_bytes() == big + b"x"
    assert 0 < fetched(result) < 200_000
    assert sum(checked) == 0, checked


async def test_modes_a_pull_cannot_apply_do_not_come_back_as_local_edits(
    pair: tuple[Path, Path],
) -> None:
    """A setuid file lands without setuid and a read-only directory with its owner's rwx (the
    pull's masks); the copy's next scan must not record that as a change of its own and send
    it back, clearing the bits on the machine they came from."""
    a, b = pair
    write(a, "tool.sh", b"#!/bin/sh\n")
    (a / "tool.sh").chmod(0o6755)
    (a / "shelf").mkdir()
    write(a, "shelf/book.txt", b"words")
    (a / "shelf").chmod(0o555)
    try:
        first = await replicate(a, b)
        assert first.in_sync
        assert stat.S_IMODE((b / "tool.sh").stat().st_mode) == 0o755
        assert stat.S_IMODE((b / "shelf").stat().st_mode) == 0o755
        again = await replicate(a, b)
        assert again.in_sync and again.root_a == first.root_a  # nothing changed anywhere
        assert stat.S_IMODE((a / "tool.sh").stat().st_mode) == 0o6755
        assert stat.S_IMODE((a / "shelf").stat().st_mode) == 0o555
    finally:
        (a / "shelf").chmod(0o755)


def test_the_temp_area_is_made_but_never_the_folder_s_backer_directory(tmp_path: Path) -> None:
    """Found by unmounting a folder during a pull: `.backer/tmp` was made with its parents, so a
    bare mount point got a new `.backer/`, passed the marker check, and its files were taken
    for deleted. Only `init` and `join` make `.backer/`."""
    folder = tmp_path / "folder"
    (folder / ".backer").mkdir(parents=True)
    disk = FolderDisk(folder)
    fd, temp = disk.temp_file("k")
    os.close(fd)
    assert temp.parent == folder / ".backer" / "tmp"
    temp.unlink()
    temp.parent.rmdir()
    temp.parent.parent.rmdir()  # the disk holding the folder is gone
    with pytest.raises(FolderMissingError, match="mounted"):
        disk.temp_file("k")
    assert not (folder / ".backer").exists()
