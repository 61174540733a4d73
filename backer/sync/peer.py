"""A session with one peer over any Link: answers the peer's requests, gossips our root, and
fetches for pulls.

The pump is short and makes no protocol decisions (STYLE.md 1): bytes from the link go into the
sans-IO `protocol.session.Session`; its events become answers (read from the replica in worker
threads), resolved request futures, or the end of the session. `PeerSession` implements
`pull.Fetcher`; *when* to pull is its owner's decision: `run_session` pulls from this one peer,
the node's folder puller (`sync.swarm`) pulls from many at once. Imports protocol and sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from backer.errors import BackerError, RemoteProtocolError
from backer.ids import DeviceId, Hash
from backer.protocol import session as proto
from backer.protocol.messages import MAX_BATCH_CHUNKS, RemoteEntry
from backer.sync.fetcher import PeerMovedOn, PullReport
from backer.sync.link import Link
from backer.sync.pull import pull
from backer.sync.replica import Replica

__all__ = [
    "GOSSIP_EVERY",
    "PeerGone",
    "PeerSession",
    "SessionResult",
    "run_session",
    "wait_either",
]

# How a link can fail under a session: the socket (OSError, ConnectionError) or an encrypted
# channel over it that failed or was closed (a RemoteProtocolError, e.g. mesh.ChannelError).
LINK_FAILURES = (RemoteProtocolError, ConnectionError, OSError)
ANSWERS_IN_FLIGHT = 64  # answers being read from disk at once
BATCHES_IN_FLIGHT = 16  # our batch requests open at once, chunk requests included
# The chunks asked in one turn of the event loop travel in one GetChunks of at most this many
# bytes: large enough that a request's cost is spread over many chunks, small enough that
# several are in flight at once and the peer's disk, both ciphers and our writes overlap.
CHUNK_REQUEST_BYTES = 1024 * 1024
# While this many chunk requests are unanswered, chunks asked meanwhile wait until they fill a
# request or an answer comes (as Nagle's algorithm holds small segments): otherwise each answer
# frees room for only as many chunks as it carried, and requests shrink to a few chunks each.
CHUNK_REQUESTS_AHEAD = 2
GOSSIP_EVERY = 30.0  # seconds between re-announcements of an unchanged root (also a keepalive)
# A peer that leaves every one of our requests unanswered this long is stalled (or hostile): the
# session ends so its requests move to other peers and the pull waiting on them can finish. A
# working peer answers something far sooner: one 64 KiB chunk in 30 s is 2 kB/s.
ANSWER_WITHIN = 30.0
# A frame must arrive within this long of its first byte: a peer dripping a large frame a byte
# at a time would otherwise hold its buffer and its session for ever (8 MiB in 120 s is 70 KB/s;
# answers stop at 4 MiB, so 35 KB/s is enough).
FRAME_WITHIN = 120.0
_PEER_WORKING = (
    proto.NodesRequested,
    proto.EntriesRequested,
    proto.GroupsRequested,
    proto.ChunksRequested,
)
# A one-shot session whose pulls stop making progress gives up after this many quiet seconds
# (a path the peer has that cannot be applied here, for instance), instead of waiting forever.
STUCK_AFTER = 5.0


class PeerGone(BackerError):
    """The session ended while a request to its peer was open: ask someone else."""


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


Steer = Callable[["PeerSession"], Coroutine[Any, Any, None]]


async def run_session(
    replica: Replica,
    link: Link,
    *,
    device: bytes,
    folder: bytes,
    until_in_sync: bool = False,
    stuck_after: float = STUCK_AFTER,
) -> SessionResult:
    """Run one session, pulling from this peer whenever its root differs from ours, until the
    peer leaves, something fails, or (with `until_in_sync`) both sides hold the same root and
    nothing is in flight; then close the link."""
    peer = PeerSession(replica, link, device=device, folder=folder)
    steer = functools.partial(_pull_from_one, until_in_sync=until_in_sync, stuck_after=stuck_after)
    return await peer.run(steer)


class PeerSession:
    """One session's pump. `await run()` until it ends; meanwhile the owner may fetch through it
    (`nodes`, `entries`, `groups`, `chunk`), read `peer_root`, and is called back with
    `on_change(self)` whenever the peer's root changes or the session ends."""

    def __init__(
        self,
        replica: Replica,
        link: Link,
        *,
        device: bytes,
        folder: bytes,
        on_change: Callable[[PeerSession], None] | None = None,
        on_peers: Callable[[tuple[tuple[bytes, tuple[str, ...]], ...]], None] | None = None,
        gossip_every: float | None = None,
        expect_device: bytes | None = None,
        answer_within: float | None = ANSWER_WITHIN,
        frame_within: float | None = FRAME_WITHIN,
    ) -> None:
        self.replica = replica
        self.link = link
        self.session = proto.Session(
            device=device, folder=folder, root=replica.settled_root, peer_device=expect_device
        )
        self.result = SessionResult()
        self.peer_root: Hash | None = None
        self.peer_device: bytes | None = None  # as the peer's Hello says
        self.on_change = on_change
        self.on_peers = on_peers
        self.gossip_every = gossip_every
        self.answer_within = answer_within
        self.frame_within = frame_within
        self._frame_since: float | None = None  # when the frame now arriving began
        self.answered_at = 0.0  # when the peer last answered, or we began waiting on it
        self.wake = asyncio.Event()  # the peer's root changed, or it asked us for something
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.write_lock = asyncio.Lock()
        self.answers = asyncio.Semaphore(ANSWERS_IN_FLIGHT)
        self.batches = asyncio.Semaphore(BATCHES_IN_FLIGHT)
        # Chunks asked by `chunk()`: their waiters until answered, and those not yet requested.
        self._chunk_waiters: dict[Hash, list[asyncio.Future[bytes | None]]] = {}
        self._chunks_unsent: dict[Hash, int] = {}
        self._chunk_sender: asyncio.Task[None] | None = None
        self._chunk_requests_open = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self._root_event = replica.watch_root()
        self._ended = False
        self.announced = replica.settled_root  # the root our Hello carries

    @property
    def open(self) -> bool:
        return not self._ended and self.session.state is proto.State.OPEN

    @property
    def load(self) -> int:
        """Our requests this peer has not answered yet, each chunk asked counted."""
        return len(self.pending) + len(self._chunk_waiters)

    async def run(self, steer: Steer | None = None) -> SessionResult:
        """Pump until the session ends (with `steer(self)` running beside, if given); close the
        link; return how it went."""
        try:
            async with asyncio.TaskGroup() as tasks:
                self.tasks = tasks
                await self._send(self.session.start())
                tasks.create_task(self._read())
                tasks.create_task(self._gossip())
                if self.answer_within is not None:
                    tasks.create_task(self._watch_answers(self.answer_within))
                if steer is not None:
                    tasks.create_task(steer(self))
        except* _Ended:
            pass
        except* LINK_FAILURES as group:
            if not self.result.reason:
                self.result.reason, self.result.clean = str(group.exceptions[0]), False
        finally:
            self._ended = True
            self.replica.unwatch_root(self._root_event)
            gone = PeerGone(self.result.reason or "the session ended")
            waiting = [*self.pending.values()]
            waiting += [f for futures in self._chunk_waiters.values() for f in futures]
            for future in waiting:
                if not future.done():
                    future.set_exception(gone)
                    future.exception()  # retrieved here: nobody may be waiting any more
            self.pending.clear()
            self._chunk_waiters.clear()
            self._chunks_unsent.clear()
            with contextlib.suppress(*LINK_FAILURES):
                await self.link.close()
            if self.on_change is not None:
                self.on_change(self)
        self.result.local_root = self.replica.root
        self.result.peer_root = self.peer_root
        return self.result

    async def close(self, reason: str) -> None:
        """Say goodbye and end the session (from outside `run`)."""
        if self.open:
            with contextlib.suppress(*LINK_FAILURES):
                await self._send(self.session.close(reason))
        if not self.result.reason:
            self.result.reason, self.result.clean = reason, True
        with contextlib.suppress(*LINK_FAILURES):
            await self.link.close()

    def end(self, reason: str, *, clean: bool) -> NoReturn:
        """End the session from a task running inside `run` (a steer)."""
        if not self.result.reason:
            self.result.reason, self.result.clean = reason, clean
        raise _Ended

    async def send_close(self, reason: str) -> None:
        await self._send(self.session.close(reason))

    async def announce_peers(self, peers: Iterable[tuple[bytes, Iterable[str]]]) -> None:
        if self.open:
            await self._send(self.session.announce_peers(peers))

    # -- the pump ------------------------------------------------------------------------------

    async def _read(self) -> None:
        while True:
            data = await self._read_within_frame_bound()
            if not data:
                self.session.receive_eof()
            else:
                self.bytes_received += len(data)
                self.session.receive_data(data)
            while (event := self.session.next_event()) is not None:
                await self._handle(event)
            await self._flush()
            if not data:
                self.end(self.result.reason or "the peer went away", clean=bool(self.result.reason))

    async def _read_within_frame_bound(self) -> bytes:
        """The link's next bytes; the session ends if a frame begun takes too long to finish."""
        if self.frame_within is None or not self.session.partial_frame:
            self._frame_since = None
            return await self.link.read()
        loop = asyncio.get_running_loop()
        if self._frame_since is None:
            self._frame_since = loop.time()
        try:
            async with asyncio.timeout_at(self._frame_since + self.frame_within):
                return await self.link.read()
        except TimeoutError:
            self.end(
                f"a frame took over {self.frame_within:g} s to arrive "
                f"({self.session.partial_frame} bytes of it so far)",
                clean=False,
            )

    async def _handle(self, event: proto.Event) -> None:
        if isinstance(event, _PEER_WORKING):
            self.wake.set()  # the peer is pulling from us: a one-shot session is not stuck
        match event:
            case proto.PeerHello(root=root, device=device):
                self.peer_device = device
                self._peer_root_is(root)
            case proto.PeerRoot(root=root):
                self._peer_root_is(root)
            case proto.PeersAnnounced(peers=peers):
                if self.on_peers is not None:
                    self.on_peers(peers)
            case proto.NodesRequested(id=rid, hashes=hashes):
                await self._answer(rid, self.replica.read_nodes, hashes, self.session.answer_nodes)
            case proto.EntriesRequested(id=rid, wanted=wanted, inline=inline):
                read = functools.partial(self.replica.read_entries, inline=inline)
                await self._answer(rid, read, wanted, self.session.answer_entries)
            case proto.GroupsRequested(id=rid, hashes=hashes):
                await self._answer(
                    rid, self.replica.read_groups, hashes, self.session.answer_groups
                )
            case proto.ChunksRequested(id=rid, wanted=wanted):
                # read_chunks vouches for every chunk (sync/chunkread.py): no second hash.
                await self._answer(
                    rid, self.replica.read_chunks, wanted, self._answer_verified_chunks
                )
            case (
                proto.NodesReceived(id=rid)
                | proto.EntriesReceived(id=rid)
                | proto.GroupsReceived(id=rid)
                | proto.ChunksReceived(id=rid)
            ):
                future = self.pending.pop(rid, None)
                self.answered_at = asyncio.get_running_loop().time()
                if future is not None and not future.done():
                    future.set_result(event)
            case proto.ConnectionLost(reason=reason):
                self.end(self.result.reason or f"the connection ended: {reason}", clean=False)
            case proto.PeerClosed(reason=reason):
                self.end(f"the peer closed the session: {reason}", clean=True)
            case proto.PeerError(code=code, text=text):
                self.end(f"the peer reported error {code}: {text}", clean=False)
            case proto.ProtocolViolation(reason=reason):
                await self._flush()  # the session queued an Error frame for the peer
                self.end(f"protocol violation by the peer: {reason}", clean=False)

    def _peer_root_is(self, root: Hash) -> None:
        changed = root != self.peer_root
        self.peer_root = root
        self.wake.set()
        if changed and self.on_change is not None:
            self.on_change(self)

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

    def _answer_verified_chunks(self, rid: int, chunks: list[bytes | None]) -> bytes:
        return self.session.answer_chunks(rid, chunks, verified=True)

    async def _watch_answers(self, within: float) -> None:
        """End the session if the peer leaves our requests unanswered for `within` seconds
        (it may keep the connection alive all the while: the channel's keepalives say
        nothing about the session)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(within / 4)
            if self.pending and loop.time() - self.answered_at > within:
                self.end(
                    f"the peer stopped answering: {len(self.pending)} requests open for "
                    f"{within:g} s",
                    clean=False,
                )

    async def _gossip(self) -> None:
        """Announce our root when it changes, and every `gossip_every` seconds regardless: a
        peer that missed a change (or restarted its view of us) catches up, and the
        announcement doubles as the keepalive of an idle session."""
        while True:
            if self.gossip_every is None:
                await self._root_event.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.gossip_every):
                        await self._root_event.wait()
            self._root_event.clear()
            await self.announce_root(again=self.gossip_every is not None)

    async def announce_root(self, *, again: bool = False) -> None:
        """Send our settled root (`Replica.settled_root`) if the peer has not heard it yet
        (or `again`)."""
        root = self.replica.settled_root
        if (root != self.announced or again) and self.session.state is proto.State.OPEN:
            self.announced = root
            await self._send(self.session.announce_root(root))

    async def _send(self, data: bytes) -> None:
        if data:
            async with self.write_lock:
                await self.link.write(data)
                self.bytes_sent += len(data)

    async def _flush(self) -> None:
        await self._send(self.session.data_to_send())

    # -- pull.Fetcher --------------------------------------------------------------------------

    async def _batch(self, make: Callable[[], tuple[int, bytes]]) -> Any:
        """A batch request, at most BATCHES_IN_FLIGHT at a time: a pull of a large tree must
        not leave more requests open than the peer's session allows."""
        async with self.batches:
            return await self._request(make)

    async def _request(self, make: Callable[[], tuple[int, bytes]]) -> Any:
        """Send a request made by the session and wait for its verified answer event."""
        if not self.open:
            raise PeerGone(self.result.reason or "the session is not open")
        rid, data = make()
        loop = asyncio.get_running_loop()
        if not self.pending:
            self.answered_at = loop.time()  # the wait for an answer starts now
        future: asyncio.Future[Any] = loop.create_future()
        self.pending[rid] = future
        try:
            await self._send(data)
        except LINK_FAILURES as exc:  # the connection broke under us: ask someone else
            self.pending.pop(rid, None)
            raise PeerGone(f"the connection failed: {exc}") from exc
        return await future

    async def nodes(self, hashes: Sequence[Hash]) -> dict[Hash, bytes]:
        found: dict[Hash, bytes] = {}
        todo = list(hashes)
        while todo:
            event = await self._batch(functools.partial(self.session.request_nodes, todo))
            found.update(event.nodes)
            todo = list(event.unanswered)
        return found

    async def entries(
        self, wanted: Sequence[tuple[str, Hash]], *, inline: bool = True
    ) -> list[RemoteEntry]:
        found: list[RemoteEntry] = []
        todo = list(wanted)
        while todo:
            request = functools.partial(self.session.request_entries, todo, inline=inline)
            event = await self._batch(request)
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

    async def chunks(self, wanted: Sequence[tuple[Hash, int]]) -> dict[Hash, bytes]:
        """The chunks the peer has of these (hash, size) pairs. Every chunk asked while a
        request is being made, by any number of callers, travels in one GetChunks of up to
        CHUNK_REQUEST_BYTES (STYLE.md 17); a chunk already asked is not asked twice."""
        if not self.open:
            raise PeerGone(self.result.reason or "the session is not open")
        loop = asyncio.get_running_loop()
        asked: list[tuple[Hash, asyncio.Future[bytes | None]]] = []
        for digest, size in wanted:
            future: asyncio.Future[bytes | None] = loop.create_future()
            waiters = self._chunk_waiters.setdefault(digest, [])
            waiters.append(future)
            if len(waiters) == 1:
                self._chunks_unsent[digest] = size
            asked.append((digest, future))
        self._send_chunks_soon()
        try:
            answers = await asyncio.gather(*(future for _, future in asked))
        finally:
            for digest, future in asked:
                if future.cancelled():  # a hedged request another peer won: forget it
                    self._forget(digest, future)
        return {digest: data for (digest, _), data in zip(asked, answers, strict=True) if data}

    def _forget(self, digest: Hash, future: asyncio.Future[bytes | None]) -> None:
        waiters = self._chunk_waiters.get(digest)
        if waiters is None or future not in waiters:
            return
        waiters.remove(future)
        if not waiters:  # nobody wants it any more: unasked, it is not asked
            del self._chunk_waiters[digest]
            self._chunks_unsent.pop(digest, None)

    def _send_chunks_soon(self) -> None:
        if self._chunk_sender is None or self._chunk_sender.done():
            self._chunk_sender = self.tasks.create_task(self._send_chunk_requests())

    async def _send_chunk_requests(self) -> None:
        await asyncio.sleep(0)  # the other chunks asked in this turn of the loop join the batch
        while self._chunks_unsent:
            if (
                self._chunk_requests_open >= CHUNK_REQUESTS_AHEAD
                and len(self._chunks_unsent) < MAX_BATCH_CHUNKS
                and sum(self._chunks_unsent.values()) < CHUNK_REQUEST_BYTES
            ):
                return  # the next answer sends them, with whatever joined them by then
            batch: list[tuple[Hash, int]] = []
            total = 0
            for digest, size in self._chunks_unsent.items():
                if batch and (total + size > CHUNK_REQUEST_BYTES or len(batch) == MAX_BATCH_CHUNKS):
                    break
                batch.append((digest, size))
                total += size
            for digest, _ in batch:
                del self._chunks_unsent[digest]
            self._chunk_requests_open += 1
            self.tasks.create_task(self._fetch_chunks(batch))

    async def _fetch_chunks(self, batch: list[tuple[Hash, int]]) -> None:
        try:
            event = await self._batch(functools.partial(self.session.request_chunks, batch))
        except PeerGone as exc:
            for digest, _ in batch:
                self._settle(digest, exc)
            return
        finally:
            self._chunk_requests_open -= 1
            if self._chunks_unsent and self.open:
                self._send_chunks_soon()
        for digest, size in batch:
            if digest in event.chunks:
                self._settle(digest, event.chunks[digest])
            elif digest in event.missing:
                self._settle(digest, None)
            elif digest in self._chunk_waiters:  # beyond the answer's prefix: ask again
                self._chunks_unsent[digest] = size
                self._send_chunks_soon()

    def _settle(self, digest: Hash, outcome: bytes | BaseException | None) -> None:
        for future in self._chunk_waiters.pop(digest, []):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)


