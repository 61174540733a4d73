"""A rename on one replica is a rename on the other: the moved files keep their inodes, no byte
is rebuilt or fetched, nothing goes to the versions area; and a user's edit that races the
move is never lost."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_apply_races import Edit, append, atomic_save, edit_at_swap, live
from test_sync import OLD, converge, fetched, write

from backer.index.chunker import chunk_bytes
from backer.index.scan import scan
from backer.index.store import IndexStore
from backer.protocol import codec
from backer.protocol import session as session_module
from backer.protocol.messages import Entries, GetGroups, Message
from backer.sync import moves as moves_module
from backer.sync.swap import move_noreplace
from backer.sync.versions import Versions


def inodes(folder: Path, rel_dir: str) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in (folder / rel_dir).iterdir()}


def versions_kept(folder: Path) -> int:
    return sum(1 for _ in Versions(folder).all())


async def _pair_with_album(tmp_path: Path, files: int = 30) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for i in range(files):
        write(a, f"album/photo-{i:03d}.jpg", os.urandom(20_000 + i))
    await converge(a, b)
    return a, b


async def test_a_renamed_directory_is_moved_on_the_copy_not_rebuilt(tmp_path: Path) -> None:
    """Before, each file was rebuilt from the old one's chunks into a new inode and the old
    one archived: 30 versions of files that were never lost."""
    a, b = await _pair_with_album(tmp_path)
    before = inodes(b, "album")
    os.rename(a / "album", a / "album-2026")
    result = await converge(a, b)
    assert fetched(result) == 0
    assert not (b / "album").exists()
    assert inodes(b, "album-2026") == before  # the same files, renamed
    assert versions_kept(b) == 0


async def test_a_moved_file_with_other_metadata_is_rebuilt_and_the_old_one_kept(
    tmp_path: Path,
) -> None:
    """Only a file that needs no byte or mode changed is renamed; another mtime makes it a
    new file, built as usual, and the deleted one goes to the versions area as before."""
    a, b = await _pair_with_album(tmp_path, files=2)
    os.rename(a / "album/photo-000.jpg", a / "photo.jpg")
    os.utime(a / "photo.jpg", (1_700_000_000, 1_700_000_000))
    await converge(a, b)
    assert (b / "photo.jpg").read_bytes() == (a / "photo.jpg").read_bytes()
    assert versions_kept(b) == 1


async def test_a_renamed_directory_s_chunk_lists_stay_off_the_wire(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy already has every moved file's chunk list (its own files' lists): the pull
    asks for entries without inline lists and finds every group locally. Before, each entry
    carried its list inline (127 kB of a 500-photo rename's 441 kB)."""
    a, b = await _pair_with_album(tmp_path)
    sent: list[Message] = []

    def frame(message: Message) -> bytes:
        sent.append(message)
        return codec.frame(message)

    monkeypatch.setattr(session_module, "frame", frame)
    os.rename(a / "album", a / "album-2026")
    await converge(a, b)
    moved = [
        entry
        for message in sent
        if isinstance(message, Entries)
        for entry in message.entries
        if entry is not None and entry.groups
    ]
    assert len(moved) == 30
    assert all(entry.chunks is None for entry in moved)
    assert not any(isinstance(message, GetGroups) for message in sent)


@pytest.mark.parametrize("edit", [atomic_save(b"saved on b"), append(b" + typed on b")])
async def test_an_edit_at_the_move_of_its_file_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: Edit
) -> None:
    """b's user edits a file at the instant the pull renames it: what moved is not what the
    index said, so it goes back to its old path, where the deletion meets it (edit beats
    delete), and the new path is built from the peer's content."""
    a, b = await _pair_with_album(tmp_path, files=3)
    original = (a / "album/photo-001.jpg").read_bytes()
    os.rename(a / "album", a / "moved")
    done = edit_at_swap(monkeypatch, b, "album/photo-001.jpg", edit)
    await converge(a, b)
    assert done
    for folder in (a, b):
        assert (folder / "moved/photo-001.jpg").read_bytes() == original
        assert (folder / "album/photo-001.jpg").read_bytes() in (
            b"saved on b",
            original + b" + typed on b",
        )


async def test_an_edit_that_cannot_move_back_is_kept_at_the_new_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user types into the file as it is renamed and saves a new file at its old path
    before it can go back: both survive, on both replicas, with the peer's version too."""
    a, b = await _pair_with_album(tmp_path, files=2)
    original = (a / "album/photo-001.jpg").read_bytes()
    os.rename(a / "album", a / "moved")
    raced: list[str] = []

    def racing_move(src_dir: int, src: str, dst_dir: int, dst: str) -> None:
        move_noreplace(src_dir, src, dst_dir, dst)
        if src == "photo-001.jpg" and not raced:
            raced.append(dst)
            with (b / "moved" / dst).open("ab") as moved:
                moved.write(b" + typed as it moved")
            (b / "album/photo-001.jpg").write_bytes(b"a new file at the old path")

    monkeypatch.setattr(moves_module, "move_noreplace", racing_move)
    await converge(a, b)
    assert raced
    for folder in (a, b):
        assert {
            original,
            original + b" + typed as it moved",
            b"a new file at the old path",
        } <= live(folder)


@pytest.mark.parametrize("named", [True, False], ids=["watched", "full"])
async def test_a_renamed_directory_is_indexed_without_reading_its_files(
    folder: Path, store: IndexStore, named: bool
) -> None:
    """A directory's rename leaves its files' stat whole (inode, size, mtime and ctime): the
    scan takes each one's chunk list from the record of the path it left. Before, the source
    of a 500-photo rename read and hashed all 68 MB again. A file edited in place with its
    size and mtime put back has a new ctime, and is read."""
    for i in range(12):
        write(folder, f"album/p{i:02d}.jpg", os.urandom(30_000 + i))
    await scan(folder, store, device=7)
    before = {p: store.get(f"album/{p}") for p in (f"p{i:02d}.jpg" for i in range(12))}
    edited = folder / "album/p00.jpg"
    edited.write_bytes(os.urandom(30_000))  # same size, in place
    os.utime(edited, ns=(OLD * 10**9, OLD * 10**9))  # and the same mtime: only its ctime tells
    os.rename(folder / "album", folder / "album-2")
    paths = ["album", "album-2"] if named else None
    report = await scan(folder, store, device=7, paths=paths, allow_deletions=True)
    assert report.hashed_files == 1
    for name, old in before.items():
        record = store.get(f"album-2/{name}")
        assert old is not None and record is not None
        if name == "p00.jpg":
            assert record.entry.chunks == chunk_bytes((folder / "album-2" / name).read_bytes())
        else:
            assert record.entry.chunks == old.entry.chunks
        gone = store.get(f"album/{name}")
        assert gone is not None and gone.entry.deleted
