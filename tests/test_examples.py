"""The examples run as documented."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from procs import free_port

from backer.cli.commands import _parser

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout


def test_in_memory(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "from_a").write_text("a")
    (b / "from_b").write_text("b")
    assert "in sync" in run(str(EXAMPLES / "in_memory.py"), str(a), str(b))
    assert (b / "from_a").read_text() == "a" and (a / "from_b").read_text() == "b"


def test_scan_folder(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    out = run(str(EXAMPLES / "scan_folder.py"), str(tmp_path))
    assert out.startswith("root ")


def test_tcp_server_and_client(tmp_path: Path) -> None:
    served, client = tmp_path / "served", tmp_path / "client"
    served.mkdir()
    client.mkdir()
    (served / "doc.txt").write_text("served")
    server = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "tcp_server.py"), str(served), "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        address = server.stdout.readline().split(" on ")[1].strip()
        out = run(str(EXAMPLES / "tcp_client.py"), str(client), address, "--once")
        assert "in sync" in out
        assert (client / "doc.txt").read_text() == "served"
    finally:
        server.terminate()
        server.wait(timeout=30)
    out = run(str(EXAMPLES / "tcp_client.py"), str(client), address, "--once")
    assert "retrying" in out


def test_readonly_server_script(tmp_path: Path) -> None:
    port = free_port()
    done = subprocess.run(
        ["bash", str(EXAMPLES / "readonly_server.sh"), str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={
            **os.environ,
            "PYTHON": sys.executable,
            "SERVER_PORT": str(port),
            "LAPTOP_PORT": str(free_port()),
        },
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the server received report.txt" in done.stdout
    assert "the laptop refused the server's edit" in done.stdout
    assert "its edit stays local, and how to undo it: backer revert" in done.stdout
    assert "after backer revert the server holds the laptop's report.txt again" in done.stdout


def test_systemd_unit_runs_a_valid_command() -> None:
    unit = (EXAMPLES / "backer.service").read_text()
    start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(start.removeprefix("ExecStart="))
    assert argv[0].endswith("/backer") and argv[1] == "run"
    args = _parser().parse_args(argv[1:])
    assert args.listen == "0.0.0.0:22100"
