"""The mesh of one folder: encrypted sessions with many devices, one per device.

It dials at most `max_peers` of them and accepts up to INBOUND_FACTOR times as many that dial
it: a node whose dialled sessions are full still lets a newcomer in, so late joiners can never
end up an island of their own (measured: 20 nodes with one shared limit of 16 split in two).

Dials the addresses it knows (static ones, those peers tell it about, those discovery finds),
with exponential backoff and jitter after each failure; accepts the connections the listener
hands it; resolves a double connection between two devices the same way on both ends (when
both dialled at once, the one dialled by the smaller device ID stays, and between two dialled
by the same device, the newer; a new connection replaces one established more than RACE_WINDOW
before, which the other end has evidently lost: a restarted peer is not refused while our end
of its old connection lingers half-open); and
tells every peer the addresses of the others, so the mesh fills in by itself. Each session feeds
the folder's puller (`sync.swarm.FolderPuller`).

Imports sync and mesh; never discovery (the node passes discovered addresses to `learn`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import nacl.signing

from backer.addresses import format_address, parse_address
from backer.errors import InvalidAddressError
from backer.events import Emit, ErrorOccurred, PeerConnected, PeerDisconnected, ignore
from backer.ids import DeviceId
from backer.keys import FolderKey
from backer.mesh.channel import ChannelError
from backer.mesh.secure import SecureLink, secure
from backer.mesh.transport import dial
from backer.protocol.messages import MAX_ADDRESSES_PER_PEER, MAX_PEERS_LISTED
from backer.protocol.session import Session
from backer.sync.link import Link
from backer.sync.peer import ANSWER_WITHIN, FRAME_WITHIN, GOSSIP_EVERY, PeerSession
from backer.sync.replica import Replica
from backer.sync.swarm import FolderPuller

__all__ = ["Connection", "FolderMesh", "Known"]

BACKOFF_FIRST = 0.5  # seconds before the first retry of an address...
BACKOFF_MAX = 60.0  # ...doubling up to this, each delay jittered by +-50 %
STABLE_AFTER = 10.0  # a session that lasted this long resets its address's backoff
RACE_WINDOW = 5.0  # two connections between two devices this close together: a double dial
KEEPALIVE = 45.0  # the channel's own keepalive: rarely needed, the root gossip comes first
IDLE_TIMEOUT = 100.0  # a peer silent this long (three gossip rounds) is gone
MAX_KNOWN = 512  # addresses remembered per folder
INBOUND_FACTOR = 4  # sessions others dial, as a multiple of the sessions we dial
TOO_MANY = "too many peers"

Dial = Callable[[str, bytes], Awaitable[Link]]


@dataclass(slots=True)
class Known:
    """An address this folder's mesh may dial."""

    address: str
    source: str  # "static", "peer", or a discovery method
    device: bytes | None = None  # who we expect there, once known
    failures: int = 0
    next_try: float = 0.0
    dialing: bool = False
    ourselves: bool = False  # it turned out to be this very node


@dataclass(slots=True)
class Connection:
    session: PeerSession
    device: bytes
    address: str  # the far end of the connection
    outgoing: bool
    since: float
    known: Known | None = None  # the address we dialled, for an outgoing connection
    advertised: tuple[str, ...] = field(default=())  # where the peer says it can be dialled

    @property
    def dialable(self) -> tuple[str, ...]:
        own = (self.known.address,) if self.known is not None else ()
        return tuple(dict.fromkeys(own + self.advertised))[:MAX_ADDRESSES_PER_PEER]


