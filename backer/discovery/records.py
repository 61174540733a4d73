"""DHT records: what a device stores in the DHT so the members of its folders can find it.

Owns the record format, the DHT keys a folder is announced under, sealing and checking a record,
and the bounded table of records a DHT node keeps. Pure: no I/O, no clock (time is an
argument); imports errors, ids, addresses and pynacl only.

A record says "this device listens at these addresses until `expiry`", readable by members only:

    version u8 (2) | day key 32 | expiry u32 (unix s) | nonce 24 | sealed | signature 64
    sealed = XChaCha20-Poly1305(members' key, nonce, ad = DHT key | the 61 bytes before it,
             device key 32 | device signature 64 | address count u8
             | count x (length u8, `host:port` UTF-8))

A folder is announced under `dht_key(discovery_id, epoch)`, a hash of its discovery ID and the
day; the members' key is derived from the discovery ID and the DHT key, so it changes daily too.
The day key is an Ed25519 key the device derives from its own key and the DHT key: storage
nodes check its signature (over the DHT key and every byte before it, so a record cannot be
altered, replayed under another key, or replaced without it), the size and the expiry, and learn
nothing else: not the device, not its addresses, and nothing that links one day's record to the
next. A member opens the sealed part (which proves the record was made by a member) and checks
the device's own signature inside, which binds the device key to this day key, the DHT key,
the expiry and the addresses.
"""

from __future__ import annotations

import enum
import heapq
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import nacl.bindings
import nacl.exceptions
import nacl.signing

from backer.addresses import parse_address
from backer.errors import DecodeError, InvalidAddressError
from backer.ids import hash_bytes

__all__ = [
    "DHT_KEY_SIZE",
    "EPOCH_SECONDS",
    "MAX_ADDRESSES",
    "MAX_ADDRESS_TEXT",
    "MAX_LIFETIME",
    "MAX_RECORD_SIZE",
    "NONCE_SIZE",
    "RECORD_VERSION",
    "SIGNATURE_SIZE",
    "Put",
    "Record",
    "RecordTable",
    "announce_keys",
    "day_key_of",
    "dht_key",
    "epoch_of",
    "lookup_keys",
    "make_record",
    "newest_per_device",
    "verify",
]

RECORD_VERSION = 2  # 1 carried the device key and addresses in the clear: linkable across days
DHT_KEY_SIZE = 20  # kademlia's 160-bit key space
EPOCH_SECONDS = 86_400  # the DHT key of a folder changes daily
MAX_ADDRESSES = 8
MAX_ADDRESS_TEXT = 255  # one length byte
MAX_RECORD_SIZE = 1024
MAX_LIFETIME = 4 * 3600  # a record claiming to live longer than this is refused
SIGNATURE_SIZE = 64
PUBLIC_KEY_SIZE = 32
NONCE_SIZE = 24
TAG_SIZE = 16

_HEAD = struct.Struct(">B32sI24s")  # version, day key, expiry, nonce
_INNER = struct.Struct(">32s64sB")  # device key, device signature, address count
_SIGNED_CONTEXT = b"backer dht record v2\x00"  # the day key's signature over the record
_DEVICE_CONTEXT = b"backer dht record v2 device\x00"  # the device's, inside
_MAX_EXPIRY = 2**32 - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """A decoded record that passed `verify`. `data` is its exact encoding (what is stored and
    served again). A storage node sees only the day key and the expiry; a member also the
    device key and the addresses."""

    public_key: bytes  # the day key: one per device and DHT key
    expiry: int
    data: bytes = field(repr=False)
    device_key: bytes = b""  # the device's Ed25519 key (members only)
    addresses: tuple[str, ...] = ()  # members only

    @property
    def device(self) -> bytes:
        """The device ID (BLAKE3 of the device key), as the mesh names devices."""
        if not self.device_key:
            raise ValueError("only a member can read a record's device")
        return hash_bytes("device id", self.device_key)


# -- keys and epochs ---------------------------------------------------------------------------


