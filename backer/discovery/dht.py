"""The Kademlia DHT: the `kademlia` package behind our adapter, and the finder that announces
our folders in it and looks up their other members.

Owns every contact with `kademlia` (bmuller, 2.2; LIBRARIES.md lists its traps) and the UDP
socket it talks on. What the adapter changes, and why:

- one value per key, last write wins -> a key holds a bounded set of signed records
  (`records.RecordTable`); STORE adds one record, FIND_VALUE answers with the records held *and*
  the closest nodes, and a lookup crawls on to the k closest nodes and returns the union;
- no authentication, no receiver-side checks -> every datagram is decoded with limits and
  checked field by field here, not by rpcudp; a STORE keeps only a valid signed, unexpired,
  small record; answers with junk, or from another address than the one asked, count as no
  answer; nothing from the network raises;
- forged node IDs enter routing tables -> a node that asks us something becomes a contact only
  once it answers our ping with the ID it claimed, and one address holds one contact; a sender
  not yet a contact gets at most ~1 KB of records per answer (no amplification for spoofers);
- `get()` returns the local copy -> our lookup always asks the network;
- `welcome_if_new` hashes keys twice -> our override measures distance to the key itself;
- binds 0.0.0.0 by default -> `listen(host, port)` has no default host;
- pickle state files -> never saved or loaded; owners republish their records, so neither does
  a storage node (no `iter_older_than` republish);
- fixed 5 s RPC timeout, tables empty after start -> a shorter timeout, and `stay_joined`
  re-bootstraps until the table fills, again soon after, then hourly;
- fire-and-forget tasks (per datagram, per welcome STORE, per bucket ping) -> datagrams are
  handled synchronously; the few background RPCs are owned, capped and cancelled on close.

Imports discovery.base and discovery.records, addresses, errors; never mesh, sync or node.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import os
import random
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Self

import msgpack
from kademlia.crawling import NodeSpiderCrawl, SpiderCrawl
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.routing import RoutingTable
from kademlia.storage import IStorage

from backer.addresses import format_address, parse_address
from backer.discovery.base import Context, Found
from backer.discovery.records import (
    DHT_KEY_SIZE,
    MAX_ADDRESS_TEXT,
    MAX_ADDRESSES,
    MAX_LIFETIME,
    MAX_RECORD_SIZE,
    Put,
    Record,
    RecordTable,
    announce_keys,
    lookup_keys,
    make_record,
    newest_per_device,
    verify,
)
from backer.errors import BackerError, DecodeError, InvalidAddressError

__all__ = [
    "ALPHA",
    "KSIZE",
    "RPC_TIMEOUT",
    "DhtFinder",
    "DhtNode",
    "RecordStorage",
    "source_of",
]

KSIZE = 20
ALPHA = 3
RPC_TIMEOUT = 2.0  # kademlia waits 5 s; a crawl stalls that long on every dead contact
NODE_ID_SIZE = DHT_KEY_SIZE
MAX_REQUEST = 8192 + 21  # rpcudp's own cap on what it sends, plus its 21-byte header
MAX_REPLY = 16 * 1024
REPLY_VALUE_BYTES = 8000  # the records one FIND_VALUE answer carries at most
STRANGER_VALUE_BYTES = 1200  # ... to a sender not (yet) in the routing table
MAX_SEND_BUFFER = 256 * 1024  # past this, answers are dropped rather than queued
MAX_CRAWL_VALUES = 1024  # distinct records one lookup collects at most
MAX_BACKGROUND = 64  # welcome STOREs and bucket pings in flight at most
MAX_HINTS = 32
WELCOME_BURST, WELCOME_RATE = 20, 10.0  # hand-overs to new contacts: a burst, then per second
RCVBUF = 1 << 20  # a burst of bootstraps overflows the default UDP buffer
SETTLE = 1.0  # the pause between the first joins, while routing tables fill
HEALTH_CHECK = 30.0  # how often a joined node checks that it still has contacts
_REQUEST, _RESPONSE = b"\x00", b"\x01"
_WILDCARD = ("", "0.0.0.0", "::")
_TEST_NET = "192.0.2.1"  # no packet is sent: only asks which interface the default route uses

# -- the storage a DHT node keeps --------------------------------------------------------------


class RecordStorage(IStorage):  # type: ignore[misc]  # kademlia is untyped
    """kademlia's storage interface over a `RecordTable`: a key holds a bounded set of valid
    records, never an arbitrary value. `storage[key] = record` adds one record (or drops it)."""

    def __init__(
        self, table: RecordTable | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.table = table if table is not None else RecordTable()
        self.clock = clock
        self.refused = 0  # how many STOREs were dropped as invalid

    def put(self, key: object, value: object, source: str = "") -> bool:
        """Whether the table now holds `value` under `key` (or a newer record of its device).
        `source`: the host that sent it, "" for this node's own."""
        if not isinstance(key, bytes) or not isinstance(value, bytes):
            self.refused += 1
            return False
        try:
            outcome = self.table.put(key, value, now=self.clock(), source=source_of(source))
        except DecodeError:
            self.refused += 1
            return False
        return outcome is not Put.FULL

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.put(key, value)

    def __getitem__(self, key: bytes) -> list[bytes]:
        found = self.table.get(key, now=self.clock())
        if not found:
            raise KeyError(key)
        return found

    def get(self, key: bytes, default: list[bytes] | None = None) -> list[bytes] | None:
        return self.table.get(key, now=self.clock()) or default

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, bytes]]:
        return []  # the owners republish their signed records; storage nodes do not

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        for key, found in self.table.items(now=self.clock()):
            for value in found:
                yield key, value

    def __len__(self) -> int:
        return len(self.table)


