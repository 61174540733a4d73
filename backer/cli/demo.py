"""`backer demo`: three nodes on this machine, in temporary folders, that find each other with no
address configured, sync a folder, an edit, a delete and a conflict, and converge; then they are
cleaned up. Exits 1 if anything did not converge in time, so CI runs it as a test.

Imports config, keys, index, node, events and the CLI's common helpers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backer.cli.common import EXIT_ERROR, EXIT_OK, human
from backer.config import FolderConfig, Home, NodeConfig
from backer.events import PeerConnected, PeerFound
from backer.index.store import IndexStore
from backer.keys import FolderKey
from backer.node.node import Node
from backer.sync.merge import is_conflict_copy

__all__ = ["add_demo_command"]

NAMES = ("laptop", "desktop", "server")
STEP_DEADLINE = 20.0


def add_demo_command(commands: Any) -> None:
    demo = commands.add_parser(
        "demo", help="watch three local nodes find each other and sync (a few seconds, cleans up)"
    )
    demo.add_argument("--keep", action="store_true", help="keep the demo folders afterwards")
    demo.set_defaults(run=cmd_demo)


def cmd_demo(home: Home, args: argparse.Namespace) -> int:
    del home  # the demo makes its own homes
    ok = asyncio.run(_demo(keep=args.keep))
    return EXIT_OK if ok else EXIT_ERROR


class _Demo:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.key = FolderKey.generate()
        self.folders = {name: base / name / "folder" for name in NAMES}
        self.nodes: dict[str, Node] = {}
        self.started = time.monotonic()
        self.all_started = asyncio.Event()  # narration waits for it: "started" comes first

    def name_of(self, address: str) -> str:
        """The node listening at `address` by its name; all listen on 127.0.0.1, so the port
        tells them apart (an mDNS answer may name the host differently)."""
        port = address.rpartition(":")[2]
        for name, node in self.nodes.items():
            if node.listen_address.rpartition(":")[2] == port:
                return name
        return address

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:5.2f} s] {text}", flush=True)

    def config(self, name: str) -> tuple[Home, NodeConfig]:
        folder = self.folders[name]
        folder.mkdir(parents=True)
        IndexStore.open(folder, create=True).close()
        config = NodeConfig(
            folders=(FolderConfig(path=str(folder), key=str(self.key)),),
            listen="127.0.0.1:0",  # LAN discovery then stays on this machine
            discovery=("mdns", "beacon"),
        )
        return Home(self.base / name / "home"), config

    def roots(self) -> set[bytes]:
        return {next(iter(n.folders.values())).replica.root for n in self.nodes.values()}

    async def until(self, what: str, check: Callable[[], bool]) -> bool:
        end = time.monotonic() + STEP_DEADLINE
        while not check():
            if time.monotonic() > end:
                self.say(f"FAILED: {what} did not happen within {STEP_DEADLINE:g} s")
                return False
            await asyncio.sleep(0.02)
        return True

    def everywhere(self, rel: str, data: bytes | None) -> Callable[[], bool]:
        def check() -> bool:
            for folder in self.folders.values():
                path = folder / rel
                try:
                    if data is None:
                        if path.exists():
                            return False
                    elif path.read_bytes() != data:
                        return False
                except OSError:
                    return False
            return len(self.roots()) == 1

        return check


async def _demo(*, keep: bool) -> bool:
    base = Path(tempfile.mkdtemp(prefix="backer-demo-"))
    demo = _Demo(base)
    try:
        return await _story(demo)
    finally:
        for node in demo.nodes.values():
            node.stop()
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
            demo.say("cleaned up")
        else:
            demo.say(f"the demo folders are kept in {base}")


async def _story(demo: _Demo) -> bool:
    sample = _sample_files(demo.folders["laptop"])
    total = sum(len(data) for data in sample.values())
    demo.say(f"three nodes share one folder key; laptop holds {len(sample)} files ({human(total)})")
    stack = contextlib.AsyncExitStack()
    async with stack:
        for name in NAMES:
            home, config = demo.config(name) if name != "laptop" else _existing(demo)
            node = Node(home, config)
            watcher = node.bus.subscribe()
            await stack.enter_async_context(node)
            demo.nodes[name] = node
            stack.callback(watcher.close)
            asyncio.get_running_loop().create_task(_narrate(demo, name, watcher))
        demo.say("started laptop, desktop and server; no addresses configured")
        demo.all_started.set()
        if not await demo.until("the sample files reaching every node", _all_have(demo, sample)):
            return False
        demo.say(f"every node holds the {len(sample)} files: synced")

        edited = b"# Notes\n\nEdited on the desktop.\n"
        (demo.folders["desktop"] / "notes.md").write_bytes(edited)
        demo.say("desktop edits notes.md")
        if not await demo.until("the edit spreading", demo.everywhere("notes.md", edited)):
            return False
        demo.say("the edit reached laptop and server")

        (demo.folders["server"] / "photos" / "beach-1.jpg").unlink()
        demo.say("server deletes photos/beach-1.jpg")
        gone = demo.everywhere("photos/beach-1.jpg", None)
        if not await demo.until("the delete spreading", gone):
            return False
        kept = list((demo.folders["laptop"] / ".backer" / "versions").rglob("beach-1*"))
        demo.say(f"deleted everywhere; laptop kept the old file in .backer/versions ({len(kept)})")

        (demo.folders["laptop"] / "plan.txt").write_bytes(b"laptop's plan: go left\n")
        (demo.folders["desktop"] / "plan.txt").write_bytes(b"desktop's plan: go right\n")
        demo.say("laptop and desktop edit plan.txt at the same moment")
        if not await demo.until("the conflict settling", _conflict_settled(demo)):
            return False
        copy = next(p.name for p in demo.folders["server"].iterdir() if is_conflict_copy(p.name))
        demo.say(f"conflict: both versions kept everywhere (plan.txt and {copy})")

        if len(demo.roots()) != 1:
            demo.say("FAILED: the roots differ")
            return False
        root = next(iter(demo.roots())).hex()
        demo.say(f"all three folders have the same root {root[:16]}...")
        print(
            "\nSummary: three nodes found each other by mDNS/broadcast on this machine, synced "
            f"{len(sample)} files, an edit, a delete (kept as a version) and a conflict (both "
            f"versions kept), and converged in {time.monotonic() - demo.started:.1f} s.\n"
            "Try it for real: `backer init DIR` on one machine, `backer join KEY DIR` on another, "
            "then `backer run --listen 0.0.0.0:22100` on both.",
            flush=True,
        )
    return True


def _existing(demo: _Demo) -> tuple[Home, NodeConfig]:
    """The laptop's folder already holds the sample files: index it like `backer init`."""
    folder = demo.folders["laptop"]
    IndexStore.open(folder, create=True).close()
    config = NodeConfig(
        folders=(FolderConfig(path=str(folder), key=str(demo.key)),),
        listen="127.0.0.1:0",
        discovery=("mdns", "beacon"),
    )
    return Home(demo.base / "laptop" / "home"), config