def epoch_of(now: float) -> int:
    return int(now // EPOCH_SECONDS)


def dht_key(discovery_id: bytes, epoch: int) -> bytes:
    """The 20-byte DHT key a folder is announced under during `epoch`."""
    if epoch < 0:
        raise ValueError("an epoch is not negative")
    return hash_bytes("dht key", discovery_id + epoch.to_bytes(8, "big"))[:DHT_KEY_SIZE]


def announce_keys(discovery_id: bytes, *, now: float, lifetime: float) -> list[bytes]:
    """Where a record made at `now` living `lifetime` seconds goes: the current epoch's key, and
    the next epoch's too when the record outlives the current epoch (so a member whose clock is
    ahead, already in the next epoch, still finds it)."""
    epoch = epoch_of(now)
    keys = [dht_key(discovery_id, epoch)]
    if now + lifetime >= (epoch + 1) * EPOCH_SECONDS:
        keys.append(dht_key(discovery_id, epoch + 1))
    return keys


def lookup_keys(discovery_id: bytes, *, now: float, lifetime: float) -> list[bytes]:
    """Where to look at `now`: the current epoch's key, and the previous one's while records
    announced before the epoch began may still live."""
    epoch = epoch_of(now)
    keys = [dht_key(discovery_id, epoch)]
    if epoch > 0 and now - epoch * EPOCH_SECONDS < lifetime:
        keys.append(dht_key(discovery_id, epoch - 1))
    return keys


# -- making and checking records ---------------------------------------------------------------


def make_record(
    device_key: nacl.signing.SigningKey,
    *,
    discovery_id: bytes,
    key: bytes,
    addresses: Iterable[str],
    expiry: int,
    nonce: bytes | None = None,
) -> bytes:
    """Our sealed, signed record for the folder `discovery_id` under the DHT key `key`."""
    listed = tuple(dict.fromkeys(addresses))
    if not 1 <= len(listed) <= MAX_ADDRESSES:
        raise ValueError(f"a record lists 1 to {MAX_ADDRESSES} addresses, not {len(listed)}")
    if not 0 < expiry <= _MAX_EXPIRY:
        raise ValueError(f"expiry {expiry} out of range")
    if len(key) != DHT_KEY_SIZE:
        raise ValueError(f"a DHT key is {DHT_KEY_SIZE} bytes")
    listing = b""
    for address in listed:
        parse_address(address)
        text = address.encode("utf-8")
        if len(text) > MAX_ADDRESS_TEXT:
            raise ValueError(f"address too long: {address!r}")
        listing += bytes([len(text)]) + text
    day_key = day_key_of(device_key, key)
    head = _HEAD.pack(
        RECORD_VERSION, bytes(day_key.verify_key), expiry, nonce or os.urandom(NONCE_SIZE)
    )
    vouched = device_key.sign(
        _DEVICE_CONTEXT + key + head[:-NONCE_SIZE] + bytes([len(listed)]) + listing
    ).signature
    inner = _INNER.pack(bytes(device_key.verify_key), vouched, len(listed)) + listing
    sealed = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        inner, key + head, head[-NONCE_SIZE:], _members_key(discovery_id, key)
    )
    body = head + sealed
    record = body + day_key.sign(_SIGNED_CONTEXT + key + body).signature
    if len(record) > MAX_RECORD_SIZE:
        raise ValueError(f"a record of {len(record)} bytes is over {MAX_RECORD_SIZE}")
    return record


def day_key_of(device_key: nacl.signing.SigningKey, key: bytes) -> nacl.signing.SigningKey:
    """The key a device signs its records under `key` (one DHT key, so one folder and day)
    with: derived from its own, so each republication keeps it, unlinkable without it."""
    return nacl.signing.SigningKey(hash_bytes("dht day key", device_key.encode() + key))


