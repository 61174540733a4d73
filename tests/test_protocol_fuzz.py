"""Fuzzing the decoders and the session with random and mutated input: every input ends in values
and events, or in RemoteProtocolError / ProtocolViolation; never in any other exception.

Volume comes from a seeded loop of mutations of valid frames (bit flips, byte edits, truncation,
splicing, length tampering); hypothesis adds shrinking for whatever it finds.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import time
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backer.errors import RemoteProtocolError
from backer.ids import Hash
from backer.index.chunker import chunk_bytes
from backer.index.entry import Entry, Kind, VersionVector, chunk_groups, group_hash, pack_chunks
from backer.index.merkle import EMPTY_ROOT, build
from backer.protocol.codec import FrameDecoder, decode, frame
from backer.protocol.messages import (
    PROTOCOL_VERSION,
    Chunks,
    Close,
    Entries,
    Error,
    GetChunks,
    GetEntries,
    GetGroups,
    GetNodes,
    Groups,
    Hello,
    Message,
    Nodes,
    RemoteEntry,
    Root,
)
from backer.protocol.session import Event, ProtocolViolation, Session, State

SEED = 20261101
CODEC_INPUTS = 70_000
SESSION_INPUTS = 30_000
LONGER = float(os.environ.get("BACKER_FUZZ_SECONDS", "0"))  # seconds of mutation beyond those
DEVICE, PEER, FOLDER = Hash(b"A" * 32), Hash(b"B" * 32), Hash(b"F" * 32)
VV = VersionVector(((1, 7), (2, 3)))
DATA = random.Random(SEED).randbytes(5_000)  # one chunk
SMALL = Entry(
    path="d/small", kind=Kind.FILE, version=VV, modifier=2, size=len(DATA), chunks=chunk_bytes(DATA)
)
BIG = Entry(
    path="d/big",
    kind=Kind.FILE,
    version=VV,
    modifier=1,
    size=200 * 9_000,
    chunks=pack_chunks([(bytes([i]) * 32, 9_000) for i in range(200)]),
)
TREE = build((e.path, e.leaf_hash()) for e in (SMALL, BIG))
GROUP = chunk_groups(BIG.chunks)[0]
CHUNK_HASH = SMALL.chunks[:32]
CHUNK_DATA = DATA[: int.from_bytes(SMALL.chunks[32:36], "big")]
WANTED = [(e.path, e.leaf_hash()) for e in (SMALL, BIG)]

# Our side asks these (ids 1 to 4) once the peer said hello; ANSWERS answer them validly.
ANSWERS: list[Message] = [
    Nodes(id=1, nodes=(TREE.added[TREE.root], None)),
    Entries(id=2, entries=(RemoteEntry.from_entry(SMALL), RemoteEntry.from_entry(BIG))),
    Groups(id=3, groups=(GROUP,)),
    Chunks(id=4, chunks=(CHUNK_DATA,)),
]
OTHERS: list[Message] = [
    Hello(version=PROTOCOL_VERSION, device=PEER, folder=FOLDER, root=TREE.root),
    Root(root=TREE.root),
    GetNodes(id=10, hashes=(TREE.root, EMPTY_ROOT)),
    GetEntries(id=11, wanted=(("d/small", SMALL.leaf_hash()),)),
    GetGroups(id=12, hashes=(group_hash(GROUP),)),
    GetChunks(id=13, wanted=((Hash(CHUNK_HASH), 1000),)),
    Error(code=1, text="no"),
    Close(reason="bye"),
]
HELLO_FRAME = frame(OTHERS[0])
FRAMES = [frame(m) for m in ANSWERS + OTHERS]
EVENT_TYPES: tuple[type, ...] = Event.__args__


def asking_session() -> Session:
    """A session that has heard the peer's Hello and has requests 1 to 4 open."""
    session = Session(DEVICE, FOLDER, EMPTY_ROOT, max_peer_requests=8)
    session.start()
    session.receive_data(HELLO_FRAME)
    assert session.next_event() is not None
    session.request_nodes([TREE.root, EMPTY_ROOT])
    session.request_entries(WANTED)
    session.request_groups([group_hash(GROUP)])
    session.request_chunks([(Hash(CHUNK_HASH), len(CHUNK_DATA))])
    return session


# --- mutations -----------------------------------------------------------------------------------


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        how = rng.randrange(9)
        at = rng.randrange(len(out) + 1) if out else 0
        if how == 0 and out:  # bit flip
            at = min(at, len(out) - 1)
            out[at] ^= 1 << rng.randrange(8)
        elif how == 1 and out:  # interesting byte
            out[min(at, len(out) - 1)] = rng.choice((0, 0xFF, 0xC0, 0xC1, 0x7F, 0x80, 0x90, 0xDD))
        elif how == 2:  # insert
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        elif how == 3:  # delete
            del out[at : at + rng.randint(1, 16)]
        elif how == 4:  # truncate
            del out[at:]
        elif how == 5:  # splice with another frame
            other = rng.choice(FRAMES)
            out = out[:at] + other[rng.randrange(len(other)) :]
        elif how == 6:  # duplicate a region
            out[at:at] = out[at : at + rng.randint(1, 64)]
        elif how == 7 and len(out) >= 4:  # tamper with a length prefix
            out[0:4] = rng.choice((0, 1, len(out), len(out) - 4, 2**23, 2**32 - 1)).to_bytes(
                4, "big"
            )
        else:  # random bytes
            out = bytearray(rng.randbytes(rng.randint(0, 64)))
    return bytes(out)


