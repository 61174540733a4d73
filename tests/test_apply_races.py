"""A user's edit made at the exact step where a pull swaps in, or removes, what is at a path
(issue 14, cases 1 and 2): the disk's `before_swap` seam makes the edit happen there, and
nothing the user wrote may be lost, on either replica. Also a subdirectory on another
filesystem (case 5), where no rename from the temp area can reach."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_sync import OLD, converge, snapshot, write

from backer.sync import swap as swap_module
from backer.sync.disk import FolderDisk
from backer.sync.merge import is_conflict_copy

Edit = Callable[[Path], None]


def atomic_save(data: bytes) -> Edit:
    """What most editors do: write a temp file beside the path, rename it over the path."""

    def save(path: Path) -> None:
        temp = path.with_name(f".{path.name}.swp")
        temp.write_bytes(data)
        os.rename(temp, path)

    return save


def append(data: bytes) -> Edit:
    def edit(path: Path) -> None:
        with path.open("ab") as file:
            file.write(data)

    return edit


def replace_by_file(data: bytes) -> Edit:
    """A symlink replaced by a regular file, atomically."""
    return atomic_save(data)


def edit_at_swap(monkeypatch: pytest.MonkeyPatch, folder: Path, rel: str, edit: Edit) -> list[str]:
    """Make `edit` happen to folder/rel once, when a pull is about to swap or remove it."""
    done: list[str] = []

    def hook(disk: FolderDisk, at: str) -> None:
        if disk.folder == folder and at == rel and not done:
            done.append(at)
            edit(folder / rel)

    monkeypatch.setattr(FolderDisk, "before_swap", hook)
    return done


def refuse_flags(refused: int) -> Callable[[int, str, int, str, int], None]:
    """renameat2 on a filesystem that answers EINVAL to these flags."""
    original = swap_module.renameat2

    def renameat2(src_dir: int, src: str, dst_dir: int, dst: str, flags: int) -> None:
        if flags & refused:
            raise OSError(errno.EINVAL, "not supported on this filesystem")
        original(src_dir, src, dst_dir, dst, flags)

    return renameat2


def live(folder: Path) -> set[bytes | str]:
    return {content for _, content, _ in snapshot(folder).values()}


async def _shared(tmp_path: Path, files: dict[str, bytes]) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for rel, data in files.items():
        write(a, rel, data)
    await converge(a, b)
    return a, b


@pytest.mark.parametrize(
    "edit", [atomic_save(b"saved on b meanwhile"), append(b" + typed on b meanwhile")]
)
async def test_an_edit_at_the_install_of_a_pulled_version_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: Edit
) -> None:
    """Case 1: the install passed its last check, then the user saved. The exchange swaps the
    pulled version in; what came out is not what the pull expected, so it is the user's edit:
    a conflict copy, on both replicas. Before, an atomic save was overwritten (on no node, in
    no versions area) and an edit in place survived only in b's versions area."""
    a, b = await _shared(tmp_path, {"x.txt": b"one"})
    write(a, "x.txt", b"two, from a", mtime=OLD + 10)
    done = edit_at_swap(monkeypatch, b, "x.txt", edit)
    await converge(a, b)
    assert done
    edited = (
        b"saved on b meanwhile"
        if b"saved on b meanwhile" in live(b)
        else b"one + typed on b meanwhile"
    )
    for folder in (a, b):
        assert (folder / "x.txt").read_bytes() == b"two, from a"
        assert {edited, b"two, from a"} <= live(folder)
        assert any(is_conflict_copy(p) for p in snapshot(folder))


