"""The scanner against a real folder: incremental rescans, tombstones, ignore rules, symlinks,
Unicode and odd names, special files, and files that change while they are read."""

from __future__ import annotations

import os
import socket
import unicodedata
from pathlib import Path

import pytest

from backer.errors import FolderMissingError, MassDeletionError
from backer.index import merkle
from backer.index.chunker import chunk_bytes
from backer.index.entry import Entry, Kind, VersionVector, iter_chunks
from backer.index.scan import ScanReport, scan
from backer.index.store import IndexStore, LocalState, Record

DEVICE = 0xB0B
OLD = 1_600_000_000  # an mtime far from "now", so no file is "racy"
VV = VersionVector(((DEVICE, 1),))


def write(folder: Path, rel: str, data: bytes = b"x", mtime: int = OLD) -> Path:
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return path


async def rescan(folder: Path, store: IndexStore, **kwargs: object) -> ScanReport:
    return await scan(folder, store, device=DEVICE, **kwargs)  # type: ignore[arg-type]


def live(store: IndexStore) -> dict[str, Kind]:
    return {e.path: e.kind for e in store.entries() if not e.deleted}


def assert_tree_matches_entries(store: IndexStore) -> None:
    built = merkle.build((e.path, e.leaf_hash()) for e in store.entries())
    assert built.root == store.root


async def test_first_scan_indexes_files_dirs_and_content(folder: Path, store: IndexStore) -> None:
    data = os.urandom(300_000)
    write(folder, "a/b/big.bin", data)
    write(folder, "a/small.txt", b"hello")
    write(folder, "empty", b"")
    (folder / "emptydir").mkdir()
    report = await rescan(folder, store)
    assert live(store) == {
        "a": Kind.DIR,
        "a/b": Kind.DIR,
        "a/b/big.bin": Kind.FILE,
        "a/small.txt": Kind.FILE,
        "empty": Kind.FILE,
        "emptydir": Kind.DIR,
    }
    assert (report.files, report.dirs, report.bytes) == (3, 3, 300_005)
    big = store.get("a/b/big.bin")
    assert big is not None
    assert big.entry.size == len(data)
    assert big.entry.mtime_ns == OLD * 10**9
    assert big.entry.chunk_count > 1
    assert sum(n for _, n in iter_chunks(big.entry.chunks)) == len(data)
    assert big.entry.version.counter(DEVICE) > 0 and big.entry.modifier == DEVICE
    empty = store.get("empty")
    assert empty is not None and empty.entry.chunks == b"" and empty.entry.size == 0
    assert report.root == store.root != merkle.EMPTY_ROOT
    assert_tree_matches_entries(store)


async def test_rescan_reads_only_changed_files(folder: Path, store: IndexStore) -> None:
    for i in range(50):
        write(folder, f"d{i % 5}/f{i}", os.urandom(100))
    first = await rescan(folder, store)
    assert first.hashed_files == 50
    unchanged = await rescan(folder, store)
    assert (unchanged.hashed_files, unchanged.updated, unchanged.root) == (0, 0, first.root)
    write(folder, "d1/f1", b"changed", mtime=OLD + 5)
    changed = await rescan(folder, store)
    assert (changed.hashed_files, changed.updated) == (1, 1)
    assert changed.root != first.root
    record = store.get("d1/f1")
    assert record is not None and record.entry.size == len(b"changed")


async def test_touch_without_content_change_is_a_new_version(
    folder: Path, store: IndexStore
) -> None:
    path = write(folder, "f", b"same")
    await rescan(folder, store)
    before = store.get("f")
    os.utime(path, (OLD + 60, OLD + 60))
    report = await rescan(folder, store)
    after = store.get("f")
    assert before and after and report.updated == 1
    assert after.entry.chunks == before.entry.chunks
    assert after.entry.version.counter(DEVICE) > before.entry.version.counter(DEVICE)


async def test_inode_change_with_same_content_keeps_version(
    folder: Path, store: IndexStore
) -> None:
    write(folder, "f", b"same")
    await rescan(folder, store)
    before = store.get("f")
    os.remove(folder / "f")
    write(folder, "f", b"same")  # a new inode, same bytes and mtime: an editor's atomic save
    report = await rescan(folder, store)
    after = store.get("f")
    assert report.hashed_files == 1 and report.updated == 0
    assert before and after and after.entry == before.entry


