"""The LAN finders on loopback: mDNS pinned to 127.0.0.1 and the beacon on 127.255.255.255,
never the machine's real interface. Every wait is on a milestone (a Found arriving), with a
deadline; "nothing else was found" is judged when a later milestone proves the earlier
packets were already handled (one socket delivers in order)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import nacl.signing
import pytest
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from backer.discovery.base import (
    Announcement,
    Context,
    DiscoveryError,
    Found,
    encode_beacon,
    to_txt,
)
from backer.discovery.beacon import PER_SOURCE_BURST, BeaconFinder, RateLimit
from backer.discovery.mdns import SERVICE_TYPE, MdnsFinder
from backer.ids import DeviceId
from backer.keys import FolderKey

DEADLINE = 5.0
LOOPBACK = "127.0.0.1"
KINDS = ["mdns", "beacon"]


@dataclass
class Peer:
    context: Context
    finder: MdnsFinder | BeaconFinder
    found: list[Found] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def device(self) -> bytes:
        return self.context.device

    def devices(self) -> set[bytes]:
        return {found.device for found in self.found}

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        """Wait until `predicate()` holds, re-checked whenever something is found."""
        try:
            async with asyncio.timeout(DEADLINE):
                while not predicate():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"not within {DEADLINE} s: {what}; found {self.found}") from None


class Peers:
    """Makes finders on loopback and stops every one of them at the end of the test."""

    def __init__(self, beacon_port: int) -> None:
        self.beacon_port = beacon_port
        self.started: list[Peer] = []

    async def start(
        self,
        kind: str,
        folders: tuple[FolderKey, ...],
        *,
        port: int = 22100,
        key: nacl.signing.SigningKey | None = None,
        **options: Any,
    ) -> Peer:
        found: list[Found] = []
        changed = asyncio.Event()

        def on_found(item: Found) -> None:
            found.append(item)
            changed.set()

        context = Context(
            device_key=key or nacl.signing.SigningKey.generate(),
            host=LOOPBACK,
            port=port,
            folders=folders,
            on_found=on_found,
        )
        finder: MdnsFinder | BeaconFinder
        if kind == "mdns":
            finder = MdnsFinder(context, ip_version=IPVersion.V4Only, **options)
        else:
            finder = BeaconFinder(context, port=self.beacon_port, **options)
        peer = Peer(context, finder, found, changed)
        await finder.start()
        self.started.append(peer)
        return peer

    async def stop_all(self) -> None:
        await asyncio.gather(*(peer.finder.stop() for peer in self.started))


@pytest.fixture
def beacon_port() -> int:
    """A free UDP port for this test's beacons (not the fixed 22101)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def peers(beacon_port: int) -> AsyncIterator[Peers]:
    made = Peers(beacon_port)
    try:
        yield made
    finally:
        await made.stop_all()


@pytest.fixture
async def no_loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Fails the test if anything reached the event loop's exception handler."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        yield seen
    finally:
        loop.set_exception_handler(None)
    assert not seen, seen


# -- both finders -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_members_of_a_folder_find_each_other_and_no_one_else(peers: Peers, kind: str) -> None:
    shared, other = FolderKey.generate(), FolderKey.generate()
    outsider = await peers.start(kind, (other,), port=20003)
    a = await peers.start(kind, (shared,), port=20001)
    b = await peers.start(kind, (shared,), port=20002)
    await a.until(lambda: b.device in a.devices(), "a finds b")
    await b.until(lambda: a.device in b.devices(), "b finds a")
    # Only now a member of the outsider's folder arrives: when the outsider has found it, it
    # has long handled a's and b's first announcements, which reached it earlier.
    companion = await peers.start(kind, (other,), port=20004)
    await outsider.until(lambda: companion.device in outsider.devices(), "outsider, companion")

    via = "mdns" if kind == "mdns" else "beacon"
    for me, them in [(a, b), (b, a), (outsider, companion)]:
        assert me.devices() == {them.device}, "nothing but the one peer, never ourselves"
        first = me.found[0]
        assert first.device == them.device and first.via == via
        assert first.addresses == (f"127.0.0.1:{them.context.port}",)
    assert {f.folder for f in a.found + b.found} == {shared.discovery_id}
    assert {f.folder for f in outsider.found} == {other.discovery_id}


