"""The listener under a crowd of connections that never send their preface: past the cap per
source address, or in total, new ones are closed at once and the owner is told once; an honest
dial still gets through, and once the crowd leaves, everyone is admitted again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
from collections.abc import AsyncIterator

from backer.mesh.transport import Listener, dial, pending_limit
from backer.sync.link import Link

FOLDER = os.urandom(32)


class Accepted:
    def __init__(self) -> None:
        self.links: list[Link] = []
        self.told: list[str] = []
        self.arrived = asyncio.Event()

    async def accept(self, folder: bytes, link: Link, address: str) -> None:
        self.links.append(link)
        self.arrived.set()


@contextlib.asynccontextmanager
async def listening(per_source: int, total: int) -> AsyncIterator[tuple[Listener, Accepted]]:
    accepted = Accepted()
    listener = Listener(
        "127.0.0.1:0",
        lambda: [FOLDER],
        accepted.accept,
        refused=accepted.told.append,
        per_source=per_source,
        total=total,
    )
    await listener.start()
    try:
        yield listener, accepted
    finally:
        await listener.stop()


async def silent(address: str, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection from `source` (any 127/8 address is loopback) that never says a word."""
    host, port = address.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port), local_addr=(source, 0))


async def still_open(reader: asyncio.StreamReader) -> bool:
    try:
        await asyncio.wait_for(reader.read(1), 0.5)
    except TimeoutError:
        return True
    except ConnectionError:
        return False
    return False


async def closed_by_listener(reader: asyncio.StreamReader) -> bool:
    """Whether the listener hung up on this connection (within a generous bound)."""
    try:
        return await asyncio.wait_for(reader.read(1), 3.0) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def test_one_source_is_capped_and_others_still_get_in() -> None:
    async with listening(per_source=4, total=100) as (listener, accepted):
        crowd = [await silent(listener.bound, "127.0.0.2") for _ in range(10)]
        try:
            refused = [await closed_by_listener(r) for r, _ in crowd[4:]]
            assert all(refused)
            assert len(accepted.told) == 1 and "4 connections from 127.0.0.2" in accepted.told[0]
            honest = await dial(listener.bound, FOLDER)
            await asyncio.wait_for(accepted.arrived.wait(), 5.0)
            await honest.close()
            waiting = await asyncio.gather(*(still_open(r) for r, _ in crowd[:4]))
            assert all(waiting)  # the first four wait for their preface (5 s)
        finally:
            for _, w in crowd:
                w.close()


async def test_the_total_is_capped_and_freed_when_the_crowd_leaves() -> None:
    async with listening(per_source=100, total=6) as (listener, accepted):
        crowd = [await silent(listener.bound, f"127.0.0.{3 + n % 3}") for n in range(6)]
        late = await silent(listener.bound, "127.0.0.9")
        assert await closed_by_listener(late[0])
        assert len(accepted.told) == 1 and "6 connections wait" in accepted.told[0]
        for _, w in crowd:
            w.close()
        # As the crowd's connections end, the count falls and newcomers are admitted again.
        deadline = asyncio.get_running_loop().time() + 10
        while not accepted.links:
            assert asyncio.get_running_loop().time() < deadline, "never admitted again"
            link = await dial(listener.bound, FOLDER)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(accepted.arrived.wait(), 0.5)
            await link.close()


def test_the_total_stays_well_below_the_file_descriptor_limit() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert 1 <= pending_limit() <= max(1, soft // 4)