def verify(data: bytes, *, now: float, dht_key: bytes, discovery_id: bytes | None = None) -> Record:
    """The record in `data`, stored under `dht_key`; DecodeError saying why it is refused.

    Without `discovery_id` (a storage node) the form, size, day-key signature and expiry are
    checked; with it (a member) the sealed part is opened and checked too."""
    if not isinstance(data, bytes):
        raise DecodeError(f"a record is bytes, not {type(data).__name__}")
    if len(data) > MAX_RECORD_SIZE:
        raise DecodeError(f"a record of {len(data)} bytes is over {MAX_RECORD_SIZE}")
    if len(dht_key) != DHT_KEY_SIZE:
        raise DecodeError(f"a DHT key is {DHT_KEY_SIZE} bytes")
    if len(data) < _HEAD.size + TAG_SIZE + _INNER.size + SIGNATURE_SIZE:
        raise DecodeError("a record too short")
    version, day_key, expiry, nonce = _HEAD.unpack_from(data)
    if version != RECORD_VERSION:
        raise DecodeError(f"record version {version}")
    if expiry <= now:  # before the signature: the cheap checks first
        raise DecodeError(f"a record expired at {expiry}")
    if expiry > now + MAX_LIFETIME:
        raise DecodeError(f"a record claims to live until {expiry}, too far ahead")
    if not nacl.bindings.crypto_core_ed25519_is_valid_point(day_key):
        raise DecodeError("a record's day key is not a valid Ed25519 point")
    body, signature = data[:-SIGNATURE_SIZE], data[-SIGNATURE_SIZE:]
    try:
        nacl.signing.VerifyKey(day_key).verify(_SIGNED_CONTEXT + dht_key + body, signature)
    except nacl.exceptions.BadSignatureError:
        raise DecodeError(
            "a record's signature does not match (forged, altered or moved)"
        ) from None
    record = Record(public_key=day_key, expiry=expiry, data=data)
    if discovery_id is None:
        return record
    try:
        inner = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            body[_HEAD.size :],
            dht_key + body[: _HEAD.size],
            nonce,
            _members_key(discovery_id, dht_key),
        )
    except nacl.exceptions.CryptoError:
        raise DecodeError(
            "a record does not open with the folder's key: not made by a member"
        ) from None
    if len(inner) < _INNER.size:
        raise DecodeError("a record's sealed part is too short")
    device_key, vouched, count = _INNER.unpack_from(inner)
    addresses = _addresses(inner[_INNER.size :], count)
    try:
        nacl.signing.VerifyKey(device_key).verify(
            _DEVICE_CONTEXT + dht_key + body[: _HEAD.size - NONCE_SIZE] + inner[_INNER.size - 1 :],
            vouched,
        )
    except (nacl.exceptions.BadSignatureError, ValueError):
        raise DecodeError("a record's device signature does not match") from None
    return Record(
        public_key=day_key, expiry=expiry, data=data, device_key=device_key, addresses=addresses
    )


def _addresses(listing: bytes, count: int) -> tuple[str, ...]:
    """The `count` addresses of a record's listing, which they must fill exactly."""
    if not 1 <= count <= MAX_ADDRESSES:
        raise DecodeError(f"a record lists 1 to {MAX_ADDRESSES} addresses, not {count}")
    offset = 0
    addresses: list[str] = []
    for _ in range(count):
        if offset >= len(listing):
            raise DecodeError("a record's addresses run past its end")
        size = listing[offset]
        text = listing[offset + 1 : offset + 1 + size]
        offset += 1 + size
        if len(text) != size or size == 0:
            raise DecodeError("a record's address is cut short or empty")
        try:
            address = text.decode("utf-8")
            parse_address(address)
        except (UnicodeDecodeError, InvalidAddressError) as exc:
            raise DecodeError(f"a record's address is not host:port: {text!r}") from exc
        addresses.append(address)
    if len(set(addresses)) != len(addresses):
        raise DecodeError("a record lists an address twice")
    if offset != len(listing):
        raise DecodeError("a record's length does not match its fields (extra or missing bytes)")
    return tuple(addresses)


def _members_key(discovery_id: bytes, key: bytes) -> bytes:
    return hash_bytes("dht record seal", discovery_id + key)


def newest_per_device(records: Iterable[Record]) -> list[Record]:
    """One record per device, the one that expires last; latest expiry first."""
    best: dict[bytes, Record] = {}
    for record in records:
        held = best.get(record.public_key)
        if held is None or record.expiry > held.expiry:
            best[record.public_key] = record
    return sorted(best.values(), key=lambda r: -r.expiry)


# -- what a DHT node keeps ---------------------------------------------------------------------


class Put(enum.Enum):
    """What `RecordTable.put` did with a valid record."""

    STORED = "stored"
    STALE = "stale"  # the table holds a record of that device expiring as late or later
    FULL = "full"  # the table (or the key) is full of records that outlive this one


