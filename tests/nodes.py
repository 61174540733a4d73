"""Helpers for tests that run whole nodes in one process: temporary homes and folders, a
cluster started in order, and waits on real outcomes (files on disk, equal roots)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from backer.config import FolderConfig, Home, NodeConfig
from backer.index.store import IndexStore
from backer.keys import FolderKey
from backer.node.folder import FolderOptions
from backer.node.node import Node, NodeOptions

DEADLINE = 30.0
FAST = FolderOptions(backoff_first=0.05, backoff_max=1.0, hedge_after=1.0, answer_within=3.0)


def make_member(
    base: Path,
    name: str,
    key: FolderKey,
    peers: Sequence[str] = (),
    *,
    listen: str = "127.0.0.1:0",
    max_peers: int = 16,
) -> tuple[Home, NodeConfig, Path]:
    home = Home(base / name / "home")
    folder = base / name / "folder"
    folder.mkdir(parents=True, exist_ok=True)
    IndexStore.open(folder, create=True).close()
    config = NodeConfig(
        folders=(FolderConfig(path=str(folder), key=str(key)),),
        listen=listen,
        peers=tuple(peers),
        discovery=(),  # in-process tests use static peers only
        max_peers=max_peers,
    )
    return home, config, folder


@dataclasses.dataclass
class Member:
    node: Node
    folder: Path

    @property
    def root(self) -> bytes:
        return next(iter(self.node.folders.values())).replica.root


@contextlib.asynccontextmanager
async def cluster(
    base: Path,
    count: int,
    *,
    key: FolderKey | None = None,
    peers_of: Callable[[int, list[str]], Sequence[str]] = lambda i, up: up[-1:],
    options: FolderOptions = FAST,
    max_peers: int = 16,
) -> AsyncIterator[list[Member]]:
    """`count` nodes started in order; node i statically knows `peers_of(i, addresses of the
    nodes before it)` (default: the previous one, a line)."""
    key = key or FolderKey.generate()
    members: list[Member] = []
    async with contextlib.AsyncExitStack() as stack:
        addresses: list[str] = []
        for i in range(count):
            home, config, folder = make_member(
                base, f"n{i}", key, peers_of(i, addresses), max_peers=max_peers
            )
            node = Node(home, config, options=NodeOptions(folder=options))
            await stack.enter_async_context(node)
            addresses.append(node.listen_address)
            members.append(Member(node, folder))
        yield members


async def eventually(
    check: Callable[[], bool], *, deadline: float = DEADLINE, what: str = ""
) -> None:
    """Poll `check` until it holds; fail after `deadline` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not check():
        if loop.time() > end:
            raise AssertionError(f"not within {deadline:g} s: {what or check}")
        await asyncio.sleep(0.02)


def file_is(path: Path, data: bytes) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return path.read_bytes() == data
        except OSError:
            return False

    return check


def converged(members: Sequence[Member]) -> Callable[[], bool]:
    return lambda: len({m.root for m in members}) == 1