# -- one peer: pull whenever its root differs --------------------------------------------------


async def _pull_from_one(peer: PeerSession, *, until_in_sync: bool, stuck_after: float) -> None:
    replica = peer.replica
    changed = replica.watch_root()
    fruitless: tuple[Hash, Hash] | None = None  # (peer root, our root) a pull could not move
    try:
        while True:
            changed.clear()
            target, local = peer.peer_root, replica.root
            if target is not None and target != local and (target, local) != fruitless:
                if replica.has_all_of(target):
                    fruitless = (target, local)  # nothing to pull: wait for its next root
                    continue
                try:
                    peer.result.pulls.append(await pull(replica, peer, target))
                except PeerMovedOn:
                    fruitless = (target, local)  # wait for the peer's next root
                else:
                    if replica.root == local:
                        fruitless = (target, local)
                continue
            if until_in_sync and target is not None and target == local:
                await peer.announce_root()  # the peer's last view of us is this root
                await peer.send_close("in sync")
                peer.end("in sync", clean=True)
            stuck = until_in_sync and fruitless == (target, local)
            if not await _wait(peer.wake, changed, stuck_after if stuck else None) and stuck:
                errors = [e for report in peer.result.pulls for e in report.errors]
                await peer.send_close("not in sync")
                peer.end(f"not in sync: no progress ({len(errors)} paths failed)", clean=False)
    finally:
        replica.unwatch_root(changed)


async def _wait(wake: asyncio.Event, changed: asyncio.Event, timeout: float | None) -> bool:
    """Wait until the peer's root, ours, or a pull changes; False if `timeout` passed."""
    woken = await wait_either(wake, changed, timeout)
    wake.clear()
    return woken


async def wait_either(first: asyncio.Event, second: asyncio.Event, timeout: float | None) -> bool:
    """Wait until either event is set; False if `timeout` seconds passed first."""
    waits = [asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())]
    try:
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
    return bool(done)
