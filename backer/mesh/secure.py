"""The encrypted channel as a Link: the asyncio pump around `backer.mesh.channel.Channel`.

    link = await secure(tcp_link, initiator=True, device_key=key, folder=folder_key)
    link.peer_device                         # the DeviceId the peer proved it holds
    await run_session(replica, link, ...)    # any Link user works unchanged

Only moves bytes and keeps time (handshake timeout, keepalives, idle timeout); every decision is
the Channel's. Imports errors, ids, keys, sync.link and mesh; never discovery.

Who can learn what: the responder's device key travels in message 2, encrypted under keys that
the folder's discovery ID (in the prologue) and the ephemerals decide, not the PSK (XXpsk3
mixes it in at message 3). So anyone holding the discovery ID, a members' secret, can learn a
responder's device key; without it, a dialler gets no further than the preface.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import NoReturn

import nacl.signing

from backer.errors import BackerError
from backer.ids import DeviceId
from backer.keys import FolderKey
from backer.mesh.channel import (
    HANDSHAKE_TIMEOUT,
    IDLE_TIMEOUT,
    KEEPALIVE,
    REKEY_AFTER,
    Channel,
    ChannelError,
    ChannelStats,
    Reason,
)
from backer.mesh.noise import CipherName
from backer.sync.link import Link

__all__ = ["SecureLink", "secure"]


async def secure(
    link: Link,
    *,
    initiator: bool,
    device_key: nacl.signing.SigningKey,
    folder: FolderKey,
    timeout: float = HANDSHAKE_TIMEOUT,
    keepalive: float | None = KEEPALIVE,
    idle: float | None = IDLE_TIMEOUT,
    ciphers: Sequence[CipherName] | None = None,
    rekey_after: int = REKEY_AFTER,
) -> SecureLink:
    """Run the handshake over `link` (its first bytes) and return the encrypted Link.

    Nothing of the folder is sent before the handshake completes and the peer has proved it
    holds the folder key and its device key. On any failure the link is closed and
    `ChannelError` says why (`.reason`). `rekey_after` is part of the protocol: both ends must
    use the same value (only tests change it). `ciphers` limits what we offer or accept
    (default: every cipher this machine runs).
    """
    channel = Channel(
        initiator=initiator,
        device_key=device_key,
        psk=folder.psk,
        discovery_id=folder.discovery_id,
        ciphers=ciphers,
        rekey_after=rekey_after,
    )
    try:
        async with asyncio.timeout(timeout):
            early = await _handshake(link, channel)
    except TimeoutError:
        await _close_quietly(link)
        raise ChannelError(
            f"the handshake timed out after {timeout:g} s", reason=Reason.TIMEOUT
        ) from None
    except ChannelError:
        await _close_quietly(link)
        raise
    except (ConnectionError, OSError) as exc:
        await _close_quietly(link)
        raise ChannelError(
            f"the connection failed during the handshake: {exc}", reason=Reason.CLOSED
        ) from exc
    except asyncio.CancelledError:
        await _close_quietly(link)  # a half-done handshake is of no use to anyone
        raise
    return SecureLink(link, channel, early=early, keepalive=keepalive, idle=idle)


async def _handshake(link: Link, channel: Channel) -> bytes:
    """Pump until the channel is established; return any application bytes that came with the
    last handshake record."""
    channel.start()
    await _flush(link, channel)
    early: list[bytes] = []
    while not channel.established:
        data = await link.read()
        try:
            if data:
                early.append(channel.receive_data(data))
            else:
                channel.receive_eof()
        except ChannelError:
            with contextlib.suppress(ConnectionError, OSError):
                await _flush(link, channel)  # the alert that tells the peer why
            raise
        await _flush(link, channel)
    return b"".join(early)


async def _flush(link: Link, channel: Channel) -> None:
    data = channel.data_to_send()
    if data:
        await link.write(data)


async def _close_quietly(link: Link) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        await link.close()


class SecureLink:
    """An established channel as a Link: `read`, `write`, `close`, plus who the peer is.

    `read()` returns decrypted bytes (b"" once the peer's stream ended cleanly) and raises
    `ChannelError` on a tampered, truncated or malformed record, or when nothing (not even a
    keepalive) arrived for `idle` seconds; the link is closed by then. While open, an empty
    record goes out after `keepalive` seconds without a write. That timer is a task this object
    owns: `close()` (which `run_session` calls) ends it.
    """

    def __init__(
        self,
        link: Link,
        channel: Channel,
        *,
        early: bytes = b"",
        keepalive: float | None = KEEPALIVE,
        idle: float | None = IDLE_TIMEOUT,
    ) -> None:
        if not channel.established:
            raise BackerError("a SecureLink needs an established channel")
        peer_key = channel.peer_key
        assert peer_key is not None
        self.peer_key = peer_key
        self.peer_device = DeviceId.from_public_key(peer_key)
        self._link = link
        self._channel = channel
        self._early = early
        self._idle = idle
        self._keepalive = keepalive
        self._loop = asyncio.get_running_loop()
        self._last_sent = self._last_received = self._loop.time()
        self._write_lock = asyncio.Lock()
        self._error: ChannelError | None = None
        self._eof = False
        self._closed = False
        self._keepalive_task: asyncio.Task[None] | None = None
        if keepalive is not None:
            self._keepalive_task = self._loop.create_task(self._send_keepalives(keepalive))

    @property
    def cipher(self) -> CipherName:
        cipher = self._channel.cipher
        assert cipher is not None
        return cipher

    @property
    def handshake_hash(self) -> bytes:
        """Equal on both ends of one channel, unique to it: for channel binding."""
        return self._channel.handshake_hash

    @property
    def stats(self) -> ChannelStats:
        return self._channel.stats

    async def read(self) -> bytes:
        if self._early:
            data, self._early = self._early, b""
            return data
        while True:
            if self._error is not None:
                raise self._error
            if self._eof or self._closed:
                return b""
            try:
                if self._idle is None:
                    data = await self._link.read()
                else:
                    async with asyncio.timeout_at(self._last_received + self._idle):
                        data = await self._link.read()
            except TimeoutError:
                await self._fail(
                    ChannelError(
                        f"idle timeout: nothing from the peer for {self._idle:g} s",
                        reason=Reason.IDLE,
                    )
                )
            self._last_received = self._loop.time()
            try:
                if not data:
                    self._eof = True
                    self._channel.receive_eof()
                    return b""
                plaintext = self._channel.receive_data(data)
            except ChannelError as exc:
                await self._fail(exc)
            if plaintext:
                return plaintext

    async def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise ChannelError("the channel is closed", reason=Reason.LOCAL)
        if not data:
            return
        async with self._write_lock:
            try:
                records = self._channel.seal_records(bytes(data))
            except ChannelError as exc:
                await self._fail(exc)
            self._last_sent = self._loop.time()
            for record in records:  # one write each: no megabyte-sized join
                await self._link.write(record)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._shutdown()

    async def _send_keepalives(self, interval: float) -> None:
        try:
            while True:
                wait = self._last_sent + interval - self._loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                async with self._write_lock:
                    if self._last_sent + interval > self._loop.time():
                        continue  # a write went out while we waited for the lock
                    self._last_sent = self._loop.time()
                    await self._link.write(self._channel.seal(b""))
        except (ConnectionError, OSError):
            return  # the link is gone: read() reports how it ended
        except ChannelError as exc:
            if self._error is None:
                self._error = exc

    async def _fail(self, error: ChannelError) -> NoReturn:
        if self._error is None:
            self._error = error
        await self._shutdown()
        raise self._error

    async def _shutdown(self) -> None:
        task, self._keepalive_task = self._keepalive_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait([task])
        await _close_quietly(self._link)

    def __repr__(self) -> str:
        return f"SecureLink({self.cipher}, peer={self.peer_device})"
