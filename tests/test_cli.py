"""The command line as a person uses it, in a temporary home."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from backer.cli import main
from backer.keys import FolderKey


def run(capsys: pytest.CaptureFixture[str], home: Path, *args: str) -> tuple[int, str, str]:
    code = main(["--home", str(home), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_init_scan_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home, folder = tmp_path / "home", tmp_path / "docs"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    (folder / "sub").mkdir()
    (folder / "sub" / "data.bin").write_bytes(os.urandom(100_000))

    code, out, _ = run(capsys, home, "init", str(folder))
    assert code == 0
    printed = [line.strip() for line in out.splitlines() if line.strip().startswith("bk")]
    key = FolderKey.parse(printed[0])
    assert key.can_write and FolderKey.parse(printed[1]).tier.value == "read-only"
    assert (folder / ".backer" / "index.db").exists()

    code, again, _ = run(capsys, home, "init", str(folder))
    assert code == 0 and str(key) in again and "already" in again

    code, out, _ = run(capsys, home, "scan", str(folder), "--json")
    assert code == 0
    summary = json.loads(out)
    assert (summary["files"], summary["dirs"], summary["bytes"]) == (2, 1, 100_005)
    assert summary["hashed_files"] == 2 and summary["chunks"] >= 3

    code, out, _ = run(capsys, home, "scan", str(folder))
    assert code == 0 and summary["root"] in out and "2 files" in out

    code, out, _ = run(capsys, home, "status", str(folder), "--json")
    status = json.loads(out)
    assert code == 0 and status["root"] == summary["root"] and status["shared"]
    assert status["folder_id"] == key.folder_id and status["files"] == 2

    code, out, _ = run(capsys, home, "status", str(folder))
    assert code == 0 and summary["root"] in out


def test_scan_of_a_new_folder_creates_its_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "f").write_text("x")
    code, out, _ = run(capsys, tmp_path / "home", "scan", str(tmp_path / "plain"), "--json")
    assert code == 0 and json.loads(out)["files"] == 1


def test_errors_are_plain_words_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, tmp_path / "home", "scan", str(tmp_path / "nope"))
    assert code == 1 and "not a directory" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, tmp_path / "home", "status", str(tmp_path / "empty"))
    assert code == 1 and "backer scan" in err


def test_shared_folder_with_missing_marker_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home, folder = tmp_path / "home", tmp_path / "usb"
    folder.mkdir()
    assert run(capsys, home, "init", str(folder))[0] == 0
    for leftover in (folder / ".backer").iterdir():
        leftover.unlink()
    (folder / ".backer").rmdir()
    code, _, err = run(capsys, home, "scan", str(folder))
    assert code == 1 and "mounted" in err
    assert not (folder / ".backer").exists()


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "init" in capsys.readouterr().out
