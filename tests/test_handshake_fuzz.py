"""The handshake decoder against hostile bytes: random streams and mutations of real handshake
messages, fed to both roles. Nothing but ChannelError may come out, no input may establish a
channel without the key, and every failure is raised at once (never a hang waiting for more).

Bounded here (a seeded run of a few seconds); for a longer run:
    BACKER_FUZZ_SECONDS=600 python -m pytest -q tests/test_handshake_fuzz.py
"""

from __future__ import annotations

import os
import random
import time

import nacl.signing

from backer.keys import FolderKey
from backer.mesh.channel import Channel, ChannelError

FOLDER = FolderKey.generate()
OTHER = FolderKey.generate()
SECONDS = float(os.environ.get("BACKER_FUZZ_SECONDS", "2"))


def channel(*, initiator: bool, folder: FolderKey = FOLDER) -> Channel:
    made = Channel(
        initiator=initiator,
        device_key=nacl.signing.SigningKey.generate(),
        psk=folder.psk,
        discovery_id=folder.discovery_id,
    )
    made.start()
    return made


def real_messages() -> list[bytes]:
    """The records of a genuine handshake, in order (message 1, 2, 3, the confirmation)."""
    initiator, responder = channel(initiator=True), channel(initiator=False)
    records = []
    data = initiator.data_to_send()
    sender, receiver = initiator, responder
    while data:
        records.append(data)
        receiver.receive_data(data)
        data = receiver.data_to_send()
        sender, receiver = receiver, sender
    assert initiator.established and responder.established
    return records


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.4 and buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif choice < 0.6 and buf:
            del buf[rng.randrange(len(buf)) :]
        elif choice < 0.8:
            buf[rng.randrange(len(buf) + 1) : 0] = rng.randbytes(rng.randint(1, 64))
        elif len(buf) >= 2:
            size = rng.randrange(0, 70000)
            buf[0:2] = size.to_bytes(3, "big")[1:]  # lie about the record length
    return bytes(buf)


def feed(target: Channel, pieces: list[bytes], eof: bool) -> None:
    try:
        for piece in pieces:
            target.receive_data(piece)
            target.data_to_send()
        if eof:
            target.receive_eof()
    except ChannelError:
        return


def test_hostile_handshake_bytes_only_ever_raise_channel_error() -> None:
    rng = random.Random(20261126)
    records = real_messages()
    end = time.monotonic() + SECONDS
    rounds = 0
    while time.monotonic() < end or rounds < 300:
        rounds += 1
        kind = rounds % 4
        if kind == 0:  # random bytes to a fresh responder
            target = channel(initiator=False)
            stream = rng.randbytes(rng.randint(0, 300))
        elif kind == 1:  # a mutated message 1 to a responder
            target = channel(initiator=False)
            stream = mutate(rng, records[0])
        elif kind == 2:  # a mutated message 2 to an initiator that sent message 1
            target = channel(initiator=True)
            target.data_to_send()
            stream = mutate(rng, records[1])
        else:  # a real message 1 from a peer without the key, then noise
            target = channel(initiator=False)
            stranger = channel(initiator=True, folder=OTHER)
            stream = stranger.data_to_send() + rng.randbytes(rng.randint(0, 200))
        cut = sorted(rng.randrange(len(stream) + 1) for _ in range(rng.randint(0, 3)))
        pieces = [stream[a:b] for a, b in zip([0, *cut], [*cut, len(stream)], strict=True)]
        feed(target, pieces, eof=rng.random() < 0.5)
        assert not target.established, f"round {rounds}: hostile bytes opened a channel"
    print(f"\nhandshake fuzz: {rounds:,} rounds in {SECONDS:g} s")
    assert rounds >= 300
