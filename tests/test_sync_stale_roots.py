"""No pulls towards roots that cannot hold anything new: while a copy fills, it keeps announcing
the root it started from (not the half-filled trees it passes through), and a node does not pull
towards the empty tree or a root it had itself before. An initial sync causes no pulls the other
way, and a real change on the copy still reaches the source."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from test_scan import write

from backer.events import Event, PullStarted
from backer.ids import Hash
from backer.index.entry import Entry, Kind, VersionVector
from backer.index.merkle import EMPTY_ROOT
from backer.index.store import KEEP_GENERATIONS, IndexStore, Record
from backer.sync import pull as pull_module
from backer.sync.link import memory_pipe
from backer.sync.peer import PeerSession
from backer.sync.replica import Replica
from backer.sync.replicate import PLAIN_FOLDER, replicate
from backer.sync.swarm import FolderPuller


def source_folder(tmp_path: Path, files: int) -> Path:
    source = tmp_path / "source"
    for i in range(files):
        write(source, f"d{i % 4}/f{i}", os.urandom(50 + i))
    return source


@pytest.mark.parametrize("source_side", ["a", "b"])
async def test_an_initial_sync_makes_no_pull_the_other_way(
    tmp_path: Path, source_side: str
) -> None:
    source, copy = source_folder(tmp_path, 30), tmp_path / "copy"
    copy.mkdir()
    pair = (source, copy) if source_side == "a" else (copy, source)
    result = await asyncio.wait_for(replicate(*pair), 60)
    assert result.in_sync
    by_source, by_copy = (result.a, result.b) if source_side == "a" else (result.b, result.a)
    assert by_source.pulls == []  # not even towards the copy's empty root
    assert sum(report.files for report in by_copy.pulls) == 30


class Node:
    """A replica with the node's puller and one gossiping session: `sync.swarm` as a node runs
    it, without the mesh."""

    def __init__(self, replica: Replica, link: object, name: bytes) -> None:
        self.replica = replica
        self.events: list[Event] = []
        self.puller = FolderPuller(replica, emit=self.events.append)
        self.heard: list[Hash] = []  # every root the peer announced to us, in order
        self.session = PeerSession(
            replica,
            link,  # type: ignore[arg-type]
            device=name * 32,
            folder=PLAIN_FOLDER,
            on_change=self._heard,
            gossip_every=0.002,  # announce the current root all the time
        )
        self.puller.add(self.session)

    def _heard(self, session: PeerSession) -> None:
        if session.peer_root is not None:
            self.heard.append(session.peer_root)
        self.puller.poke()

    def pulls(self) -> list[PullStarted]:
        return [e for e in self.events if isinstance(e, PullStarted)]


async def sync_as_nodes(source: Path, copy: Path) -> tuple[Node, Node]:
    """Run both nodes until each has heard the other's root and both are equal and idle."""
    replicas = [
        await Replica.open(path, device=n + 1, create=True) for n, path in enumerate((source, copy))
    ]
    for replica in replicas:
        await replica.scan()
    end_a, end_b = memory_pipe()
    nodes = (Node(replicas[0], end_a, b"a"), Node(replicas[1], end_b, b"b"))
    try:
        async with asyncio.timeout(60):
            tasks: list[asyncio.Task[object]] = []
            for node in nodes:
                tasks.append(asyncio.create_task(node.session.run()))
                tasks.append(asyncio.create_task(node.puller.run()))
            while not all(
                n.replica.root == nodes[0].replica.root
                and n.session.peer_root == n.replica.root
                and n.puller.current is None
                and not n.replica.lock.locked()
                for n in nodes
            ):
                await asyncio.sleep(0.01)  # polled with a deadline: nothing to await here
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for replica in replicas:
            await replica.close()
    return nodes


async def test_a_filling_copy_announces_no_half_filled_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pull_module, "COMMIT_EVERY", 5)  # many half-filled roots on the way
    source, copy = source_folder(tmp_path, 200), tmp_path / "copy"
    copy.mkdir()
    by_source, by_copy = await sync_as_nodes(source, copy)
    final = by_source.replica.root
    assert set(by_source.heard) <= {EMPTY_ROOT, final}, "the copy announced a half-filled root"
    assert by_source.pulls() == []
    assert len(by_copy.pulls()) == 1


async def test_a_change_on_the_copy_still_reaches_the_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pull_module, "COMMIT_EVERY", 5)  # a few commits: fewer than 8
    source, copy = source_folder(tmp_path, 20), tmp_path / "copy"
    write(copy, "mine.txt", b"made on the copy")
    by_source, _ = await sync_as_nodes(source, copy)
    assert (source / "mine.txt").read_bytes() == b"made on the copy"
    assert len(by_source.pulls()) == 1  # towards the copy's own root, once


async def test_a_long_pull_announces_its_progress_before_the_old_tree_is_purged(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    replica = await Replica.open(folder, device=1, create=True)
    try:
        began = replica.store.commit([Record(_entry("mine", 1))])
        async with replica.pulling():
            for n in range(KEEP_GENERATIONS // 2):
                assert replica.settled_root == began  # its nodes are all still there
                replica.store.commit([Record(_entry(f"pulled-{n}", 1))])
            assert replica.settled_root == replica.root != began
        empty = tmp_path / "empty"
        empty.mkdir()
        copy = await Replica.open(empty, device=2, create=True)
        async with copy.pulling():
            for n in range(KEEP_GENERATIONS + 1):
                copy.store.commit([Record(_entry(f"pulled-{n}", 1))])
            assert copy.settled_root == EMPTY_ROOT  # nothing to walk, nothing to purge
        await copy.close()
    finally:
        await replica.close()


def test_an_index_remembers_the_roots_it_had(tmp_path: Path) -> None:
    with IndexStore.open(tmp_path, create=True) as store:
        assert store.covers(EMPTY_ROOT)
        roots = [store.root]
        for n in range(3):
            entry = _entry("f", n + 1)
            roots.append(store.commit([Record(entry)]))
        assert all(store.covers(root) for root in roots[:-1])
        assert not store.covers(roots[-1])  # the current one: not "before"
        assert not store.covers(Hash(b"x" * 32))


def _entry(path: str, counter: int) -> Entry:
    return Entry(
        path=path,
        kind=Kind.SYMLINK,
        target=f"target-{counter}",
        version=VersionVector(((1, counter),)),
        modifier=1,
    )
