"""A peer session over any Link: answers the peer's requests and pulls what it has newer.

The pump is short and makes no protocol decisions (STYLE.md 1): bytes from the link go into the
sans-IO `protocol.session.Session`; its events become answers (read from the replica in worker
threads), resolved request futures (for the puller), or the end of the session. It implements
`pull.Fetcher` for the pulls it starts. Imports protocol and sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from backer.errors import RemoteProtocolError
from backer.ids import DeviceId, Hash
from backer.protocol import session as proto
from backer.protocol.messages import RemoteEntry
from backer.sync.link import Link
from backer.sync.pull import PeerMovedOn, PullReport, pull
from backer.sync.replica import Replica

__all__ = ["SessionResult", "run_session"]

ANSWERS_IN_FLIGHT = 64  # answers being read from disk at once
BATCHES_IN_FLIGHT = 16  # our batch requests open at once (+ the pull's chunk window of 64)
_PEER_WORKING = (
    proto.NodesRequested,
    proto.EntriesRequested,
    proto.GroupsRequested,
    proto.ChunkRequested,
)
# A one-shot session whose pulls stop making progress gives up after this many quiet seconds
# (a path the peer has that cannot be applied here, for instance), instead of waiting forever.
STUCK_AFTER = 5.0


@dataclass(slots=True)
class SessionResult:
    reason: str = ""  # why the session ended ("in sync", "peer closed", a protocol violation...)
    clean: bool = True  # False when it ended on an error
    pulls: list[PullReport] = field(default_factory=list)
    local_root: Hash | None = None
    peer_root: Hash | None = None
    peer_device: DeviceId | None = None  # proved by the encrypted channel, when there is one

    @property
    def in_sync(self) -> bool:
        return self.local_root is not None and self.local_root == self.peer_root


class _Ended(Exception):
    """Unwinds the session's task group once the session is over."""


async def run_session(
    replica: Replica,
    link: Link,
    *,
    device: bytes,
    folder: bytes,
    until_in_sync: bool = False,
    stuck_after: float = STUCK_AFTER,
) -> SessionResult:
    """Run one session until the peer leaves, something fails, or (with `until_in_sync`) both
    sides hold the same root and nothing is in flight; then close the link."""
    peer = _Peer(replica, link, device=device, folder=folder, until_in_sync=until_in_sync)
    peer.stuck_after = stuck_after
    try:
        await peer.run()
    finally:
        with contextlib.suppress(OSError, ConnectionError):
            await link.close()
    peer.result.local_root = replica.root
    peer.result.peer_root = peer.peer_root
    return peer.result


