"""The swarm fetcher against fake peers: spreading, moving requests off vanished or slow peers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from backer.ids import Hash
from backer.protocol.messages import RemoteEntry
from backer.sync.peer import PeerGone
from backer.sync.replica import Replica
from backer.sync.swarm import FolderPuller, Swarm

ROOT = Hash(b"r" * 32)
OTHER_ROOT = Hash(b"o" * 32)


class FakePeer:
    def __init__(
        self,
        name: bytes,
        *,
        root: Hash = ROOT,
        chunks: dict[Hash, bytes] | None = None,
        stall: bool = False,
        gone: bool = False,
    ) -> None:
        self.peer_device = name * 32
        self.peer_root: Hash | None = root
        self.open = True
        self.load = 0
        self.held = chunks or {}
        self.stall = stall
        self.gone = gone
        self.asked: list[Hash] = []

    async def _serve(self) -> None:
        if self.gone:
            raise PeerGone("vanished")
        if self.stall:
            await asyncio.Event().wait()

    async def nodes(self, hashes: Sequence[Hash]) -> dict[Hash, bytes]:
        await self._serve()
        return {h: self.held[h] for h in hashes if h in self.held}

    async def groups(self, hashes: Sequence[Hash]) -> dict[Hash, bytes]:
        return await self.nodes(hashes)

    async def entries(
        self, wanted: Sequence[tuple[str, Hash]], *, inline: bool = True
    ) -> list[RemoteEntry]:
        await self._serve()
        return []

    async def chunks(self, wanted: Sequence[tuple[Hash, int]]) -> dict[Hash, bytes]:
        self.asked += [digest for digest, _ in wanted]
        self.load += len(wanted)
        try:
            await self._serve()
            return {digest: self.held[digest] for digest, _ in wanted if digest in self.held}
        finally:
            self.load -= len(wanted)


def digest(n: int) -> Hash:
    return Hash(bytes([n]) * 32)


async def test_chunks_spread_over_the_peers_that_hold_the_root() -> None:
    held = {digest(n): bytes([n]) * 10 for n in range(40)}
    peers = [FakePeer(b"a", chunks=held), FakePeer(b"b", chunks=held)]
    swarm = Swarm(lambda: peers, ROOT)
    got = await asyncio.gather(*(swarm.chunks([(d, 10)]) for d in held))
    assert [found[d] for found, d in zip(got, held, strict=True)] == list(held.values())
    assert all(peer.asked for peer in peers)  # both served some
    assert sum(len(peer.asked) for peer in peers) == len(held)  # each chunk asked once


async def test_a_peer_with_the_announced_root_is_asked_first() -> None:
    held = {digest(1): b"x" * 10}
    moved_on, current = FakePeer(b"a", root=OTHER_ROOT, chunks=held), FakePeer(b"b", chunks=held)
    swarm = Swarm(lambda: [moved_on, current], ROOT)
    assert await swarm.chunks([(digest(1), 10)]) == {digest(1): b"x" * 10}
    assert current.asked and not moved_on.asked


async def test_a_vanished_peer_s_request_moves_to_another_at_once() -> None:
    held = {digest(1): b"x" * 10}
    gone, alive = FakePeer(b"a", gone=True), FakePeer(b"b", chunks=held)
    gone.load, alive.load = 0, 5  # the vanished one looks best
    swarm = Swarm(lambda: [gone, alive], ROOT, hedge_after=60)
    assert await asyncio.wait_for(swarm.chunks([(digest(1), 10)]), 5) == {digest(1): b"x" * 10}
    assert swarm.stats.moved == 1 and swarm.stats.hedged == 0


async def test_a_slow_peer_s_request_is_also_asked_of_another() -> None:
    held = {digest(1): b"x" * 10}
    slow, fast = FakePeer(b"a", chunks=held, stall=True), FakePeer(b"b", chunks=held)
    fast.load = 5  # the stalled one looks best
    swarm = Swarm(lambda: [slow, fast], ROOT, hedge_after=0.05)
    assert await asyncio.wait_for(swarm.chunks([(digest(1), 10)]), 5) == {digest(1): b"x" * 10}
    assert swarm.stats.hedged == 1


async def test_a_chunk_nobody_has_is_none_after_asking_everyone() -> None:
    peers = [FakePeer(b"a"), FakePeer(b"b"), FakePeer(b"c", root=OTHER_ROOT)]
    swarm = Swarm(lambda: peers, ROOT)
    assert await swarm.chunks([(digest(9), 10)]) == {}
    assert all(peer.asked == [digest(9)] for peer in peers)


async def test_the_chunks_of_a_run_one_peer_lacks_are_asked_of_the_next() -> None:
    a = FakePeer(b"a", chunks={digest(1): b"one"})
    b = FakePeer(b"b", chunks={digest(1): b"one", digest(2): b"two"})
    b.load = 5  # a is asked first
    swarm = Swarm(lambda: [a, b], ROOT)
    assert await swarm.chunks([(digest(1), 3), (digest(2), 3)]) == {
        digest(1): b"one",
        digest(2): b"two",
    }
    assert a.asked == [digest(1), digest(2)] and b.asked == [digest(2)]


async def test_batch_items_one_peer_lacks_are_asked_of_the_next() -> None:
    a = FakePeer(b"a", chunks={digest(1): b"one"})
    b = FakePeer(b"b", chunks={digest(2): b"two"})
    swarm = Swarm(lambda: [a, b], ROOT)
    assert await swarm.nodes([digest(1), digest(2), digest(3)]) == {
        digest(1): b"one",
        digest(2): b"two",
    }


@pytest.mark.parametrize("gone", [True, False])
async def test_no_open_peer_means_nothing_found(gone: bool) -> None:
    peer = FakePeer(b"a", chunks={digest(1): b"one"}, gone=gone)
    peer.open = not gone
    swarm = Swarm(lambda: [peer], ROOT)
    assert await swarm.nodes([digest(1)]) == ({} if gone else {digest(1): b"one"})


async def test_a_retry_for_a_root_nobody_announces_does_not_spin(tmp_path: Path) -> None:
    # Found by a benchmark: a read-write node whose read-only peer had moved on kept a
    # past-due retry for the old root, so the puller's wait was 0 s for ever (one core at 60 %).
    replica = await Replica.open(tmp_path, device=1, create=True)
    try:
        clock = [100.0]
        puller = FolderPuller(replica, clock=lambda: clock[0])
        peer = FakePeer(b"a", root=OTHER_ROOT)
        puller.add(peer)
        puller._retry[(ROOT, replica.root)] = (50.0, 2.0)  # past due, nobody announces ROOT
        puller._retry[(OTHER_ROOT, replica.root)] = (130.0, 4.0)  # announced, due in 30 s
        assert puller._next_retry() == 30.0
        peer.peer_root = None
        assert puller._next_retry() is None  # nothing announced is waiting: wait for news
    finally:
        await replica.close()
