"""The encrypted channel over in-memory links: data both ways, the cipher offer, every refusal
(wrong folder, wrong key, bad identity, downgrade, timeout), what a relay in the middle sees and
what it can break (flipped bits, cuts, oversized and undersized records), rekeying, keepalives
and the idle timeout; then two folders replicated end to end over SecureLinks.

Every wait has a deadline; nothing sleeps to synchronise."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from nacl.signing import SigningKey

from backer.errors import BackerError
from backer.ids import DeviceId
from backer.keys import FolderKey, Tier
from backer.mesh.channel import MAX_PLAINTEXT, Channel, ChannelError, Reason
from backer.mesh.noise import CipherName, DeviceHandshake, available_ciphers
from backer.mesh.secure import SecureLink, secure
from backer.sync.link import Link, memory_pipe
from backer.sync.peer import run_session
from backer.sync.replica import Replica

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 10.0
T = TypeVar("T")

# Sizes on the wire: a record is a 2-byte length, then the Noise message.
MSG1_RECORD = 2 + 1 + 32 + 16  # offer byte, e, empty payload's tag
MSG2_RECORD = 2 + 32 + 48 + 96 + 16  # e, encrypted s, encrypted identity
MSG3_RECORD = 2 + 48 + 96 + 16  # encrypted s, encrypted identity
CONFIRM_RECORD = 2 + 16
DEFAULT_CIPHER: CipherName = "AESGCM" if "AESGCM" in available_ciphers() else "ChaChaPoly"


async def within(awaitable: Awaitable[T]) -> T:
    async with asyncio.timeout(DEADLINE):
        return await awaitable


async def read_exactly(link: Link, count: int) -> bytes:
    got = bytearray()
    async with asyncio.timeout(DEADLINE):
        while len(got) < count:
            data = await link.read()
            assert data, f"the stream ended after {len(got)} of {count} bytes"
            got += data
    return bytes(got)


async def secure_both(
    link_i: Link,
    link_r: Link,
    *,
    folder: FolderKey,
    folder_r: FolderKey | None = None,
    key_i: SigningKey | None = None,
    key_r: SigningKey | None = None,
    options_i: dict[str, Any] | None = None,
    options_r: dict[str, Any] | None = None,
) -> list[SecureLink | BaseException]:
    """Both ends of a handshake at once; each result is a SecureLink or the exception."""
    results = await within(
        asyncio.gather(
            secure(
                link_i,
                initiator=True,
                device_key=key_i or SigningKey.generate(),
                folder=folder,
                **(options_i or {}),
            ),
            secure(
                link_r,
                initiator=False,
                device_key=key_r or SigningKey.generate(),
                folder=folder_r or folder,
                **(options_r or {}),
            ),
            return_exceptions=True,
        )
    )
    return list(results)


def established(results: list[SecureLink | BaseException]) -> tuple[SecureLink, SecureLink]:
    one, two = results
    if isinstance(one, BaseException):
        raise one
    if isinstance(two, BaseException):
        raise two
    return one, two


def failures(results: list[SecureLink | BaseException]) -> list[ChannelError]:
    for result in results:
        assert isinstance(result, ChannelError), f"expected a ChannelError, got {result!r}"
    return [result for result in results if isinstance(result, ChannelError)]


class Relay:
    """A man in the middle: two memory pipes joined by a pump per direction, "i>r" (initiator to
    responder) and "r>i". It records every byte it forwards; it can flip one bit at a stream
    offset, cut a direction after some bytes, replace a direction's first write, or inject."""

    def __init__(
        self,
        *,
        flip: tuple[str, int] | None = None,
        cut: tuple[str, int] | None = None,
        replace_first: tuple[str, bytes] | None = None,
    ) -> None:
        self.initiator_end, self._left = memory_pipe()
        self._right, self.responder_end = memory_pipe()
        self.seen: dict[str, bytearray] = {"i>r": bytearray(), "r>i": bytearray()}
        self.writes: dict[str, list[bytes]] = {"i>r": [], "r>i": []}
        self._flip = flip
        self._cut = cut
        self._replace_first = replace_first
        self.keepalives = 0
        self.enough_keepalives = asyncio.Event()
        self.keepalive_target = 0

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._pump("i>r", self._left, self._right))
            tasks.create_task(self._pump("r>i", self._right, self._left))

    async def inject(self, direction: str, data: bytes) -> None:
        await (self._right if direction == "i>r" else self._left).write(data)

    async def close(self) -> None:
        for end in (self._left, self._right):
            await end.close()

    async def _pump(self, direction: str, source: Link, sink: Link) -> None:
        while data := await source.read():
            offset = len(self.seen[direction])
            if self._replace_first and self._replace_first[0] == direction and not offset:
                data = self._replace_first[1]
            self.seen[direction] += data
            self.writes[direction].append(data)
            if self._flip and self._flip[0] == direction:
                at = self._flip[1] - offset
                if 0 <= at < len(data):
                    changed = bytearray(data)
                    changed[at] ^= 0x04
                    data = bytes(changed)
            if self._cut and self._cut[0] == direction:
                keep = self._cut[1] - offset
                if keep < len(data):
                    if keep > 0:
                        await sink.write(data[:keep])
                    break
            with contextlib.suppress(ConnectionError):
                await sink.write(data)
            if direction == "i>r" and len(data) == CONFIRM_RECORD:  # an empty record
                self.keepalives += 1
                if self.keepalive_target and self.keepalives >= self.keepalive_target:
                    self.enough_keepalives.set()
        await sink.close()


