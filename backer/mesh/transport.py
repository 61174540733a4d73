"""TCP for the mesh: dial a folder's peer, accept connections for any hosted folder.

`dial` opens a connection and sends the folder preface (`mesh.preface`); `Listener` accepts,
reads a preface, and hands the connection to whoever hosts the folder it names. Everything after
the preface is the encrypted channel's business. Imports sync.link and mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable

from backer.addresses import format_address, parse_address
from backer.mesh.preface import NONCE_SIZE, PREFACE_SIZE, make_preface, match_preface
from backer.sync.link import Link, StreamLink

__all__ = ["DIAL_TIMEOUT", "Listener", "PrefixedLink", "dial", "peer_address", "read_preface"]

DIAL_TIMEOUT = 5.0
PREFACE_TIMEOUT = 5.0

Accept = Callable[[bytes, Link, str], Awaitable[None]]


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
    link: Link, folders: list[bytes], *, timeout: float = PREFACE_TIMEOUT
) -> tuple[bytes, Link] | None:
    """The folder a new connection's preface names and the link to go on with; None (the link
    closed) if it names none of `folders`, is not a preface, or is not sent in time."""
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
        await _close(link)
        return None
    return folder, PrefixedLink(link, data[PREFACE_SIZE:])


class Listener:
    """Accepts TCP connections on `address` and passes each to `accept(discovery_id, link,
    remote_address)` for the folder its preface names; others are closed unanswered."""

    def __init__(self, address: str, folders: Callable[[], list[bytes]], accept: Accept) -> None:
        self.address = address
        self._folders = folders
        self._accept = accept
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
        self._handlers.add(task)
        _tune(writer)
        link = StreamLink(reader, writer)
        try:
            remote = peer_address(link)
            found = await read_preface(link, self._folders())
            if found is not None:
                await self._accept(found[0], found[1], remote)
        finally:
            self._handlers.discard(task)


def _tune(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _close(link: Link) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        await link.close()
