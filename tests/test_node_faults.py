"""Nodes that die or restart in the middle of things: nothing half-done stays, the work
completes from the peers that are left, and a restarted node catches up."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from nodes import FAST, eventually, file_is, make_member

from backer.events import FileProgress, PeerDisconnected, PullFinished
from backer.keys import FolderKey
from backer.node.node import Node, NodeOptions

MIB = 1024 * 1024


def start(base: Path, name: str, key: FolderKey, peers: list[str]) -> tuple[Node, Path]:
    home, config, folder = make_member(base, name, key, peers)
    return Node(home, config, options=NodeOptions(folder=FAST)), folder


async def kill(node: Node) -> None:
    """As abrupt as one process allows: no goodbyes, the connections just drop."""
    task = node._task
    assert task is not None
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_a_peer_killed_mid_transfer_the_file_completes_from_the_others(
    tmp_path: Path,
) -> None:
    key = FolderKey.generate()
    data = os.urandom(48 * MIB)
    a, a_folder = start(tmp_path, "a", key, [])
    (a_folder / "big.bin").write_bytes(data)
    async with a:
        b, b_folder = start(tmp_path, "b", key, [a.listen_address])
        async with b:
            await eventually(file_is(b_folder / "big.bin", data), deadline=60)
            c, c_folder = start(tmp_path, "c", key, [a.listen_address, b.listen_address])
            events = c.bus.subscribe()
            async with c:
                await asyncio.wait_for(events.next_of(FileProgress), 30)  # under way
                await kill(a)
                finished = await asyncio.wait_for(events.next_of(PullFinished), 60)
                assert (c_folder / "big.bin").read_bytes() == data
                assert not finished.errors
                lost = [e for e in c.bus.recent if isinstance(e[1], PeerDisconnected)]
                assert lost, "a was killed during the pull"


async def test_a_restarted_node_resumes_its_transfer_and_converges(tmp_path: Path) -> None:
    key = FolderKey.generate()
    data = os.urandom(48 * MIB)
    a, a_folder = start(tmp_path, "a", key, [])
    (a_folder / "big.bin").write_bytes(data)
    async with a:
        b, b_folder = start(tmp_path, "b", key, [a.listen_address])
        events = b.bus.subscribe()
        async with b:
            # Stop b once part of the file is in; the rest comes after the restart.
            await asyncio.wait_for(events.next_of(FileProgress, lambda e: e.done >= 8 * MIB), 30)
            left = b.status()["folders"][0]["left"]  # what `backer status` shows meanwhile
            assert left["files"] == 1 and 0 < left["bytes"] <= 40 * MIB, left
        assert not (b_folder / "big.bin").exists()  # never a partial file at its real path
        (a_folder / "later.txt").write_bytes(b"written while b was down")
        b, _ = start(tmp_path, "b", key, [a.listen_address])
        events = b.bus.subscribe()
        async with b:
            await eventually(file_is(b_folder / "big.bin", data), deadline=60)
            await eventually(file_is(b_folder / "later.txt", b"written while b was down"))
            await eventually(lambda: _root(a) == _root(b))
        resumed = [e for _, e in b.bus.recent if isinstance(e, PullFinished) and e.files]
        assert sum(e.bytes_local for e in resumed) >= 4 * MIB  # the kept temp data was reused


def _root(node: Node) -> bytes:
    return next(iter(node.folders.values())).replica.root