@contextlib.asynccontextmanager
async def relayed(**options: Any) -> AsyncIterator[Relay]:
    relay = Relay(**options)
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(relay.run())
        try:
            yield relay
        finally:
            await relay.close()


# -- data both ways ---------------------------------------------------------------------------


@pytest.mark.parametrize("cipher", [*available_ciphers(), None])
async def test_data_both_ways(cipher: CipherName | None) -> None:
    folder = FolderKey.generate()
    key_i, key_r = SigningKey.generate(), SigningKey.generate()
    options = {"ciphers": [cipher]} if cipher else {}
    one, two = memory_pipe()
    initiator, responder = established(
        await secure_both(
            one, two, folder=folder, key_i=key_i, key_r=key_r, options_i=options, options_r=options
        )
    )
    assert initiator.peer_device == DeviceId.from_public_key(bytes(key_r.verify_key))
    assert responder.peer_device == DeviceId.from_public_key(bytes(key_i.verify_key))
    assert initiator.handshake_hash == responder.handshake_hash
    assert initiator.cipher == responder.cipher == (cipher or DEFAULT_CIPHER)

    big = os.urandom(3 * MAX_PLAINTEXT + 1234)
    await initiator.write(big)
    await responder.write(b"pong")
    await initiator.write(b"")  # nothing to send: no record
    await initiator.write(b"tail")
    assert await read_exactly(responder, len(big) + 4) == big + b"tail"
    assert await read_exactly(initiator, 4) == b"pong"
    assert responder.stats.records_received == 4 + 1  # big is 4 records, then "tail"
    assert initiator.stats.keepalives_received == 1  # the key confirmation

    await initiator.close()
    assert await within(responder.read()) == b""  # a clean end between records
    await responder.close()


async def test_concurrent_writers_never_interleave_inside_a_write() -> None:
    folder = FolderKey.generate()
    one, two = memory_pipe(depth=4)
    initiator, responder = established(await secure_both(one, two, folder=folder))
    blobs = [bytes([n]) * (2 * MAX_PLAINTEXT + 100) for n in range(1, 5)]
    writing = [asyncio.ensure_future(initiator.write(blob)) for blob in blobs]
    received = await read_exactly(responder, sum(map(len, blobs)))
    await within(asyncio.gather(*writing))
    pieces = [received[i : i + len(blobs[0])] for i in range(0, len(received), len(blobs[0]))]
    assert sorted(pieces) == sorted(blobs)
    await initiator.close()
    await responder.close()


# -- the cipher offer -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offer_i", "offer_r", "expected"),
    [
        (None, None, DEFAULT_CIPHER),
        (["ChaChaPoly"], None, "ChaChaPoly"),
        (None, ["ChaChaPoly"], "ChaChaPoly"),  # the responder asks the initiator to retry
        (["AESGCM"], None, "AESGCM"),
        (["AESGCM"], ["ChaChaPoly"], Reason.NO_CIPHER),
        (["ChaChaPoly"], ["AESGCM"], Reason.NO_CIPHER),
    ],
)
async def test_cipher_choice(
    offer_i: list[CipherName] | None, offer_r: list[CipherName] | None, expected: object
) -> None:
    assert "AESGCM" in available_ciphers(), "these cases need hardware AES"
    folder = FolderKey.generate()
    async with relayed() as relay:
        results = await secure_both(
            relay.initiator_end,
            relay.responder_end,
            folder=folder,
            options_i={"ciphers": offer_i} if offer_i else None,
            options_r={"ciphers": offer_r} if offer_r else None,
        )
        if isinstance(expected, Reason):
            assert [e.reason for e in failures(results)] == [expected, expected]
            return
        initiator, responder = established(results)
        assert initiator.cipher == responder.cipher == expected
        retried = offer_i is None and offer_r == ["ChaChaPoly"]
        if retried:
            assert relay.writes["r>i"][0] == b"\x00\x01\x01"  # "retry with ChaChaPoly"
        assert len(relay.writes["i>r"]) == (3 if retried else 2)
        await initiator.close()
        await responder.close()