class _Peer:
    def __init__(
        self, replica: Replica, link: Link, *, device: bytes, folder: bytes, until_in_sync: bool
    ) -> None:
        self.replica = replica
        self.link = link
        self.until_in_sync = until_in_sync
        self.session = proto.Session(device=device, folder=folder, root=replica.root)
        self.result = SessionResult()
        self.peer_root: Hash | None = None
        self.wake = asyncio.Event()  # the peer's root, our root or a pull's state changed
        self.pulling = False
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.write_lock = asyncio.Lock()
        self.answers = asyncio.Semaphore(ANSWERS_IN_FLIGHT)
        self.batches = asyncio.Semaphore(BATCHES_IN_FLIGHT)
        self.chunk_asks: list[tuple[int, Hash, int]] = []
        self.root_event = replica.watch_root()
        self.stuck_after = STUCK_AFTER

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                self.tasks = tasks
                await self._send(self.session.start())
                tasks.create_task(self._read())
                tasks.create_task(self._steer())
        except* _Ended:
            pass
        except* (RemoteProtocolError, ConnectionError, OSError) as group:
            if not self.result.reason:
                self.result.reason, self.result.clean = str(group.exceptions[0]), False
        finally:
            self.replica.unwatch_root(self.root_event)
            for future in self.pending.values():
                future.cancel()

    # -- the pump ------------------------------------------------------------------------------

    async def _read(self) -> None:
        while True:
            data = await self.link.read()
            if not data:
                self.session.receive_eof()
            else:
                self.session.receive_data(data)
            while (event := self.session.next_event()) is not None:
                await self._handle(event)
            if self.chunk_asks:
                asks, self.chunk_asks = self.chunk_asks, []
                self.tasks.create_task(self._answer_chunks(asks))
            await self._flush()
            if not data:
                self._end(
                    self.result.reason or "the peer went away", clean=bool(self.result.reason)
                )

    async def _handle(self, event: proto.Event) -> None:
        if isinstance(event, _PEER_WORKING):
            self.wake.set()  # the peer is pulling from us: a one-shot session is not stuck
        match event:
            case proto.PeerHello(root=root) | proto.PeerRoot(root=root):
                self.peer_root = root
                self.wake.set()
            case proto.NodesRequested(id=rid, hashes=hashes):
                await self._answer(rid, self.replica.read_nodes, hashes, self.session.answer_nodes)
            case proto.EntriesRequested(id=rid, wanted=wanted):
                await self._answer(
                    rid, self.replica.read_entries, wanted, self.session.answer_entries
                )
            case proto.GroupsRequested(id=rid, hashes=hashes):
                await self._answer(
                    rid, self.replica.read_groups, hashes, self.session.answer_groups
                )
            case proto.ChunkRequested(id=rid, hash=digest, size=size):
                self.chunk_asks.append((rid, digest, size))  # answered in batches, see _read
            case (
                proto.NodesReceived(id=rid)
                | proto.EntriesReceived(id=rid)
                | proto.GroupsReceived(id=rid)
                | proto.ChunkReceived(id=rid)
            ):
                future = self.pending.pop(rid, None)
                if future is not None and not future.done():
                    future.set_result(event)
            case proto.ConnectionLost(reason=reason):
                self._end(self.result.reason or f"the connection ended: {reason}", clean=False)
            case proto.PeerClosed(reason=reason):
                self._end(f"the peer closed the session: {reason}", clean=True)
            case proto.PeerError(code=code, text=text):
                self._end(f"the peer reported error {code}: {text}", clean=False)
            case proto.ProtocolViolation(reason=reason):
                await self._flush()  # the session queued an Error frame for the peer
                self._end(f"protocol violation by the peer: {reason}", clean=False)

    async def _answer(
        self,
        rid: int,
        read: Callable[[Any], list[Any]],
        wanted: Any,
        encode: Callable[[int, Any], bytes],
    ) -> None:
        async def answer() -> None:
            async with self.answers:
                values = await asyncio.to_thread(read, wanted)
                if self.session.state is proto.State.OPEN:  # else the peer left meanwhile
                    await self._send(encode(rid, values))

        # The reader never waits for an answer to be sent: when both peers answer each other
        # and neither reads, TCP buffers fill and both stall. The Session caps how many
        # requests a peer may leave unanswered, which bounds these tasks.
        self.tasks.create_task(answer())

    async def _answer_chunks(self, asks: list[tuple[int, Hash, int]]) -> None:
        """Read every chunk asked in one arrival of bytes with one hop to a worker thread."""
        async with self.answers:
            found = await asyncio.to_thread(
                self.replica.read_chunks, [(digest, size) for _, digest, size in asks]
            )
            if self.session.state is proto.State.OPEN:
                await self._send(
                    b"".join(
                        self.session.answer_chunk(rid, data)
                        for (rid, _, _), data in zip(asks, found, strict=True)
                    )
                )

    async def _send(self, data: bytes) -> None:
        if data:
            async with self.write_lock:
                await self.link.write(data)

    async def _flush(self) -> None:
        await self._send(self.session.data_to_send())

    def _end(self, reason: str, *, clean: bool) -> None:
        if not self.result.reason:
            self.result.reason, self.result.clean = reason, clean
        raise _Ended

    # -- steering: when to pull, when to announce, when to stop --------------------------------

    async def _steer(self) -> None:
        announced = self.replica.root
        fruitless: tuple[Hash, Hash] | None = None  # (peer root, our root) a pull could not move
        while True:
            if self.root_event.is_set():
                self.root_event.clear()
                if self.replica.root != announced:
                    announced = self.replica.root
                    await self._send(self.session.announce_root(announced))
            target, local = self.peer_root, self.replica.root
            if target is not None and target != local and (target, local) != fruitless:
                try:
                    self.result.pulls.append(await pull(self.replica, self, target))
                except PeerMovedOn:
                    fruitless = (target, local)  # wait for the peer's next root
                else:
                    if self.replica.root == local:
                        fruitless = (target, local)
                continue
            if self.until_in_sync and target is not None and target == local:
                await self._send(self.session.close("in sync"))
                self._end("in sync", clean=True)
            stuck = self.until_in_sync and fruitless == (target, local)
            if not await self._wait(self.stuck_after if stuck else None) and stuck:
                errors = [e for report in self.result.pulls for e in report.errors]
                await self._send(self.session.close("not in sync"))
                self._end(f"not in sync: no progress ({len(errors)} paths failed)", clean=False)

    async def _wait(self, timeout: float | None) -> bool:
        """Wait until the peer's root, ours, or a pull changes; False if `timeout` passed."""
        waits = [
            asyncio.ensure_future(self.wake.wait()),
            asyncio.ensure_future(self.root_event.wait()),
        ]
        try:
            done, _ = await asyncio.wait(
                waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiting in waits:
                waiting.cancel()
        self.wake.clear()
        return bool(done)

    # -- pull.Fetcher --------------------------------------------------------------------------

    async def _batch(self, make: Callable[[], tuple[int, bytes]]) -> Any:
        """A batch request, at most BATCHES_IN_FLIGHT at a time: a pull of a large tree must
        not leave more requests open than the peer's session allows."""
        async with self.batches:
            return await self._request(make())

    async def _request(self, request: tuple[int, bytes]) -> Any:
        """Send a request made by the session and wait for its verified answer event."""
        rid, data = request
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[rid] = future
        await self._send(data)
        return await future

    async def nodes(self, hashes: Sequence[Hash]) -> dict[Hash, bytes]:
        found: dict[Hash, bytes] = {}
        todo = list(hashes)
        while todo:
            event = await self._batch(functools.partial(self.session.request_nodes, todo))
            found.update(event.nodes)
            todo = list(event.unanswered)
        return found

    async def entries(self, wanted: Sequence[tuple[str, Hash]]) -> list[RemoteEntry]:
        found: list[RemoteEntry] = []
        todo = list(wanted)
        while todo:
            event = await self._batch(functools.partial(self.session.request_entries, todo))
            found.extend(event.entries)
            todo = list(event.unanswered)
        return found

    async def groups(self, hashes: Sequence[Hash]) -> dict[Hash, bytes]:
        found: dict[Hash, bytes] = {}
        todo = list(hashes)
        while todo:
            event = await self._batch(functools.partial(self.session.request_groups, todo))
            found.update(event.groups)
            todo = list(event.unanswered)
        return found

    async def chunk(self, digest: Hash, size: int) -> bytes | None:
        event = await self._request(self.session.request_chunk(digest, size))
        data: bytes | None = event.data
        return data
