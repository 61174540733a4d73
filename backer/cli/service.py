"""`backer service install|uninstall`: run `backer run` by itself, as a systemd user unit.

Writes `$XDG_CONFIG_HOME/systemd/user/backer.service` (default `~/.config/...`) for this node
home and this Python (a pipx install keeps both stable), then enables and starts it with
`systemctl --user`; `uninstall` stops, disables and removes it. Every step is printed, so a
person can see, and undo, what was done. Imports config and the CLI's common helpers.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from backer.cli.common import EXIT_OK, address_arg
from backer.config import Home
from backer.errors import BackerError

__all__ = ["UNIT_NAME", "add_service_command", "unit_path", "unit_text"]

UNIT_NAME = "backer.service"


def add_service_command(commands: Any) -> None:
    service = commands.add_parser(
        "service", help="run `backer run` by itself at login (a systemd user unit)"
    )
    actions = service.add_subparsers(title="actions", metavar="ACTION", required=True)
    install = actions.add_parser("install", help="write, enable and start the unit")
    install.add_argument(
        "--listen",
        type=address_arg,
        metavar="HOST:PORT",
        help="accept peers here (default: the config's listen; 0.0.0.0:22100 for a LAN)",
    )
    install.set_defaults(run=cmd_install)
    uninstall = actions.add_parser("uninstall", help="stop, disable and remove the unit")
    uninstall.set_defaults(run=cmd_uninstall)


def unit_path() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user" / UNIT_NAME


def unit_text(home: Home, listen: str | None) -> str:
    command = [sys.executable, "-m", "backer", "--home", str(home.path), "run", "--web"]
    if listen:
        command += ["--listen", listen]
    return f"""# Written by `backer service install`; `backer service uninstall` removes it.
[Unit]
Description=backer: peer-to-peer folder mirroring ({home.path})
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={shlex.join(command)}
# SIGTERM: goodbyes are sent, transfers are abandoned with their temp data kept for next time.
KillSignal=SIGTERM
TimeoutStopSec=20
Restart=on-failure
RestartSec=5
Nice=5
IOSchedulingClass=best-effort
IOSchedulingPriority=7

[Install]
WantedBy=default.target
"""


def cmd_install(home: Home, args: argparse.Namespace) -> int:
    if not home.load_config().folders:
        raise BackerError(
            "no folders to run yet: `backer init DIR` or `backer join KEY DIR` first, "
            "then install the service"
        )
    path = unit_path()
    text = unit_text(home, args.listen)
    existed = path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{UNIT_NAME}.tmp")
    temp.write_text(text)
    os.replace(temp, path)
    print(f"{'updated' if existed else 'wrote'} {path}")
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        print(
            "systemctl not found (no systemd here): start `backer run` another way; "
            f"the unit's command is in {path}"
        )
        return EXIT_OK
    _systemctl(systemctl, "daemon-reload")
    _systemctl(systemctl, "enable", "--now", UNIT_NAME)
    if existed:
        _systemctl(systemctl, "restart", UNIT_NAME)
    print(
        "backer now runs at login and restarts if it fails. What it does: "
        f"`journalctl --user -u {UNIT_NAME} -f`; the dashboard: `backer open`. To run it "
        "without a login session (a server): `loginctl enable-linger $USER`"
    )
    return EXIT_OK


def cmd_uninstall(home: Home, args: argparse.Namespace) -> int:
    path = unit_path()
    if not path.exists():
        print(f"no backer service installed ({path} does not exist)")
        return EXIT_OK
    systemctl = shutil.which("systemctl")
    if systemctl is not None:
        _systemctl(systemctl, "disable", "--now", UNIT_NAME)
    path.unlink()
    print(f"removed {path}")
    if systemctl is not None:
        _systemctl(systemctl, "daemon-reload")
    print("backer no longer starts by itself; your folders and their config are untouched")
    return EXIT_OK


def _systemctl(systemctl: str, *args: str) -> None:
    command = [systemctl, "--user", *args]
    print(f"ran {shlex.join(['systemctl', '--user', *args])}", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        raise BackerError(
            f"`systemctl --user {' '.join(args)}` failed: {why[-1] if why else done.returncode}"
            " (is there a user session? `loginctl enable-linger $USER` makes one on a server)"
        )