async def test_a_forged_retry_cannot_downgrade() -> None:
    """A relay answers the initiator's AES-GCM offer with a forged "retry with ChaChaPoly": the
    responder (which runs AES-GCM) never agrees, so the connection fails instead."""
    assert "AESGCM" in available_ciphers(), "this case needs hardware AES"
    folder = FolderKey.generate()
    async with relayed(replace_first=("r>i", b"\x00\x01\x01")) as relay:
        results = await secure_both(relay.initiator_end, relay.responder_end, folder=folder)
        failures(results)


def test_a_retried_offer_nobody_asked_for_is_a_downgrade() -> None:
    folder = FolderKey.generate()
    initiator, responder = (
        Channel(
            initiator=side,
            device_key=SigningKey.generate(),
            psk=folder.psk,
            discovery_id=folder.discovery_id,
        )
        for side in (True, False)
    )
    initiator.start()
    responder.start()
    first = bytearray(initiator.data_to_send())
    first[2] |= 0x80  # the retry flag on the offer byte
    with pytest.raises(ChannelError) as raised:
        responder.receive_data(bytes(first))
    assert raised.value.reason is Reason.DOWNGRADE
    assert responder.data_to_send() == b"\x00\x01\x14"  # the alert, then nothing


def test_the_machine_refuses_misuse() -> None:
    folder = FolderKey.generate()
    side = Channel(
        initiator=True,
        device_key=SigningKey.generate(),
        psk=folder.psk,
        discovery_id=folder.discovery_id,
    )
    with pytest.raises(BackerError):
        side.receive_data(b"\x00\x01")
    with pytest.raises(BackerError):
        side.seal(b"early")
    with pytest.raises(BackerError):
        Channel(
            initiator=True,
            device_key=SigningKey.generate(),
            psk=folder.psk,
            discovery_id=folder.discovery_id,
            ciphers=[],
        )


# -- refusals ---------------------------------------------------------------------------------


async def test_wrong_folder_both_sides_fail_and_the_responder_sees_only_message_1() -> None:
    async with relayed() as relay:
        results = await secure_both(
            relay.initiator_end,
            relay.responder_end,
            folder=FolderKey.generate(),
            folder_r=FolderKey.generate(),
        )
    errors = failures(results)
    assert [e.reason for e in errors] == [Reason.WRONG_FOLDER, Reason.WRONG_FOLDER]
    assert "does not host this folder" in str(errors[0])
    assert "not in this folder" in str(errors[1])
    assert len(relay.seen["i>r"]) == MSG1_RECORD  # nothing else ever reached the responder
    assert bytes(relay.seen["r>i"]) == b"\x00\x01\x10"  # only the alert came back


async def test_wrong_folder_key_both_sides_fail_before_any_folder_byte() -> None:
    """Same folder (discovery ID), different PSK: a read-only key with a forged read secret."""
    folder = FolderKey.generate()
    impostor = FolderKey(tier=Tier.READ_ONLY, material=os.urandom(32) + folder.verify_key)
    assert impostor.discovery_id == folder.discovery_id and impostor.psk != folder.psk
    for initiator_key, responder_key in ((folder, impostor), (impostor, folder)):
        async with relayed() as relay:
            results = await secure_both(
                relay.initiator_end,
                relay.responder_end,
                folder=initiator_key,
                folder_r=responder_key,
            )
        errors = failures(results)
        assert [e.reason for e in errors] == [Reason.WRONG_KEY, Reason.WRONG_KEY]
        assert all("wrong folder key" in str(e) for e in errors)
        # the initiator sent messages 1 and 3 and nothing else; the responder never confirmed
        assert len(relay.seen["i>r"]) == MSG1_RECORD + MSG3_RECORD
        assert len(relay.seen["r>i"]) == MSG2_RECORD + 3