async def test_an_edit_at_the_install_of_a_conflict_winner_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The winner of a conflict replaces a loser that was copied aside: an atomic save made
    between that copy and the install is a third version, and is kept too."""
    a, b = await _shared(tmp_path, {"x.txt": b"one"})
    write(a, "x.txt", b"wins, from a", mtime=OLD + 20)
    write(b, "x.txt", b"loses, on b", mtime=OLD + 10)
    done = edit_at_swap(monkeypatch, b, "x.txt", atomic_save(b"a third, on b"))
    await converge(a, b)
    assert done
    for folder in (a, b):
        assert {b"wins, from a", b"loses, on b", b"a third, on b"} <= live(folder)


@pytest.mark.parametrize("flags", ["supported", "refused"])
async def test_a_file_the_user_creates_at_the_install_of_a_new_path_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: str
) -> None:
    """Nothing was expected at the path: the pulled file never replaces one the user just
    made there (RENAME_NOREPLACE, or a hard link where the filesystem refuses the flag); the
    two become a conflict like any concurrent creation."""
    if flags == "refused":
        monkeypatch.setattr(swap_module, "renameat2", refuse_flags(swap_module.RENAME_NOREPLACE))
    a, b = await _shared(tmp_path, {"other.txt": b"other"})
    write(a, "new.txt", b"made on a", mtime=OLD + 10)
    done = edit_at_swap(monkeypatch, b, "new.txt", atomic_save(b"made on b meanwhile"))
    await converge(a, b)
    assert done
    for folder in (a, b):
        assert {b"made on a", b"made on b meanwhile"} <= live(folder)


async def test_a_file_saved_over_a_symlink_at_its_replacement_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await _shared(tmp_path, {"target.txt": b"t"})
    os.symlink("target.txt", a / "link")
    await converge(a, b)
    os.unlink(a / "link")
    os.symlink("elsewhere", a / "link")
    done = edit_at_swap(monkeypatch, b, "link", replace_by_file(b"a file saved over the link"))
    await converge(a, b)
    assert done
    for folder in (a, b):
        assert b"a file saved over the link" in live(folder)
        assert os.readlink(folder / "link") == "elsewhere"


@pytest.mark.parametrize("edit", [atomic_save(b"saved on b"), append(b" + typed on b")])
async def test_an_edit_at_the_deletion_of_its_file_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: Edit
) -> None:
    """Case 2: a deletes x.txt; b's user edits it at the step that removes it. The removal
    moves it out, sees it is not what the peer deleted, puts it back: edit beats delete, and
    the edit is the live file everywhere. Before, it was archived and deleted everywhere."""
    a, b = await _shared(tmp_path, {"x.txt": b"one", "keep.txt": b"keep"})
    os.unlink(a / "x.txt")
    done = edit_at_swap(monkeypatch, b, "x.txt", edit)
    await converge(a, b)
    assert done
    for folder in (a, b):
        assert (folder / "x.txt").read_bytes() in (b"saved on b", b"one + typed on b")


async def test_an_edit_inside_a_directory_renamed_away_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renames d to e while b's user edits d/y.txt as the pull removes it: the edited file
    stays at d/y.txt (with its directory) on both replicas, and e/y.txt arrives too."""
    a, b = await _shared(tmp_path, {"d/y.txt": b"why"})
    os.rename(a / "d", a / "e")
    done = edit_at_swap(monkeypatch, b, "d/y.txt", append(b" not"))
    await converge(a, b)
    assert done
    for folder in (a, b):
        assert (folder / "d/y.txt").read_bytes() == b"why not"
        assert (folder / "e/y.txt").read_bytes() == b"why"


