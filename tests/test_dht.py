"""The DHT: signed records checked field by field, a bounded set of records per key, lookups
that return every device announced, and kademlia's traps covered (forged STOREs from a raw
socket, hostile datagrams and replies, the double hash in `welcome_if_new`). Loopback only."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import msgpack
import nacl.bindings
import nacl.signing
import pytest
import umsgpack  # what kademlia's rpcudp sends with
from kademlia.node import Node
from kademlia.utils import digest

from backer.discovery import records
from backer.discovery.base import Context, Found
from backer.discovery.dht import DhtFinder, DhtNode, source_of
from backer.discovery.records import (
    DHT_KEY_SIZE,
    EPOCH_SECONDS,
    MAX_ADDRESSES,
    MAX_LIFETIME,
    MAX_RECORD_SIZE,
    Put,
    RecordTable,
    announce_keys,
    day_key_of,
    dht_key,
    lookup_keys,
    make_record,
    newest_per_device,
    verify,
)
from backer.errors import DecodeError
from backer.ids import hash_bytes
from backer.keys import FolderKey

NOW = 1_800_000_000.0
FOLDER = FolderKey.generate().discovery_id
KEY = dht_key(FOLDER, int(NOW // EPOCH_SECONDS))
DEADLINE = 10.0


def signer() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey.generate()


def record(
    key: nacl.signing.SigningKey | None = None,
    *,
    addresses: tuple[str, ...] = ("192.0.2.7:22000",),
    expiry: float = NOW + 3600,
    folder: bytes = FOLDER,
    dht: bytes = KEY,
) -> bytes:
    return make_record(
        key or signer(), discovery_id=folder, key=dht, addresses=addresses, expiry=int(expiry)
    )


# -- records -----------------------------------------------------------------------------------


def test_a_record_round_trips_and_is_small() -> None:
    device = signer()
    data = record(device, addresses=("192.0.2.7:22000", "[2001:db8::1]:22000"))
    found = verify(data, now=NOW, dht_key=KEY, discovery_id=FOLDER)
    assert found.device_key == bytes(device.verify_key)
    assert found.public_key == bytes(day_key_of(device, KEY).verify_key) != found.device_key
    assert found.device == hash_bytes("device id", bytes(device.verify_key))
    assert found.addresses == ("192.0.2.7:22000", "[2001:db8::1]:22000")
    assert found.expiry == int(NOW + 3600) and found.data == data
    most = record(addresses=tuple(f"203.0.113.{i}:65535" for i in range(MAX_ADDRESSES)))
    print(f"\nrecord sizes: 2 addresses {len(data)} B, 8 IPv4 addresses {len(most)} B")
    assert len(data) < 350 and len(most) < 450


def test_making_a_record_refuses_what_verify_would() -> None:
    with pytest.raises(ValueError, match="addresses"):
        record(addresses=())
    with pytest.raises(ValueError, match="addresses"):
        record(addresses=tuple(f"192.0.2.1:{i}" for i in range(1, MAX_ADDRESSES + 2)))
    with pytest.raises(ValueError, match="over"):
        record(addresses=tuple(f"{'h' * 200}{i}.example:1" for i in range(MAX_ADDRESSES)))
    with pytest.raises(ValueError, match="host:port"):
        record(addresses=("no port",))


def day_public(device: nacl.signing.SigningKey, key: bytes = KEY) -> bytes:
    """What a storage node knows a device by under `key`: its day key."""
    return bytes(day_key_of(device, key).verify_key)


def _flip(data: bytes, index: int) -> bytes:
    index %= len(data)
    return data[:index] + bytes([data[index] ^ 1]) + data[index + 1 :]


HEAD = struct.Struct(">B32sI24s")  # version, day key, expiry, nonce
INNER = struct.Struct(">32s64sB")  # device key, device signature, address count


def sealed(
    listing: bytes,
    count: int,
    *,
    version: int = records.RECORD_VERSION,
    vouch: bytes | None = None,
    folder: bytes = FOLDER,
    key: bytes = KEY,
    day: nacl.signing.SigningKey | None = None,
) -> bytes:
    """A record around any listing, sealed and signed correctly (the device's signature too,
    unless `vouch` is given; by the device's day key unless `day` is given), as a hostile
    member could make one."""
    device = signer()
    day = day or day_key_of(device, key)
    head = HEAD.pack(version, bytes(day.verify_key), int(NOW + 60), os.urandom(24))
    if vouch is None:
        vouch = device.sign(
            records._DEVICE_CONTEXT + key + head[:-24] + bytes([count]) + listing
        ).signature
    inner = INNER.pack(bytes(device.verify_key), vouch, count) + listing
    body = head + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        inner, key + head, head[-24:], records._members_key(folder, key)
    )
    return body + day.sign(records._SIGNED_CONTEXT + key + body).signature


def _rejections() -> list[tuple[str, Callable[[], bytes], dict[str, Any], str]]:
    other_folder = FolderKey.generate().discovery_id
    addr = b"\x0f192.0.2.7:22000"
    return [
        ("forged signature", lambda: _flip(record(), -1), {}, "signature"),
        ("altered sealed part", lambda: _flip(record(), HEAD.size + 3), {}, "signature"),
        ("altered expiry", lambda: _flip(record(), 36), {}, "signature"),
        ("moved to another key", record, {"dht_key": os.urandom(20)}, "signature"),
        ("a non-member's record", lambda: record(folder=other_folder), {}, "member"),
        ("a non-member's sealing", lambda: sealed(addr, 1, folder=other_folder), {}, "member"),
        ("expired", lambda: record(expiry=NOW - 1), {}, "expired"),
        ("expires too far ahead", lambda: record(expiry=NOW + MAX_LIFETIME + 10), {}, "ahead"),
        ("oversized", lambda: record() + b"\0" * MAX_RECORD_SIZE, {}, "over"),
        ("an extra byte", lambda: sealed(addr + b"\0", 1), {}, "length"),
        ("a missing byte", lambda: sealed(addr[:-1], 1), {}, "short"),
        ("count past the end", lambda: sealed(addr, 2), {}, "past"),
        ("no address", lambda: sealed(b"", 0), {}, "addresses"),
        ("too many addresses", lambda: sealed(addr * 9, 9), {}, "addresses"),
        ("an address twice", lambda: sealed(addr * 2, 2), {}, "twice"),
        ("not an address", lambda: sealed(b"\x04nope", 1), {}, "host:port"),
        ("bad UTF-8", lambda: sealed(b"\x04\xff:12", 1), {}, "host:port"),
        ("a forged device signature", lambda: sealed(addr, 1, vouch=bytes(64)), {}, "device"),
        ("unknown version", lambda: sealed(addr, 1, version=1), {}, "version"),
        ("too short", lambda: b"\x02" * 40, {}, "short"),
        ("not bytes", lambda: cast(bytes, "text"), {}, "bytes"),
        ("a key not on the curve", lambda: b"\x02" + b"\xff" * 32 + record()[33:], {}, "point"),
    ]


@pytest.mark.parametrize(
    ("data", "extra", "reason"),
    [pytest.param(make, extra, reason, id=name) for name, make, extra, reason in _rejections()],
)
def test_a_bad_record_is_refused_with_the_reason(
    data: Callable[[], bytes], extra: dict[str, Any], reason: str
) -> None:
    arguments: dict[str, Any] = {"now": NOW, "dht_key": KEY, "discovery_id": FOLDER, **extra}
    with pytest.raises(DecodeError, match=reason):
        verify(data(), **arguments)


def test_a_storage_node_learns_neither_the_device_nor_its_addresses() -> None:
    planted = record(folder=FolderKey.generate().discovery_id)
    seen = verify(planted, now=NOW, dht_key=KEY)  # the storage node cannot tell
    assert seen.addresses == () and seen.device_key == b""
    with pytest.raises(DecodeError, match="member"):
        verify(planted, now=NOW, dht_key=KEY, discovery_id=FOLDER)
    device = signer()
    data = record(device, addresses=("192.0.2.7:22000",))
    assert bytes(device.verify_key) not in data and b"192.0.2.7" not in data


def test_a_device_s_records_cannot_be_linked_across_days() -> None:
    device = signer()
    tomorrow = dht_key(FOLDER, int(NOW // EPOCH_SECONDS) + 1)
    today_record = verify(record(device), now=NOW, dht_key=KEY)
    tomorrow_record = verify(record(device, dht=tomorrow), now=NOW, dht_key=tomorrow)
    assert today_record.public_key != tomorrow_record.public_key
    again = verify(record(device), now=NOW, dht_key=KEY)  # a republication replaces its own
    assert again.public_key == today_record.public_key and again.data != today_record.data


def test_dht_keys_hide_the_folder_and_change_each_epoch() -> None:
    epoch = int(NOW // EPOCH_SECONDS)
    keys = {dht_key(FOLDER, epoch), dht_key(FOLDER, epoch + 1), dht_key(os.urandom(32), epoch)}
    assert len(keys) == 3 and all(len(k) == DHT_KEY_SIZE for k in keys)
    assert not any(FOLDER[:8] in k for k in keys)


@pytest.mark.parametrize("lifetime", [600.0, 3600.0, MAX_LIFETIME - 60])
def test_a_lookup_finds_what_was_announced_across_an_epoch_boundary(lifetime: float) -> None:
    boundary = (NOW // EPOCH_SECONDS + 1) * EPOCH_SECONDS
    moments = [boundary + offset for offset in range(-int(lifetime) - 7, int(lifetime) + 7, 97)]
    for announced in moments:
        put = set(announce_keys(FOLDER, now=announced, lifetime=lifetime))
        for looked in moments:
            if announced <= looked < announced + lifetime:
                assert put & set(lookup_keys(FOLDER, now=looked, lifetime=lifetime))
    far_from_boundary = boundary - EPOCH_SECONDS / 2
    assert len(announce_keys(FOLDER, now=far_from_boundary, lifetime=lifetime)) == 1
    assert len(lookup_keys(FOLDER, now=far_from_boundary, lifetime=lifetime)) == 1


# -- the table a DHT node keeps ----------------------------------------------------------------


def test_the_table_keeps_the_newest_record_of_each_device() -> None:
    table, device = RecordTable(), signer()
    old, new = record(device, expiry=NOW + 100), record(device, expiry=NOW + 200)
    assert table.put(KEY, old, now=NOW) is Put.STORED
    assert table.put(KEY, new, now=NOW) is Put.STORED
    assert table.put(KEY, old, now=NOW) is Put.STALE  # a replayed older record
    assert table.get(KEY, now=NOW) == [new] and len(table) == 1
    with pytest.raises(DecodeError):
        table.put(KEY, _flip(new, 50), now=NOW)
    assert table.get(KEY, now=NOW + 300) == [] and table.cull(now=NOW + 300) == 1


def test_the_table_stays_bounded_under_a_flood() -> None:
    table = RecordTable(per_key=8, total=32)
    keys = [os.urandom(DHT_KEY_SIZE) for _ in range(10)]
    for i in range(400):
        key = keys[i % len(keys)]
        table.put(key, record(dht=key, expiry=NOW + 100 + i), now=NOW)
        assert len(table) <= 32
        assert all(len(table.get(k, now=NOW)) <= 8 for k in keys)
    kept = [verify(v, now=NOW, dht_key=k).expiry for k in keys for v in table.get(k, now=NOW)]
    # Full: a newcomer never displaces a live record, however late it expires.
    assert sorted(kept) == [int(NOW + 100 + i) for i in range(32)]
    assert table.put(keys[0], record(dht=keys[0], expiry=NOW + 5000), now=NOW) is Put.FULL
    # Expired records make room.
    assert table.put(keys[0], record(dht=keys[0], expiry=NOW + 5000), now=NOW + 120) is Put.STORED


def test_one_throwaway_key_cannot_wipe_a_storage_node() -> None:
    """Found by an attack review: one key sent 4,096 records expiring as late as allowed;
    every honest record was evicted and honest re-announcements got FULL."""
    table = RecordTable()
    honest = [signer() for _ in range(20)]
    for i, device in enumerate(honest):
        source = f"198.51.100.{i}"
        assert table.put(KEY, record(device, expiry=NOW + 600), now=NOW, source=source) is (
            Put.STORED
        )
    attacker = signer()
    stored = 0
    for _ in range(4096):
        key = os.urandom(DHT_KEY_SIZE)
        latest = record(attacker, dht=key, expiry=NOW + records.MAX_LIFETIME - 1)
        stored += table.put(key, latest, now=NOW, source="203.0.113.66") is Put.STORED
    assert stored == table.per_source
    # One signing key for every DHT key (an honest device has one per key): capped per key.
    one_key = signer()
    stored = sum(
        table.put(k, sealed(b"\x0f192.0.2.7:22000", 1, key=k, day=one_key), now=NOW) is Put.STORED
        for k in (os.urandom(DHT_KEY_SIZE) for _ in range(100))
    )
    assert stored == table.per_device
    assert len(table.get(KEY, now=NOW)) == 20
    for device in honest:  # a re-announcement, expiring later, is always taken
        assert table.put(KEY, record(device, expiry=NOW + 900), now=NOW) is Put.STORED


def test_one_address_with_many_keys_is_capped_per_source_and_per_key() -> None:
    table = RecordTable(per_key=32, total=4096, per_source=64, per_source_key=8)
    results = [
        table.put(KEY, record(), now=NOW, source="203.0.113.66") is Put.STORED for _ in range(20)
    ]
    assert sum(results) == 8  # one address cannot fill a folder's key
    others = [os.urandom(DHT_KEY_SIZE) for _ in range(40)]
    stored = sum(
        table.put(k, record(dht=k), now=NOW, source="203.0.113.66") is Put.STORED
        for k in others
        for _ in range(3)
    )
    assert stored == 64 - 8
    assert table.put(KEY, record(), now=NOW, source="198.51.100.9") is Put.STORED


def test_newest_per_device_orders_by_expiry() -> None:
    a, b = signer(), signer()
    found = [
        verify(record(k, expiry=NOW + e), now=NOW, dht_key=KEY)
        for k, e in ((a, 10), (b, 30), (a, 20))
    ]
    assert [(r.public_key, r.expiry) for r in newest_per_device(found)] == [
        (day_public(b), int(NOW + 30)),
        (day_public(a), int(NOW + 20)),
    ]


# -- the network -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def network(count: int, **options: Any) -> AsyncIterator[list[DhtNode]]:
    """`count` nodes on loopback, all joined through the first, twice (tables fill)."""
    nodes = [DhtNode(**options) for _ in range(count)]
    async with contextlib.AsyncExitStack() as stack:
        for node in nodes:
            await stack.enter_async_context(node)
            await node.listen("127.0.0.1", 0)
        seed = address(nodes[0])
        async with asyncio.timeout(DEADLINE):
            for _ in range(2):
                await asyncio.gather(*(node.join([seed]) for node in nodes[1:]))
        yield nodes


def address(node: DhtNode) -> str:
    host, port = node.address
    return f"{host}:{port}"


def loop_errors() -> list[dict[str, Any]]:
    """Collects whatever reaches the event loop's exception handler: an exception no one
    caught (in a callback or a task nobody awaited)."""
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    return errors


async def test_a_node_binds_only_the_address_it_is_given() -> None:
    async with DhtNode() as node:
        host, port = await node.listen("127.0.0.1", 0)
        assert host == "127.0.0.1" and port > 0
        # No pickle: kademlia's save_state/load_state are not part of the adapter at all.
        assert not hasattr(node, "load_state") and not hasattr(node, "save_state")


async def test_thirty_nodes_return_every_device_announced_under_a_key() -> None:
    async with network(30) as nodes:
        devices = [signer() for _ in range(5)]
        expiry = time.time() + 3600
        for i, device in enumerate(devices):
            data = record(device, addresses=(f"127.0.0.1:{40001 + i}",), expiry=expiry)
            async with asyncio.timeout(DEADLINE):
                assert await nodes[1 + i * 5].put(KEY, data) >= 10
        want = {day_public(d) for d in devices}
        took = []
        for node in nodes:
            start = time.perf_counter()
            async with asyncio.timeout(DEADLINE):
                found = await node.get(KEY)
            took.append(time.perf_counter() - start)
            assert {r.public_key for r in found} == want
        print(
            f"\n30-node DHT lookup: mean {1000 * sum(took) / len(took):.1f} ms, "
            f"max {1000 * max(took):.1f} ms"
        )


async def test_a_lookup_is_the_union_of_what_nodes_hold_not_the_first_answer() -> None:
    async with network(8) as nodes:
        # Each storage node holds a different device (as after churn): only a union finds all.
        devices = [signer() for _ in range(4)]
        for node, device in zip(nodes[1:5], devices, strict=True):
            node.storage.put(KEY, record(device, expiry=time.time() + 600))
        for node in (nodes[0], nodes[6]):
            found = await node.get(KEY)
            assert {r.public_key for r in found} == {day_public(d) for d in devices}


def store_packet(node_id: bytes, key: Any, value: Any, *, msg_id: bytes | None = None) -> bytes:
    """A STORE request exactly as kademlia's rpcudp frames one."""
    packed: bytes = umsgpack.packb(["store", [node_id, key, value]])
    return b"\x00" + (msg_id or os.urandom(20)) + packed


class RawPeer(asyncio.DatagramProtocol):
    """A raw UDP socket: sends what it likes, collects every reply."""

    def __init__(self) -> None:
        self.replies: dict[bytes, Any] = {}
        self.arrived = asyncio.Event()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # not a subclass of it

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data[:1] == b"\x01":
            self.replies[data[1:21]] = msgpack.unpackb(data[21:])
            self.arrived.set()

    def send(self, data: bytes, to: tuple[str, int]) -> bytes:
        assert self.transport is not None
        self.transport.sendto(data, to)
        return data[1:21]

    async def reply(self, msg_id: bytes) -> Any:
        async with asyncio.timeout(DEADLINE):
            while msg_id not in self.replies:
                self.arrived.clear()
                await self.arrived.wait()
        return self.replies[msg_id]

    async def ping(self, to: tuple[str, int]) -> Any:
        """Datagrams are handled in order: a ping answered means all before it were handled."""
        packet = b"\x00" + os.urandom(20) + umsgpack.packb(["ping", [os.urandom(20)]])
        return await self.reply(self.send(packet, to))


@contextlib.asynccontextmanager
async def raw_peer() -> AsyncIterator[RawPeer]:
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(
        RawPeer, local_addr=("127.0.0.1", 0), family=socket.AF_INET
    )
    try:
        yield peer
    finally:
        transport.close()


async def test_a_forged_store_from_a_raw_socket_is_ignored_on_read() -> None:
    errors = loop_errors()
    async with network(10) as nodes, raw_peer() as attacker:
        device = signer()
        genuine = record(device, expiry=time.time() + 600)
        assert await nodes[3].put(KEY, genuine) >= 5

        async def store_everywhere(value: Any) -> list[Any]:
            sent = [
                attacker.send(store_packet(os.urandom(20), KEY, value), n.address) for n in nodes
            ]
            return [await attacker.reply(msg_id) for msg_id in sent]

        assert await store_everywhere(b"garbage") == [False] * 10
        assert await store_everywhere(12345) == [False] * 10
        assert await store_everywhere(_flip(genuine, HEAD.size + 2)) == [False] * 10
        # A replay of the device's older record: the newer one is held, and stays.
        assert await store_everywhere(record(device, expiry=time.time() + 300)) == [True] * 10
        # A non-member signs its own record: storage nodes keep it (they cannot check the
        # folder proof); members drop it on read.
        planted = record(folder=FolderKey.generate().discovery_id, expiry=time.time() + 600)
        assert await store_everywhere(planted) == [True] * 10
        # Over kademlia's own 8 KB request cap: dropped unanswered.
        too_big = attacker.send(
            store_packet(os.urandom(20), KEY, os.urandom(9000)), nodes[0].address
        )
        assert await attacker.ping(nodes[0].address) == nodes[0].node_id
        assert too_big not in attacker.replies
        for node in nodes:
            found = {r.data for r in await node.get(KEY)}
            assert found == {genuine, planted}
            members = []
            for data in found:
                with contextlib.suppress(DecodeError):
                    verify(data, now=time.time(), dht_key=KEY, discovery_id=FOLDER)
                    members.append(data)
            assert members == [genuine]
    assert errors == []


HOSTILE_DATAGRAMS = [
    b"",
    b"\x00" * 21,
    b"\x00" + os.urandom(20) + b"\xc1",  # a msgpack code that is never used
    b"\x00" + os.urandom(20) + b"\x91" * 5000,  # nested arrays, deeper than any stack
    b"\x00" + os.urandom(20) + b"\xdd\xff\xff\xff\xff",  # an array claiming 4 billion items
    b"\x00" + os.urandom(20) + msgpack.packb({"a": 1}),
    b"\x00" + os.urandom(20) + msgpack.packb(["store"]),
    b"\x00" + os.urandom(20) + msgpack.packb(["store", [b"short id", KEY, b"x"]]),
    b"\x00" + os.urandom(20) + msgpack.packb(["store", [os.urandom(20), 7, b"x"]]),
    b"\x00" + os.urandom(20) + msgpack.packb(["find_node", [os.urandom(20), "text key"]]),
    b"\x00" + os.urandom(20) + msgpack.packb(["find_value", [os.urandom(20), os.urandom(32)]]),
    b"\x00" + os.urandom(20) + msgpack.packb(["ping", [os.urandom(20), "extra"]]),
    b"\x00" + os.urandom(20) + msgpack.packb(["__init__", []]),
    b"\x00" + os.urandom(20) + msgpack.packb(["welcome_if_new", [1]]),
    b"\x00" + os.urandom(20) + msgpack.ExtType(1, b"x").data,
    b"\x01" + os.urandom(20) + msgpack.packb([True]),  # an answer nobody asked for
    b"\x02" + os.urandom(40),
    os.urandom(60000),
]


async def test_hostile_datagrams_raise_nothing_and_change_nothing() -> None:
    errors = loop_errors()
    async with network(2) as nodes, raw_peer() as attacker:
        target = nodes[1]
        before = target.contacts
        for data in HOSTILE_DATAGRAMS:
            attacker.send(data, target.address)
        assert await attacker.ping(target.address) == target.node_id
        # Answered: the ping, and the STORE from a well-formed node ID with a key that is not
        # (a plain "no"). Nothing else.
        assert sorted(map(repr, attacker.replies.values())) == [repr(False), repr(target.node_id)]
        assert len(target.storage) == 0 and target.storage.refused == 1
        assert target.contacts == before  # the attacker never answered our ping back
    assert errors == []


class LyingNode(RawPeer):
    """A node that answers every request, with junk: malformed contacts, records that are
    not records, contacts pointing at loopback services and multicast."""

    def __init__(self, node_id: bytes, planted: list[Any]) -> None:
        super().__init__()
        self.node_id = node_id
        self.planted = planted

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data[:1] != b"\x00":
            return
        name, _ = msgpack.unpackb(data[21:])
        junk_nodes: list[Any] = [
            [b"short", "127.0.0.1", 1],
            "junk",
            [os.urandom(20), "224.0.0.251", 5353],
            [os.urandom(20), "not an ip", 5],
            [os.urandom(20), "127.0.0.1", 70000],
            [os.urandom(20), "::1", 5],
        ]
        reply: Any = {
            "ping": self.node_id,
            "find_node": junk_nodes,
            "find_value": {"values": self.planted, "nodes": junk_nodes},
        }.get(name)
        assert self.transport is not None
        self.transport.sendto(b"\x01" + data[1:21] + msgpack.packb(reply), addr)


async def test_lying_answers_count_as_junk_not_as_errors() -> None:
    errors = loop_errors()
    genuine = record(expiry=time.time() + 600)
    planted = [b"junk", 5, None, [b"x"], genuine, _flip(genuine, 40), b"\0" * 5000]
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: LyingNode(os.urandom(20), planted), local_addr=("127.0.0.1", 0)
    )
    try:
        async with DhtNode(rpc_timeout=0.5) as node:
            await node.listen("127.0.0.1", 0)
            host, port = transport.get_extra_info("sockname")
            async with asyncio.timeout(DEADLINE):
                assert await node.join([f"{host}:{port}"]) == 1  # the liar, no junk contact
                assert [r.data for r in await node.get(KEY)] == [genuine]
                assert await node.put(KEY, genuine) == 0  # its "None" is not a yes
    finally:
        transport.close()
    assert errors == []