@pytest.mark.parametrize("liar", ["initiator", "responder"])
async def test_a_bad_identity_signature_fails_both_sides(
    liar: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad_key = SigningKey.generate()
    honest_identity = DeviceHandshake._identity

    def identity(self: DeviceHandshake, handshake_hash: bytes) -> bytes:
        payload = honest_identity(self, handshake_hash)
        if bytes(self._device_key.verify_key) == bytes(bad_key.verify_key):
            payload = payload[:-1] + bytes([payload[-1] ^ 1])  # break the signature
        return payload

    monkeypatch.setattr(DeviceHandshake, "_identity", identity)
    one, two = memory_pipe()
    results = await secure_both(
        one,
        two,
        folder=FolderKey.generate(),
        key_i=bad_key if liar == "initiator" else None,
        key_r=bad_key if liar == "responder" else None,
    )
    errors = failures(results)
    assert [e.reason for e in errors] == [Reason.BAD_IDENTITY, Reason.BAD_IDENTITY]
    assert "signature" in str(errors[0 if liar == "responder" else 1])


async def test_handshake_timeout_closes_the_link() -> None:
    ours, silent = memory_pipe()
    with pytest.raises(ChannelError) as raised:
        await within(
            secure(
                ours,
                initiator=False,
                device_key=SigningKey.generate(),
                folder=FolderKey.generate(),
                timeout=0.05,
            )
        )
    assert raised.value.reason is Reason.TIMEOUT
    assert await within(silent.read()) == b""  # we closed our end


async def test_peer_closing_during_the_handshake() -> None:
    ours, theirs = memory_pipe()
    await theirs.close()
    with pytest.raises(ChannelError) as raised:
        await within(
            secure(
                ours, initiator=True, device_key=SigningKey.generate(), folder=FolderKey.generate()
            )
        )
    assert raised.value.reason is Reason.CLOSED


# -- what a relay sees, and what it can break --------------------------------------------------


async def test_a_relay_sees_only_ciphertext() -> None:
    folder = FolderKey.generate()
    key_i, key_r = SigningKey.generate(), SigningKey.generate()
    marker = b"KNOWN-PLAINTEXT-MARKER/backer"
    async with relayed() as relay:
        initiator, responder = established(
            await secure_both(
                relay.initiator_end, relay.responder_end, folder=folder, key_i=key_i, key_r=key_r
            )
        )
        for size in (0, 10, 2 * MAX_PLAINTEXT):
            message = marker + bytes(size) + marker
            await initiator.write(message)
            await responder.write(message)
            assert await read_exactly(responder, len(message)) == message
            assert await read_exactly(initiator, len(message)) == message
        await initiator.close()
        await responder.close()
    wire = bytes(relay.seen["i>r"] + relay.seen["r>i"])
    assert len(wire) > 4 * MAX_PLAINTEXT
    for secret in (
        marker,
        bytes(64),  # the zero padding of the messages
        folder.psk,
        folder.read_secret,
        folder.discovery_id,
        bytes(key_i.verify_key),  # the device identities travel encrypted too
        bytes(key_r.verify_key),
    ):
        assert secret not in wire


@pytest.mark.parametrize(
    ("direction", "offset", "both_fail"),
    [
        ("i>r", 10, True),  # message 1: the ephemeral key
        ("i>r", MSG1_RECORD - 3, True),  # message 1: its tag
        ("r>i", 2 + 40, True),  # message 2: the encrypted static key
        ("r>i", MSG2_RECORD - 20, True),  # message 2: the identity
        ("i>r", MSG1_RECORD + 30, True),  # message 3: the encrypted static key
        ("i>r", MSG1_RECORD + MSG3_RECORD - 5, True),  # message 3: the identity's tag
        ("r>i", MSG2_RECORD + 5, False),  # the confirmation: only the initiator can tell
    ],
)
async def test_a_flipped_bit_in_the_handshake_fails(
    direction: str, offset: int, both_fail: bool
) -> None:
    async with relayed(flip=(direction, offset)) as relay:
        results = await secure_both(
            relay.initiator_end, relay.responder_end, folder=FolderKey.generate()
        )
        initiator, responder = results
        assert isinstance(initiator, ChannelError)
        if both_fail:
            assert isinstance(responder, ChannelError)
        else:
            assert isinstance(responder, SecureLink)
            assert await within(responder.read()) == b""  # the initiator hung up
            await responder.close()


@pytest.mark.parametrize("where", [0, 1, 2, 20, 1318 + 50])
async def test_a_flipped_bit_in_a_transport_record_closes_the_link(where: int) -> None:
    """`where` counts from the first transport record the initiator sends (0 and 1 are its
    length; that record is 2 + 1,300 + 16 = 1,318 bytes, so 1,368 is in the second)."""
    start = MSG1_RECORD + MSG3_RECORD
    async with relayed(flip=("i>r", start + where)) as relay:
        initiator, responder = established(
            await secure_both(relay.initiator_end, relay.responder_end, folder=FolderKey.generate())
        )
        await initiator.write(b"first record " * 100)
        await initiator.write(os.urandom(MAX_PLAINTEXT))
        await initiator.close()
        with pytest.raises(ChannelError) as raised:
            await read_exactly(responder, 1300 + MAX_PLAINTEXT)
        assert raised.value.reason in (Reason.TAMPERED, Reason.TRUNCATED)
        with pytest.raises(ChannelError):  # it stays failed
            await responder.read()
        with pytest.raises(ChannelError):
            await responder.write(b"more")


@pytest.mark.parametrize("cut", [5, MSG1_RECORD - 1])
async def test_a_truncated_handshake_record_fails(cut: int) -> None:
    async with relayed(cut=("i>r", cut)) as relay:
        results = await secure_both(
            relay.initiator_end, relay.responder_end, folder=FolderKey.generate()
        )
    initiator, responder = failures(results)
    assert responder.reason is Reason.TRUNCATED
    assert initiator.reason is Reason.CLOSED


async def test_a_truncated_transport_record_fails() -> None:
    start = MSG1_RECORD + MSG3_RECORD
    async with relayed(cut=("i>r", start + 1000)) as relay:
        initiator, responder = established(
            await secure_both(relay.initiator_end, relay.responder_end, folder=FolderKey.generate())
        )
        await initiator.write(os.urandom(5000))
        with pytest.raises(ChannelError) as raised:
            await read_exactly(responder, 5000)
        assert raised.value.reason is Reason.TRUNCATED
        await initiator.close()


async def test_an_oversized_handshake_record_fails_at_once() -> None:
    """The length alone condemns it: the responder does not wait for 65,535 bytes."""
    ours, attacker = memory_pipe()
    await attacker.write(b"\xff\xff" + bytes(10))
    with pytest.raises(ChannelError) as raised:
        await within(
            secure(
                ours,
                initiator=False,
                device_key=SigningKey.generate(),
                folder=FolderKey.generate(),
                timeout=DEADLINE * 2,
            )
        )
    assert raised.value.reason is Reason.OVERSIZED
    assert await within(attacker.read()) == b"\x00\x01\x14"  # the alert, then the end


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (b"\x00\x00", Reason.MALFORMED),  # empty: no room for a tag
        (b"\x00\x05hello", Reason.MALFORMED),  # shorter than a tag
        (b"\xff\xff" + bytes(65535), Reason.TAMPERED),  # the largest record there is
    ],
)
async def test_bad_transport_records_close_the_link(record: bytes, reason: Reason) -> None:
    async with relayed() as relay:
        initiator, responder = established(
            await secure_both(relay.initiator_end, relay.responder_end, folder=FolderKey.generate())
        )
        await relay.inject("i>r", record)
        with pytest.raises(ChannelError) as raised:
            await within(responder.read())
        assert raised.value.reason is reason
        assert await within(initiator.read()) == b""  # the responder closed the link
        await initiator.close()


