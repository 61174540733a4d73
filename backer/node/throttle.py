"""Bandwidth limits of one node: every connection of every folder shares one send and one
receive budget, counted in bytes on the wire (after encryption).

`RateLimit` is a token bucket kept as "the moment the bytes already admitted will have been
sent" (no timer, no task): admitting `n` bytes moves that moment by `n / rate` and says how long
to wait, so concurrent links queue behind each other and the node's total stays at the rate.
`ThrottledLink` waits on it around a Link's reads and writes; a receiver that waits reads less,
and TCP's flow control slows the sender. Imports sync's Link only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from backer.sync.link import Link

__all__ = ["Limits", "RateLimit", "ThrottledLink"]

BURST_SECONDS = 0.05  # how far ahead of the rate a quiet link may run (a small burst)
MIN_BURST = 64 * 1024  # ...but at least one read's worth, or tiny rates would stall a read


class RateLimit:
    """`rate` bytes a second, shared by every caller of `take`."""

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("a rate limit is a positive number of bytes a second")
        self.rate = rate
        self.burst = max(MIN_BURST, rate * BURST_SECONDS)
        self.clock = clock
        self.sleep = sleep
        self._free_at = float("-inf")  # when everything admitted so far is through

    def admit(self, size: int, now: float) -> float:
        """Admit `size` bytes at `now`; the seconds to wait before moving them."""
        self._free_at = max(self._free_at, now - self.burst / self.rate) + size / self.rate
        return max(0.0, self._free_at - now)

    async def take(self, size: int) -> None:
        wait = self.admit(size, self.clock())
        if wait > 0:
            await self.sleep(wait)


@dataclass(frozen=True, slots=True)
class Limits:
    """The node's send and receive limits (None: unlimited)."""

    send: RateLimit | None = None
    receive: RateLimit | None = None

    @classmethod
    def per_second(cls, send: int, receive: int) -> Limits:
        """From bytes a second; 0 is no limit."""
        return cls(
            send=RateLimit(send) if send > 0 else None,
            receive=RateLimit(receive) if receive > 0 else None,
        )

    def wrap(self, link: Link) -> Link:
        if self.send is None and self.receive is None:
            return link
        return ThrottledLink(link, self)


class ThrottledLink:
    """A Link whose reads and writes keep within the node's limits."""

    def __init__(self, link: Link, limits: Limits) -> None:
        self._link = link
        self._limits = limits

    async def read(self) -> bytes:
        data = await self._link.read()
        if data and self._limits.receive is not None:
            await self._limits.receive.take(len(data))  # the next read waits: TCP slows them
        return data

    async def write(self, data: bytes) -> None:
        if self._limits.send is not None:
            await self._limits.send.take(len(data))
        await self._link.write(data)

    async def close(self) -> None:
        await self._link.close()
