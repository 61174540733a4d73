"""`backer run`: the daemon. Hosts every configured folder until SIGINT or SIGTERM, printing
what happens as plain lines, or as JSON lines with `--events json`.

Imports node, events, config and the CLI's common helpers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from backer.cli.common import EXIT_OK, EXIT_USAGE, address_arg, human, plural
from backer.config import DEFAULT_WEB_PORT, Home
from backer.errors import BackerError, ConfigError
from backer.events import (
    ConflictFound,
    ErrorOccurred,
    Event,
    FileProgress,
    FileUpdated,
    FolderPaused,
    FolderResumed,
    LocalChangesKept,
    NodeStarted,
    NodeStopping,
    PeerConnected,
    PeerDisconnected,
    PullFinished,
    WatchIncomplete,
)
from backer.node.bus import stamped_json
from backer.node.folder import FolderOptions
from backer.node.node import Node, NodeOptions
from backer.web import WebServer, start_web

__all__ = ["RUN_LOCK_FILE", "TerminalView", "add_run_command", "describe"]

RUN_LOCK_FILE = "run.lock"  # in the node's home; holds the running node's pid


def add_run_command(commands: Any) -> None:
    run = commands.add_parser(
        "run", help="keep every configured folder in sync with its peers until stopped"
    )
    run.add_argument(
        "--listen",
        type=address_arg,
        metavar="HOST:PORT",
        help="accept peers here (default: the config's listen)",
    )
    run.add_argument(
        "--peer",
        action="append",
        type=address_arg,
        default=[],
        metavar="HOST:PORT",
        help="also dial this address (repeatable; the config's peers are always dialled)",
    )
    run.add_argument(
        "--events", choices=("text", "json"), default="text", help="how to print what happens"
    )
    run.add_argument(
        "--discovery",
        metavar="METHODS",
        help="how to find peers, comma-separated from mdns,beacon,dht, or 'none' "
        "(default: the config's discovery, all three unless changed)",
    )
    run.add_argument(
        "--dht-bootstrap",
        action="append",
        type=address_arg,
        default=[],
        metavar="HOST:PORT",
        help="a DHT node to join through (repeatable; adds to the config's dht_bootstrap)",
    )
    run.add_argument(
        "--web",
        action="store_true",
        help="serve the dashboard on 127.0.0.1 (`web = true` in the config does too); "
        "`backer open` prints and opens its URL",
    )
    run.add_argument(
        "--web-port",
        type=int,
        metavar="PORT",
        help=f"the dashboard's port (implies --web; default: the config's web_port, "
        f"{DEFAULT_WEB_PORT} unless changed; 0: a free one)",
    )
    run.add_argument(
        "--no-watch",
        action="store_true",
        help="do not watch the folders; find changes by periodic rescans only",
    )
    run.add_argument(
        "--rescan",
        type=float,
        metavar="SECONDS",
        help="seconds between full rescans (default: 3600 when watching, 60 when not)",
    )
    run.set_defaults(run=cmd_run)


def cmd_run(home: Home, args: argparse.Namespace) -> int:
    config = home.load_config()
    if not config.folders:
        raise BackerError(
            "no folders to run: `backer init DIR` shares a folder, `backer join KEY DIR` joins one"
        )
    discovery = config.discovery
    if args.discovery is not None:
        chosen = [m.strip() for m in args.discovery.split(",") if m.strip()]
        discovery = () if chosen == ["none"] else tuple(chosen)
    try:
        config = dataclasses.replace(
            config,
            listen=args.listen or config.listen,
            peers=tuple(dict.fromkeys((*config.peers, *args.peer))),
            discovery=discovery,
            dht_bootstrap=tuple(dict.fromkeys((*config.dht_bootstrap, *args.dht_bootstrap))),
        )
    except ConfigError as exc:  # the stored config was valid: the options made it wrong
        print(f"backer run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    folder = FolderOptions(watch=not args.no_watch)
    if args.rescan is not None:
        folder = dataclasses.replace(folder, rescan_every=args.rescan, rescan_unwatched=args.rescan)
    with _one_node_per_home(home) as running:
        if running is not None:
            pid = f" (pid {running})" if running else ""  # 0: it has not written its pid yet
            print(f"backer: already running{pid}", file=sys.stderr)
            return EXIT_USAGE
        node = Node(home, config, options=NodeOptions(folder=folder))
        # kademlia logs a warning for every DHT contact that does not answer: routine, not news.
        logging.getLogger("kademlia").setLevel(logging.ERROR)
        web = args.web or args.web_port is not None or config.web
        web_port = config.web_port if args.web_port is None else args.web_port
        return asyncio.run(
            _run(node, as_json=args.events == "json", web_port=web_port if web else None)
        )


@contextlib.contextmanager
def _one_node_per_home(home: Home) -> Iterator[int | None]:
    """Hold the home's run lock while the block runs, yielding None; or, if another process
    holds it, yield that process's pid (0 if unknown). Two nodes of one home would fight over
    its peers, its folders' indexes and its status file. The kernel drops the lock when the
    holder dies, however it dies: there is no stale lock to clean up."""
    home.path.mkdir(parents=True, exist_ok=True)
    fd = os.open(home.path / RUN_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            running: int | None = int(holder) if holder.isdigit() else 0
        else:
            running = None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield running
    finally:
        os.close(fd)  # releases the lock


async def _run(node: Node, *, as_json: bool, web_port: int | None) -> int:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, node.stop, signal.Signals(signum).name)
    events = node.bus.subscribe()
    printer = asyncio.create_task(_print(events, as_json=as_json))
    dashboard = None if web_port is None else await _start_dashboard(node, web_port)
    if dashboard is not None:
        node.note_status("dashboard", dashboard.base_url)
        # stderr: with --events json, stdout stays pure JSON lines.
        print(f"dashboard: {dashboard.url}", file=sys.stderr, flush=True)
    try:
        await node.run()
    finally:
        if dashboard is not None:
            await dashboard.close()
        events.close()
        await printer
    return EXIT_OK


async def _start_dashboard(node: Node, port: int) -> WebServer:
    """The dashboard on its fixed port, with the token kept in the node home (one address to
    bookmark); on a free port, said so, if another program holds that one."""
    token = node.home.web_token
    try:
        return await start_web(node, port=port, token=token)
    except BackerError as exc:
        if port == 0:
            raise
        dashboard = await start_web(node, port=0, token=token)
        print(
            f"backer: {exc}; the dashboard is on port {dashboard.port} this time "
            "(set web_port in the config to keep one)",
            file=sys.stderr,
            flush=True,
        )
        return dashboard


async def _print(events: Any, *, as_json: bool) -> None:
    if not as_json and sys.stdout.isatty():
        view = TerminalView(Console())  # a terminal: progress bars, drawn on the loop
        try:
            while True:
                for stamped in [await events.next_stamped(), *events.take_ready()]:
                    view.show(stamped)
        except StopAsyncIteration:
            return
    render = _json_line if as_json else _text_line
    try:
        while True:
            # Everything already waiting goes out in one write (a pull of many small files
            # emits an event per file: a write each cost the node 5 % of its CPU), from a
            # worker thread: a pipe whose reader stalls must block this printer, never the
            # node (its events queue meanwhile, and are dropped past the queue's bound).
            lines = [render(s) for s in [await events.next_stamped(), *events.take_ready()]]
            text = "".join(line + "\n" for line in lines if line)
            if text:
                await asyncio.to_thread(_write_out, text)
    except StopAsyncIteration:
        return


def _json_line(stamped: tuple[float, Event]) -> str:
    return json.dumps(stamped_json(stamped))


def _text_line(stamped: tuple[float, Event]) -> str:
    return describe(stamped[1]) or ""


def _write_out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class TerminalView:
    """On a terminal: a progress bar (bytes, rate, time left) per large file being received,
    the other events as lines above the bars."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.tasks: dict[tuple[str, str], TaskID] = {}

    def show(self, stamped: tuple[float, Event]) -> None:
        event = stamped[1]
        if isinstance(event, FileProgress):
            self._progress(event)
            return
        line = describe(event)
        if line:
            self.progress.console.print(line, highlight=False, markup=False)

    def _progress(self, event: FileProgress) -> None:
        key = (event.folder, event.path)
        task = self.tasks.get(key)
        if task is None:
            if not self.tasks:
                self.progress.start()
            task = self.tasks[key] = self.progress.add_task(event.path, total=event.total)
        self.progress.update(task, completed=event.done)
        if event.done >= event.total:
            self.progress.remove_task(self.tasks.pop(key))
            if not self.tasks:
                self.progress.stop()