# -- rekeying ---------------------------------------------------------------------------------


async def test_rekey_after_a_bounded_number_of_bytes() -> None:
    folder = FolderKey.generate()
    limit = {"rekey_after": 10_000}
    one, two = memory_pipe()
    initiator, responder = established(
        await secure_both(one, two, folder=folder, options_i=limit, options_r=limit)
    )
    payloads = [os.urandom(7_000 + n) for n in range(40)]
    for payload in payloads:
        await initiator.write(payload)
        await responder.write(payload[::-1])
        assert await read_exactly(responder, len(payload)) == payload
        assert await read_exactly(initiator, len(payload)) == payload[::-1]
    # Each direction rekeys after the record that takes it to 10,000 bytes: every 2nd record.
    assert initiator.stats.rekeys_sent == responder.stats.rekeys_received == len(payloads) // 2
    assert responder.stats.rekeys_sent == initiator.stats.rekeys_received == len(payloads) // 2
    await initiator.close()
    await responder.close()


async def test_rekey_really_changes_the_keys() -> None:
    """If only the sender rekeys, the receiver can no longer decrypt: the rekey is real."""
    one, two = memory_pipe()
    initiator, responder = established(
        await secure_both(one, two, folder=FolderKey.generate(), options_i={"rekey_after": 1000})
    )
    await initiator.write(os.urandom(1500))  # one record, then the sender rekeys
    await initiator.write(b"after the rekey")
    assert len(await read_exactly(responder, 1500)) == 1500
    with pytest.raises(ChannelError) as raised:
        await within(responder.read())
    assert raised.value.reason is Reason.TAMPERED
    await initiator.close()


