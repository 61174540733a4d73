"""The command line as a person uses it, in a temporary home."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from procs import PYTHON, Running, backer, free_port
from rich.console import Console

from backer.cli import main
from backer.cli.run import TerminalView
from backer.config import FolderConfig, Home
from backer.events import FileProgress, PeerConnected
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
    assert code == 1 and "not a backer folder" in err and "backer scan" not in err


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


def test_serve_sync_versions_restore_conflicts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server_dir, client_dir = tmp_path / "server", tmp_path / "client"
    server_dir.mkdir()
    client_dir.mkdir()
    (server_dir / "report.txt").write_text("version one")
    (client_dir / "local.txt").write_text("from the client")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backer",
            "--home",
            str(tmp_path / "h1"),
            "serve",
            str(server_dir),
            "--listen",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        ready = server.stdout.readline()
        assert ready.startswith("serving"), ready
        address = ready.split(" on ")[1].strip()
        home = tmp_path / "h2"
        code, out, err = run(capsys, home, "sync", str(client_dir), address, "--json")
        outcome = json.loads(out)
        assert code == 0 and outcome["in_sync"], err
        assert (client_dir / "report.txt").read_text() == "version one"
        assert (server_dir / "local.txt").read_text() == "from the client"

        (server_dir / "report.txt").write_text("version two")
        code, out, err = run(capsys, home, "sync", str(client_dir), address)
        assert code == 0 and "in sync" in out, err
        assert (client_dir / "report.txt").read_text() == "version two"
    finally:
        server.terminate()
        server.wait(timeout=30)

    code, out, _ = run(capsys, home, "versions", str(client_dir / "report.txt"))
    assert code == 0 and out.count("\n") == 1 and "report~" in out
    code, out, _ = run(capsys, home, "restore", str(client_dir / "report.txt"))
    assert code == 0 and "restored" in out
    assert (client_dir / "report.txt").read_text() == "version one"
    code, out, _ = run(capsys, home, "versions", str(client_dir / "report.txt"))
    assert out.count("\n") == 2  # the restore kept the file it replaced
    code, out, _ = run(capsys, home, "conflicts", str(client_dir))
    assert code == 0 and "no conflicts" in out
    code, _, err = run(capsys, home, "sync", str(client_dir), "127.0.0.1:1")
    assert code == 1 and "cannot reach" in err


def test_id_and_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home, folder = tmp_path / "home", tmp_path / "f"
    folder.mkdir()
    code, out, _ = run(capsys, home, "id")
    device = out.strip()
    assert code == 0 and len(device) == 63 and device.count("-") == 7
    assert run(capsys, home, "id")[1].strip() == device  # stable
    code, _, err = run(capsys, home, "keys", str(folder))
    assert code == 1 and "backer init" in err
    run(capsys, home, "init", str(folder))
    code, out, _ = run(capsys, home, "keys", str(folder))
    printed = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert [FolderKey.parse(k).can_write for k in printed] == [True, False]
    # A device that joined with the read-only key cannot give out the read-write one.
    other = tmp_path / "other"
    ro_home = Home(tmp_path / "ro-home")
    ro_home.save_config(
        ro_home.load_config().with_folder(FolderConfig(path=str(other), key=printed[1]))
    )
    other.mkdir()
    code, out, _ = run(capsys, tmp_path / "ro-home", "keys", str(other))
    assert code == 0 and printed[1] in out and printed[0] not in out


def test_join_with_a_printed_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    origin, copy = tmp_path / "origin", tmp_path / "elsewhere" / "copy"
    origin.mkdir()
    _, out, _ = run(capsys, tmp_path / "h1", "init", str(origin))
    keys = [line.strip() for line in out.splitlines() if line.strip().startswith("bk")]
    code, out, _ = run(capsys, tmp_path / "h2", "join", keys[1], str(copy))
    assert code == 0 and "read-only" in out and (copy / ".backer").is_dir()
    code, out, _ = run(capsys, tmp_path / "h2", "join", keys[1], str(copy))
    assert code == 0 and "already" in out
    typo = keys[0][:-1] + ("q" if keys[0][-1] != "q" else "p")
    code, _, err = run(capsys, tmp_path / "h2", "join", typo, str(copy))
    assert code == 1 and "typo" in err


def test_a_shared_folder_inside_or_around_another_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outer, home = tmp_path / "outer", tmp_path / "home"
    (outer / "deep" / "inner").mkdir(parents=True)
    assert run(capsys, home, "init", str(outer))[0] == 0
    key = FolderKey.generate()
    for command in (["init"], ["join", str(key)]):
        code, _, err = run(capsys, tmp_path / "h2", *command, str(outer / "deep" / "inner"))
        assert code == 1 and f"inside the shared folder {outer}" in err, err
        assert not (outer / "deep" / "inner" / ".backer").exists()
    # The other way round: a new share around an existing one, found however deep it is.
    for command in (["init"], ["join", str(key)]):
        code, _, err = run(capsys, tmp_path / "h3", *command, str(tmp_path))
        assert code == 1 and f"holds the shared folder {outer}" in err, err
        assert not (tmp_path / ".backer").exists()
    # Side by side is fine.
    (tmp_path / "beside").mkdir()
    assert run(capsys, tmp_path / "h4", "init", str(tmp_path / "beside"))[0] == 0


def test_a_second_backer_run_on_one_home_says_already_running_and_exits_2(
    tmp_path: Path,
) -> None:
    home, folder = tmp_path / "home", tmp_path / "docs"
    folder.mkdir()
    backer(home, "init", str(folder))
    args = ["--listen", f"127.0.0.1:{free_port()}", "--discovery", "none", "--no-watch"]
    first = Running(home, args)
    try:
        first.wait_for("node_started")
        second = subprocess.run(
            [*PYTHON, "--home", str(home), "run", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 2, second.stderr
        assert f"already running (pid {first.process.pid})" in second.stderr
        assert first.process.poll() is None  # the first one is undisturbed
    finally:
        assert first.stop() == 0
    # Once it has stopped, the home is free again.
    again = Running(home, args)
    try:
        again.wait_for("node_started")
    finally:
        assert again.stop() == 0


def test_encrypted_sync_with_folder_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server_dir, client_dir, stranger_dir = (tmp_path / n for n in ("srv", "cli", "stranger"))
    server_dir.mkdir()
    (server_dir / "secret.txt").write_text("for key holders only")
    _, out, _ = run(capsys, tmp_path / "h1", "init", str(server_dir))
    key = next(line.strip() for line in out.splitlines() if line.strip().startswith("bkw1"))
    assert run(capsys, tmp_path / "h2", "join", key, str(client_dir))[0] == 0
    other = str(FolderKey.generate())
    assert run(capsys, tmp_path / "h3", "join", other, str(stranger_dir))[0] == 0
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backer",
            "--home",
            str(tmp_path / "h1"),
            "serve",
            str(server_dir),
            "--listen",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        address = server.stdout.readline().split(" on ")[1].strip()
        code, out, err = run(capsys, tmp_path / "h2", "sync", str(client_dir), address)
        assert code == 0 and "in sync" in out, err
        assert "warning" not in err
        assert (client_dir / "secret.txt").read_text() == "for key holders only"
        code, out, err = run(capsys, tmp_path / "h3", "sync", str(stranger_dir), address)
        assert code == 1 and "handshake failed" in out
        assert not (stranger_dir / "secret.txt").exists()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_run_without_folders_says_how_to_get_one(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "backer", "--home", str(tmp_path / "home"), "run"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "backer init DIR" in done.stderr and "backer join KEY DIR" in done.stderr


def test_backer_run_on_a_terminal_shows_a_progress_bar_per_large_file() -> None:
    screen = io.StringIO()
    view = TerminalView(Console(file=screen, force_terminal=True, width=100))
    mib = 1024 * 1024
    view.show((0.0, PeerConnected(folder="/f", device="ABCDEFG-X", address="h:1", outgoing=True)))
    for done in (4 * mib, 8 * mib):
        view.show((0.0, FileProgress(folder="/f", path="video.mkv", done=done, total=16 * mib)))
    assert view.tasks  # a bar is up while the file is under way
    view.show((0.0, FileProgress(folder="/f", path="video.mkv", done=16 * mib, total=16 * mib)))
    assert not view.tasks  # and gone once it is complete
    out = screen.getvalue()
    assert "connected to ABCDEFG at h:1" in out
    assert "video.mkv" in out and "MB" in out  # bytes; rate and time left beside them
