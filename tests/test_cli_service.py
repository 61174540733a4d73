"""`backer service install|uninstall` (issue 20, part 3), through the real `backer` command
with a fake `systemctl` on PATH and a temporary XDG_CONFIG_HOME: the real system is untouched."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

from procs import PYTHON
from test_cli_messages import shared

from backer.cli.commands import _parser


def fake_systemd(tmp_path: Path, *, fails: str = "") -> dict[str, str]:
    """An environment whose `systemctl` only logs its arguments (and fails on `fails`)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "systemctl"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{tmp_path / "systemctl.log"}"\n'
        f'case "$*" in *"{fails or "never"}"*) echo "Failed to connect to bus" >&2; exit 1;; esac\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
    }


def service(home: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PYTHON, "--home", str(home), "service", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_install_writes_and_enables_a_user_unit_and_uninstall_reverses_it(
    tmp_path: Path,
) -> None:
    home, _, _ = shared(tmp_path, "docs")
    env = fake_systemd(tmp_path)
    unit = tmp_path / "xdg" / "systemd" / "user" / "backer.service"

    done = service(home, env, "install", "--listen", "0.0.0.0:22100")
    assert done.returncode == 0, done.stderr
    assert f"wrote {unit}" in done.stdout
    assert "ran systemctl --user enable --now backer.service" in done.stdout
    log = (tmp_path / "systemctl.log").read_text().splitlines()
    assert log == ["--user daemon-reload", "--user enable --now backer.service"]
    text = unit.read_text()
    start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(start.removeprefix("ExecStart="))
    assert Path(argv[0]).exists() and argv[1:3] == ["-m", "backer"]  # this very Python
    args = _parser().parse_args(argv[3:])
    assert args.home == str(home) and args.web and args.listen == "0.0.0.0:22100"
    assert "WantedBy=default.target" in text and "Restart=on-failure" in text

    again = service(home, env, "install")  # a second install updates and restarts
    assert again.returncode == 0 and f"updated {unit}" in again.stdout
    assert "--listen" not in unit.read_text()  # the config's listen, this time
    assert (tmp_path / "systemctl.log").read_text().splitlines()[-1] == (
        "--user restart backer.service"
    )

    gone = service(home, env, "uninstall")
    assert gone.returncode == 0, gone.stderr
    assert f"removed {unit}" in gone.stdout and not unit.exists()
    log = (tmp_path / "systemctl.log").read_text().splitlines()
    assert log[-2:] == ["--user disable --now backer.service", "--user daemon-reload"]
    assert "no backer service installed" in service(home, env, "uninstall").stdout


def test_install_says_why_systemctl_failed_and_needs_a_folder_first(tmp_path: Path) -> None:
    env = fake_systemd(tmp_path, fails="enable")
    done = service(tmp_path / "empty-home", env, "install")
    assert done.returncode == 1 and "backer init DIR" in done.stderr, done.stderr
    home, _, _ = shared(tmp_path, "docs")
    done = service(home, env, "install")
    assert done.returncode == 1
    assert "Failed to connect to bus" in done.stderr and "enable-linger" in done.stderr
    assert "Traceback" not in done.stderr