def _sample_files(folder: Path) -> dict[str, bytes]:
    rng = random.Random(7)
    files = {
        "notes.md": b"# Notes\n\nWritten on the laptop.\n",
        "plan.txt": b"the plan\n",
    }
    for i in range(1, 9):
        files[f"photos/beach-{i}.jpg"] = rng.randbytes(rng.randrange(50_000, 400_000))
    for i in range(1, 21):
        files[f"docs/report-{i:02}.txt"] = f"report {i}\n".encode() * rng.randrange(10, 2000)
    files["video/holiday.mp4"] = rng.randbytes(6 * 1024 * 1024)
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return files


def _all_have(demo: _Demo, files: dict[str, bytes]) -> Callable[[], bool]:
    def check() -> bool:
        for folder in demo.folders.values():
            for rel, data in files.items():
                try:
                    if (folder / rel).stat().st_size != len(data):
                        return False
                except OSError:
                    return False
        return len(demo.roots()) == 1

    return check


def _conflict_settled(demo: _Demo) -> Callable[[], bool]:
    def check() -> bool:
        versions = set()
        for folder in demo.folders.values():
            copies = [p for p in folder.iterdir() if is_conflict_copy(p.name)]
            if len(copies) != 1:
                return False
            try:  # the loser moves aside before the winner arrives: a moment with neither
                versions.add(((folder / "plan.txt").read_bytes(), copies[0].read_bytes()))
            except OSError:
                return False
        return len(versions) == 1 and len(demo.roots()) == 1

    return check


async def _narrate(demo: _Demo, name: str, events: Any) -> None:
    told: set[str] = set()
    await demo.all_started.wait()  # what happened meanwhile waits in the subscription
    with contextlib.suppress(StopAsyncIteration):
        async for event in events:
            peer = (
                demo.name_of(event.address) if isinstance(event, PeerFound | PeerConnected) else ""
            )
            if isinstance(event, PeerFound) and peer not in told and peer != name:
                told.add(peer)
                demo.say(f"{name} found {peer} by {event.via}")
            elif isinstance(event, PeerConnected) and event.outgoing:
                demo.say(f"{name} connected to {peer} (encrypted)")