@pytest.mark.parametrize("kind", KINDS)
async def test_start_and_stop_leave_no_tasks_or_threads(peers: Peers, kind: str) -> None:
    threads = set(threading.enumerate())
    tasks = asyncio.all_tasks()
    shared = FolderKey.generate()
    a = await peers.start(kind, (shared,), port=20001)
    await a.finder.start()  # a second start is a no-op
    b = await peers.start(kind, (shared,), port=20002)
    await b.until(lambda: a.device in b.devices(), "b finds a")
    for peer in (a, b):
        await peer.finder.stop()
        await peer.finder.stop()  # and so is a second stop
    assert asyncio.all_tasks() == tasks
    assert set(threading.enumerate()) == threads


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("host", "port"),
    [
        ("203.0.113.7", 20001),  # TEST-NET-3: on no interface here
        ("not-an-address", 20001),
        (LOOPBACK, 0),  # the port asked for, not the one bound
    ],
)
async def test_what_cannot_start_is_a_discovery_error(kind: str, host: str, port: int) -> None:
    context = Context(
        device_key=nacl.signing.SigningKey.generate(),
        host=host,
        port=port,
        folders=(FolderKey.generate(),),
        on_found=lambda found: None,
    )
    finder = MdnsFinder(context) if kind == "mdns" else BeaconFinder(context, port=0)
    with pytest.raises(DiscoveryError):
        await finder.start()
    await finder.stop()


# -- mDNS -------------------------------------------------------------------------------------