async def test_recent_file_is_reread_next_time(folder: Path, store: IndexStore) -> None:
    write(folder, "fresh", b"new", mtime=int(__import__("time").time()))
    await rescan(folder, store)
    record = store.get("fresh")
    assert record is not None and record.local.racy
    again = await rescan(folder, store)
    assert again.hashed_files == 1 and again.updated == 0


async def test_deleted_file_and_directory_become_tombstones(
    folder: Path, store: IndexStore
) -> None:
    write(folder, "keep", b"k")
    write(folder, "gone", b"g")
    write(folder, "dir/sub/x", b"x")
    write(folder, "dir/y", b"y")
    await rescan(folder, store)
    old = store.get("gone")
    (folder / "gone").unlink()
    for p in ("dir/sub/x", "dir/y"):
        (folder / p).unlink()
    (folder / "dir/sub").rmdir()
    (folder / "dir").rmdir()
    report = await rescan(folder, store)
    assert report.deleted == 5
    assert live(store) == {"keep": Kind.FILE}
    tomb = store.get("gone")
    assert old and tomb and tomb.entry.deleted and tomb.entry.kind is Kind.FILE
    assert tomb.entry.version.counter(DEVICE) > old.entry.version.counter(DEVICE)
    for path in ("dir", "dir/sub", "dir/sub/x", "dir/y"):
        record = store.get(path)
        assert record is not None and record.entry.deleted
    assert_tree_matches_entries(store)
    # A deleted file that comes back is a new version of the same path.
    write(folder, "gone", b"back")
    await rescan(folder, store)
    back = store.get("gone")
    assert back and not back.entry.deleted
    assert back.entry.version.counter(DEVICE) > tomb.entry.version.counter(DEVICE)


async def test_kind_change_file_to_directory(folder: Path, store: IndexStore) -> None:
    write(folder, "x", b"file")
    await rescan(folder, store)
    (folder / "x").unlink()
    write(folder, "x/inside", b"now a dir")
    await rescan(folder, store)
    assert live(store) == {"x": Kind.DIR, "x/inside": Kind.FILE}
    assert_tree_matches_entries(store)


async def test_ignore_rules(folder: Path, store: IndexStore) -> None:
    write(folder, ".backerignore", b"*.tmp\nbuild/\n!keep.tmp\n")
    write(folder, "a.tmp")
    write(folder, "keep.tmp")
    write(folder, "src/b.tmp")
    write(folder, "build/out.o")
    write(folder, "src/main.c")
    await rescan(folder, store)
    assert set(live(store)) == {".backerignore", "keep.tmp", "src", "src/main.c"}
    assert not any(e.path.startswith(".backer/") for e in store.entries())
    # Newly ignored paths are forgotten, not deleted: peers must not delete their copies.
    write(folder, ".backerignore", b"*.tmp\nbuild/\n!keep.tmp\nsrc/\n", mtime=OLD + 1)
    report = await rescan(folder, store)
    assert report.deleted == 0
    assert store.get("src") is None and store.get("src/main.c") is None
    assert_tree_matches_entries(store)


async def test_a_nested_share_and_case_variants_of_the_reserved_name_are_never_indexed(
    folder: Path, store: IndexStore
) -> None:
    write(folder, "sub/.backer/index.db", b"another share's live index")
    write(folder, ".Backer/x")
    write(folder, "a/b/.BACKER/y")
    write(folder, "sub/kept.txt")
    report = await rescan(folder, store)
    assert set(live(store)) == {"sub", "sub/kept.txt", "a", "a/b"}
    assert not report.skipped  # left out like an ignored path, not a problem each scan
    assert_tree_matches_entries(store)


async def test_an_index_holding_a_nested_share_from_before_forgets_it(
    folder: Path, store: IndexStore
) -> None:
    write(folder, "sub/.backer/index.db", b"indexed by an older scanner")
    old_scanner_indexed = [
        ("sub", Kind.DIR),
        ("sub/.backer", Kind.DIR),
        ("sub/.backer/index.db", Kind.FILE),
    ]
    store.commit(
        [
            Record(Entry(path=path, kind=kind, version=VV, modifier=DEVICE), LocalState())
            for path, kind in old_scanner_indexed
        ]
    )
    report = await rescan(folder, store)
    assert report.deleted == 0  # forgotten, not deleted: no peer removes its copy
    assert "sub/.backer/index.db" not in live(store) and store.get("sub/.backer") is None
    assert_tree_matches_entries(store)