async def test_a_store_flood_stays_bounded() -> None:
    errors = loop_errors()
    async with DhtNode(per_key=4, total=16) as node, raw_peer() as attacker:
        await node.listen("127.0.0.1", 0)
        keys = [os.urandom(DHT_KEY_SIZE) for _ in range(25)]
        expiry = time.time() + 600
        for i in range(300):
            key = keys[i % len(keys)]
            attacker.send(
                store_packet(os.urandom(20), key, record(dht=key, expiry=expiry + i)), node.address
            )
        assert await attacker.ping(node.address) == node.node_id
        assert len(node.storage) == 16
        assert all(len(node.storage.get(k) or []) <= 4 for k in keys)
        assert node.contacts == 0  # 301 node IDs claimed, none answered a ping
        # And had they answered: one address holds one contact, whatever IDs it claims.
        for _ in range(300):
            node._live().router.add_contact(Node(os.urandom(20), "127.0.0.1", 9))
        assert node.contacts == 1
    assert errors == []


async def test_a_new_contact_closest_to_a_key_is_handed_its_records() -> None:
    """kademlia measures a new node's distance to digest(key), which hashes the key again:
    the records go to the wrong nodes. Ours go to the node closest to the key itself."""
    key = bytes(DHT_KEY_SIZE - 1) + b"\x10"

    def near(bit: int) -> bytes:
        return (int.from_bytes(key, "big") ^ (1 << bit)).to_bytes(DHT_KEY_SIZE, "big")

    holder_id, far_id, new_id = near(100), near(150), near(0)
    # What kademlia's rule decides for these nodes, with its double hash: no hand-over.
    hashed = int.from_bytes(digest(key), "big")
    far, holder, new = (int.from_bytes(i, "big") ^ hashed for i in (far_id, holder_id, new_id))
    assert not (new < far and holder < far)
    async with (
        DhtNode(node_id=holder_id) as holder_node,
        DhtNode(node_id=far_id) as far_node,
        DhtNode(node_id=new_id) as new_node,
    ):
        for node in (holder_node, far_node, new_node):
            await node.listen("127.0.0.1", 0)
        await holder_node.join([address(far_node)])
        data = record(dht=key, expiry=time.time() + 600)
        assert holder_node.storage.put(key, data) and len(far_node.storage) == 0
        await new_node.join([address(holder_node)])
        async with asyncio.timeout(DEADLINE):
            while len(new_node.storage) == 0:
                await asyncio.sleep(0.01)
        assert new_node.storage.get(key) == [data]


