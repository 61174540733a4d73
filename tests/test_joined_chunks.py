"""Small runs asked within a moment of each other go out as one fetch, and each caller gets
exactly its own chunks back."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from backer.ids import Hash
from backer.protocol.messages import MAX_BATCH_CHUNKS
from backer.sync.joined import JoinedChunks


class Recording:
    def __init__(self, have: set[Hash] | None = None, fail: Exception | None = None) -> None:
        self.calls: list[list[tuple[Hash, int]]] = []
        self.have = have
        self.fail = fail

    async def nodes(self, hashes: Sequence[Hash]) -> dict[Hash, bytes]:
        raise NotImplementedError

    async def entries(self, wanted: Sequence[tuple[str, Hash]]) -> list[object]:
        raise NotImplementedError

    async def groups(self, hashes: Sequence[Hash]) -> dict[Hash, bytes]:
        raise NotImplementedError

    async def chunks(self, wanted: Sequence[tuple[Hash, int]]) -> dict[Hash, bytes]:
        self.calls.append(list(wanted))
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        return {d: bytes(n) for d, n in wanted if self.have is None or d in self.have}


def digest(i: int) -> Hash:
    return Hash(i.to_bytes(32, "big"))


async def test_runs_asked_together_are_one_fetch_and_each_gets_its_own() -> None:
    fetcher = Recording(have={digest(i) for i in range(10) if i != 7})
    joined = JoinedChunks(fetcher)  # type: ignore[arg-type]
    asks = [[(digest(i), 100 + i)] for i in range(10)] + [[(digest(1), 101), (digest(2), 102)]]
    answers = await asyncio.gather(*(joined.chunks(ask) for ask in asks))
    assert len(fetcher.calls) == 1 and len(fetcher.calls[0]) == 10  # asked once each
    for ask, got in zip(asks, answers, strict=True):
        assert got == {d: bytes(n) for d, n in ask if d != digest(7)}


async def test_a_joined_fetch_carries_no_more_than_one_request_may() -> None:
    fetcher = Recording()
    joined = JoinedChunks(fetcher)  # type: ignore[arg-type]
    asks = [[(digest(i), 10)] for i in range(MAX_BATCH_CHUNKS + 5)]
    asks += [[(digest(10_000 + i), 300_000)] for i in range(5)]  # 1.5 MB
    await asyncio.gather(*(joined.chunks(ask) for ask in asks))
    assert all(len(call) <= MAX_BATCH_CHUNKS for call in fetcher.calls)
    assert all(sum(n for _, n in call) <= 1024 * 1024 for call in fetcher.calls)
    assert sum(len(call) for call in fetcher.calls) == len(asks)


async def test_a_failed_fetch_fails_its_callers_and_a_cancelled_caller_leaves_the_rest() -> None:
    failing = JoinedChunks(Recording(fail=ConnectionResetError("gone")))  # type: ignore[arg-type]
    results = await asyncio.gather(
        *(failing.chunks([(digest(i), 1)]) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, ConnectionResetError) for r in results)
    fetcher = Recording()
    joined = JoinedChunks(fetcher)  # type: ignore[arg-type]
    leaving = asyncio.ensure_future(joined.chunks([(digest(1), 1)]))
    staying = asyncio.ensure_future(joined.chunks([(digest(2), 2)]))
    await asyncio.sleep(0)
    leaving.cancel()
    assert await staying == {digest(2): bytes(2)}
    with pytest.raises(asyncio.CancelledError):
        await leaving
