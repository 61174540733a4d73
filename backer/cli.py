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
from pathlib import Path
from typing import TextIO

from backer import __version__
from backer.config import FolderConfig, Home
from backer.errors import BackerError
from backer.index.scan import ScanProgress, ScanReport, scan
from backer.index.store import INDEX_FILE, IndexStore
from backer.keys import FolderKey
from backer.paths import RESERVED_DIR

__all__ = ["main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


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
    except KeyboardInterrupt:
        print("backer: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backer",
        description="Mirror folders between your machines, peer to peer.",
    )
    parser.add_argument("--version", action="version", version=f"backer {__version__}")
    parser.add_argument(
        "--home", metavar="DIR", help="node home (device key, config); default: user config dir"
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    init = commands.add_parser("init", help="set up a folder for sharing and print its key")
    init.add_argument("dir", nargs="?", default=".", help="the folder (default: current)")
    init.set_defaults(run=_cmd_init)

    scan_cmd = commands.add_parser("scan", help="index a folder and print a summary")
    scan_cmd.add_argument("dir", help="the folder")
    scan_cmd.add_argument("--json", action="store_true", help="print the summary as JSON")
    scan_cmd.set_defaults(run=_cmd_scan)

    status = commands.add_parser("status", help="show what the index of a folder holds")
    status.add_argument("dir", nargs="?", default=".", help="the folder (default: current)")
    status.add_argument("--json", action="store_true", help="print as JSON")
    status.set_defaults(run=_cmd_status)
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
    key = FolderKey.generate()
    IndexStore.open(folder, create=True).close()
    home.save_config(config.with_folder(FolderConfig(path=str(folder), key=str(key))))
    print(f"Set up {folder} (folder {key.folder_id}).")
    print("Give this key to another machine to let it join; anyone with it can change files:\n")
    print(f"  {key}\n")
    print(f"Read-only key (receives changes, never sends its own):\n\n  {key.read_only()}\n")
    return EXIT_OK


def _cmd_scan(home: Home, args: argparse.Namespace) -> int:
    folder = _folder(home, args.dir, create=True)
    device = home.device_id()
    with IndexStore.open(folder, create=False) as store:
        with _progress_display(sys.stderr, enabled=not args.json) as show:
            report = asyncio.run(scan(folder, store, device=device.short, progress=show))
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
    folder = _folder(home, args.dir, create=False)
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
    if args.json:
        print(json.dumps(info))
        return EXIT_OK
    print(f"folder   {folder}" + (f"  (folder {info['folder_id']})" if configured else ""))
    print(f"shared   {'yes' if configured else 'no: run `backer init` to share it'}")
    print(f"root     {root.hex()}")
    print(
        f"index    {stats.files} files, {stats.dirs} directories, {stats.symlinks} symlinks, "
        f"{stats.deleted} tombstones; {_human(stats.bytes)} in {stats.chunks} chunks"
    )
    return EXIT_OK


# -- helpers ---------------------------------------------------------------------------------


def _folder(home: Home, given: str, *, create: bool) -> Path:
    folder = Path(given).resolve()
    if not folder.is_dir():
        raise BackerError(f"{folder} is not a directory")
    marker = folder / RESERVED_DIR
    if not marker.is_dir():
        if home.load_config().folder_for(str(folder)) is not None:
            raise BackerError(
                f"{marker} is missing although {folder} is shared: is its disk mounted? "
                "backer will not treat a missing disk as deleted files"
            )
        if not create:
            raise BackerError(f"{folder} has no index yet; run `backer scan {given}` first")
        IndexStore.open(folder, create=True).close()
    return folder


def _index_bytes(folder: Path) -> int:
    marker = folder / RESERVED_DIR
    return sum(p.stat().st_size for p in marker.glob(INDEX_FILE + "*") if p.is_file())


def _print_scan(report: ScanReport, chunks: int, index_bytes: int) -> None:
    rate = report.hashed_bytes / report.seconds if report.seconds > 0 else 0.0
    print(
        f"scanned  {report.files} files, {report.dirs} directories, {report.symlinks} symlinks, "
        f"{_human(report.bytes)}"
    )
    print(
        f"changes  {report.updated} updated ({report.deleted} deleted); "
        f"read {report.hashed_files} files, {_human(report.hashed_bytes)} at {_human(rate)}/s"
    )
    print(f"index    {chunks} chunks, {_human(index_bytes)} on disk")
    print(f"root     {report.root.hex()}")
    print(f"time     {report.seconds:.2f} s")
    for skipped in report.skipped:
        print(f"skipped  {skipped.path}: {skipped.reason}", file=sys.stderr)
    for path in report.unstable:
        print(f"changing {path}: kept changing while read; the next scan reads it", file=sys.stderr)


def _human(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


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
                    description=f"{p.files_seen} files, read {_human(p.bytes_hashed)} "
                    f"({_human(rate)}/s)",
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
            f"scanning: {p.files_seen} files, read {_human(p.bytes_hashed)} ({_human(rate)}/s)",
            file=self.stream,
            flush=True,
        )

    def __exit__(self, *_: object) -> None:
        stop = getattr(self.bar, "stop", None)
        if stop is not None:
            stop()