async def test_symlinks_are_stored_not_followed(
    folder: Path, store: IndexStore, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not ours")
    os.symlink(outside, folder / "to_outside")
    os.symlink("nowhere/at/all", folder / "dangling")
    os.symlink("loop", folder / "loop")
    report = await rescan(folder, store)
    assert live(store) == {
        "to_outside": Kind.SYMLINK,
        "dangling": Kind.SYMLINK,
        "loop": Kind.SYMLINK,
    }
    link = store.get("to_outside")
    assert link is not None and link.entry.target == str(outside)
    assert report.symlinks == 3 and report.files == 0
    (folder / "dangling").unlink()
    os.symlink("elsewhere", folder / "dangling")
    again = await rescan(folder, store)
    assert again.updated == 1
    changed = store.get("dangling")
    assert changed is not None and changed.entry.target == "elsewhere"


async def test_unicode_names_are_nfc(folder: Path, store: IndexStore) -> None:
    nfd = unicodedata.normalize("NFD", "café")
    nfc = unicodedata.normalize("NFC", "café")
    assert nfd != nfc
    write(folder, f"{nfd}/{nfd}.txt", b"decomposed on disk")
    await rescan(folder, store)
    assert set(live(store)) == {nfc, f"{nfc}/{nfc}.txt"}
    record = store.get(f"{nfc}/{nfc}.txt")
    assert record is not None and record.local.disk_name == f"{nfd}.txt"
    unchanged = await rescan(folder, store)
    assert unchanged.updated == 0 and unchanged.hashed_files == 0
    # Both spellings in one directory: the NFC one is indexed, the other skipped with a reason.
    write(folder, f"{nfc}/{nfc}.txt", b"composed")
    report = await rescan(folder, store)
    assert any("normalisation" in s.reason for s in report.skipped)
    record = store.get(f"{nfc}/{nfc}.txt")
    assert record is not None and record.local.disk_name is None and record.entry.size == 8


async def test_subpath_scan_of_a_name_stored_in_nfd(folder: Path, store: IndexStore) -> None:
    nfd = unicodedata.normalize("NFD", "é")
    write(folder, f"{nfd}/f", b"1")
    await rescan(folder, store)
    write(folder, f"{nfd}/f", b"22", mtime=OLD + 1)
    report = await rescan(folder, store, paths=["é/f"])
    assert report.updated == 1
    record = store.get("é/f")
    assert record is not None and record.entry.size == 2


async def test_odd_names(folder: Path, store: IndexStore) -> None:
    odd = [
        " leading space",
        "trailing space ",
        "new\nline",
        "-dash",
        "🦆 duck",
        "tab\tname",
        "x" * 255,
        "a" * 120 + "é" * 60,  # 240 bytes in UTF-8
    ]
    for name in odd:
        write(folder, name, name.encode())
    write(folder, "back\\slash", b"refused")
    bad = os.fsencode(str(folder)) + b"/bad-\xff-utf8"
    with open(bad, "wb") as handle:
        handle.write(b"x")
    report = await rescan(folder, store)
    assert set(live(store)) == set(odd)
    reasons = {s.path: s.reason for s in report.skipped}
    assert "separator" in reasons["back\\slash"]
    assert any("UTF-8" in reason for reason in reasons.values())


async def test_special_files_are_skipped(folder: Path, store: IndexStore) -> None:
    os.mkfifo(folder / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(folder / "sock"))
        write(folder, "normal")
        report = await rescan(folder, store)
    finally:
        sock.close()
    assert set(live(store)) == {"normal"}
    assert {s.path for s in report.skipped} == {"fifo", "sock"}


async def test_subpath_scan_touches_only_that_path(folder: Path, store: IndexStore) -> None:
    write(folder, "a/one", b"1")
    write(folder, "b/two", b"2")
    await rescan(folder, store)
    write(folder, "a/one", b"11", mtime=OLD + 1)
    write(folder, "b/two", b"22", mtime=OLD + 1)
    write(folder, "a/new/deep/file", b"3")
    report = await rescan(folder, store, paths=["a/one", "a/new/deep/file"])
    assert report.hashed_files == 2
    two = store.get("b/two")
    assert two is not None and two.entry.size == 1  # not rescanned
    assert {"a/new", "a/new/deep", "a/new/deep/file"} <= set(live(store))
    (folder / "a/one").unlink()
    await rescan(folder, store, paths=["a/one"])
    gone = store.get("a/one")
    assert gone is not None and gone.entry.deleted
    assert_tree_matches_entries(store)


async def test_file_changing_while_read_is_not_indexed_half_old(
    folder: Path, store: IndexStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = write(folder, "moving", b"v1" * 1000)
    write(folder, "still", b"s")
    real = chunk_bytes
    writes = {"left": 10}

    def chunk_and_meddle(data: bytes | memoryview) -> bytes:
        if writes["left"] > 0 and bytes(data[:2]) in (b"v1", b"v2"):
            writes["left"] -= 1
            with open(target, "ab") as handle:  # another program appends meanwhile
                handle.write(b"v2")
        return real(data)

    monkeypatch.setattr("backer.index.scan.chunk_bytes", chunk_and_meddle)
    report = await rescan(folder, store)
    assert report.unstable == ("moving",)
    assert store.get("moving") is None  # never indexed with content it did not finish reading
    assert store.get("still") is not None
    writes["left"] = 1  # changes once more, then holds still: the retry indexes it
    settled = await rescan(folder, store)
    assert settled.unstable == ()
    record = store.get("moving")
    assert record is not None and record.entry.size == target.stat().st_size


async def test_missing_marker_refuses_to_scan(folder: Path, store: IndexStore) -> None:
    write(folder, "f")
    await rescan(folder, store)
    (folder / ".backer" / "index.db").rename(folder / "index.db")
    for leftover in (folder / ".backer").iterdir():
        leftover.unlink()
    (folder / ".backer").rmdir()
    with pytest.raises(FolderMissingError):
        await rescan(folder, store)


async def test_root_independent_of_scan_order_and_history(tmp_path: Path) -> None:
    roots = []
    for name, order in (("one", range(30)), ("two", reversed(range(30)))):
        root = tmp_path / name
        root.mkdir()
        IndexStore.open(root, create=True).close()
        for i in order:
            write(root, f"d{i % 4}/f{i}", str(i).encode())
        with IndexStore.open(root) as store:
            roots.append((await scan(root, store, device=DEVICE, clock=lambda: 1_700_000_000)).root)
    assert roots[0] == roots[1]


async def test_directory_replaced_by_a_file_tombstones_its_children(
    folder: Path, store: IndexStore
) -> None:
    write(folder, "x/inner/deep", b"1")
    write(folder, "x/top", b"2")
    await rescan(folder, store)
    for path in ("x/inner/deep", "x/top"):
        (folder / path).unlink()
    (folder / "x/inner").rmdir()
    (folder / "x").rmdir()
    write(folder, "x", b"now a file")
    report = await rescan(folder, store)
    assert report.deleted == 3
    assert live(store) == {"x": Kind.FILE}
    assert_tree_matches_entries(store)


async def test_mass_disappearance_is_refused_not_replicated(
    folder: Path, store: IndexStore
) -> None:
    for i in range(40):
        write(folder, f"photos/{i}.jpg", str(i).encode())
    write(folder, "notes", b"n")
    await rescan(folder, store)
    root = store.root
    for i in range(40):
        (folder / f"photos/{i}.jpg").unlink()
    write(folder, "notes", b"still edited", mtime=OLD + 1)
    with pytest.raises(MassDeletionError) as refused:
        await rescan(folder, store)
    assert refused.value.vanished == 40
    assert not any(e.deleted for e in store.entries())
    record = store.get("notes")
    assert record is not None and record.entry.size == len(b"still edited")
    assert store.root != root  # the edit is recorded, the deletions are not
    report = await rescan(folder, store, allow_deletions=True)
    assert report.deleted == 40
    assert set(live(store)) == {"photos", "notes"}


async def test_moving_a_large_directory_is_not_a_mass_deletion(
    folder: Path, store: IndexStore
) -> None:
    for i in range(60):
        write(folder, f"old/{i}", str(i).encode())
    await rescan(folder, store)
    os.rename(folder / "old", folder / "new")
    report = await rescan(folder, store)
    assert report.deleted == 61
    assert len(live(store)) == 61