# -- the finder --------------------------------------------------------------------------------


class Members:
    """Finders in one process, each reporting what it finds into its own list."""

    def __init__(self) -> None:
        self.found: dict[str, list[Found]] = {}
        self.arrived = asyncio.Event()
        self.finders: dict[str, DhtFinder] = {}

    def context(self, name: str, folder: FolderKey, *, host: str, port: int) -> Context:
        self.found[name] = []

        def on_found(found: Found) -> None:
            self.found[name].append(found)
            self.arrived.set()

        return Context(
            device_key=signer(), host=host, port=port, folders=(folder,), on_found=on_found
        )

    async def until(self, check: Callable[[], bool]) -> None:
        async with asyncio.timeout(DEADLINE):
            while not check():
                self.arrived.clear()
                await self.arrived.wait()


async def test_members_of_a_folder_find_each_other_and_no_one_else() -> None:
    errors = loop_errors()
    folder, other = FolderKey.generate(), FolderKey.generate()
    members = Members()
    async with DhtNode() as bootstrap, contextlib.AsyncExitStack() as stack:
        await bootstrap.listen("127.0.0.1", 0)
        seed = address(bootstrap)
        setups = {
            "a": (folder, "127.0.0.1", 41001),
            "b": (folder, "0.0.0.0", 41002),  # a wildcard listener announces its route's address
            "c": (other, "127.0.0.1", 41003),
        }
        start = time.perf_counter()
        for name, (folder_key, host, port) in setups.items():
            context = members.context(name, folder_key, host=host, port=port)
            finder = DhtFinder(context, bootstrap=[seed], port=0)
            members.finders[name] = finder
            await finder.start()
            stack.push_async_callback(finder.stop)
        a, b = members.finders["a"].context, members.finders["b"].context
        await members.until(lambda: bool(members.found["a"] and members.found["b"]))
        print(f"\nloopback DHT, start to both found: {time.perf_counter() - start:.2f} s")
        assert members.found["a"][0] == Found(
            folder=folder.discovery_id, device=b.device, addresses=("127.0.0.1:41002",), via="dht"
        )
        assert members.found["b"][0] == Found(
            folder=folder.discovery_id, device=a.device, addresses=("127.0.0.1:41001",), via="dht"
        )
        # A non-member plants a record under the folder's DHT key (which it can see): stored,
        # never reported. And the member of another folder saw nobody.
        now = time.time()
        for key in lookup_keys(folder.discovery_id, now=now, lifetime=3600):
            await bootstrap.put(key, record(dht=key, folder=other.discovery_id, expiry=now + 600))
        late = members.context("late", folder, host="127.0.0.1", port=41004)
        finder = DhtFinder(late, bootstrap=[], port=0)
        await finder.start()
        stack.push_async_callback(finder.stop)
        finder.hint(seed)  # a DHT node met by other means: the only way in
        await members.until(lambda: len({f.device for f in members.found["late"]}) == 2)
        assert {f.device for f in members.found["late"]} == {a.device, b.device}
        assert members.found["c"] == []
    assert errors == []