class FolderMesh:
    """One folder's sessions. `await run()` dials for the folder's lifetime; `accept()` runs an
    inbound connection's session to its end; `learn()` adds an address to dial."""

    def __init__(
        self,
        replica: Replica,
        key: FolderKey,
        *,
        device_key: nacl.signing.SigningKey,
        puller: FolderPuller,
        emit: Emit = ignore,
        max_peers: int = 16,
        advertise: tuple[str, ...] = (),
        share_addresses: bool = True,
        gossip_every: float | None = GOSSIP_EVERY,
        answer_within: float | None = ANSWER_WITHIN,
        frame_within: float | None = FRAME_WITHIN,
        backoff_first: float = BACKOFF_FIRST,
        backoff_max: float = BACKOFF_MAX,
        dialer: Dial = dial,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.replica = replica
        self.key = key
        self.device_key = device_key
        self.own = DeviceId.from_public_key(bytes(device_key.verify_key)).raw
        self.puller = puller
        self.emit = emit
        self.max_peers = max_peers
        self.advertise = advertise
        self.share_addresses = share_addresses
        self.gossip_every = gossip_every
        self.answer_within = answer_within
        self.frame_within = frame_within
        self.backoff_first = backoff_first
        self.backoff_max = backoff_max
        self.dialer = dialer
        self.clock = clock
        self.connections: dict[bytes, Connection] = {}
        self.known: dict[str, Known] = {}
        self.label = str(replica.folder)
        self._wake = asyncio.Event()
        self._closing = False
        self._tasks: asyncio.TaskGroup | None = None

    # -- addresses ---------------------------------------------------------------------------

    def learn(self, address: str, *, source: str, device: bytes | None = None) -> bool:
        """Remember an address to dial (a static peer, a peer's tip, a discovery result);
        True if it is new."""
        try:
            parse_address(address)
        except InvalidAddressError:
            return False
        known = self.known.get(address)
        new = known is None
        if known is None:
            if len(self.known) >= MAX_KNOWN:
                self._forget_one()
            known = self.known[address] = Known(address=address, source=source)
        elif source == "static":
            known.source = source
        if device is not None and device != self.own:
            known.device = device
        self._wake.set()
        return new

    def _forget_one(self) -> None:
        for address, known in self.known.items():
            if known.source != "static" and not known.dialing:
                del self.known[address]
                return

    # -- dialling ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Dial what is worth dialling, for as long as the folder runs."""
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            while not self._closing:
                self._wake.clear()
                wait = self._dial_due(tasks)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()

    def _dial_due(self, tasks: asyncio.TaskGroup) -> float | None:
        """Start the dials that are due; how long until the next one is."""
        now = self.clock()
        dialled_out = sum(c.outgoing for c in self.connections.values())
        busy = dialled_out + sum(k.dialing for k in self.known.values())
        dialled = {c.known.address for c in self.connections.values() if c.known is not None}
        soonest: float | None = None
        for known in list(self.known.values()):
            if known.dialing or known.ourselves or known.address in dialled:
                continue
            if known.device is not None and known.device in self.connections:
                continue
            if known.next_try > now:
                wait = known.next_try - now
                soonest = wait if soonest is None else min(soonest, wait)
                continue
            if busy >= self.max_peers:
                break
            known.dialing = True
            busy += 1
            tasks.create_task(self._dial(known))
        return soonest

    async def _dial(self, known: Known) -> None:
        try:
            link = await self.dialer(known.address, self.key.discovery_id)
        except (OSError, TimeoutError):
            known.dialing = False
            self._failed(known)
            return
        try:
            await self._isolated(
                self._connect(link, outgoing=True, address=known.address, known=known),
                known.address,
            )
        finally:
            known.dialing = False
            self._wake.set()

    def _failed(self, known: Known) -> None:
        delay = min(self.backoff_first * 2**known.failures, self.backoff_max)
        known.failures += 1
        known.next_try = self.clock() + delay * (0.5 + random.random())
        self._wake.set()

    # -- sessions ----------------------------------------------------------------------------

    async def accept(self, link: Link, address: str) -> None:
        """Run a connection a peer opened to us (its preface named this folder)."""
        await self._isolated(
            self._connect(link, outgoing=False, address=address, known=None), address
        )

    async def _isolated(self, connection: Awaitable[None], address: str) -> None:
        """Run one connection so that whatever goes wrong in it ends it alone: a bug met on
        one peer's connection must not stop the folder's other sessions, or the node."""
        try:
            await connection
        except Exception as exc:
            self.emit(
                ErrorOccurred(
                    folder=self.label,
                    message=f"the connection with {address or 'a peer'} failed: "
                    f"{type(exc).__name__}: {exc}",
                )
            )

    async def _connect(
        self, link: Link, *, outgoing: bool, address: str, known: Known | None
    ) -> None:
        try:
            secured = await secure(
                link,
                initiator=outgoing,
                device_key=self.device_key,
                folder=self.key,
                keepalive=KEEPALIVE,
                idle=IDLE_TIMEOUT,
            )
        except ChannelError as exc:
            if known is not None:
                self._failed(known)
            self.emit(
                PeerDisconnected(
                    folder=self.label,
                    device="",
                    address=address,
                    reason=f"handshake failed: {exc}",
                    clean=False,
                )
            )
            return
        device = secured.peer_device.raw
        if known is not None:
            known.dialing = False  # dialled: from here on it is a session (or a refusal)
            known.device = device if device != self.own else None
        refusal = self._refusal(device, outgoing)
        if refusal:
            if known is not None and device == self.own:
                known.ourselves = True
            await self._refuse(secured, refusal)
            if refusal == TOO_MANY:
                self.emit(
                    PeerDisconnected(
                        folder=self.label,
                        device=str(DeviceId(device)),
                        address=address,
                        reason=f"refused: {refusal}",
                        clean=True,
                    )
                )
            return
        await self._run_session(secured, device, outgoing=outgoing, address=address, known=known)

    def _refusal(self, device: bytes, outgoing: bool) -> str:
        """Why a new connection to `device` must not stay ("" if it may)."""
        if device == self.own:
            return "that is this node"
        if self._closing:
            return "shutting down"
        existing = self.connections.get(device)
        if existing is None:
            return TOO_MANY if self._full(outgoing) else ""
        if keeps_existing(
            self.own,
            device,
            existing_outgoing=existing.outgoing,
            new_outgoing=outgoing,
            existing_age=self.clock() - existing.since,
        ):
            return "a connection to that device exists"
        return ""

    async def _refuse(self, secured: SecureLink, reason: str) -> None:
        """Close a connection we will not keep with a Close that says why, so the peer's
        event says so too (not just "the connection ended")."""
        farewell = Session(self.own, self.key.discovery_id, self.replica.root).close(reason)
        with contextlib.suppress(ConnectionError, OSError, ChannelError):
            await secured.write(farewell)
        await secured.close()

    def _full(self, outgoing: bool) -> bool:
        if outgoing:
            return sum(c.outgoing for c in self.connections.values()) >= self.max_peers
        return len(self.connections) >= self.max_peers * (1 + INBOUND_FACTOR)

    async def _run_session(
        self,
        secured: SecureLink,
        device: bytes,
        *,
        outgoing: bool,
        address: str,
        known: Known | None,
    ) -> None:
        replaced = self.connections.get(device)
        session = PeerSession(
            self.replica,
            secured,
            device=self.own,
            folder=self.key.discovery_id,
            on_change=self.puller.poke,
            gossip_every=self.gossip_every,
            answer_within=self.answer_within,
            frame_within=self.frame_within,
            expect_device=device,
        )
        connection = Connection(
            session=session,
            device=device,
            address=address,
            outgoing=outgoing,
            since=self.clock(),
            known=known,
        )
        session.on_peers = lambda peers: self._told(connection, peers)
        self.connections[device] = connection
        if replaced is not None:
            await replaced.session.close("replaced by a newer connection")
        self.puller.add(session)
        name = str(DeviceId(device))
        self.emit(PeerConnected(folder=self.label, device=name, address=address, outgoing=outgoing))
        if self._tasks is not None:
            self._tasks.create_task(self._share())
        try:
            result = await session.run()
        finally:
            self.puller.discard(session)
            if self.connections.get(device) is connection:
                del self.connections[device]
            if known is not None:
                if self.clock() - connection.since >= STABLE_AFTER:
                    known.failures = 0
                self._failed(known)  # dial again, after a (short, if it was stable) pause
        self.emit(
            PeerDisconnected(
                folder=self.label,
                device=name,
                address=address,
                reason=result.reason,
                clean=result.clean,
            )
        )

    async def close(self, reason: str = "shutting down") -> None:
        """Say goodbye to every peer; dial no more."""
        self._closing = True
        self._wake.set()
        await asyncio.gather(
            *(c.session.close(reason) for c in list(self.connections.values())),
            return_exceptions=True,
        )

    # -- address exchange ---------------------------------------------------------------------

    async def _share(self) -> None:
        """Tell every peer where this node and its other peers can be dialled."""
        if not self.share_addresses:
            return
        for connection in list(self.connections.values()):
            listing = [(self.own, self.advertise)] if self.advertise else []
            listing += [
                (other.device, other.dialable)
                for other in self.connections.values()
                if other is not connection and other.dialable
            ]
            with contextlib.suppress(ConnectionError, OSError, ChannelError):
                await connection.session.announce_peers(listing[:MAX_PEERS_LISTED])

    def _told(
        self, connection: Connection, peers: tuple[tuple[bytes, tuple[str, ...]], ...]
    ) -> None:
        if not self.share_addresses:
            return
        host = _host_of(connection.address)
        for device, addresses in peers:
            resolved = tuple(a for a in (_resolve(a, host) for a in addresses) if a)
            if device == connection.device and resolved != connection.advertised:
                connection.advertised = resolved  # the others learn where to dial it
                if self._tasks is not None:
                    self._tasks.create_task(self._share())
            if device == self.own:
                continue
            for address in resolved:
                self.learn(address, source="peer", device=device)


def keeps_existing(
    own: bytes, device: bytes, *, existing_outgoing: bool, new_outgoing: bool, existing_age: float
) -> bool:
    """Whether a new connection with `device` gives way to the one we have. Pure, and decided
    the same way at both ends from what each sees."""
    if existing_age >= RACE_WINDOW:
        # Established a while ago, so not a simultaneous dial: the device dialled again because
        # it lost that connection (it restarted, or its end timed out) while ours lingers,
        # half-open, until our idle timeout. Its end keeps the new one; so do we.
        return False
    # Both dialled at once: both ends see both connections and must keep the same one, the one
    # dialled by the smaller device ID (between two dialled by the same device, the newer).
    old = own if existing_outgoing else device
    new = own if new_outgoing else device
    return old != new and old < new


def _host_of(address: str) -> str:
    try:
        return parse_address(address)[0]
    except InvalidAddressError:
        return ""


def _resolve(address: str, host: str) -> str:
    """`:port` means the host the connection came from."""
    if not address.startswith(":"):
        return address
    return format_address(host, int(address[1:])) if host else ""
