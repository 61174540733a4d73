"""Finding peers by a UDP broadcast beacon, for networks that filter multicast (and so mDNS).

Every `interval` seconds, at start, on demand and when a new peer shows up, a `BeaconFinder`
broadcasts our announcement (`base.encode_beacon`, a fresh nonce each time) to the beacon port
and listens on it. What arrives is rate-limited per source, decoded, matched against our
folders, and reported as `Found(..., via="beacon")` at the packet's source IP and the TCP port
it announces. Imports discovery.base, addresses and errors; never mesh or node.

Where the beacon goes follows the listen host (Linux semantics, measured in namespaces):
  - a specific IP (127.0.0.1 too): to that interface's subnet broadcast (127.255.255.255 on
    loopback), sent from a socket bound to the IP, received on a socket bound to the broadcast
    address itself (a socket bound to a unicast IP never sees broadcasts);
  - 0.0.0.0: to the subnet broadcast of every broadcast-capable interface that is up, received
    on 0.0.0.0 (255.255.255.255 needs a default route, so it is only the fallback).
Several processes on one host share the port (SO_REUSEADDR + SO_REUSEPORT); the kernel gives
each of them a copy of every broadcast.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import asyncio_dgram

from backer.addresses import format_address
from backer.discovery.base import (
    NONCE_SIZE,
    Announcement,
    Context,
    DiscoveryError,
    Found,
    decode_beacon,
    encode_beacon,
)
from backer.errors import DecodeError

__all__ = [
    "BEACON_PORT",
    "BeaconFinder",
    "Interface",
    "RateLimit",
    "ipv4_interfaces",
]

BEACON_PORT = 22101
MAX_BEACON_SIZE = 512  # the largest real beacon is 48 + 12 * 8 = 144 bytes
REPLY_SPACING = 0.5  # at least this long between two beacons we send (on-demand and replies)
FORGET_AFTER = 3  # intervals without a beacon after which a peer counts as new again
MAX_PEERS_REMEMBERED = 4096
# What we accept: per source (IP, port), a burst of 4 then one a second; overall 64 then 32/s.
PER_SOURCE_BURST, PER_SOURCE_RATE = 4.0, 1.0
TOTAL_BURST, TOTAL_RATE = 64.0, 32.0

log = logging.getLogger(__name__)


class BeaconFinder:
    """Announces our folders by UDP broadcast and reports the peers whose beacons name them."""

    def __init__(
        self,
        context: Context,
        *,
        port: int = BEACON_PORT,
        broadcast: str | None = None,
        interval: float = 10.0,
    ) -> None:
        self.context = context
        self.port = port
        self.broadcast = broadcast  # where to send instead of the derived broadcast address
        self.interval = interval
        self.dropped = 0  # packets refused by the rate limit (for tests and status)
        self._device = context.device
        self._limit = RateLimit(
            PER_SOURCE_BURST, PER_SOURCE_RATE, total_burst=TOTAL_BURST, total_rate=TOTAL_RATE
        )
        self._plan: _Plan | None = None
        self._receiver: Any = None  # asyncio_dgram.DatagramServer (the package is untyped)
        self._sender: Any = None  # a DatagramClient, or None: send through the receiver
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._last_sent = -REPLY_SPACING
        self._seen: dict[bytes, float] = {}  # device -> when its last beacon arrived
        self._reported: dict[tuple[bytes, bytes], tuple[bytes, str]] = {}

    async def start(self) -> None:
        """Open the sockets and begin announcing and listening. DiscoveryError if the sockets
        cannot be opened (the address is not ours, the port is taken without SO_REUSEPORT)."""
        if self._receiver is not None:
            return
        if not 1 <= self.context.port <= 65535:
            raise DiscoveryError(f"the beacon needs the real listen port, not {self.context.port}")
        plan = _plan(self.context.host, self.broadcast)
        try:
            if plan.send_from is not None:  # first: it fails at once if the address is not ours
                self._sender = await _stream(
                    _udp_socket(plan.send_from, 0), connect=(plan.destinations[0], self.port)
                )
            self._receiver = await _stream(_udp_socket(plan.receive_on, self.port))
        except OSError as exc:
            self._close_sockets()
            raise DiscoveryError(
                f"cannot open the beacon for {self.context.host} on port {self.port}: {exc}"
            ) from exc
        self._plan = plan
        self._spawn(self._receive_loop())
        self._spawn(self._announce_loop(plan))

    async def stop(self) -> None:
        """Stop announcing and listening, and close the sockets."""
        tasks, self._tasks = list(self._tasks), set()
        for task in tasks:
            task.cancel()
        self._close_sockets()
        if tasks:
            await asyncio.wait(tasks)

    def announce(self) -> None:
        """Send a beacon now (or as soon as REPLY_SPACING allows), not at the next interval."""
        self._wake.set()

    # -- receiving ----------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        # asyncio-dgram queues every datagram without bound. The loop below takes them as they
        # come and does constant work for each before decoding (a length check, the rate limit),
        # and `Queue.get` returns at once while items wait, so the queue is emptied on every
        # turn of the event loop: it never holds more than what arrived during one turn.
        receiver = self._receiver
        while True:
            try:
                data, source = await receiver.recv()
            except asyncio_dgram.TransportClosed:
                return
            except OSError as exc:  # an ICMP error reported on the socket: not fatal
                log.debug("beacon socket error: %s", exc)
                continue
            self._on_datagram(data, source[0], source[1], time.monotonic())

    def _on_datagram(self, data: bytes, ip: str, port: int, now: float) -> None:
        """Take one datagram from `ip`:`port` (what the receive loop does with each)."""
        if len(data) > MAX_BEACON_SIZE or not self._limit.allow((ip, port), now):
            self.dropped += 1
            return
        try:
            announcement = decode_beacon(data)
        except DecodeError:
            return
        if announcement.device == self._device or (self._plan and self._plan.ignore(ip)):
            return
        folders = announcement.folders_shared(self.context.discovery_ids)
        if not folders:
            return
        self._note_peer(announcement.device, now)
        address = format_address(ip, announcement.port)
        for folder in folders:
            key = (folder, announcement.device)
            if self._reported.get(key) == (announcement.nonce, address):
                continue  # the same beacon twice (two paths, or replayed)
            if len(self._reported) >= MAX_PEERS_REMEMBERED:
                self._reported.clear()
            self._reported[key] = (announcement.nonce, address)
            self.context.on_found(
                Found(folder=folder, device=announcement.device, addresses=(address,), via="beacon")
            )

    def _note_peer(self, device: bytes, now: float) -> None:
        last = self._seen.get(device)
        if last is None or now - last > FORGET_AFTER * self.interval:
            self.announce()  # a newcomer: answer it now rather than at our next interval
        if len(self._seen) >= MAX_PEERS_REMEMBERED:
            self._seen.clear()
        self._seen[device] = now

    # -- sending ------------------------------------------------------------------------------

    async def _announce_loop(self, plan: _Plan) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wait = self._last_sent + REPLY_SPACING - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # pacing, so that replies cannot make a storm
            self._wake.clear()
            self._last_sent = loop.time()
            await self._send_beacon(plan)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()

    async def _send_beacon(self, plan: _Plan) -> None:
        beacon = encode_beacon(
            Announcement.make(
                self._device, self.context.port, self.context.discovery_ids, os.urandom(NONCE_SIZE)
            )
        )
        if self._sender is not None:
            await self._send(self._sender.send(beacon), plan.destinations[0])
            return
        for destination in plan.current_destinations():
            await self._send(self._receiver.send(beacon, (destination, self.port)), destination)

    async def _send(self, sending: Coroutine[Any, Any, None], destination: str) -> None:
        try:
            await sending
        except (OSError, asyncio_dgram.TransportClosed) as exc:
            # asyncio-dgram raises an earlier ICMP error on the next send: log it, go on.
            log.debug("beacon to %s: %s", destination, exc)

    # -- plumbing -----------------------------------------------------------------------------

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("beacon task failed", exc_info=task.exception())

    def _close_sockets(self) -> None:
        for stream in (self._sender, self._receiver):
            if stream is not None:
                stream.close()
        self._sender = self._receiver = None


class RateLimit:
    """Token buckets: `burst` packets at once per source, refilled at `rate` a second, and the
    same over all sources together. Pure: the time is an argument."""

    def __init__(
        self,
        burst: float,
        rate: float,
        *,
        total_burst: float,
        total_rate: float,
        max_sources: int = 1024,
    ) -> None:
        self.burst, self.rate = burst, rate
        self.total_burst, self.total_rate = total_burst, total_rate
        self.max_sources = max_sources
        self._sources: dict[object, tuple[float, float]] = {}  # source -> (tokens, at)
        self._total = (total_burst, float("-inf"))

    def allow(self, source: object, now: float) -> bool:
        tokens, at = self._sources.get(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        total, total_at = self._total
        total = min(self.total_burst, total + (now - total_at) * self.total_rate)
        if tokens < 1 or total < 1:
            self._remember(source, tokens, now)
            self._total = (total, now)
            return False
        self._remember(source, tokens - 1, now)
        self._total = (total - 1, now)
        return True

    def _remember(self, source: object, tokens: float, now: float) -> None:
        if source not in self._sources and len(self._sources) >= self.max_sources:
            # Forget the sources whose bucket has refilled: they lose nothing by it.
            full = now - self.burst / self.rate
            self._sources = {s: v for s, v in self._sources.items() if v[1] > full}
            if len(self._sources) >= self.max_sources:
                self._sources.clear()
        self._sources[source] = (tokens, now)


@dataclass(frozen=True, slots=True)
class Interface:
    name: str
    address: str
    netmask: str
    flags: int

    @property
    def broadcast(self) -> str:
        network = ipaddress.IPv4Network(f"{self.address}/{self.netmask}", strict=False)
        return str(network.broadcast_address)

    @property
    def up(self) -> bool:
        return bool(self.flags & _IFF_UP)

    @property
    def loopback(self) -> bool:
        return bool(self.flags & _IFF_LOOPBACK)

    @property
    def can_broadcast(self) -> bool:
        return bool(self.flags & (_IFF_BROADCAST | _IFF_LOOPBACK))


def ipv4_interfaces() -> list[Interface]:
    """The interfaces with an IPv4 address (the primary one of each), read with the Linux
    SIOCGIF* ioctls; an empty list where those do not work."""
    found = []
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for name in names:
            try:
                address = _ioctl_address(probe, _SIOCGIFADDR, name)
                netmask = _ioctl_address(probe, _SIOCGIFNETMASK, name)
                flags = struct.unpack_from("H", _ioctl(probe, _SIOCGIFFLAGS, name), 16)[0]
            except OSError as exc:
                if exc.errno not in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.EINVAL, errno.ENOTTY):
                    log.debug("interface %s: %s", name, exc)
                continue
            found.append(Interface(name, address, netmask, flags))
    return found


# -- helpers ----------------------------------------------------------------------------------

_SIOCGIFFLAGS, _SIOCGIFADDR, _SIOCGIFNETMASK = 0x8913, 0x8915, 0x891B
_IFF_UP, _IFF_BROADCAST, _IFF_LOOPBACK = 0x1, 0x2, 0x8
_ANY = ("", "0.0.0.0", "::")
_LIMITED = "255.255.255.255"


@dataclass(frozen=True, slots=True)
class _Plan:
    """Where to listen and where to send, derived from the listen host."""

    receive_on: str
    send_from: str | None  # None: send through the receive socket (the 0.0.0.0 case)
    destinations: tuple[str, ...]  # fixed ones; empty: every interface's, read at each send
    subnet: ipaddress.IPv4Network | None = None  # accept only sources in it (a fallback plan)

    def current_destinations(self) -> tuple[str, ...]:
        if self.destinations:
            return self.destinations
        interfaces = [i for i in ipv4_interfaces() if i.up and i.can_broadcast]
        outside = [i.broadcast for i in interfaces if not i.loopback]
        inside = [i.broadcast for i in interfaces if i.loopback]
        return tuple(dict.fromkeys(outside or inside or [_LIMITED]))

    def ignore(self, ip: str) -> bool:
        if self.subnet is None:
            return False
        try:
            return ipaddress.IPv4Address(ip) not in self.subnet
        except ValueError:
            return True


def _plan(host: str, broadcast: str | None) -> _Plan:
    if host in _ANY:
        return _Plan("0.0.0.0", None, (broadcast,) if broadcast else ())
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise DiscoveryError(f"the beacon needs an IPv4 listen address, not {host!r}") from None
    for interface in ipv4_interfaces():
        if interface.address == host:
            return _Plan(interface.broadcast, host, (broadcast or interface.broadcast,))
    if address.is_loopback:
        return _Plan("127.255.255.255", host, (broadcast or "127.255.255.255",))
    # Not a primary address of any interface (a secondary one, or no SIOCGIF*): send to the
    # limited broadcast from the address (the kernel routes it out of that address's
    # interface), listen on every interface and keep what comes from the address's /24.
    subnet = ipaddress.IPv4Network(f"{host}/24", strict=False)
    return _Plan("0.0.0.0", host, (broadcast or _LIMITED,), subnet)


def _udp_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _stream(sock: socket.socket, *, connect: tuple[str, int] | None = None) -> Any:
    """An asyncio-dgram stream over `sock` (closed if that fails): a DatagramClient when
    connected (it then receives nothing), else a DatagramServer."""
    try:
        if connect is not None:
            sock.connect(connect)
        return await asyncio_dgram.from_socket(sock)
    except BaseException:
        sock.close()
        raise


def _ioctl(probe: socket.socket, request: int, name: str) -> bytes:
    """One SIOCGIF* request about interface `name`: the `struct ifreq` it fills in."""
    return fcntl.ioctl(probe.fileno(), request, struct.pack("256s", name.encode()[:15]))


def _ioctl_address(probe: socket.socket, request: int, name: str) -> str:
    return socket.inet_ntoa(_ioctl(probe, request, name)[20:24])