async def test_a_stranger_gets_a_small_answer_and_a_contact_all_records() -> None:
    """A spoofed sender address would turn a small FIND_VALUE into a large reply sent to a
    victim: strangers get about 1 KB of records, contacts that answered us get them all."""
    async with network(2) as nodes, raw_peer() as stranger:
        holder, contact = nodes
        expiry = time.time() + 600
        held = [record(dht=KEY, expiry=expiry) for _ in range(30)]
        for data in held:
            holder.storage.put(KEY, data)
        packet = b"\x00" + os.urandom(20) + msgpack.packb(["find_value", [os.urandom(20), KEY]])
        reply = await stranger.reply(stranger.send(packet, holder.address))
        assert 0 < sum(map(len, reply["values"])) <= 1200
        assert {r.data for r in await contact.get(KEY)} == set(held)


async def test_a_finder_keeps_trying_until_its_bootstrap_node_answers() -> None:
    """A finder started before the only bootstrap node joins once that node comes up."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        seed_port = probe.getsockname()[1]
    folder, members = FolderKey.generate(), Members()
    async with contextlib.AsyncExitStack() as stack:
        for name, port in (("early", 42001), ("late", 42002)):
            context = members.context(name, folder, host="127.0.0.1", port=port)
            finder = DhtFinder(
                context, bootstrap=[f"127.0.0.1:{seed_port}"], port=0, rpc_timeout=0.3
            )
            members.finders[name] = finder
            await finder.start()
            stack.push_async_callback(finder.stop)
        bootstrap = await stack.enter_async_context(DhtNode())
        await bootstrap.listen("127.0.0.1", seed_port)
        await members.until(lambda: bool(members.found["early"] and members.found["late"]))
        assert members.found["early"][0].addresses == ("127.0.0.1:42002",)
        assert members.found["late"][0].addresses == ("127.0.0.1:42001",)


@pytest.mark.parametrize(
    ("host", "counted_as"),
    [
        ("203.0.113.66", "203.0.113.66"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.66", "203.0.113.66"),
        ("not-an-address", "not-an-address"),
    ],
)
def test_a_store_counts_against_its_ipv4_address_or_ipv6_64(host: str, counted_as: str) -> None:
    assert source_of(host) == counted_as
