"""`backer peers`, and the live part of `backer status`: what the running `backer run` wrote
to its status file (`backer.node.statusfile`). Imports node and the CLI's common helpers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import webbrowser
from typing import Any

from backer.cli.common import EXIT_ERROR, EXIT_OK, human, plural
from backer.config import Home
from backer.errors import BackerError
from backer.node.statusfile import STATUS_FILE, read_status

__all__ = [
    "add_open_command",
    "add_peers_command",
    "live_status",
    "print_dashboard",
    "print_live_folder",
]


def add_peers_command(commands: Any) -> None:
    peers = commands.add_parser(
        "peers", help="show the peers of the running node: connected, found, how, state"
    )
    peers.add_argument("--json", action="store_true", help="print as JSON")
    peers.set_defaults(run=cmd_peers)


def add_open_command(commands: Any) -> None:
    opener = commands.add_parser(
        "open", help="print the running dashboard's URL (with its token) and open it"
    )
    opener.add_argument("--print", action="store_true", help="only print the URL, open no browser")
    opener.add_argument(
        "--new-token",
        action="store_true",
        help="replace the dashboard's token first: every URL given out before stops working",
    )
    opener.set_defaults(run=cmd_open)


def cmd_open(home: Home, args: argparse.Namespace) -> int:
    if args.new_token:
        home.new_web_token()
        print("made a new dashboard token: URLs given out before no longer work", flush=True)
    status = live_status(home)
    if status is None:
        raise BackerError(
            "backer run is not running (for this --home): start it with `backer run --web`, "
            "or run it as a service (`backer service install`)"
        )
    base = status.get("dashboard")
    if not isinstance(base, str):
        raise BackerError(
            f"the running node serves no dashboard: restart it with `backer run --web`, or "
            f"set `web = true` in {home.config_path}"
        )
    url = f"{base}#token={home.web_token()}"
    print(url, flush=True)
    if args.print:
        return EXIT_OK
    if not _has_display() or not webbrowser.open(url):
        port = base.rstrip("/").rpartition(":")[2]
        print(
            "no browser here; from your own machine: "
            f"`ssh -L {port}:127.0.0.1:{port} THIS-HOST`, then open the URL there",
            flush=True,
        )
    return EXIT_OK


def _has_display() -> bool:
    """A graphical session to open a browser in (a headless server has none, and a text
    browser would take over the terminal)."""
    if sys.platform != "linux":
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def live_status(home: Home) -> dict[str, Any] | None:
    return read_status(home.path / STATUS_FILE)


def cmd_peers(home: Home, args: argparse.Namespace) -> int:
    status = live_status(home)
    if status is None:
        print(
            "backer run is not running (for this --home); start it to connect to peers",
            flush=True,
        )
        return EXIT_ERROR
    if args.json:
        print(json.dumps(status))
        return EXIT_OK
    print(f"device {status['device']}, listening on {status['listen'] or '(nothing)'}")
    for folder in status["folders"]:
        name = f" (folder {folder['folder_id']})" if "folder_id" in folder else ""
        print(f"\n{folder['path']}{name}: {folder['state']}")
        if not folder["peers"]:
            print("  no peer connected")
        for peer in folder["peers"]:
            print_peer(peer)
        waiting = [k for k in folder.get("known", []) if k["state"] != "connected"]
        if waiting:
            print("  addresses known, not connected:")
            for known in waiting:
                print(
                    f"    {known['address']:<24} found by {known['found_by']:<8} {known['state']}"
                )
    return EXIT_OK


def print_peer(peer: dict[str, Any]) -> None:
    if peer["outgoing"]:
        how = f"dialled; found by {peer['found_by']}"
    elif peer["found_by"] in ("", "dialled us"):
        how = "it dialled us"
    else:
        how = f"it dialled us; found by {peer['found_by']} too"
    print(f"  {peer['device'][:7]}  {peer['address']:<24} {_sync_state(peer):<8} {how}")


def _sync_state(peer: dict[str, Any]) -> str:
    if peer["in_sync"]:
        return "in sync"
    return str(peer.get("differs_by") or "syncing")


def print_dashboard(status: dict[str, Any]) -> None:
    """The running dashboard's address, for `backer status` (the token stays out of it)."""
    base = status.get("dashboard")
    if isinstance(base, str):
        print(f"web      {base}  (`backer open` opens it, with its token)")
    else:
        print("web      off: `backer run --web`, or `web = true` in the config")


def print_live_folder(status: dict[str, Any], path: str) -> None:
    """The running node's view of one folder, for `backer status`."""
    for folder in status["folders"]:
        if folder["path"] == path:
            peers = folder["peers"]
            in_sync = sum(1 for p in peers if p["in_sync"])
            print(f"running  yes ({folder['state']}); {in_sync} of {len(peers)} peers in sync")
            left = folder.get("left")
            if left:
                print(f"syncing  {left['files']} files, {human(left['bytes'])} left to receive")
            local_only = folder.get("local_only", 0)
            if local_only:
                print(
                    f"local    {plural(local_only, 'change')} made here stay here (a read-only "
                    "key: peers refuse them); `backer revert` undoes them"
                )
            for peer in peers:
                print_peer(peer)
            return
    print("running  yes, but this folder is not among its folders (restart it to add)")