async def test_a_filesystem_without_exchange_still_installs_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where RENAME_EXCHANGE is refused (EINVAL), the install falls back to link-then-rename
    (the old window stays open there) and says so once."""
    a, b = await _shared(tmp_path, {"x.txt": b"one"})
    monkeypatch.setattr(swap_module, "renameat2", refuse_flags(swap_module.RENAME_EXCHANGE))
    write(a, "x.txt", b"two", mtime=OLD + 10)
    with caplog.at_level(logging.WARNING, logger="backer.sync.disk"):
        await converge(a, b)
    assert (b / "x.txt").read_bytes() == b"two"
    versions = [p.read_bytes() for p in (b / ".backer/versions").rglob("*") if p.is_file()]
    assert versions == [b"one"]
    assert "RENAME_EXCHANGE" in caplog.text


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `path` (root), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        raise AssertionError("this test mounts a tmpfs: it needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Path]:
    """b/sub is a tmpfs of its own, as a subdirectory on a second disk would be."""
    with tmpfs(tmp_path / "b" / "sub", "size=8m,mode=0755") as sub:
        yield sub


async def test_a_subdirectory_on_another_filesystem_receives_replaces_and_deletes(
    tmp_path: Path, mounted: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Case 5: a rename from .backer/tmp cannot cross into another filesystem (EXDEV), so the
    subdirectory never received a file and the pull retried for ever. Temp files for it are
    made on its own filesystem now; what is replaced or deleted there is copied into the
    versions area; an edit at the deletion still wins there."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "sub").mkdir()
    os.chmod(a / "sub", 0o755)
    for rel, data in {"sub/x.txt": b"one", "sub/gone.txt": b"bye", "sub/kept.txt": b"k"}.items():
        write(a, rel, data)
    write(a, "sub/deeper/y.txt", b"deep")
    await converge(a, b)
    assert (mounted / "x.txt").read_bytes() == b"one"
    write(a, "sub/x.txt", b"two", mtime=OLD + 10)
    os.unlink(a / "sub/gone.txt")
    os.unlink(a / "sub/kept.txt")
    done = edit_at_swap(monkeypatch, b, "sub/kept.txt", append(b", edited on b"))
    await converge(a, b)
    assert done
    for folder in (a, b):
        assert (folder / "sub/x.txt").read_bytes() == b"two"
        assert not (folder / "sub/gone.txt").exists()
        assert (folder / "sub/kept.txt").read_bytes() == b"k, edited on b"
    versions = {p.read_bytes() for p in (b / ".backer/versions").rglob("*") if p.is_file()}
    assert versions == {b"one", b"bye"}
    assert not [p for p in mounted.iterdir() if p.name.startswith(".backer-")]


async def test_a_conflict_on_another_filesystem_keeps_both_copies(
    tmp_path: Path, mounted: Path
) -> None:
    """The local loser of a conflict is copied aside in its own directory; on a sub-mount the
    copy was made in .backer/tmp and linked across filesystems (EXDEV), so the pull failed on
    that path for ever (the chaos soak, seed 41, with one node's d0 on a tmpfs)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "sub").mkdir()
    os.chmod(a / "sub", 0o755)
    write(a, "sub/x.txt", b"base")
    await converge(a, b)
    write(a, "sub/x.txt", b"edited on a, later", mtime=OLD + 200)
    write(b, "sub/x.txt", b"edited on b", mtime=OLD + 100)
    result = await converge(a, b)
    assert not [e for r in (result.a, result.b) for p in r.pulls for e in p.errors]
    for folder in (a, b):
        contents = sorted(p.read_bytes() for p in (folder / "sub").iterdir() if p.is_file())
        assert contents == [b"edited on a, later", b"edited on b"], folder
    assert not [p for p in mounted.iterdir() if p.name.startswith(".backer-")]


async def test_a_versions_area_on_its_own_filesystem_still_takes_what_a_pull_replaces(
    tmp_path: Path,
) -> None:
    """Replaced and deleted files are copied into a versions area mounted apart (a rename
    cannot reach it), and a deletion is not mistaken for a local edit because the copy has
    another inode."""
    a, b = await _shared(tmp_path, {"x.txt": b"one", "y.txt": b"why"})
    with tmpfs(b / ".backer/versions", "size=8m"):
        write(a, "x.txt", b"two", mtime=OLD + 10)
        os.unlink(a / "y.txt")
        result = await converge(a, b)
        assert not [e for r in (result.a, result.b) for p in r.pulls for e in p.errors]
        versions = {p.read_bytes() for p in (b / ".backer/versions").rglob("*") if p.is_file()}
        assert versions == {b"one", b"why"}
        assert not (b / "y.txt").exists()
        assert not [p for p in b.iterdir() if p.name.startswith(".backer-")]


@pytest.fixture
def small_b(tmp_path: Path) -> Iterator[Path]:
    """Replica b's whole folder on an 8 MiB tmpfs."""
    with tmpfs(tmp_path / "b", "size=8m") as b:
        yield b


async def test_versions_never_make_a_pull_fail_for_want_of_space(
    tmp_path: Path, small_b: Path
) -> None:
    """Case 8: each replacement of a large file kept the old one in the versions area until
    the disk was full and every pull failed with ENOSPC. Old versions now give way, oldest
    first, before a file is built; a path's newest version is kept."""
    a = tmp_path / "a"
    a.mkdir()
    write(a, "small.txt", b"small")
    contents = [os.urandom(3 * 1024 * 1024 // 2) for _ in range(7)]
    for round_, data in enumerate(contents):
        write(a, "big.bin", data, mtime=OLD + round_)
        await converge(a, small_b)
        assert (small_b / "big.bin").read_bytes() == data
    versions = [p.read_bytes() for p in (small_b / ".backer/versions").rglob("*") if p.is_file()]
    assert contents[-2] in versions  # the newest version of big.bin stays


async def test_a_filesystem_without_exchange_or_links_never_leaves_the_path_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where neither RENAME_EXCHANGE nor hard links work (exFAT), the old file was renamed away
    before the new one was renamed in: a crash between left the path empty, which the next
    scan read as a deletion. Now the old file is copied (and checked), so at every rename the
    path holds a file."""
    a, b = await _shared(tmp_path, {"x.txt": b"one"})
    monkeypatch.setattr(swap_module, "renameat2", refuse_flags(swap_module.RENAME_EXCHANGE))

    def no_links(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "this filesystem has no hard links")

    present_at_rename: list[bool] = []
    rename = os.rename

    def watched_rename(*args: Any, **kwargs: Any) -> None:
        present_at_rename.append(os.path.lexists(b / "x.txt"))
        rename(*args, **kwargs)

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(os, "rename", watched_rename)
    write(a, "x.txt", b"two", mtime=OLD + 10)
    await converge(a, b)
    assert (b / "x.txt").read_bytes() == b"two"
    assert present_at_rename and all(present_at_rename)
    versions = [p.read_bytes() for p in (b / ".backer/versions").rglob("*") if p.is_file()]
    assert versions == [b"one"]
    assert not [p for p in b.rglob("*sync-conflict*")]  # the checked copy is no local edit
