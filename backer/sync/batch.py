"""One worker-thread hop for many items: `ThreadBatcher` gathers the items submitted while its
worker is busy (or in the same turn of the event loop) and hands them to one call in a thread.

Disk work per pulled file (opening a temp file, sealing and swapping it in) costs a thread hop
each, and an fsync each: with thousands of small files the hops and barriers, not the bytes,
set the pace (STYLE.md 17). Callers still await their own item's result; one item's failure is
its caller's alone. Imports nothing of backer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["ThreadBatcher"]

_T = TypeVar("_T")
_R = TypeVar("_R")


class ThreadBatcher(Generic[_T, _R]):
    """`await submit(item)` -> `work([... item ...])[i]`, with `work` run in a worker thread
    over up to `max_items` items at a time. `work` returns one result per item, in order: a
    value, or the exception that item's caller gets. A value whose caller gave up meanwhile
    (cancelled) goes to `unclaimed`, to release what it holds (an open file, say)."""

    def __init__(
        self,
        work: Callable[[Sequence[_T]], Sequence[_R | BaseException]],
        max_items: int,
        *,
        unclaimed: Callable[[_R], None] = lambda _: None,
    ) -> None:
        if max_items < 1:
            raise ValueError("max_items must be positive")
        self._work = work
        self._unclaimed = unclaimed
        self._max_items = max_items
        self._queue: list[tuple[_T, asyncio.Future[_R]]] = []
        self._runner: asyncio.Task[None] | None = None
        self.batches = 0  # calls of `work` so far

    async def submit(self, item: _T) -> _R:
        future: asyncio.Future[_R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        await asyncio.sleep(0)  # the items submitted in this turn of the loop join the batch
        while self._queue:
            batch = self._queue[: self._max_items]
            del self._queue[: self._max_items]
            live = [(item, future) for item, future in batch if not future.cancelled()]
            if not live:
                continue
            self.batches += 1
            try:
                results = await asyncio.to_thread(self._work, [item for item, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(f"{len(results)} results for {len(live)} items")
            except BaseException as exc:
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for (_, future), result in zip(live, results, strict=True):
                if future.done():
                    if not isinstance(result, BaseException):
                        self._unclaimed(result)
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
