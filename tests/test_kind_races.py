"""A directory replaced by a file on one replica while another edits a file inside it (issue
14, case 4): the edit inside wins on every replica, the directory stays, and the file that
replaced it is kept as a conflict copy, whichever replica pulls first."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_sync import OLD, converge, snapshot, write

from backer.sync.merge import is_conflict_copy


@pytest.mark.parametrize("first", ["a", "b"])
async def test_a_directory_replaced_by_a_file_under_an_edit_keeps_both(
    tmp_path: Path, first: str
) -> None:
    """Found with two nodes: A ended with file d, B kept d/y.txt, and A's pulls failed for ever
    ("'d' is a symlink or not a directory")."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    write(a, "d/y.txt", b"y")
    write(a, "d/z.txt", b"z")
    await converge(a, b)
    shutil.rmtree(a / "d")
    write(a, "d", b"a file now", mtime=OLD + 10)
    write(b, "d/y.txt", b"y edited offline", mtime=OLD + 20)
    one, two = (a, b) if first == "a" else (b, a)
    await converge(one, two)
    seen = snapshot(a)
    assert seen["d"][0] == "dir"
    assert seen["d/y.txt"][1] == b"y edited offline"
    assert "d/z.txt" not in seen  # deleted on a, unedited on b
    copies = [p for p, (kind, data, _) in seen.items() if is_conflict_copy(p)]
    assert copies and all(seen[p][1] == b"a file now" for p in copies)
    assert snapshot(b) == seen


@pytest.mark.parametrize("first", ["a", "b"])
async def test_a_directory_replaced_by_a_symlink_under_an_edit_keeps_both(
    tmp_path: Path, first: str
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    write(a, "d/y.txt", b"y")
    await converge(a, b)
    shutil.rmtree(a / "d")
    os.symlink("elsewhere", a / "d")
    write(b, "d/y.txt", b"y edited offline", mtime=OLD + 20)
    one, two = (a, b) if first == "a" else (b, a)
    await converge(one, two)
    seen = snapshot(b)
    assert seen["d"][0] == "dir" and seen["d/y.txt"][1] == b"y edited offline"
    copies = [p for p in seen if is_conflict_copy(p)]
    assert [seen[p] for p in copies] == [("link", "elsewhere", 0)]
