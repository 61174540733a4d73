"""Two Sessions joined by a fake link: hello, gossip, and every request/answer pair with real tree
nodes, entries, groups and chunks; then a hostile peer, which must always end in a
ProtocolViolation, an Error frame for it, and CLOSED, never an exception; then our own misuse,
which is a LocalProtocolError."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from backer.errors import LocalProtocolError
from backer.ids import Hash
from backer.index.chunker import CHUNK_MAX, CHUNK_MIN, chunk_bytes, hash_chunk
from backer.index.entry import (
    Entry,
    Kind,
    VersionVector,
    chunk_groups,
    group_hash,
    iter_chunks,
    pack_chunks,
)
from backer.index.merkle import EMPTY_ROOT, build, node_hash
from backer.protocol.codec import FrameDecoder, decode, encode, encode_frame, frame
from backer.protocol.messages import (
    PROTOCOL_VERSION,
    Chunks,
    Close,
    Entries,
    Error,
    ErrorCode,
    GetChunks,
    GetNodes,
    Groups,
    Hello,
    Message,
    Nodes,
    Peers,
    RemoteEntry,
    Root,
)
from backer.protocol.session import (
    ChunksReceived,
    ChunksRequested,
    ConnectionLost,
    EntriesReceived,
    EntriesRequested,
    Event,
    GroupsReceived,
    GroupsRequested,
    NodesReceived,
    NodesRequested,
    PeerClosed,
    PeerError,
    PeerHello,
    PeerRoot,
    PeersAnnounced,
    ProtocolViolation,
    Session,
    State,
)

DEVICE_A, DEVICE_B = Hash(b"A" * 32), Hash(b"B" * 32)
FOLDER = Hash(b"F" * 32)
VV = VersionVector(((1, 1),))
RNG = random.Random(3)
CONTENT = RNG.randbytes(300_000)
CHUNKS = chunk_bytes(CONTENT)
SMALL = Entry(
    path="a/small", kind=Kind.FILE, version=VV, modifier=1, size=3, chunks=chunk_bytes(b"abc")
)
BIG_CHUNKS = pack_chunks([(RNG.randbytes(32), 40_000) for _ in range(400)])
BIG = Entry(
    path="a/big", kind=Kind.FILE, version=VV, modifier=1, size=400 * 40_000, chunks=BIG_CHUNKS
)
DIRECTORY = Entry(path="a", kind=Kind.DIR, version=VV, modifier=1)
TREE = build((e.path, e.leaf_hash()) for e in (SMALL, BIG, DIRECTORY))
NODES = TREE.added
ENTRIES = {e.path: e for e in (SMALL, BIG, DIRECTORY)}
GROUPS = {group_hash(g): g for g in chunk_groups(BIG_CHUNKS)}


def drain(session: Session) -> list[Event]:
    events = []
    while (event := session.next_event()) is not None:
        events.append(event)
    return events


def deliver(data: bytes, to: Session) -> list[Event]:
    to.receive_data(data)
    return drain(to)


def connected() -> tuple[Session, Session]:
    a = Session(DEVICE_A, FOLDER, EMPTY_ROOT)
    b = Session(DEVICE_B, FOLDER, TREE.root)
    hello_a, hello_b = a.start(), b.start()
    assert deliver(hello_b, a) == [PeerHello(device=DEVICE_B, root=TREE.root)]
    assert deliver(hello_a, b) == [PeerHello(device=DEVICE_A, root=EMPTY_ROOT)]
    assert a.state is b.state is State.OPEN
    return a, b


def test_hello_and_root_gossip() -> None:
    a, b = connected()
    assert a.peer_root == TREE.root and a.peer_device == DEVICE_B
    new_root = Hash(bytes(32))
    assert deliver(b.announce_root(new_root), a) == [PeerRoot(root=new_root)]
    assert a.peer_root == new_root
    assert a.data_to_send() == b.data_to_send() == b""


def test_peers_are_announced_once_open_and_refused_before() -> None:
    a, b = connected()
    tips = ((DEVICE_A, ("127.0.0.1:22100", ":22101")),)
    assert deliver(b.announce_peers(tips), a) == [PeersAnnounced(peers=tips)]
    early = Session(DEVICE_A, FOLDER, EMPTY_ROOT)
    early.start()
    with pytest.raises(LocalProtocolError):
        early.announce_peers(tips)  # not before the peer's Hello
    events = deliver(frame(Peers(peers=tips)), early)
    assert len(events) == 1 and isinstance(events[0], ProtocolViolation)


def test_a_whole_pull_nodes_entries_groups_chunk() -> None:
    a, b = connected()
    # One level of the tree.
    request_id, data = a.request_nodes([TREE.root, Hash(bytes(32))])
    assert a.pending_requests == 1
    [asked] = deliver(data, b)
    assert asked == NodesRequested(id=request_id, hashes=(TREE.root, Hash(bytes(32))))
    [got] = deliver(b.answer_nodes(request_id, [NODES[TREE.root], None]), a)
    assert got == NodesReceived(
        id=request_id,
        nodes={TREE.root: NODES[TREE.root]},
        missing=(Hash(bytes(32)),),
        unanswered=(),
    )
    assert a.pending_requests == b.peer_requests == 0
    # Entries: one inline, one by groups, one gone.
    wanted = [(e.path, e.leaf_hash()) for e in (SMALL, BIG)] + [("gone", Hash(bytes(32)))]
    request_id, data = a.request_entries(wanted)
    [asked] = deliver(data, b)
    assert isinstance(asked, EntriesRequested) and asked.wanted == tuple(wanted)
    [got] = deliver(b.answer_entries(request_id, [SMALL, RemoteEntry.from_entry(BIG), None]), a)
    assert isinstance(got, EntriesReceived)
    assert got.missing == ("gone",) and got.unanswered == ()
    small, big = got.entries
    assert small.inline_entry() == SMALL
    assert big.chunks is None and big.inline_entry() is None
    # Groups of the big entry's chunk list, then the full entry.
    request_id, data = a.request_groups(list(dict.fromkeys(big.groups)))
    [asked] = deliver(data, b)
    assert isinstance(asked, GroupsRequested)
    [got] = deliver(b.answer_groups(request_id, [GROUPS[x] for x in asked.hashes]), a)
    assert isinstance(got, GroupsReceived) and not got.missing
    assert big.to_entry(b"".join(got.groups[x] for x in big.groups)) == BIG
    # Chunks, many in one request.
    (digest, size), (second, second_size) = list(iter_chunks(CHUNKS))[:2]
    request_id, data = a.request_chunks([(digest, size), (second, second_size)])
    [asked] = deliver(data, b)
    assert asked == ChunksRequested(id=request_id, wanted=((digest, size), (second, second_size)))
    [got] = deliver(b.answer_chunks(request_id, [CONTENT[:size], None]), a)
    assert got == ChunksReceived(
        id=request_id, chunks={digest: CONTENT[:size]}, missing=(second,), unanswered=()
    )
    assert a.data_to_send() == b.data_to_send() == b""


def test_a_hashed_answer_skips_only_the_responders_own_hash() -> None:
    """`verified=True` (the replica hashed each chunk as it read it) spares the second hash on
    the way out; the size is still checked there, and the requester still checks both."""
    a, b = connected()
    digest, size = next(iter_chunks(CHUNKS))
    request_id, data = a.request_chunks([(digest, size)])
    deliver(data, b)
    with pytest.raises(LocalProtocolError, match="not what was asked"):
        b.answer_chunks(request_id, [CONTENT[: size + 1]], verified=True)
    lie = bytes([CONTENT[0] ^ 1]) + CONTENT[1:size]
    [violation] = deliver(b.answer_chunks(request_id, [lie], verified=True), a)
    assert isinstance(violation, ProtocolViolation) and "hash" in violation.reason


def test_requests_are_pipelined_and_answered_in_any_order() -> None:
    a, b = connected()
    digest, size = next(iter_chunks(CHUNKS))
    sent = [a.request_chunks([(digest, size)]) for _ in range(5)]
    assert [i for i, _ in sent] == sorted({i for i, _ in sent})
    asked = deliver(b"".join(data for _, data in sent), b)
    answers = b"".join(b.answer_chunks(e.id, [CONTENT[:size]]) for e in reversed(asked))  # type: ignore[union-attr]
    assert [e.id for e in deliver(answers, a)] == [i for i, _ in reversed(sent)]  # type: ignore[union-attr]


def test_big_batch_answers_are_cut_to_a_prefix_and_the_rest_reported() -> None:
    a, b = connected()
    # Every record ends a group (last hash byte 0xFF), so each entry has 40,000 groups: 1.3 MB.
    heavy = [
        Entry(
            path=f"heavy{n}",
            kind=Kind.FILE,
            version=VV,
            modifier=1,
            size=40_000 * CHUNK_MIN,
            chunks=pack_chunks([(bytes([n]) * 31 + b"\xff", CHUNK_MIN)] * 40_000),
        )
        for n in range(4)
    ]
    wanted = [(e.path, e.leaf_hash()) for e in heavy]
    request_id, data = a.request_entries(wanted)
    deliver(data, b)
    answer = b.answer_entries(request_id, heavy)
    assert len(answer) < 4 * 1024 * 1024 + 1000
    [got] = deliver(answer, a)
    assert isinstance(got, EntriesReceived)
    assert [e.path for e in got.entries] == ["heavy0", "heavy1", "heavy2"]
    assert got.unanswered == (wanted[3],)


def test_close_and_error_from_the_peer_end_the_session() -> None:
    a, b = connected()
    assert deliver(b.close("bye"), a) == [PeerClosed(reason="bye")]
    assert a.state is b.state is State.CLOSED
    a, b = connected()
    assert deliver(b.error(ErrorCode.SHUTDOWN, "going"), a) == [
        PeerError(code=ErrorCode.SHUTDOWN, text="going")
    ]
    assert a.state is State.CLOSED


def test_a_peer_may_refuse_us_before_its_hello() -> None:
    session = Session(DEVICE_A, FOLDER, EMPTY_ROOT)
    session.start()
    events = deliver(frame(Error(code=ErrorCode.FOLDER, text="not here")), session)
    assert events == [PeerError(code=ErrorCode.FOLDER, text="not here")]
    assert session.state is State.CLOSED
    assert session.data_to_send() == b""


def test_end_of_stream() -> None:
    a, b = connected()
    a.receive_data(b.announce_root(TREE.root)[:3])
    a.receive_eof()
    assert drain(a) == [ConnectionLost(reason="stream ended inside a frame")]
    a, b = connected()
    a.receive_data(b.announce_root(TREE.root))
    a.receive_eof()
    assert drain(a) == [PeerRoot(root=TREE.root), ConnectionLost(reason="stream ended")]
    assert a.state is State.CLOSED


# --- a hostile peer ------------------------------------------------------------------------------


def sent_error(session: Session) -> Error:
    [payload] = FrameDecoder().feed(session.data_to_send())
    message = decode(payload)
    assert isinstance(message, Error)
    return message


def assert_violation(events: list[Event], session: Session, code: int = ErrorCode.PROTOCOL) -> str:
    assert events and isinstance(events[-1], ProtocolViolation), events
    assert session.state is State.CLOSED
    assert sent_error(session).code == code
    session.receive_data(frame(Root(root=TREE.root)))  # after CLOSED every input is ignored
    assert session.next_event() is None
    assert session.data_to_send() == b""
    return events[-1].reason


def opened() -> Session:
    """Our session, after a valid Hello from a raw peer that we then break the rules with."""
    session = Session(DEVICE_A, FOLDER, EMPTY_ROOT)
    session.start()
    assert deliver(frame(hello()), session) == [PeerHello(device=DEVICE_B, root=TREE.root)]
    return session


def hello(**changes: object) -> Hello:
    fields: dict[str, object] = {
        "version": PROTOCOL_VERSION,
        "device": DEVICE_B,
        "folder": FOLDER,
        "root": TREE.root,
    }
    return Hello(**(fields | changes))  # type: ignore[arg-type]


def test_wrong_folder() -> None:
    session = Session(DEVICE_A, FOLDER, EMPTY_ROOT)
    session.start()
    reason = assert_violation(
        deliver(frame(hello(folder=Hash(bytes(32)))), session), session, ErrorCode.FOLDER
    )
    assert "folder" in reason


def test_wrong_version() -> None:
    session = Session(DEVICE_A, FOLDER, EMPTY_ROOT)
    reason = assert_violation(
        deliver(frame(hello(version=PROTOCOL_VERSION + 1)), session), session, ErrorCode.VERSION
    )
    assert "version" in reason


@pytest.mark.parametrize(
    "message",
    [Root(root=TREE.root), GetNodes(id=1, hashes=(TREE.root,)), Nodes(id=1, nodes=(b"x",))],
    ids=lambda m: type(m).__name__,
)
def test_a_message_before_hello(message: Message) -> None:
    session = Session(DEVICE_A, FOLDER, EMPTY_ROOT)
    session.start()
    assert "not allowed" in assert_violation(deliver(frame(message), session), session)


def test_a_second_hello() -> None:
    session = opened()
    assert_violation(deliver(frame(hello()), session), session)


def asked_nodes(hashes: list[Hash]) -> tuple[Session, int]:
    session = opened()
    request_id, _ = session.request_nodes(hashes)
    return session, request_id


def junk_node() -> bytes:
    return b"\x92\x00\x91\x93\xa1a\x00\xc4\x01x"  # hashes fine, but not a valid node


HOSTILE_ANSWERS: dict[str, Callable[[], tuple[Session, Message]]] = {}


def hostile(name: str) -> Callable[[Callable[[], tuple[Session, Message]]], None]:
    def register(case: Callable[[], tuple[Session, Message]]) -> None:
        HOSTILE_ANSWERS[name] = case

    return register


@hostile("unknown id")
def _unknown_id() -> tuple[Session, Message]:
    session, request_id = asked_nodes([TREE.root])
    return session, Nodes(id=request_id + 1, nodes=(NODES[TREE.root],))


@hostile("node bytes of another hash")
def _node_of_another_hash() -> tuple[Session, Message]:
    other = next(h for h in NODES if h != TREE.root)
    session, request_id = asked_nodes([TREE.root])
    return session, Nodes(id=request_id, nodes=(NODES[other],))


@hostile("node that hashes right but does not decode")
def _node_not_decoding() -> tuple[Session, Message]:
    session, request_id = asked_nodes([node_hash(junk_node())])
    return session, Nodes(id=request_id, nodes=(junk_node(),))


@hostile("longer than asked")
def _longer() -> tuple[Session, Message]:
    session, request_id = asked_nodes([TREE.root])
    return session, Nodes(id=request_id, nodes=(NODES[TREE.root], None))


@hostile("wrong answer type")
def _wrong_type() -> tuple[Session, Message]:
    session, request_id = asked_nodes([TREE.root])
    return session, Groups(id=request_id, groups=(next(iter(GROUPS.values())),))


@hostile("answered twice")
def _twice() -> tuple[Session, Message]:
    session, request_id = asked_nodes([TREE.root])
    [event] = deliver(frame(Nodes(id=request_id, nodes=(None,))), session)
    assert isinstance(event, NodesReceived)
    return session, Nodes(id=request_id, nodes=(None,))


def asked_entries(entry: Entry) -> tuple[Session, int]:
    session = opened()
    request_id, _ = session.request_entries([(entry.path, entry.leaf_hash())])
    return session, request_id


@hostile("entry whose leaf hash does not match")
def _entry_leaf() -> tuple[Session, Message]:
    session, request_id = asked_entries(SMALL)
    forged = RemoteEntry.from_entry(SMALL.with_version(VersionVector(((1, 2),)), 1))
    return session, Entries(id=request_id, entries=(forged,))


@hostile("entry of another path")
def _entry_path() -> tuple[Session, Message]:
    session, request_id = asked_entries(SMALL)
    return session, Entries(id=request_id, entries=(RemoteEntry.from_entry(BIG),))


@hostile("group of another hash")
def _group() -> tuple[Session, Message]:
    session = opened()
    first, second = list(GROUPS)[:2]
    request_id, _ = session.request_groups([first])
    return session, Groups(id=request_id, groups=(GROUPS[second],))


def asked_chunk() -> tuple[Session, int, int]:
    session = opened()
    digest, size = next(iter_chunks(CHUNKS))
    request_id, _ = session.request_chunks([(digest, size)])
    return session, request_id, size


@hostile("chunk of the wrong size")
def _chunk_size() -> tuple[Session, Message]:
    session, request_id, size = asked_chunk()
    return session, Chunks(id=request_id, chunks=(CONTENT[: size - 1],))


@hostile("chunk of the wrong hash")
def _chunk_hash() -> tuple[Session, Message]:
    session, request_id, size = asked_chunk()
    return session, Chunks(id=request_id, chunks=(CONTENT[1 : size + 1],))


@pytest.mark.parametrize("case", HOSTILE_ANSWERS.values(), ids=HOSTILE_ANSWERS.keys())
def test_hostile_answer(case: Callable[[], tuple[Session, Message]]) -> None:
    session, answer = case()
    assert_violation(deliver(frame(answer), session), session)
    assert session.pending_requests == 0


def test_a_flood_of_requests() -> None:
    session = Session(DEVICE_A, FOLDER, EMPTY_ROOT, max_peer_requests=4)
    session.start()
    deliver(frame(hello()), session)
    flood = b"".join(frame(GetChunks(id=i, wanted=((TREE.root, 1),))) for i in range(1, 6))
    events = deliver(flood, session)
    assert [type(e) for e in events] == [ChunksRequested] * 4 + [ProtocolViolation]
    assert "unanswered" in assert_violation(events, session)


def test_answering_frees_room_for_more_requests() -> None:
    session = Session(DEVICE_A, FOLDER, EMPTY_ROOT, max_peer_requests=1)
    session.start()
    deliver(frame(hello()), session)
    for i in range(1, 10):
        [event] = deliver(frame(GetChunks(id=i, wanted=((TREE.root, 1),))), session)
        assert isinstance(event, ChunksRequested)
        session.answer_chunks(event.id, [None])


def test_request_ids_must_increase() -> None:
    session = opened()
    deliver(frame(GetChunks(id=5, wanted=((TREE.root, 1),))), session)
    assert "increase" in assert_violation(
        deliver(frame(GetChunks(id=5, wanted=((TREE.root, 1),))), session), session
    )


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00\x00",
        b"\x00\x80\x00\x01",
        b"\xff\xff\xff\xff",
        encode_frame(b"\xc1"),
        encode_frame(encode(Root(root=TREE.root)) + b"\x00"),
        encode_frame(b"\x81\xa1t\x63"),
    ],
    ids=["zero length", "oversized length", "max length", "not msgpack", "trailing", "unknown"],
)
def test_garbage(data: bytes) -> None:
    session = opened()
    assert_violation(deliver(data, session), session)


def test_frames_before_garbage_in_one_read_are_still_delivered() -> None:
    session = opened()
    events = deliver(frame(Root(root=EMPTY_ROOT)) + b"\x00\x00\x00\x00", session)
    assert events[0] == PeerRoot(root=EMPTY_ROOT)
    assert_violation(events, session)


def test_input_after_the_peer_closed_is_ignored() -> None:
    session = opened()
    events = deliver(frame(Close(reason="")) + frame(Root(root=TREE.root)) + b"junk", session)
    assert events == [PeerClosed(reason="")]
    assert session.data_to_send() == b""


# --- our own misuse ------------------------------------------------------------------------------


def test_local_misuse_is_a_local_protocol_error() -> None:
    fresh = Session(DEVICE_A, FOLDER, EMPTY_ROOT)
    with pytest.raises(LocalProtocolError, match=r"cannot send"):
        fresh.request_nodes([TREE.root])
    with pytest.raises(LocalProtocolError):
        Session(b"short", FOLDER, EMPTY_ROOT)
    a, b = connected()
    with pytest.raises(LocalProtocolError):
        a.start()
    with pytest.raises(LocalProtocolError):
        a.request_nodes([])
    with pytest.raises(LocalProtocolError):
        a.request_nodes([TREE.root, TREE.root])
    with pytest.raises(LocalProtocolError):
        a.request_entries([("../x", TREE.root)])
    with pytest.raises(LocalProtocolError):
        a.request_chunks([(TREE.root, CHUNK_MAX + 1)])
    with pytest.raises(LocalProtocolError):
        a.request_chunks([(TREE.root, 1), (TREE.root, 2)])
    with pytest.raises(LocalProtocolError, match="no open"):
        a.answer_nodes(99, [None])
    request_id, data = a.request_nodes([TREE.root])
    deliver(data, b)
    with pytest.raises(LocalProtocolError, match="no open"):
        b.answer_groups(request_id, [None])
    with pytest.raises(LocalProtocolError, match="1 to 1"):
        b.answer_nodes(request_id, [None, None])
    with pytest.raises(LocalProtocolError, match="1 to 1"):
        b.answer_nodes(request_id, [])
    with pytest.raises(LocalProtocolError, match="not what was asked"):
        b.answer_nodes(request_id, [junk_node()])
    assert b.peer_requests == 1  # a refused answer leaves the request open
    b.answer_nodes(request_id, [NODES[TREE.root]])
    with pytest.raises(LocalProtocolError, match="no open"):
        b.answer_nodes(request_id, [NODES[TREE.root]])
    digest, size = next(iter_chunks(CHUNKS))
    request_id, data = a.request_chunks([(digest, size)])
    deliver(data, b)
    with pytest.raises(LocalProtocolError, match="not what was asked"):
        b.answer_chunks(request_id, [CONTENT[1 : size + 1]])
    assert hash_chunk(CONTENT[:size]) == digest
    b.close()
    with pytest.raises(LocalProtocolError):
        b.announce_root(TREE.root)
    with pytest.raises(LocalProtocolError):
        b.close()


def test_a_long_violation_reason_is_cut_for_the_error_frame() -> None:
    session = opened()
    long_path = "é/" * 1000 + "x"
    session.request_entries([(long_path, TREE.root)])
    forged = RemoteEntry.from_entry(SMALL)
    events = deliver(frame(Entries(id=1, entries=(forged,))), session)
    assert len(events[-1].reason.encode()) > 1024  # type: ignore[union-attr]
    assert_violation(events, session)


def test_a_hello_naming_another_device_than_the_proved_one_is_a_violation() -> None:
    proved = Session(DEVICE_A, FOLDER, EMPTY_ROOT, peer_device=DEVICE_B)
    proved.start()
    liar = Session(b"q" * 32, FOLDER, EMPTY_ROOT)
    events = deliver(liar.start(), proved)
    assert len(events) == 1 and isinstance(events[0], ProtocolViolation)
    assert "another device" in events[0].reason and proved.state is State.CLOSED
    honest = Session(DEVICE_A, FOLDER, EMPTY_ROOT, peer_device=DEVICE_B)
    honest.start()
    assert deliver(Session(DEVICE_B, FOLDER, EMPTY_ROOT).start(), honest) == [
        PeerHello(device=DEVICE_B, root=EMPTY_ROOT)
    ]