class RecordTable:
    """A bounded set of records per DHT key: at most `per_key` devices per key (the newest
    record of each) and `total` records in all. Only records that pass `verify` (as a storage
    node) enter.

    Nobody may crowd the others out: one device (public key) holds at most `per_device`
    records, one source address at most `per_source` (and `per_source_key` under one key),
    and a newcomer never displaces a live record: when the table or the key is full it is
    refused until records expire. A device's own newer record always replaces its older one.
    Records put with no source (`source=""`: the node's own) count against no source.
    """

    def __init__(
        self,
        *,
        per_key: int = 32,
        total: int = 4096,
        per_device: int = 16,
        per_source: int = 64,
        per_source_key: int = 8,
    ) -> None:
        if per_key < 1 or total < per_key:
            raise ValueError("a table holds at least one record per key, and total >= per_key")
        if min(per_device, per_source, per_source_key) < 1:
            raise ValueError("every cap is at least one record")
        self.per_key = per_key
        self.total = total
        self.per_device = per_device
        self.per_source = per_source
        self.per_source_key = per_source_key
        self._keys: dict[bytes, dict[bytes, Record]] = {}
        self._count = 0
        self._sources: dict[tuple[bytes, bytes], str] = {}  # (key, public key) -> who stored it
        self._by_device: dict[bytes, int] = {}
        self._by_source: dict[str, int] = {}
        self._by_source_key: dict[tuple[str, bytes], int] = {}
        # (expiry, key, public key) of every record held, soonest first; entries of records
        # since replaced or removed are skipped when met, and compacted away in bulk.
        self._expiries: list[tuple[int, bytes, bytes]] = []

    def __len__(self) -> int:
        return self._count

    def put(self, key: bytes, data: bytes, *, now: float, source: str = "") -> Put:
        """Keep `data` under `key` if it is a valid record; DecodeError (with the reason) if
        it is not. `source` is the host that sent it ("" for the node itself)."""
        record = verify(data, now=now, dht_key=key)
        held = self._keys.get(key, {}).get(record.public_key)
        if held is not None:
            if held.expiry >= record.expiry:
                return Put.STALE
            source = self._sources.get((key, held.public_key), source)
            self._remove(key, held.public_key)
        else:
            self.cull(now=now)
            if self._crowded(key, record.public_key, source):
                return Put.FULL
        self._keys.setdefault(key, {})[record.public_key] = record
        self._count += 1
        self._sources[(key, record.public_key)] = source
        _count(self._by_device, record.public_key, 1)
        if source:
            _count(self._by_source, source, 1)
            _count(self._by_source_key, (source, key), 1)
        heapq.heappush(self._expiries, (record.expiry, key, record.public_key))
        if len(self._expiries) > 2 * self._count + 64:
            self._expiries = [
                (r.expiry, k, r.public_key) for k, held in self._keys.items() for r in held.values()
            ]
            heapq.heapify(self._expiries)
        return Put.STORED

    def _crowded(self, key: bytes, public_key: bytes, source: str) -> bool:
        """Whether a new record of `public_key` from `source` would pass a cap."""
        return (
            self._count >= self.total
            or len(self._keys.get(key, {})) >= self.per_key
            or self._by_device.get(public_key, 0) >= self.per_device
            or (
                bool(source)
                and (
                    self._by_source.get(source, 0) >= self.per_source
                    or self._by_source_key.get((source, key), 0) >= self.per_source_key
                )
            )
        )

    def get(self, key: bytes, *, now: float) -> list[bytes]:
        """The live records under `key`, latest expiry first."""
        records = self._keys.get(key)
        if not records:
            return []
        live = sorted((r for r in records.values() if r.expiry > now), key=lambda r: -r.expiry)
        return [r.data for r in live]

    def keys(self) -> list[bytes]:
        return list(self._keys)

    def items(self, *, now: float) -> Iterator[tuple[bytes, list[bytes]]]:
        """Every key with its live records."""
        for key in list(self._keys):
            records = self.get(key, now=now)
            if records:
                yield key, records

    def cull(self, *, now: float) -> int:
        """Forget expired records; how many were forgotten."""
        gone = 0
        while (found := self._soonest()) is not None and found[1].expiry <= now:
            self._remove(found[0], found[1].public_key)
            gone += 1
        return gone

    def _soonest(self) -> tuple[bytes, Record] | None:
        """The record expiring soonest, and its key."""
        while self._expiries:
            expiry, key, public_key = self._expiries[0]
            held = self._keys.get(key, {}).get(public_key)
            if held is not None and held.expiry == expiry:
                return key, held
            heapq.heappop(self._expiries)
        return None

    def _remove(self, key: bytes, public_key: bytes) -> None:
        records = self._keys[key]
        del records[public_key]
        self._count -= 1
        if not records:
            del self._keys[key]
        _count(self._by_device, public_key, -1)
        source = self._sources.pop((key, public_key), "")
        if source:
            _count(self._by_source, source, -1)
            _count(self._by_source_key, (source, key), -1)


_K = TypeVar("_K")


def _count(counts: dict[_K, int], what: _K, change: int) -> None:
    left = counts.get(what, 0) + change
    if left > 0:
        counts[what] = left
    else:
        counts.pop(what, None)