# -- keepalive and idle timeout ----------------------------------------------------------------


async def test_keepalives_keep_an_idle_link_alive() -> None:
    idle = 0.5
    async with relayed() as relay:
        relay.keepalive_target = 30  # 30 keepalives at least 0.02 s apart: past the idle timeout
        initiator, responder = established(
            await secure_both(
                relay.initiator_end,
                relay.responder_end,
                folder=FolderKey.generate(),
                options_i={"keepalive": 0.02, "idle": None},
                options_r={"keepalive": None, "idle": idle},
            )
        )
        reading = asyncio.ensure_future(responder.read())
        await within(relay.enough_keepalives.wait())
        assert not reading.done(), "the responder gave up although keepalives kept coming"
        assert responder.stats.keepalives_received >= 20
        await initiator.write(b"still here")
        assert await within(reading) == b"still here"
        await initiator.close()
        await responder.close()


async def test_the_idle_timeout_closes_a_silent_link() -> None:
    one, two = memory_pipe()
    initiator, responder = established(
        await secure_both(
            one,
            two,
            folder=FolderKey.generate(),
            options_i={"keepalive": None},
            options_r={"keepalive": None, "idle": 0.05},
        )
    )
    with pytest.raises(ChannelError) as raised:
        await within(responder.read())
    assert raised.value.reason is Reason.IDLE
    assert await within(initiator.read()) == b""  # the responder hung up
    await initiator.close()
    await responder.close()


# -- end to end -------------------------------------------------------------------------------


async def test_two_folders_replicate_over_secure_links(tmp_path: Path) -> None:
    folder = FolderKey.generate()
    marker = b"END-TO-END-PLAINTEXT-MARKER"
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "notes.txt").write_bytes(marker * 1000)
    (tmp_path / "b" / "sub" / "data.bin").write_bytes(os.urandom(300_000) + marker)
    replicas = [await Replica.open(tmp_path / name, device=0, create=True) for name in ("a", "b")]
    try:
        for replica in replicas:
            replica.device = await asyncio.to_thread(replica.store.local_device)
            await replica.scan()
        a, b = replicas
        assert a.root != b.root
        async with relayed() as relay:
            link_a, link_b = established(
                await secure_both(relay.initiator_end, relay.responder_end, folder=folder)
            )
            result_a, result_b = await within(
                asyncio.gather(
                    run_session(
                        a,
                        link_a,
                        device=device_bytes(a),
                        folder=folder.discovery_id,
                        until_in_sync=True,
                    ),
                    run_session(b, link_b, device=device_bytes(b), folder=folder.discovery_id),
                )
            )
        assert result_a.in_sync, result_a.reason
        assert result_b.in_sync, result_b.reason
        assert a.root == b.root
        for side in ("a", "b"):
            assert (tmp_path / side / "notes.txt").read_bytes() == marker * 1000
            assert (tmp_path / side / "sub" / "data.bin").read_bytes().endswith(marker)
        wire = bytes(relay.seen["i>r"] + relay.seen["r>i"])
        assert len(wire) > 300_000
        assert marker not in wire
    finally:
        for replica in replicas:
            await replica.close()


def device_bytes(replica: Replica) -> bytes:
    return replica.device.to_bytes(8, "big") + bytes(24)


# -- the benchmark still runs -----------------------------------------------------------------


def test_crypto_bench_quick_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "crypto_bench.py"), "--quick"],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for measure in ("records, encrypt+decrypt", "handshake, both sides", "secure()"):
        assert measure in result.stdout, result.stdout
