"""A session's chunk fetching: the chunks asked together travel in one GetChunks, a chunk asked
twice is asked once, and a caller that gives up leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path

import pytest

from backer.ids import Hash
from backer.index.entry import iter_chunks
from backer.sync.link import memory_pipe
from backer.sync.peer import PeerSession
from backer.sync.replica import Replica
from backer.sync.replicate import PLAIN_FOLDER

DEADLINE = 30.0


@pytest.fixture
async def holder(tmp_path: Path) -> AsyncIterator[Replica]:
    folder = tmp_path / "a"
    folder.mkdir()
    for i in range(40):
        (folder / f"f{i}.bin").write_bytes(os.urandom(2000 + i))
    replica = await Replica.open(folder, device=0, create=True)
    await replica.scan()
    yield replica
    await replica.close()


def chunks_of(replica: Replica, paths: Iterable[str]) -> list[tuple[Hash, int]]:
    wanted = []
    for path in paths:
        record = replica.store.get(path)
        assert record is not None
        wanted += list(iter_chunks(record.entry.chunks))
    return wanted


async def fetching(
    holder: Replica,
    tmp_path: Path,
    fetch: Callable[[PeerSession], Awaitable[None]],
    requests: list[int],
) -> None:
    """Run a session from a fresh replica to `holder`, with `fetch(peer)` as its steer; each
    GetChunks the fetching side sends is recorded in `requests` by its number of chunks."""
    (tmp_path / "b").mkdir()
    asker = await Replica.open(tmp_path / "b", device=0, create=True)
    near, far = memory_pipe()
    serving = PeerSession(holder, far, device=b"a" * 32, folder=PLAIN_FOLDER)
    asking = PeerSession(asker, near, device=b"b" * 32, folder=PLAIN_FOLDER)
    request_chunks = asking.session.request_chunks

    def counted(wanted: Iterable[tuple[Hash, int]]) -> tuple[int, bytes]:
        wanted = list(wanted)
        requests.append(len(wanted))
        return request_chunks(wanted)

    asking.session.request_chunks = counted  # type: ignore[method-assign]

    async def steer(peer: PeerSession) -> None:
        while not peer.open:
            await peer.wake.wait()
            peer.wake.clear()
        await fetch(peer)
        peer.end("done", clean=True)

    try:
        async with asyncio.timeout(DEADLINE):
            await asyncio.gather(serving.run(), asking.run(steer))
    finally:
        await asker.close()


async def test_chunks_asked_together_travel_in_one_request(holder: Replica, tmp_path: Path) -> None:
    wanted = chunks_of(holder, [f"f{i}.bin" for i in range(40)])
    requests: list[int] = []
    got: list[bytes | None] = []

    async def fetch(peer: PeerSession) -> None:
        found = await peer.chunks(wanted)
        got.extend(found.get(d) for d, _ in wanted)
        assert peer.load == 0

    await fetching(holder, tmp_path, fetch, requests)
    assert requests == [len(wanted)]
    assert [len(data or b"") for data in got] == [size for _, size in wanted]
    assert holder.read_chunks(wanted) == got


async def test_a_chunk_asked_twice_is_asked_once_and_a_missing_one_is_none(
    holder: Replica, tmp_path: Path
) -> None:
    [(digest, size)] = chunks_of(holder, ["f0.bin"])
    requests: list[int] = []
    got: list[bytes | None] = []

    async def fetch(peer: PeerSession) -> None:
        asked = [peer.chunks([(digest, size)]), peer.chunks([(digest, size), (Hash(bytes(32)), 5)])]
        first, second = await asyncio.gather(*asked)
        got.extend([first.get(digest), second.get(digest), second.get(Hash(bytes(32)))])

    await fetching(holder, tmp_path, fetch, requests)
    assert requests == [2]
    assert got[0] == got[1] == (holder.read_chunks([(digest, size)])[0]) and got[2] is None


async def test_a_caller_that_gives_up_leaves_no_waiter(holder: Replica, tmp_path: Path) -> None:
    [(digest, size)] = chunks_of(holder, ["f1.bin"])
    requests: list[int] = []

    async def fetch(peer: PeerSession) -> None:
        waiting = asyncio.ensure_future(peer.chunks([(digest, size)]))
        await asyncio.sleep(0)  # it has asked (the request may or may not be out yet)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert peer.load == len(peer.pending)  # no chunk waits; only an answer may be owed

    await fetching(holder, tmp_path, fetch, requests)
    assert requests in ([], [1])
