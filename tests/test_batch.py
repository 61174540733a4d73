"""ThreadBatcher: many submissions, few thread hops, each caller gets its own result."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from backer.sync.batch import ThreadBatcher


async def test_items_submitted_together_run_in_one_call_off_the_loop() -> None:
    loop_thread = threading.get_ident()
    calls: list[list[int]] = []

    def work(items: Sequence[int]) -> list[int | BaseException]:
        assert threading.get_ident() != loop_thread
        calls.append(list(items))
        return [item * 2 for item in items]

    batcher: ThreadBatcher[int, int] = ThreadBatcher(work, max_items=100)
    assert await asyncio.gather(*(batcher.submit(i) for i in range(10))) == [
        i * 2 for i in range(10)
    ]
    assert calls == [list(range(10))]


async def test_a_batch_is_capped_and_what_arrives_meanwhile_forms_the_next() -> None:
    started, release = threading.Event(), threading.Event()
    calls: list[list[int]] = []

    def work(items: Sequence[int]) -> list[int | BaseException]:
        calls.append(list(items))
        started.set()
        release.wait(10)
        return list(items)

    batcher: ThreadBatcher[int, int] = ThreadBatcher(work, max_items=3)
    first = [asyncio.ensure_future(batcher.submit(i)) for i in range(4)]
    assert await asyncio.to_thread(started.wait, 10)
    later = [asyncio.ensure_future(batcher.submit(i)) for i in range(4, 6)]
    release.set()
    assert await asyncio.gather(*first, *later) == list(range(6))
    assert calls == [[0, 1, 2], [3, 4, 5]]


async def test_one_item_failing_fails_only_its_caller() -> None:
    def work(items: Sequence[int]) -> list[int | BaseException]:
        return [ValueError(i) if i == 2 else i for i in items]

    batcher: ThreadBatcher[int, int] = ThreadBatcher(work, max_items=10)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
    assert results[:2] == [0, 1] and results[3] == 3
    assert isinstance(results[2], ValueError)


async def test_work_that_raises_fails_every_caller_of_its_batch_and_the_next_runs() -> None:
    def work(items: Sequence[int]) -> list[int | BaseException]:
        if 0 in items:
            raise OSError("disk gone")
        return list(items)

    batcher: ThreadBatcher[int, int] = ThreadBatcher(work, max_items=10)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(2)), return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results)
    assert await batcher.submit(5) == 5


def test_max_items_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        ThreadBatcher(list, max_items=0)


async def test_a_result_whose_caller_gave_up_is_released() -> None:
    started, release = threading.Event(), threading.Event()
    released: list[int] = []

    def work(items: Sequence[int]) -> list[int | BaseException]:
        started.set()
        release.wait(10)
        return list(items)

    batcher: ThreadBatcher[int, int] = ThreadBatcher(work, max_items=10, unclaimed=released.append)
    waiting = asyncio.ensure_future(batcher.submit(7))
    kept = asyncio.ensure_future(batcher.submit(8))
    assert await asyncio.to_thread(started.wait, 10)
    waiting.cancel()
    release.set()
    assert await kept == 8
    assert released == [7]