async def test_mdns_ignores_foreign_and_forged_services(
    peers: Peers, no_loop_errors: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    shared = FolderKey.generate()
    me = await peers.start("mdns", (shared,), port=20001)
    nonce = os.urandom(8)
    forged_tokens = to_txt(Announcement.make(os.urandom(32), 1, [os.urandom(32)], nonce))
    hostile: list[dict[str, str] | bytes] = [
        {"path": "/printer"},  # a foreign service that borrowed our type
        b"\xff\xfe" + os.urandom(40),  # not even TXT syntax
        {**forged_tokens, "v": "9"},  # another version
        {**forged_tokens, "id": "not base64!"},
        {**forged_tokens, "t": forged_tokens["t"][:-3]},  # tokens cut short
        forged_tokens,  # well formed, but names none of our folders
        # our own device ID, naming our folder: someone replaying or spoofing us
        to_txt(Announcement.make(me.device, 1, [shared.discovery_id], nonce)),
    ]
    async with _raw_zeroconf() as zc:
        infos = [
            _info(f"hostile-{i}", 30000 + i, properties) for i, properties in enumerate(hostile)
        ]
        registering = [zc.async_register_service(i, cooperating_responders=True) for i in infos]
        await asyncio.gather(*await asyncio.gather(*registering))  # all announced
        genuine = await peers.start("mdns", (shared,), port=20002)
        await me.until(lambda: genuine.device in me.devices(), "the genuine peer")
        assert me.devices() == {genuine.device}
        await asyncio.gather(*await asyncio.gather(*map(zc.async_unregister_service, infos)))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_mdns_says_goodbye_and_reports_a_restarted_peer(peers: Peers) -> None:
    shared = FolderKey.generate()
    watcher = await peers.start("mdns", (shared,), port=20001)
    key = nacl.signing.SigningKey.generate()
    name = f"{DeviceId.from_public_key(bytes(key.verify_key))}.{SERVICE_TYPE}"
    events: list[tuple[str, ServiceStateChange]] = []
    changed = asyncio.Event()

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        events.append((name, state_change))
        changed.set()

    async def seen(state: ServiceStateChange) -> None:
        async with asyncio.timeout(DEADLINE):
            while (name, state) not in events:
                changed.clear()
                await changed.wait()

    async with _raw_zeroconf() as zc:
        browser = AsyncServiceBrowser(zc.zeroconf, SERVICE_TYPE, handlers=[on_change])
        try:
            first = await peers.start("mdns", (shared,), port=20002, key=key)
            await seen(ServiceStateChange.Added)
            await watcher.until(lambda: len(watcher.found) == 1, "the first run")
            await first.finder.stop()
            await seen(ServiceStateChange.Removed)  # the goodbye went out
            # The same device again, on another port: reported again, with the new address.
            await peers.start("mdns", (shared,), port=20003, key=key)
            await watcher.until(lambda: len(watcher.found) == 2, "the second run")
        finally:
            await browser.async_cancel()
    assert [f.addresses for f in watcher.found] == [("127.0.0.1:20002",), ("127.0.0.1:20003",)]


async def test_mdns_reannounces_with_a_fresh_nonce(peers: Peers) -> None:
    shared = FolderKey.generate()
    watcher = await peers.start("mdns", (shared,), port=20001)
    chatty = await peers.start("mdns", (shared,), port=20002, reannounce=0.2)
    await watcher.until(lambda: len(watcher.found) >= 2, "a re-announcement")
    assert {f.device for f in watcher.found} == {chatty.device}
    assert {f.addresses for f in watcher.found} == {("127.0.0.1:20002",)}


# -- the beacon -------------------------------------------------------------------------------


async def test_beacon_ignores_garbage_forgeries_and_ourselves(
    peers: Peers, beacon_port: int, no_loop_errors: list[dict[str, Any]]
) -> None:
    shared = FolderKey.generate()
    me = await peers.start("beacon", (shared,), port=20001)
    nonce = os.urandom(8)
    good = encode_beacon(Announcement.make(os.urandom(32), 20009, [shared.discovery_id], nonce))
    hostile = [
        b"",
        os.urandom(200),
        good[:-1],  # a token cut short
        good + b"x",
        good + bytes(1000),  # oversized
        b"BKRB\x02" + good[5:],  # another version
        encode_beacon(Announcement.make(os.urandom(32), 20009, [os.urandom(32)], nonce)),
        encode_beacon(Announcement.make(me.device, 20009, [shared.discovery_id], nonce)),
    ]
    for packet in hostile:  # each from its own socket, so the rate limit plays no part
        _send_beacon(packet, beacon_port)
    genuine = await peers.start("beacon", (shared,), port=20002)
    await me.until(lambda: genuine.device in me.devices(), "the genuine peer")
    assert me.devices() == {genuine.device}
    assert isinstance(me.finder, BeaconFinder)
    assert me.finder.dropped == 1  # only the oversized packet, refused before decoding


async def test_beacon_rate_limit_holds_per_source(peers: Peers, beacon_port: int) -> None:
    shared = FolderKey.generate()
    me = await peers.start("beacon", (shared,), port=20001)
    flood = 20
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as source:
        source.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        source.bind((LOOPBACK, 0))
        for _ in range(flood):  # valid beacons of many devices, all from one source
            beacon = Announcement.make(os.urandom(32), 20009, [shared.discovery_id], os.urandom(8))
            source.sendto(encode_beacon(beacon), ("127.255.255.255", beacon_port))
    last = os.urandom(32)  # then one from another source: when it is in, the flood was handled
    _send_beacon(
        encode_beacon(Announcement.make(last, 20010, [shared.discovery_id], os.urandom(8))),
        beacon_port,
    )
    await me.until(lambda: last in me.devices(), "the beacon after the flood")
    flooded = [f for f in me.found if f.device != last]
    assert len(flooded) == PER_SOURCE_BURST
    assert isinstance(me.finder, BeaconFinder)
    assert me.finder.dropped == flood - PER_SOURCE_BURST


async def test_beacon_on_demand_sends_a_fresh_beacon(peers: Peers) -> None:
    shared = FolderKey.generate()
    a = await peers.start("beacon", (shared,), port=20001)
    b = await peers.start("beacon", (shared,), port=20002)
    await b.until(lambda: a.device in b.devices(), "b finds a")
    await a.until(lambda: b.device in a.devices(), "a finds b (b's answer to a newcomer)")
    before = len(b.found)
    assert isinstance(a.finder, BeaconFinder)
    a.finder.announce()
    await b.until(lambda: len(b.found) > before, "the beacon sent on demand")


def test_rate_limit_buckets() -> None:
    limit = RateLimit(2, 1.0, total_burst=3, total_rate=1.0, max_sources=2)
    assert [limit.allow("a", 0.0) for _ in range(3)] == [True, True, False]
    assert limit.allow("b", 0.0) is True
    assert limit.allow("c", 0.0) is False  # the total is spent, whoever asks
    assert limit.allow("a", 0.5) is False  # half a token
    assert limit.allow("a", 1.0) is True  # refilled, one a second
    for i in range(100):  # many sources: the table stays bounded
        limit.allow(i, 10.0 + i)
    assert len(limit._sources) <= 2


# -- helpers ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _raw_zeroconf() -> AsyncIterator[AsyncZeroconf]:
    zc = AsyncZeroconf(interfaces=[LOOPBACK], ip_version=IPVersion.V4Only)
    try:
        yield zc
    finally:
        await zc.async_close()


def _info(label: str, port: int, properties: dict[str, str] | bytes) -> AsyncServiceInfo:
    unique = f"{label}-{os.urandom(4).hex()}"
    return AsyncServiceInfo(
        SERVICE_TYPE,
        f"{unique}.{SERVICE_TYPE}",
        port=port,
        properties=properties,
        server=f"{unique}.local.",
        parsed_addresses=[LOOPBACK],
    )


def _send_beacon(packet: bytes, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.bind((LOOPBACK, 0))
        sock.sendto(packet, ("127.255.255.255", port))
