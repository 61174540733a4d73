"""The node's event stream: every part emits into it, any number of readers follow it.

`emit` never blocks and never fails: each subscriber has a bounded queue, and a reader that
falls behind loses its oldest events (and is told how many), so a slow dashboard cannot stall
a transfer. Runs on the node's event loop. Imports events.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from backer.events import Event, to_json

__all__ = ["EventBus", "Subscription", "stamped_json"]

_E = TypeVar("_E")
RECENT = 256  # events kept for late readers (the dashboard's "recent changes")


class Subscription:
    """One reader's view of the stream: iterate it, or `await next()`."""

    def __init__(self, bus: EventBus, limit: int) -> None:
        self._bus = bus
        self._items: deque[tuple[float, Event]] = deque()
        self._limit = limit
        self._ready = asyncio.Event()
        self.dropped = 0
        self.closed = False

    def _put(self, stamped: tuple[float, Event]) -> None:
        if len(self._items) >= self._limit:
            self._items.popleft()
            self.dropped += 1
        self._items.append(stamped)
        self._ready.set()

    async def next_stamped(self) -> tuple[float, Event]:
        while not self._items:
            if self.closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    def take_ready(self) -> list[tuple[float, Event]]:
        """Every event already waiting, without waiting for more."""
        ready = list(self._items)
        self._items.clear()
        return ready

    async def next(self) -> Event:
        return (await self.next_stamped())[1]

    async def wait_for(self, matches: Callable[[Event], bool]) -> Event:
        """The next event that `matches` (the others are consumed): await a milestone."""
        while True:
            event = await self.next()
            if matches(event):
                return event

    async def next_of(self, kind: type[_E], matches: Callable[[_E], bool] = lambda _: True) -> _E:
        """The next event of type `kind` that `matches`."""
        while True:
            event = await self.next()
            if isinstance(event, kind) and matches(event):
                return event

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        return await self.next()

    def close(self) -> None:
        self.closed = True
        self._ready.set()
        self._bus._subscribers.discard(self)


class EventBus:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._subscribers: set[Subscription] = set()
        self.on_emit: Callable[[], None] | None = None  # told after every event
        self.recent: deque[tuple[float, Event]] = deque(maxlen=RECENT)

    def emit(self, event: Event) -> None:
        stamped = (self._clock(), event)
        self.recent.append(stamped)
        for subscriber in list(self._subscribers):
            subscriber._put(stamped)
        if self.on_emit is not None:
            self.on_emit()

    def subscribe(self, limit: int = 10_000) -> Subscription:
        subscription = Subscription(self, limit)
        self._subscribers.add(subscription)
        return subscription

    def close(self) -> None:
        for subscriber in list(self._subscribers):
            subscriber.close()


def stamped_json(stamped: tuple[float, Event]) -> dict[str, Any]:
    when, event = stamped
    return to_json(event, time=round(when, 3))