def source_of(host: str) -> str:
    """Who a STORE counts against: its IPv4 address, or the /64 of its IPv6 address (one
    subscriber's whole allocation, so a host cannot dodge the cap by changing addresses)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return (
        str(address.ipv4_mapped or address) if isinstance(address, ipaddress.IPv6Address) else host
    )


# -- the node ----------------------------------------------------------------------------------


class DhtNode:
    """One DHT node on one UDP socket: join through seeds, store and find records.

    Keys are 20-byte DHT keys (`records.dht_key`), values encoded records. Use as an async
    context manager, or `listen()` then `close()`."""

    def __init__(
        self,
        *,
        node_id: bytes | None = None,
        ksize: int = KSIZE,
        alpha: int = ALPHA,
        rpc_timeout: float = RPC_TIMEOUT,
        per_key: int = 32,
        total: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if node_id is not None and len(node_id) != NODE_ID_SIZE:
            raise ValueError(f"a node ID is {NODE_ID_SIZE} bytes")
        self.node = Node(node_id or os.urandom(NODE_ID_SIZE))
        self.ksize = ksize
        self.alpha = alpha
        self.storage = RecordStorage(RecordTable(per_key=per_key, total=total), clock=clock)
        self.clock = clock
        self._rpc_timeout = rpc_timeout
        self._protocol: _Protocol | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._family = socket.AF_INET
        self._seeds_met: list[tuple[str, int]] = []

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def node_id(self) -> bytes:
        node_id: bytes = self.node.id
        return node_id

    @property
    def address(self) -> tuple[str, int]:
        """Where the socket is bound (after `listen`)."""
        if self._transport is None:
            raise BackerError("the DHT node is not listening")
        sockname = self._transport.get_extra_info("sockname")
        return str(sockname[0]), int(sockname[1])

    @property
    def contacts(self) -> int:
        """How many nodes the routing table holds."""
        if self._protocol is None:
            return 0
        return sum(len(bucket) for bucket in self._protocol.router.buckets)

    @property
    def seeds_met(self) -> list[tuple[str, int]]:
        """The seed addresses that answered the last join."""
        return list(self._seeds_met)

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        """Bind UDP on exactly `host:port` (there is no default host: kademlia's is 0.0.0.0)."""
        if self._transport is not None:
            raise BackerError("the DHT node listens already")
        self._family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.bind((host, port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise BackerError(
                f"cannot listen for the DHT on {format_address(host, port)}: {exc}"
            ) from exc
        local = ipaddress.ip_address(sock.getsockname()[0])
        protocol = _Protocol(
            self.node,
            self.storage,
            self.ksize,
            rpc_timeout=self._rpc_timeout,
            family=self._family,
            loopback_ok=local.is_loopback or local.is_unspecified,
        )
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
        self._transport, self._protocol = transport, protocol
        return self.address

    async def close(self) -> None:
        protocol, self._protocol = self._protocol, None
        if self._transport is not None:
            self._transport.close()
        if protocol is not None:
            await protocol.shut()

    async def join(self, seeds: Iterable[str]) -> int:
        """Ping the seeds (`host:port`; host names are resolved) and crawl towards our own ID,
        filling the routing table; how many contacts it holds then."""
        protocol = self._live()
        addresses = [a for a in await self._resolve(seeds) if a != self.address]
        replies = await asyncio.gather(*(protocol.ping(a, self.node_id) for a in addresses))
        met: list[Any] = []
        self._seeds_met = []
        for address, (ok, reply) in zip(addresses, replies, strict=True):
            if ok and _is_id(reply) and reply != self.node_id:
                node = Node(reply, address[0], address[1])
                protocol.welcome_if_new(node)
                met.append(node)
                self._seeds_met.append(address)
        known = met + protocol.router.find_neighbors(self.node, self.alpha)
        if known:
            await NodeSpiderCrawl(protocol, self.node, known, self.ksize, self.alpha).find()
        return self.contacts

    async def refresh(self) -> None:
        """Kademlia's hourly refresh: crawl a random ID in every bucket not used for an hour."""
        protocol = self._live()
        for node_id in protocol.get_refresh_ids():
            target = Node(node_id)
            nearest = protocol.router.find_neighbors(target, self.alpha)
            if nearest:
                await NodeSpiderCrawl(protocol, target, nearest, self.ksize, self.alpha).find()

    async def stay_joined(
        self,
        seeds: Callable[[], Sequence[str]],
        *,
        wake: asyncio.Event | None = None,
        joined: Callable[[], None] | None = None,
        refresh: float = 3600.0,
        first_retry: float = 0.25,
        most_retry: float = 30.0,
    ) -> None:
        """Keep the routing table filled, until cancelled. Joins through `seeds()` with backoff
        while the table is empty; after the first success twice more, `SETTLE` apart (a fresh
        network answers "not found" until the tables fill); then every `refresh` seconds, or
        at once when the table empties or `wake` is set (a new seed). `joined()` follows every
        successful join."""
        loop = asyncio.get_running_loop()
        delay, streak = first_retry, 0
        while True:
            if await self.join(seeds()):
                streak += 1
                delay = first_retry
                if joined is not None:
                    joined()
                if streak < 3:
                    await _wait_for(wake, SETTLE)
                    continue
                await self.refresh()
                due = loop.time() + refresh
                while loop.time() < due and self.contacts:
                    if await _wait_for(wake, min(HEALTH_CHECK, due - loop.time())):
                        break
            else:
                streak = 0
                await _wait_for(wake, delay)
                delay = min(delay * 2, most_retry)

    async def put(self, key: bytes, record: bytes) -> int:
        """Store `record` under `key` on the k nodes closest to it (and here, if this node is
        among them); how many remote nodes kept it."""
        protocol = self._live()
        target = Node(key)
        nearest = protocol.router.find_neighbors(target)
        if not nearest:
            self.storage.put(key, record)
            return 0
        nodes = await NodeSpiderCrawl(protocol, target, nearest, self.ksize, self.alpha).find()
        if (
            not nodes
            or len(nodes) < self.ksize
            or self.node.distance_to(target) < max(n.distance_to(target) for n in nodes)
        ):
            self.storage.put(key, record)
        results = await asyncio.gather(*(protocol.call_store(n, key, record) for n in nodes))
        return sum(1 for ok, reply in results if ok and reply is True)

    async def get(self, key: bytes) -> list[Record]:
        """Every valid record under `key` that this node or the k nodes closest to it hold (the
        union, not the first answer), newest per device. Not checked for a folder proof: the
        caller does that with the discovery ID."""
        protocol = self._live()
        target = Node(key)
        values = list(self.storage.get(key) or [])
        nearest = protocol.router.find_neighbors(target)
        if nearest:
            values += await _RecordCrawl(protocol, target, nearest, self.ksize, self.alpha).find()
        now = self.clock()
        records = []
        for value in dict.fromkeys(values):
            with contextlib.suppress(DecodeError):
                records.append(verify(value, now=now, dht_key=key))
        return newest_per_device(records)

    async def observed_host(self, address: tuple[str, int]) -> str | None:
        """Our host as the node at `address` sees it (behind NAT, the public address)."""
        ok, reply = await self._live().stun(address)
        if ok and isinstance(reply, list) and len(reply) == 2 and isinstance(reply[0], str):
            with contextlib.suppress(ValueError):
                return str(ipaddress.ip_address(reply[0]))
        return None

    def route_host(self) -> str | None:
        """The address of our interface that routes towards a seed that answered, or else
        towards the default route (a UDP `connect` sends nothing)."""
        targets = list(self._seeds_met)
        if self._protocol is not None:
            targets += [(n.ip, n.port) for n in self._protocol.router.find_neighbors(self.node, 3)]
        if self._family == socket.AF_INET:
            targets.append((_TEST_NET, 9))
        for host, port in targets:
            with (
                contextlib.suppress(OSError),
                socket.socket(self._family, socket.SOCK_DGRAM) as probe,
            ):
                probe.connect((host, port))
                local = ipaddress.ip_address(probe.getsockname()[0])
                if not local.is_unspecified:
                    return str(local)
        return None

    def _live(self) -> _Protocol:
        if self._protocol is None:
            raise BackerError("the DHT node is not listening")
        return self._protocol

    async def _resolve(self, seeds: Iterable[str]) -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        found: dict[tuple[str, int], None] = {}
        for seed in seeds:
            try:
                host, port = parse_address(seed)
                infos = await loop.getaddrinfo(
                    host, port, family=self._family, type=socket.SOCK_DGRAM
                )
            except (InvalidAddressError, OSError):
                continue
            for info in infos[:1]:
                found[(str(info[4][0]), int(info[4][1]))] = None
        return list(found)


# -- the finder --------------------------------------------------------------------------------


class DhtFinder:
    """Announces our folders in the DHT and reports the other members it finds there.

    Listens on UDP at `host:port` (default: the context's listen address, so a peer met on the
    LAN at `host:port` is a DHT node there too), joins through `bootstrap` and the hints it is
    given, announces a record per folder (republished every `republish` seconds, living three
    times that), and looks each folder up: soon after joining, then backing off to every
    `lookup_every` seconds."""

    def __init__(
        self,
        context: Context,
        *,
        bootstrap: Sequence[str],
        host: str | None = None,
        port: int | None = None,
        republish: float = 1200.0,
        lookup_every: float = 60.0,
        rpc_timeout: float = RPC_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for seed in bootstrap:
            parse_address(seed)
        self.context = context
        self.node = DhtNode(rpc_timeout=rpc_timeout, clock=clock)
        self._bootstrap = tuple(bootstrap)
        host = context.host if host is None else host
        self._host = "0.0.0.0" if host in _WILDCARD else host  # an IPv4 DHT on "::" too
        self._port = context.port if port is None else port
        self._republish = republish
        self._lifetime = min(MAX_LIFETIME - 60.0, max(60.0, 3 * republish))
        self._lookup_every = lookup_every
        self._clock = clock
        self._device = context.device
        self._hints: deque[str] = deque(maxlen=MAX_HINTS)
        self._wake = asyncio.Event()
        self._joined = asyncio.Event()
        self._announce_now = asyncio.Event()
        self._lookup_now = asyncio.Event()
        self._observed: str | None = None
        self._reported: dict[tuple[bytes, bytes], tuple[tuple[str, ...], float]] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where our DHT node listens (UDP)."""
        return self.node.address

    async def start(self) -> None:
        await self.node.listen(self._host, self._port)
        self._task = asyncio.create_task(self._run(), name="dht finder")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.node.close()

    def hint(self, address: str) -> None:
        """A DHT node learned by other means (a peer met on the LAN) to join through."""
        try:
            parse_address(address)
        except InvalidAddressError:
            return
        if address not in self._hints and address not in self._bootstrap:
            self._hints.append(address)
            self._wake.set()

    def _seeds(self) -> list[str]:
        return [*self._bootstrap, *self._hints]

    def _on_joined(self) -> None:
        self._joined.set()
        self._announce_now.set()
        self._lookup_now.set()

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(
                self.node.stay_joined(self._seeds, wake=self._wake, joined=self._on_joined)
            )
            group.create_task(self._announce_loop())
            group.create_task(self._lookup_loop())

    async def _announce_loop(self) -> None:
        await self._joined.wait()
        while True:
            self._announce_now.clear()
            await self._announce()
            await _wait_for(self._announce_now, self._republish)

    async def _lookup_loop(self) -> None:
        await self._joined.wait()
        first = min(0.5, self._lookup_every)
        delay = first
        while True:
            self._lookup_now.clear()
            await self._lookup()
            if await _wait_for(self._lookup_now, delay):
                delay = first
            else:
                delay = min(delay * 2, self._lookup_every)

    async def _announce(self) -> None:
        addresses = await self._addresses()
        if not addresses or not self.context.folders:
            return
        now = self._clock()
        expiry = int(now + self._lifetime)
        async with asyncio.TaskGroup() as group:
            for folder in self.context.folders:
                for key in announce_keys(folder.discovery_id, now=now, lifetime=self._lifetime):
                    record = make_record(
                        self.context.device_key,
                        discovery_id=folder.discovery_id,
                        key=key,
                        addresses=addresses,
                        expiry=expiry,
                    )
                    group.create_task(self.node.put(key, record))

    async def _addresses(self) -> list[str]:
        """Where members should dial us: the listen host, or for a wildcard the interface
        that routes to the DHT; plus the address the DHT sees us from (behind NAT, the
        public one), asked again at every announcement since networks change."""
        port = self.context.port
        if not 1 <= port <= 65535:
            return []
        host: str | None = self.context.host
        if host in _WILDCARD:
            host = self.node.route_host()
        met = self.node.seeds_met
        if met:
            self._observed = await self.node.observed_host(met[0]) or self._observed
        addresses = []
        for candidate in dict.fromkeys(h for h in (host, self._observed) if h):
            address = format_address(candidate, port)
            with contextlib.suppress(InvalidAddressError):
                parse_address(address)
                if len(address.encode()) <= MAX_ADDRESS_TEXT:
                    addresses.append(address)
        return addresses[:MAX_ADDRESSES]

    async def _lookup(self) -> None:
        now = self._clock()
        jobs = [
            (folder.discovery_id, key)
            for folder in self.context.folders
            for key in lookup_keys(folder.discovery_id, now=now, lifetime=self._lifetime)
        ]
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self.node.get(key)) for _, key in jobs]
        now = self._clock()
        for (discovery_id, key), task in zip(jobs, tasks, strict=True):
            for candidate in task.result():
                try:
                    record = verify(candidate.data, now=now, dht_key=key, discovery_id=discovery_id)
                except DecodeError:
                    continue  # planted by a non-member: storage nodes cannot tell, we can
                if record.device != self._device:
                    self._report(discovery_id, record, now)

    def _report(self, discovery_id: bytes, record: Record, now: float) -> None:
        """Report a member found, once per change of its addresses and again after a
        republish period (a node that forgot it hears again)."""
        slot = (discovery_id, record.device)
        last = self._reported.get(slot)
        if last is not None and last[0] == record.addresses and now - last[1] < self._republish:
            return
        self._reported[slot] = (record.addresses, now)
        if len(self._reported) > 4096:
            oldest = min(self._reported, key=lambda s: self._reported[s][1])
            del self._reported[oldest]
        self.context.on_found(
            Found(folder=discovery_id, device=record.device, addresses=record.addresses, via="dht")
        )


# -- kademlia, fixed ---------------------------------------------------------------------------


class _RoutingTable(RoutingTable):  # type: ignore[misc]  # kademlia is untyped
    """kademlia's table, but a full bucket's liveness ping is an owned background call, not a
    fire-and-forget future."""

    def add_contact(self, node: Any) -> None:
        # One contact per address: node IDs cost nothing to forge, so an address naming a new
        # ID replaces its old one (a node restarted) instead of filling the table with IDs
        # that all lead to one sender, each to be asked, and timed out, in every lookup.
        for bucket in self.buckets:
            for held in (*bucket.nodes.values(), *bucket.replacement_nodes.values()):
                if held.same_home_as(node) and held.id != node.id:
                    bucket.remove_node(held)
        index = self.get_bucket_for(node)
        bucket = self.buckets[index]
        if bucket.add_node(node):
            return
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
            self.split_bucket(index)
            self.add_contact(node)
        else:
            self.protocol.spawn(functools.partial(self.protocol.call_ping, bucket.head()))


class _Protocol(KademliaProtocol):  # type: ignore[misc]  # kademlia is untyped
    """kademlia's protocol with our own datagram handling: bounded decoding, strict argument
    checks, replies only from the address asked, records instead of values."""

    def __init__(
        self,
        source_node: Any,
        storage: RecordStorage,
        ksize: int,
        *,
        rpc_timeout: float,
        family: socket.AddressFamily,
        loopback_ok: bool,
    ) -> None:
        super().__init__(source_node, storage, ksize)
        self.router = _RoutingTable(self, ksize, source_node)
        self.storage: RecordStorage = storage
        self._wait_timeout = rpc_timeout
        self._pending: dict[
            bytes, tuple[asyncio.Future[tuple[bool, Any]], asyncio.TimerHandle, tuple[str, int]]
        ] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._family = family
        self._loopback_ok = loopback_ok
        self._meeting: set[bytes] = set()
        self._welcomes = float(WELCOME_BURST)
        self._welcomed_at = 0.0

    # -- outgoing calls (never rpcudp's __getattr__ magic, which turns any name into an RPC)

    def ping(self, address: tuple[str, int], node_id: bytes) -> asyncio.Future[tuple[bool, Any]]:
        return self._call(address, "ping", node_id)

    def store(
        self, address: tuple[str, int], node_id: bytes, key: bytes, value: bytes
    ) -> asyncio.Future[tuple[bool, Any]]:
        return self._call(address, "store", node_id, key, value)

    def find_node(
        self, address: tuple[str, int], node_id: bytes, key: bytes
    ) -> asyncio.Future[tuple[bool, Any]]:
        return self._call(address, "find_node", node_id, key)

    def find_value(
        self, address: tuple[str, int], node_id: bytes, key: bytes
    ) -> asyncio.Future[tuple[bool, Any]]:
        return self._call(address, "find_value", node_id, key)

    def stun(self, address: tuple[str, int]) -> asyncio.Future[tuple[bool, Any]]:
        return self._call(address, "stun")

    async def call_find_node(self, node_to_ask: Any, node_to_find: Any) -> tuple[bool, Any]:
        address = (node_to_ask.ip, node_to_ask.port)
        ok, reply = await self.find_node(address, self.source_node.id, node_to_find.id)
        contacts = self._contacts(reply) if ok else None
        result = (True, contacts) if contacts is not None else (False, None)
        return self._answered(result, node_to_ask)

    async def call_find_value(self, node_to_ask: Any, node_to_find: Any) -> tuple[bool, Any]:
        address = (node_to_ask.ip, node_to_ask.port)
        ok, reply = await self.find_value(address, self.source_node.id, node_to_find.id)
        result: tuple[bool, Any] = (False, None)
        if ok and isinstance(reply, dict) and set(reply) == {"values", "nodes"}:
            values = reply["values"]
            contacts = self._contacts(reply["nodes"])
            if isinstance(values, list) and contacts is not None:
                kept = [v for v in values if isinstance(v, bytes) and len(v) <= MAX_RECORD_SIZE]
                result = (True, (kept[:64], [Node(*c) for c in contacts]))
        return self._answered(result, node_to_ask)

    def _answered(self, result: tuple[bool, Any], node: Any) -> tuple[bool, Any]:
        answered: tuple[bool, Any] = self.handle_call_response(result, node)
        return answered

    def _call(self, address: tuple[str, int], name: str, *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        msg_id = os.urandom(20)
        data = _REQUEST + msg_id + _pack([name, list(args)])
        if (
            self.transport is None
            or self.transport.is_closing()
            or self.transport.get_write_buffer_size() >= MAX_SEND_BUFFER
            or len(data) > MAX_REQUEST
        ):
            future.set_result((False, None))
            return future
        try:
            self.transport.sendto(data, address)
        except (OSError, ValueError, TypeError):
            future.set_result((False, None))
            return future
        timer = loop.call_later(self._wait_timeout, self._expire, msg_id)
        self._pending[msg_id] = (future, timer, (address[0], address[1]))
        return future

    def _expire(self, msg_id: bytes) -> None:
        entry = self._pending.pop(msg_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result((False, None))

    def spawn(self, call: Callable[[], Coroutine[Any, Any, Any]]) -> bool:
        """Run `call()` in the background, owned here; dropped (False) when too many run."""
        if (
            len(self._background) >= MAX_BACKGROUND
            or self.transport is None
            or self.transport.is_closing()
        ):
            return False
        task = asyncio.get_running_loop().create_task(call())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return True

    async def shut(self) -> None:
        for future, timer, _ in self._pending.values():
            timer.cancel()
            if not future.done():
                future.set_result((False, None))
        self._pending.clear()
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- incoming datagrams

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        """Handle one datagram here and now (rpcudp spawns a task for each, unbounded)."""
        if len(data) < 22 or len(data) > MAX_REPLY or self.transport is None:
            return
        kind, msg_id = data[:1], data[1:21]
        if kind == _REQUEST and len(data) <= MAX_REQUEST:
            message = _unpack(data[21:])
            if message is not None:
                self._request(msg_id, message, (addr[0], addr[1]))
        elif kind == _RESPONSE:
            entry = self._pending.get(msg_id)
            if entry is None or entry[2] != (addr[0], addr[1]):
                return  # unasked, or from another address than the one asked
            message = _unpack(data[21:])
            del self._pending[msg_id]
            entry[1].cancel()
            if not entry[0].done():
                entry[0].set_result((True, message) if message is not None else (False, None))

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error for some earlier datagram: the call times out like any other

    def _request(self, msg_id: bytes, message: Any, sender: tuple[str, int]) -> None:
        if not (
            isinstance(message, list)
            and len(message) == 2
            and isinstance(message[0], str)
            and isinstance(message[1], list)
        ):
            return
        name, args = message
        reply: Any
        if name == "stun" and not args:
            reply = [sender[0], sender[1]]
        elif name in ("ping", "store", "find_node", "find_value") and args:
            source = self._source(args[0], sender)
            if source is None:
                return
            if name == "ping" and len(args) == 1:
                reply = self.source_node.id
            elif name == "store" and len(args) == 3:
                reply = self.storage.put(args[1], args[2], sender[0])
            elif name in ("find_node", "find_value") and len(args) == 2 and _is_id(args[1]):
                key = args[1]
                nodes = [list(n) for n in self.router.find_neighbors(Node(key), exclude=source)]
                # Records go in full only to a contact that answered us from this address: a
                # spoofed sender would turn a small request into a large reply to a victim.
                budget = REPLY_VALUE_BYTES if self._is_contact(source) else STRANGER_VALUE_BYTES
                reply = (
                    {"values": self._values_for(key, budget), "nodes": nodes}
                    if name == "find_value"
                    else nodes
                )
            else:
                return
            self._meet(source)
        else:
            return
        if self.transport.get_write_buffer_size() < MAX_SEND_BUFFER:
            with contextlib.suppress(OSError):
                self.transport.sendto(_RESPONSE + msg_id + _pack(reply), sender)

    def _meet(self, node: Any) -> None:
        """A node that asks us something enters the table only once it answers a ping of ours
        with the ID it claimed (kademlia adds it at once): a spoofed sender address, or a node
        that never answers, would be asked and timed out in every lookup."""
        if node.id in self._meeting or not self.router.is_new_node(node):
            return
        if len(self._meeting) < MAX_BACKGROUND and self.spawn(
            functools.partial(self._check_contact, node)
        ):
            self._meeting.add(node.id)

    async def _check_contact(self, node: Any) -> None:
        try:
            ok, reply = await self.ping((node.ip, node.port), self.source_node.id)
            if ok and reply == node.id:
                self.welcome_if_new(node)
        finally:
            self._meeting.discard(node.id)

    def _source(self, node_id: Any, sender: tuple[str, int]) -> Any:
        if not _is_id(node_id) or node_id == self.source_node.id:
            return None
        return Node(node_id, sender[0], sender[1])

    def _is_contact(self, node: Any) -> bool:
        held = self.router.buckets[self.router.get_bucket_for(node)][node.id]
        return held is not None and bool(held.same_home_as(node))

    def _values_for(self, key: bytes, budget: int) -> list[bytes]:
        held = self.storage.get(key) or []
        if sum(len(v) for v in held) > budget:
            held = random.sample(held, len(held))  # a different share for each asker
        values, size = [], 0
        for value in held:
            if size + len(value) <= budget:
                values.append(value)
                size += len(value)
        return values

    def _contacts(self, reply: Any) -> list[tuple[bytes, str, int]] | None:
        """The well-formed contacts of a FIND_NODE answer; None if it is not a list."""
        if not isinstance(reply, list):
            return None
        contacts = []
        for item in reply[: self.router.ksize]:
            if not (isinstance(item, list) and len(item) == 3):
                continue
            node_id, host, port = item
            if not (_is_id(node_id) and isinstance(host, str) and isinstance(port, int)):
                continue
            if node_id == self.source_node.id or not 1 <= port <= 65535:
                continue
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                continue
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            if (
                family != self._family
                or ip.is_unspecified
                or ip.is_multicast
                or (ip.is_loopback and not self._loopback_ok)
            ):
                continue
            contacts.append((node_id, str(ip), port))
        return contacts

    def welcome_if_new(self, node: Any) -> None:
        """Hand a new contact the records it should hold, then add it to the table.

        kademlia's version measures distance to `digest(key)`, a hash of the stored key,
        which is already a key: so it hands records to the wrong nodes. Ours uses the key."""
        if not self.router.is_new_node(node):
            return
        if self._may_welcome():
            self._hand_over(node)
        self.router.add_contact(node)

    def _may_welcome(self) -> bool:
        """A token bucket: each hand-over scans the whole table, and new node IDs cost an
        attacker nothing."""
        now = asyncio.get_running_loop().time()
        self._welcomes = min(
            WELCOME_BURST, self._welcomes + (now - self._welcomed_at) * WELCOME_RATE
        )
        self._welcomed_at = now
        if self._welcomes < 1:
            return False
        self._welcomes -= 1
        return True

    def _hand_over(self, node: Any) -> None:
        for key, values in self.storage.table.items(now=self.storage.clock()):
            keynode = Node(key)
            neighbors = self.router.find_neighbors(keynode)
            if neighbors:
                farthest = neighbors[-1].distance_to(keynode)
                new_node_close = node.distance_to(keynode) < farthest
                closest = neighbors[0].distance_to(keynode)
                this_closest = self.source_node.distance_to(keynode) < closest
            if not neighbors or (new_node_close and this_closest):
                for value in values:
                    self.spawn(functools.partial(self.call_store, node, key, value))


class _RecordCrawl(SpiderCrawl):  # type: ignore[misc]  # kademlia is untyped
    """A lookup that does not stop at the first node holding records: it asks the k closest
    nodes and returns the union of what they hold (kademlia returns the most common value)."""

    def __init__(self, protocol: _Protocol, node: Any, peers: list[Any], ksize: int, alpha: int):
        super().__init__(protocol, node, peers, ksize, alpha)
        self.values: dict[bytes, None] = {}

    async def find(self) -> list[bytes]:
        found: list[bytes] = await self._find(self.protocol.call_find_value)
        return found

    async def _nodes_found(self, responses: dict[bytes, tuple[bool, Any]]) -> list[bytes]:
        silent = []
        for peer_id, (ok, reply) in responses.items():
            if not ok:
                silent.append(peer_id)
                continue
            values, nodes = reply
            for value in values:
                if len(self.values) < MAX_CRAWL_VALUES:
                    self.values[value] = None
            self.nearest.push(nodes)
        self.nearest.remove(silent)
        if self.nearest.have_contacted_all():
            return list(self.values)
        return await self.find()


# -- helpers -----------------------------------------------------------------------------------


def _pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _unpack(data: bytes) -> Any:
    """The msgpack value in `data`, or None for anything malformed (bounded: a datagram is
    small, and no container may claim more entries than it could hold)."""
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_array_len=256,
            max_map_len=8,
            max_ext_len=0,
        )
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException):
        return None


def _is_id(value: Any) -> bool:
    return isinstance(value, bytes) and len(value) == NODE_ID_SIZE


async def _wait_for(event: asyncio.Event | None, timeout: float) -> bool:
    """Wait until `event` is set (then clear it: True) or `timeout` passes (False)."""
    if event is None:
        await asyncio.sleep(timeout)
        return False
    try:
        async with asyncio.timeout(max(0.0, timeout)):
            await event.wait()
    except TimeoutError:
        return False
    event.clear()
    return True
