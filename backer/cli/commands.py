"""The `backer` command: one coherent tool over the layers below.

Owns argument parsing, exit codes and what a person reads; every decision about folders lives in
the layers it calls. Top layer: may import anything in backer, nothing imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from backer import __version__
from backer.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    address_arg,
    folder_key,
    folder_path,
    human,
    inside_folder,
    os_error_text,
    refuse_nested,
)
from backer.cli.demo import add_demo_command
from backer.cli.dht import add_dht_command
from backer.cli.live import (
    add_open_command,
    add_peers_command,
    live_status,
    print_dashboard,
    print_live_folder,
)
from backer.cli.oneshot import cmd_serve, cmd_sync
from backer.cli.run import add_run_command
from backer.cli.service import add_service_command
from backer.config import FolderConfig, Home
from backer.errors import BackerError
from backer.index.scan import ScanProgress, ScanReport, scan
from backer.index.store import INDEX_FILE, IndexStore
from backer.keys import FolderKey
from backer.paths import RESERVED_DIR
from backer.sync.merge import is_conflict_copy
from backer.sync.replica import Replica, signer_for
from backer.sync.versions import Versions

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return EXIT_USAGE
    home = Home(Path(args.home)) if args.home else Home.default()
    try:
        result: int = args.run(home, args)
        return result
    except BackerError as exc:
        print(f"backer: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # a read-only or full disk, a permission: one line, no traceback
        print(f"backer: {os_error_text(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("backer: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backer",
        description="Mirror folders between your machines, peer to peer.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""getting started:
  backer demo                       see three local nodes sync (a few seconds, cleans up)
  backer init ~/Documents           share a folder: prints its keys
  backer join KEY ~/Documents       on another machine, with the key printed by init
  backer run --listen 0.0.0.0:22100 on each machine: keeps the folders in sync, live
  backer status ~/Documents         how it is going (peers in sync, what is left)

exit codes: 0 done, 1 failed (the message says why and what to do), 2 bad usage""",
    )
    parser.add_argument("--version", action="version", version=f"backer {__version__}")
    parser.add_argument(
        "--home", metavar="DIR", help="node home (device key, config); default: user config dir"
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    init = commands.add_parser("init", help="set up a folder for sharing and print its key")
    init.add_argument("dir", nargs="?", default=".", help="the folder (default: current)")
    init.set_defaults(run=_cmd_init)

    join = commands.add_parser("join", help="add a folder shared with you by its key")
    join.add_argument("key", help="the folder key another device printed (bkw1... or bkr1...)")
    join.add_argument("dir", help="where the folder goes on this machine (created if missing)")
    join.set_defaults(run=_cmd_join)

    ident = commands.add_parser("id", help="print this device's ID (to compare with a peer's)")
    ident.set_defaults(run=_cmd_id)

    keys = commands.add_parser("keys", help="print the keys of a folder this device can give out")
    keys.add_argument("dir", nargs="?", default=".", help="the folder (default: current)")
    keys.set_defaults(run=_cmd_keys)

    scan_cmd = commands.add_parser("scan", help="index a folder and print a summary")
    scan_cmd.add_argument("dir", help="the folder")
    scan_cmd.add_argument("--json", action="store_true", help="print the summary as JSON")
    scan_cmd.add_argument(
        "--allow-deletions",
        action="store_true",
        help="record deletions even when most of the folder vanished at once",
    )
    scan_cmd.set_defaults(run=_cmd_scan)

    status = commands.add_parser(
        "status", help="show a folder's index and, while `run` runs, its peers and what is left"
    )
    status.add_argument("dir", nargs="?", default=".", help="the folder (default: current)")
    status.add_argument("--json", action="store_true", help="print as JSON")
    status.set_defaults(run=_cmd_status)

    sync = commands.add_parser(
        "sync", help="reconcile a folder with a `backer serve` peer both ways, then exit"
    )
    sync.add_argument("dir", help="the folder")
    sync.add_argument("peer", type=address_arg, metavar="HOST:PORT", help="address of the peer")
    sync.add_argument("--json", action="store_true", help="print the outcome as JSON")
    sync.set_defaults(run=cmd_sync)

    serve = commands.add_parser("serve", help="let peers sync a folder with this machine")
    serve.add_argument("dir", help="the folder")
    serve.add_argument(
        "--listen",
        type=address_arg,
        default="127.0.0.1:22000",
        metavar="HOST:PORT",
        help="address to listen on (default 127.0.0.1:22000)",
    )
    serve.set_defaults(run=cmd_serve)

    versions = commands.add_parser("versions", help="list the kept versions of a file")
    versions.add_argument("path", help="a file inside a folder")
    versions.set_defaults(run=_cmd_versions)

    restore = commands.add_parser("restore", help="bring back a kept version of a file")
    restore.add_argument("path", help="a file inside a folder")
    restore.add_argument(
        "--at",
        metavar="YYYYMMDD-HHMMSS",
        help="which version (default: the newest), as `backer versions` lists it",
    )
    restore.set_defaults(run=_cmd_restore)

    revert = commands.add_parser(
        "revert", help="undo this read-only device's own changes (the mesh's versions return)"
    )
    revert.add_argument("dir", nargs="?", default=".", help="the folder (default: current)")
    revert.set_defaults(run=_cmd_revert)

    conflicts = commands.add_parser("conflicts", help="list conflict copies in a folder")
    conflicts.add_argument("dir", nargs="?", default=".", help="the folder (default: current)")
    conflicts.set_defaults(run=_cmd_conflicts)

    add_run_command(commands)
    add_peers_command(commands)
    add_open_command(commands)
    add_service_command(commands)
    add_dht_command(commands)
    add_demo_command(commands)
    return parser


# -- commands --------------------------------------------------------------------------------


def _cmd_init(home: Home, args: argparse.Namespace) -> int:
    folder = Path(args.dir).resolve()
    if not folder.is_dir():
        raise BackerError(f"{folder} is not a directory; create it first")
    config = home.load_config()
    existing = config.folder_for(str(folder))
    if existing is not None:
        key = FolderKey.parse(existing.key)
        print(f"{folder} is already shared. Its key:\n\n  {key}\n")
        return EXIT_OK
    refuse_nested(folder)
    key = FolderKey.generate()
    IndexStore.open(folder, create=True).close()
    home.save_config(config.with_folder(FolderConfig(path=str(folder), key=str(key))))
    print(f"Set up {folder} (folder {key.folder_id}).")
    print("Give this key to another machine to let it join; anyone with it can change files:\n")
    print(f"  {key}\n")
    print(f"Read-only key (receives changes, never sends its own):\n\n  {key.read_only()}\n")
    return EXIT_OK


def _cmd_join(home: Home, args: argparse.Namespace) -> int:
    key = FolderKey.parse(args.key)
    folder = Path(args.dir).resolve()
    config = home.load_config()
    existing = config.folder_for(str(folder))
    if existing is not None:
        if FolderKey.parse(existing.key).discovery_id != key.discovery_id:
            raise BackerError(f"{folder} is already shared as another folder")
        print(f"{folder} already joined folder {key.folder_id}")
        return EXIT_OK
    refuse_nested(folder)
    folder.mkdir(parents=True, exist_ok=True)
    IndexStore.open(folder, create=True).close()
    home.save_config(config.with_folder(FolderConfig(path=str(folder), key=str(key))))
    tier = "read-write" if key.can_write else "read-only: it receives changes, never sends its own"
    print(f"Joined folder {key.folder_id} at {folder} ({tier}).")
    return EXIT_OK


def _cmd_id(home: Home, args: argparse.Namespace) -> int:
    print(home.device_id())
    return EXIT_OK


def _cmd_keys(home: Home, args: argparse.Namespace) -> int:
    folder = Path(args.dir).resolve()
    configured = home.load_config().folder_for(str(folder))
    if configured is None:
        raise BackerError(f"{folder} is not shared from this device; `backer init {args.dir}`")
    for key in FolderKey.parse(configured.key).keys_to_give_out():
        what = (
            "read-write: may change files"
            if key.can_write
            else "read-only: receives, never sends its own changes"
        )
        print(f"{what}\n  {key}")
    return EXIT_OK


def _cmd_scan(home: Home, args: argparse.Namespace) -> int:
    folder = folder_path(home, args.dir, create=True)
    if _served_by_running_node(home, folder):
        raise BackerError(
            f"`backer run` is running for {folder} and keeps its index itself; stop it first "
            "to scan by hand (for instance with --allow-deletions)"
        )
    device = home.device_id()
    with IndexStore.open(folder, create=False) as store:
        store.signer = signer_for(folder_key(home, folder))
        store.sign_unsigned()
        with _progress_display(sys.stderr, enabled=not args.json) as show:
            report = asyncio.run(
                scan(
                    folder,
                    store,
                    device=device.short,
                    progress=show,
                    allow_deletions=args.allow_deletions,
                )
            )
        stats = store.stats()
        index_bytes = _index_bytes(folder)
    summary = {
        "folder": str(folder),
        "root": report.root.hex(),
        "files": report.files,
        "dirs": report.dirs,
        "symlinks": report.symlinks,
        "bytes": report.bytes,
        "chunks": stats.chunks,
        "updated": report.updated,
        "deleted": report.deleted,
        "hashed_files": report.hashed_files,
        "hashed_bytes": report.hashed_bytes,
        "skipped": [{"path": s.path, "reason": s.reason} for s in report.skipped],
        "unstable": list(report.unstable),
        "seconds": round(report.seconds, 4),
        "index_bytes": index_bytes,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        _print_scan(report, stats.chunks, index_bytes)
    return EXIT_OK


def _cmd_status(home: Home, args: argparse.Namespace) -> int:
    folder = folder_path(home, args.dir, create=False)
    configured = home.load_config().folder_for(str(folder))
    with IndexStore.open(folder) as store:
        stats = store.stats()
        root = store.root
    info = {
        "folder": str(folder),
        "shared": configured is not None,
        "folder_id": FolderKey.parse(configured.key).folder_id if configured else None,
        "root": root.hex(),
        "files": stats.files,
        "dirs": stats.dirs,
        "symlinks": stats.symlinks,
        "deleted": stats.deleted,
        "bytes": stats.bytes,
        "chunks": stats.chunks,
        "index_bytes": _index_bytes(folder),
    }
    live = live_status(home)
    if args.json:
        info["running"] = live
        print(json.dumps(info))
        return EXIT_OK
    print(f"folder   {folder}" + (f"  (folder {info['folder_id']})" if configured else ""))
    print(f"shared   {'yes' if configured else 'no: run `backer init` to share it'}")
    print(f"root     {root.hex()}")
    print(
        f"index    {stats.files} files, {stats.dirs} directories, {stats.symlinks} symlinks, "
        f"{stats.deleted} tombstones; {human(stats.bytes)} in {stats.chunks} chunks"
    )
    if live is None:
        print("running  no: `backer run` keeps it in sync")
    else:
        print_live_folder(live, str(folder))
        print_dashboard(live)
    return EXIT_OK


def _cmd_versions(home: Home, args: argparse.Namespace) -> int:
    folder, rel = inside_folder(args.path)
    found = Versions(folder).list(rel)
    if not found:
        print(f"no kept versions of {rel}")
        return EXIT_OK
    for version in found:
        print(f"{version.time:%Y%m%d-%H%M%S}  {human(version.size):>10}  {version.stored}")
    return EXIT_OK


def _cmd_restore(home: Home, args: argparse.Namespace) -> int:
    folder, rel = inside_folder(args.path)
    when = None
    if args.at:
        try:
            when = datetime.strptime(args.at, "%Y%m%d-%H%M%S").replace(tzinfo=UTC)
        except ValueError as exc:
            raise BackerError("--at takes YYYYMMDD-HHMMSS, as `backer versions` shows") from exc
    replaced = (folder / rel).exists() or (folder / rel).is_symlink()
    try:
        version = Versions(folder).restore(rel, when, time.time())
    except FileNotFoundError as exc:
        raise BackerError(str(exc)) from exc
    device = home.device_id()

    async def record() -> None:
        replica = await Replica.open(folder, device=device.short, key=folder_key(home, folder))
        try:
            await replica.scan([rel])
        finally:
            await replica.close()

    if not _served_by_running_node(home, folder):  # else its watcher records the restore
        asyncio.run(record())
    kept = "; the replaced file was kept (`backer versions` lists it)" if replaced else ""
    print(f"restored {rel} from {version.time:%Y%m%d-%H%M%S}{kept}")
    return EXIT_OK


def _cmd_revert(home: Home, args: argparse.Namespace) -> int:
    folder = folder_path(home, args.dir, create=False)
    key = folder_key(home, folder)
    if key is None or key.can_write:
        raise BackerError(
            f"{folder} is not a read-only share here: its changes are real changes, nothing to "
            "revert (restore single files with `backer restore`)"
        )
    if _served_by_running_node(home, folder):
        raise BackerError(
            f"`backer run` is running for {folder} and owns its index: stop it first, then "
            "revert, and start it again (the shared versions then come back)"
        )
    device = home.device_id()

    async def go() -> list[str]:
        replica = await Replica.open(folder, device=device.short, key=key)
        try:
            return await replica.revert()
        finally:
            await replica.close()

    reverted = asyncio.run(go())
    for path in reverted:
        print(f"reverted {path}")
    print(
        f"{len(reverted)} local changes moved to the versions area; the next sync brings back "
        "the shared versions"
        if reverted
        else "no local changes"
    )
    return EXIT_OK


def _cmd_conflicts(home: Home, args: argparse.Namespace) -> int:
    folder = folder_path(home, args.dir, create=False)
    with IndexStore.open(folder) as store:
        found = sorted(
            e.path for e in store.entries() if not e.deleted and is_conflict_copy(e.path)
        )
    for path in found:
        print(path)
    if not found:
        print("no conflicts")
    return EXIT_OK


# -- helpers ---------------------------------------------------------------------------------


def _served_by_running_node(home: Home, folder: Path) -> bool:
    """Whether a live `backer run` of this home hosts `folder`: then only it writes the index
    (two processes updating one index would each miss the other's changes to the tree)."""
    live = live_status(home)
    return live is not None and any(f["path"] == str(folder) for f in live["folders"])


def _index_bytes(folder: Path) -> int:
    marker = folder / RESERVED_DIR
    return sum(p.stat().st_size for p in marker.glob(INDEX_FILE + "*") if p.is_file())


def _print_scan(report: ScanReport, chunks: int, index_bytes: int) -> None:
    rate = report.hashed_bytes / report.seconds if report.seconds > 0 else 0.0
    print(
        f"scanned  {report.files} files, {report.dirs} directories, {report.symlinks} symlinks, "
        f"{human(report.bytes)}"
    )
    print(
        f"changes  {report.updated} updated ({report.deleted} deleted); "
        f"read {report.hashed_files} files, {human(report.hashed_bytes)} at {human(rate)}/s"
    )
    print(f"index    {chunks} chunks, {human(index_bytes)} on disk")
    print(f"root     {report.root.hex()}")
    print(f"time     {report.seconds:.2f} s")
    for skipped in report.skipped:
        print(f"skipped  {skipped.path}: {skipped.reason}", file=sys.stderr)
    for path in report.unstable:
        print(f"changing {path}: kept changing while read; the next scan reads it", file=sys.stderr)


class _progress_display:
    """A rich progress bar on a terminal, a plain line every few seconds otherwise."""

    def __init__(self, stream: TextIO, *, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self.started = time.monotonic()
        self.last_line = 0.0
        self.bar: object = None

    def __enter__(self) -> Callable[[ScanProgress], None]:
        if self.enabled and self.stream.isatty():
            from rich.progress import (  # noqa: PLC0415 - only a terminal needs rich
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            bar = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                transient=True,
            )
            bar.start()
            task = bar.add_task("scanning")
            self.bar = bar

            def show_bar(p: ScanProgress) -> None:
                rate = p.bytes_hashed / max(time.monotonic() - self.started, 1e-9)
                bar.update(
                    task,
                    description=f"{p.files_seen} files, read {human(p.bytes_hashed)} "
                    f"({human(rate)}/s)",
                )

            return show_bar
        return self._show_line

    def _show_line(self, p: ScanProgress) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last_line < 2.0:
            return
        self.last_line = now
        rate = p.bytes_hashed / max(now - self.started, 1e-9)
        print(
            f"scanning: {p.files_seen} files, read {human(p.bytes_hashed)} ({human(rate)}/s)",
            file=self.stream,
            flush=True,
        )

    def __exit__(self, *_: object) -> None:
        stop = getattr(self.bar, "stop", None)
        if stop is not None:
            stop()
