"""TCP for the mesh: dial a folder's peer, accept connections for any hosted folder.

`dial` opens a connection and sends the folder preface (`mesh.preface`); `Listener` accepts,
reads a preface, and hands the connection to whoever hosts the folder it names. Connections
still waiting for their preface are capped per source address and in total, below the process's
file-descriptor limit: past a cap, a new one is closed at once. Everything after the preface is
the encrypted channel's business. Imports sync.link and mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
from collections import Counter
from collections.abc import Awaitable, Callable

from backer.addresses import format_address, parse_address
from backer.mesh.preface import MAGIC, NONCE_SIZE, PREFACE_SIZE, make_preface, match_preface
from backer.sync.link import Link, StreamLink

__all__ = [
    "DIAL_TIMEOUT",
    "PENDING_PER_SOURCE",
    "Listener",
    "PrefixedLink",
    "dial",
    "peer_address",
    "pending_limit",
    "read_preface",
]

DIAL_TIMEOUT = 5.0
PREFACE_TIMEOUT = 5.0
PENDING_PER_SOURCE = 32  # connections from one address still waiting for their preface
PENDING_MAX = 512  # ... from all addresses, at most (see `pending_limit`)

Accept = Callable[[bytes, Link, str], Awaitable[None]]
Refused = Callable[[str], None]  # told why, once per burst of refused connections


class PrefixedLink:
    """A Link whose first read returns bytes already read from it (past the preface)."""

    def __init__(self, link: Link, first: bytes) -> None:
        self._link = link
        self._first = first

    async def read(self) -> bytes:
        if self._first:
            data, self._first = self._first, b""
            return data
        return await self._link.read()

    async def write(self, data: bytes) -> None:
        await self._link.write(data)

    async def close(self) -> None:
        await self._link.close()


async def dial(address: str, discovery_id: bytes, *, timeout: float = DIAL_TIMEOUT) -> Link:
    """Connect to `address` for the folder `discovery_id`; OSError if it cannot be reached."""
    host, port = parse_address(address)
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
    _tune(writer)
    link = StreamLink(reader, writer)
    try:
        await link.write(make_preface(discovery_id, os.urandom(NONCE_SIZE)))
    except BaseException:
        await link.close()
        raise
    return link


def peer_address(link: Link) -> str:
    """`host:port` of the far end of a TCP link ("" when it is not one)."""
    remote = link.remote() if isinstance(link, StreamLink) else None
    return "" if remote is None else format_address(*remote)


async def read_preface(
    link: Link,
    folders: list[bytes],
    *,
    timeout: float = PREFACE_TIMEOUT,
    unknown: Callable[[], None] = lambda: None,
) -> tuple[bytes, Link] | None:
    """The folder a new connection's preface names and the link to go on with; None (the link
    closed) if it names none of `folders`, is not a preface, or is not sent in time. `unknown`
    is called for a well-formed preface that names none of them: a backer with another key."""
    data = b""
    try:
        async with asyncio.timeout(timeout):
            while len(data) < PREFACE_SIZE:
                more = await link.read()
                if not more:
                    break
                data += more
    except (TimeoutError, ConnectionError, OSError):
        pass
    folder = match_preface(data[:PREFACE_SIZE], folders)
    if folder is None:
        if len(data) >= PREFACE_SIZE and data.startswith(MAGIC):
            unknown()
        await _close(link)
        return None
    return folder, PrefixedLink(link, data[PREFACE_SIZE:])


def pending_limit() -> int:
    """How many connections may wait for their preface at once: PENDING_MAX, or a quarter of
    the file descriptors this process may open, whichever is less (the rest are for peers,
    folders and their indexes)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return PENDING_MAX
    return max(1, min(PENDING_MAX, soft // 4))


class Listener:
    """Accepts TCP connections on `address` and passes each to `accept(discovery_id, link,
    remote_address)` for the folder its preface names; others are closed unanswered. Past
    `per_source` connections from one address, or `total` from all, waiting for a preface, a
    new one is closed at once and `refused` is told (once until the crowd thins out).
    `unknown(source host)` hears of each backer preface naming none of the folders."""

    def __init__(
        self,
        address: str,
        folders: Callable[[], list[bytes]],
        accept: Accept,
        *,
        refused: Refused = lambda _: None,
        unknown: Refused = lambda _: None,
        per_source: int = PENDING_PER_SOURCE,
        total: int | None = None,
    ) -> None:
        self.address = address
        self._folders = folders
        self._accept = accept
        self._refused = refused
        self._unknown = unknown
        self._per_source = per_source
        self._total = pending_limit() if total is None else total
        self._pending: Counter[str] = Counter()  # source host -> connections before the preface
        self._refusing: set[str] = set()  # sources (and "" for all) told about, not yet relieved
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._bound = ""

    @property
    def bound(self) -> str:
        """The address actually listened on (the real port when asked for port 0); still the
        same once stopped, as the status written while the node shuts down names it (reading
        it from a closed server's sockets raised IndexError, and the node exited 1)."""
        if not self._bound:
            raise RuntimeError("the listener has not started")
        return self._bound

    async def start(self) -> None:
        host, port = parse_address(self.address)
        self._server = await asyncio.start_server(self._on_connection, host, port)
        bound_host, bound_port = self._server.sockets[0].getsockname()[:2]
        self._bound = format_address(str(bound_host), int(bound_port))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers)

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        link = StreamLink(reader, writer)
        remote = peer_address(link)
        source = _host(writer)
        if not self._admit(source, remote):
            writer.transport.abort()  # no goodbye: it costs nothing, and it was not asked for
            return
        self._handlers.add(task)
        _tune(writer)
        try:
            try:
                found = await read_preface(
                    link, self._folders(), unknown=lambda: self._unknown(source)
                )
            finally:
                self._release(source)
            if found is not None:
                await self._accept(found[0], found[1], remote)
        finally:
            self._handlers.discard(task)

    def _admit(self, source: str, remote: str) -> bool:
        if self._pending[source] >= self._per_source:
            self._refuse(source, f"{self._per_source} connections from {source} wait already")
            return False
        if self._pending.total() >= self._total:
            self._refuse("", f"{self._total} connections wait already")
            return False
        self._pending[source] += 1
        return True

    def _refuse(self, key: str, why: str) -> None:
        if key not in self._refusing:
            self._refusing.add(key)
            self._refused(
                f"refusing connections before their preface: {why} "
                "(closed at once until fewer wait)"
            )

    def _release(self, source: str) -> None:
        self._pending[source] -= 1
        if self._pending[source] <= 0:
            del self._pending[source]
        if self._pending[source] < self._per_source:
            self._refusing.discard(source)
        if self._pending.total() < self._total:
            self._refusing.discard("")


def _host(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


def _tune(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _close(link: Link) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        await link.close()
