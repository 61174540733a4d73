"""Links: the duplex byte streams a session runs over (TCP, an in-memory pipe, an encrypted
channel...). Anything with these three coroutines works.

Owns the `Link` protocol and two adapters: asyncio streams and an in-memory pipe. Imports
nothing from backer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Protocol

__all__ = ["Link", "StreamLink", "memory_pipe"]

READ_SIZE = 256 * 1024


class Link(Protocol):
    async def read(self) -> bytes:
        """The next bytes that arrived; b"" once the stream has ended."""
        ...

    async def write(self, data: bytes) -> None:
        """Send `data`, waiting while the other side is slow (backpressure)."""
        ...

    async def close(self) -> None: ...


class StreamLink:
    """A Link over an asyncio (reader, writer) pair, e.g. from `asyncio.open_connection`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self) -> bytes:
        try:
            return await self._reader.read(READ_SIZE)
        except ConnectionError:
            return b""

    async def write(self, data: bytes) -> None:
        if self._writer.is_closing():  # asyncio would drop the bytes and log a warning
            raise ConnectionResetError("the connection is closed")
        self._writer.write(data)
        await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()

    def remote(self) -> tuple[str, int] | None:
        """(host, port) of the far end, for a socket."""
        info = self._writer.get_extra_info("peername")
        return (str(info[0]), int(info[1])) if info else None


class _Direction:
    """One direction of a pipe: a bounded queue of writes that can be closed."""

    def __init__(self, depth: int) -> None:
        self.items: deque[bytes] = deque()
        self.depth = depth
        self.closed = False
        self.readable = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()

    async def put(self, data: bytes) -> None:
        while len(self.items) >= self.depth and not self.closed:
            self.writable.clear()
            await self.writable.wait()
        if self.closed:
            raise ConnectionResetError("the pipe is closed")
        self.items.append(data)
        self.readable.set()

    async def get(self) -> bytes:
        while not self.items and not self.closed:
            self.readable.clear()
            await self.readable.wait()
        if not self.items:
            return b""
        self.writable.set()
        return self.items.popleft()

    def close(self) -> None:
        self.closed = True
        self.readable.set()
        self.writable.set()


class _PipeEnd:
    def __init__(self, inbox: _Direction, outbox: _Direction) -> None:
        self._inbox = inbox
        self._outbox = outbox

    async def read(self) -> bytes:
        return await self._inbox.get()

    async def write(self, data: bytes) -> None:
        if data:
            await self._outbox.put(data)

    async def close(self) -> None:
        self._outbox.close()  # the peer reads what is queued, then the end of the stream
        self._inbox.close()
        self._inbox.items.clear()


def memory_pipe(depth: int = 64) -> tuple[Link, Link]:
    """Two connected in-memory Links; each direction holds at most `depth` writes in flight."""
    one, two = _Direction(depth), _Direction(depth)
    return _PipeEnd(one, two), _PipeEnd(two, one)