def pieces(rng: random.Random, data: bytes) -> list[bytes]:
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(3)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# --- the properties ------------------------------------------------------------------------------


def decode_stream(chunks: list[bytes]) -> int:
    """Frames and messages from `chunks`; RemoteProtocolError is the only failure allowed."""
    decoder, decoded = FrameDecoder(), 0
    try:
        for chunk in chunks:
            for payload in decoder.feed(chunk):
                try:
                    decode(payload)
                    decoded += 1
                except RemoteProtocolError:
                    pass
    except RemoteProtocolError:
        pass
    return decoded


def run_session(session: Session, chunks: list[bytes], eof: bool) -> list[Event]:
    """Feed `chunks`; every outcome must be events, a violation must close with an Error."""
    events: list[Event] = []
    for chunk in chunks:
        session.receive_data(chunk)
        while (event := session.next_event()) is not None:
            events.append(event)
    if eof:
        session.receive_eof()
        while (event := session.next_event()) is not None:
            events.append(event)
    assert all(isinstance(e, EVENT_TYPES) for e in events)
    violations = [e for e in events if isinstance(e, ProtocolViolation)]
    if violations:
        assert events[-1] is violations[0] and len(violations) == 1
        assert session.state is State.CLOSED
        [payload] = FrameDecoder().feed(session.data_to_send())
        assert isinstance(decode(payload), Error)
    else:
        assert session.data_to_send() == b""
    return events


def test_valid_corpus_decodes_and_answers_verify() -> None:
    assert decode_stream([b"".join(FRAMES)]) == len(FRAMES)
    events = run_session(asking_session(), [b"".join(frame(m) for m in ANSWERS)], eof=False)
    assert not any(isinstance(e, ProtocolViolation) for e in events)
    assert len(events) == len(ANSWERS)


def test_seeded_mutation_volume() -> None:
    rng = random.Random(SEED)
    inputs = decoded = events = 0
    for _ in range(CODEC_INPUTS):
        decoded += _codec_input(rng)
        inputs += 1
    for n in range(SESSION_INPUTS):
        events += _session_input(rng, n)
        inputs += 1
    end = time.monotonic() + LONGER  # BACKER_FUZZ_SECONDS: go on mutating, both kinds
    while time.monotonic() < end:
        decoded += _codec_input(rng)
        events += _session_input(rng, inputs)
        inputs += 2
    print(f"\nprotocol fuzz: {inputs:,} inputs, {decoded:,} frames decoded, {events:,} events")
    assert inputs >= 100_000
    assert decoded > 1000 and events > 1000  # the mutations do not all fail at the first byte


def _codec_input(rng: random.Random) -> int:
    data = mutate(rng, b"".join(rng.sample(FRAMES, rng.randint(1, 3))))
    return decode_stream(pieces(rng, data))


def _session_input(rng: random.Random, n: int) -> int:
    if n % 3 == 0:  # a fresh session: the Hello itself may be damaged
        session = Session(DEVICE, FOLDER, EMPTY_ROOT)
        stream = HELLO_FRAME + b"".join(rng.sample(FRAMES, 2))
    else:  # a session waiting for answers
        session = asking_session()
        stream = b"".join(rng.sample(FRAMES, rng.randint(1, 3)))
    return len(run_session(session, pieces(rng, mutate(rng, stream)), eof=n % 7 == 0))


# --- hypothesis, for shrinking -------------------------------------------------------------------

_settings = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
edits = st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), max_size=6)


def apply_edits(data: bytes, changes: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for at, value in changes:
        if out:
            out[at % len(out)] = value
    return bytes(out if cut is None else out[: cut % (len(out) + 1)])


@_settings
@given(st.binary(max_size=512), st.lists(st.binary(max_size=64), max_size=4))
def test_random_bytes_decode_or_refuse(data: bytes, more: list[bytes]) -> None:
    decode_stream([data, *more])
    with contextlib.suppress(RemoteProtocolError):
        decode(data)


@_settings
@given(st.sampled_from(FRAMES), edits, st.none() | st.integers(0, 2**16))
def test_edited_frames_decode_or_refuse(
    data: bytes, changes: list[tuple[int, int]], cut: int | None
) -> None:
    decode_stream([apply_edits(data, changes, cut)])


@_settings
@given(st.lists(st.binary(max_size=128), max_size=5), st.booleans())
def test_random_bytes_into_a_session(chunks: list[bytes], eof: bool) -> None:
    run_session(Session(DEVICE, FOLDER, EMPTY_ROOT), chunks, eof)
    run_session(asking_session(), chunks, eof)


@_settings
@given(
    st.lists(st.sampled_from(FRAMES), min_size=1, max_size=4),
    edits,
    st.none() | st.integers(0, 2**16),
    st.booleans(),
)
def test_edited_answers_into_a_session(
    frames: list[bytes], changes: list[tuple[int, int]], cut: int | None, eof: bool
) -> None:
    stream = apply_edits(b"".join(frames), changes, cut)
    run_session(asking_session(), [stream], eof)
    session: Callable[[], Session] = lambda: Session(DEVICE, FOLDER, EMPTY_ROOT)  # noqa: E731
    run_session(session(), [HELLO_FRAME + stream], eof)