def describe(event: Event) -> str | None:
    """One plain line for a person, or None for events too small to print."""
    match event:
        case NodeStarted(device=device, listen=listen, folders=folders):
            return f"device {device} listening on {listen or '(nothing)'}; folders: " + ", ".join(
                folders
            )
        case NodeStopping(reason=reason):
            return f"stopping ({reason})"
        case PeerConnected(folder=folder, device=device, address=address, outgoing=outgoing):
            way = "to" if outgoing else "from"
            return f"{folder}: connected {way} {device[:7]} at {address}"
        case PeerDisconnected(folder=folder, device=device, address=address, reason=reason):
            return f"{folder}: {device[:7] or address} left: {reason}"
        case PullFinished(folder=folder, files=files, deleted=deleted, errors=errors) if (
            files or deleted or errors or event.reason
        ):
            text = (
                f"{folder}: received {plural(files, 'file')} ({human(event.bytes_fetched)} over "
                f"the wire, {human(event.bytes_local)} reused), {deleted} deleted, "
                f"{plural(event.conflicts, 'conflict')}"
            )
            if event.reason:
                text += f"; stopped early: {event.reason}"
            return "\n".join([text, *(f"{folder}: refused {error}" for error in errors)])
        case FileProgress(folder=folder, path=path, done=done, total=total):  # not a terminal
            return f"{folder}: {path} {done * 100 // max(total, 1)}% of {human(total)}"
        case FileUpdated():
            return None
        case ConflictFound(folder=folder, path=path, copy=copy):
            return f"{folder}: conflict on {path}; the other version is kept as {copy}"
        case FolderPaused(folder=folder, reason=reason):
            return f"{folder}: PAUSED: {reason}"
        case FolderResumed(folder=folder):
            return f"{folder}: resumed"
        case WatchIncomplete(folder=folder, watched_dirs=watched, total_dirs=total, fix=fix):
            return f"{folder}: watching only {watched} of {total} directories; {fix}"
        case LocalChangesKept(folder=folder, count=count):
            return (
                f"{folder}: {plural(count, 'local change')} stay on this device: its key is "
                "read-only, so peers refuse them; `backer revert` brings back the shared versions"
            )
        case ErrorOccurred(folder=folder, message=message):
            return f"{folder or 'backer'}: error: {message}"
    return None
