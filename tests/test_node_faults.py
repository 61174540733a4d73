"""Nodes that die or restart in the middle of things: nothing half-done stays, the work
completes from the peers that are left, and a restarted node catches up."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest
from nodes import FAST, eventually, file_is, make_member

from backer.errors import RemoteProtocolError
from backer.events import FileProgress, PeerDisconnected, PullFinished
from backer.ids import Hash
from backer.keys import FolderKey
from backer.node.node import Node, NodeOptions
from backer.sync.link import memory_pipe
from backer.sync.peer import PeerGone, PeerSession
from backer.sync.replica import Replica
from backer.sync.replicate import PLAIN_FOLDER

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


async def test_a_session_whose_channel_failed_closes_quietly_and_its_requests_move_on(
    tmp_path: Path,
) -> None:
    """Found by the chaos test: a connection replaced by a newer one had an encrypted channel
    that had already failed, and saying goodbye on it raised out of the mesh and stopped the
    node. A broken link under a session must end that session only: closing it is quiet, and
    a request on it raises PeerGone so the swarm asks another peer."""
    replicas = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        replica = await Replica.open(tmp_path / name, device=0, create=True)
        replica.device = replica.store.local_device()
        replicas.append(replica)
    end_a, end_b = memory_pipe()
    one = PeerSession(replicas[0], end_a, device=b"a" * 32, folder=PLAIN_FOLDER)
    two = PeerSession(replicas[1], end_b, device=b"b" * 32, folder=PLAIN_FOLDER)
    runs = [asyncio.create_task(one.run()), asyncio.create_task(two.run())]
    try:
        await eventually(lambda: one.open and two.open)

        async def failed_channel(data: bytes) -> None:
            raise RemoteProtocolError("the channel is closed")

        end_a.write = failed_channel  # type: ignore[method-assign]
        with pytest.raises(PeerGone, match="connection failed"):
            await one.chunks([(Hash(bytes(32)), 10)])
        await one.close("replaced by a newer connection")
        assert one.result.reason == "replaced by a newer connection"
    finally:
        await two.close("done")
        await asyncio.wait(runs, timeout=10)
        for replica in replicas:
            await replica.close()
