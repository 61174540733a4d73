"""The codec: every message round-trips; every malformed payload is a RemoteProtocolError with a
reason; frames reassemble from any split; an oversized length is refused before its body. Also
`RemoteEntry`, whose leaf hash must equal the `Entry` it came from."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backer.errors import LocalProtocolError, RemoteProtocolError
from backer.ids import Hash
from backer.index.chunker import CHUNK_MIN
from backer.index.entry import Entry, Kind, VersionVector, chunk_groups, group_hash, pack_chunks
from backer.protocol.codec import (
    MAX_FRAME,
    FrameDecoder,
    answer_prefix,
    decode,
    encode,
    encode_frame,
    frame,
)
from backer.protocol.messages import (
    MAX_BATCH_CHUNKS,
    MAX_BATCH_ENTRIES,
    MAX_BATCH_GROUPS,
    MAX_BATCH_NODES,
    MAX_CHUNK,
    MAX_GROUP_BYTES,
    MAX_GROUPS_PER_ENTRY,
    MAX_INLINE_CHUNKS,
    MAX_NODE_BYTES,
    MAX_TEXT,
    MAX_VECTOR,
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
    Peers,
    RemoteEntry,
    Root,
)

RNG = random.Random(7)


def h(n: int) -> Hash:
    return Hash(bytes([n]) * 32)


VV = VersionVector(((1, 5), (2**64 - 1, 2**64 - 1)))


def file_entry(path: str, records: int, *, seed: int = 1) -> Entry:
    rng = random.Random(seed)
    chunks = [(rng.randbytes(32), rng.randint(1, MAX_CHUNK)) for _ in range(records)]
    return Entry(
        path=path,
        kind=Kind.FILE,
        version=VV,
        modifier=2**64 - 1,
        size=sum(length for _, length in chunks),
        mtime_ns=-(2**63),
        mode=0o644,
        chunks=pack_chunks(chunks),
    )


SMALL = file_entry("docs/small.txt", 3)  # chunk list inline
LARGE = file_entry("big/video.mkv", 600)  # 21,600 bytes of chunk list: groups only
EMPTY_FILE = Entry(path="empty", kind=Kind.FILE, version=VV, modifier=1)
DIRECTORY = Entry(path="docs", kind=Kind.DIR, version=VV, modifier=1, mode=0o755)
LINK = Entry(path="docs/link", kind=Kind.SYMLINK, version=VV, modifier=1, target="../x\u00e9")
TOMBSTONE = Entry(path="gone/é", kind=Kind.FILE, version=VV, modifier=3, deleted=True)
ENTRIES = [SMALL, LARGE, EMPTY_FILE, DIRECTORY, LINK, TOMBSTONE]

MESSAGES: list[Message] = [
    Hello(version=2, device=h(1), folder=h(2), root=h(3)),
    Hello(version=2**32 - 1, device=h(1), folder=h(2), root=h(3)),
    Root(root=h(4)),
    Peers(peers=()),
    Peers(peers=((h(1), ("127.0.0.1:22100", ":22101", "[::1]:9", "nas.local:1")),)),
    Peers(peers=tuple((h(i), (f"10.0.0.{i}:1",)) for i in range(64))),
    GetNodes(id=0, hashes=(h(5),)),
    GetNodes(id=2**63 - 1, hashes=tuple(h(i) for i in range(MAX_BATCH_NODES))),
    Nodes(id=1, nodes=(b"\x92\x00\x90", None, bytes(MAX_NODE_BYTES))),
    GetEntries(id=2, wanted=(("a/b", h(6)), ("a/\u00e9", h(7)))),
    GetEntries(id=2, wanted=(("a/b", h(6)),), inline=False),
    GetEntries(id=2, wanted=(("photos/album/p1.jpg", h(6)), ("photos/album/p2.jpg", h(7)))),
    Entries(id=3, entries=(*(RemoteEntry.from_entry(e) for e in ENTRIES), None)),
    GetGroups(id=4, hashes=(h(8), h(9))),
    Groups(id=5, groups=(chunk_groups(LARGE.chunks)[0], None)),
    GetChunks(id=6, wanted=((h(10), MAX_CHUNK), (h(11), 1))),
    GetChunks(id=6, wanted=tuple((h(i), 1) for i in range(MAX_BATCH_CHUNKS))),
    Chunks(id=7, chunks=(bytes(MAX_CHUNK), None)),
    Error(code=65535, text="é" * (MAX_TEXT // 2)),
    Close(reason=""),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message: Message) -> None:
    payload = encode(message)
    assert decode(payload) == message
    assert FrameDecoder().feed(frame(message)) == [payload]


def test_every_message_type_is_in_the_table() -> None:
    assert {type(m) for m in MESSAGES} == set(Message.__args__)


# --- malformed payloads --------------------------------------------------------------------------


def wire(message: Message) -> dict[str, Any]:
    """The raw map of a valid message, to break."""
    obj: dict[str, Any] = msgpack.unpackb(encode(message), raw=False)
    return obj


def packed(obj: object) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def with_(message: Message, **changes: object) -> bytes:
    obj = wire(message)
    for key, value in changes.items():
        if value is _DROP:
            del obj[key]
        else:
            obj[key] = value
    return packed(obj)


_DROP = object()
ENTRY_MAP = wire(Entries(id=1, entries=(RemoteEntry.from_entry(SMALL),)))["e"][0]


def entries_with(**changes: object) -> bytes:
    entry = dict(ENTRY_MAP)
    for key, value in changes.items():
        if value is _DROP:
            del entry[key]
        else:
            entry[key] = value
    return packed({"t": 6, "i": 1, "e": [entry]})


def second_entry_with(**changes: object) -> bytes:
    """An Entries payload of two entries, the second written against the first."""
    second = {"p": "ocs/other.txt", "q": 1, "k": 0}
    second.update(changes)
    return packed({"t": 6, "i": 1, "e": [ENTRY_MAP, second]})


def vector(*pairs: tuple[int, int]) -> list[list[int]]:
    return [list(pair) for pair in pairs]


HELLO, GET_NODES = MESSAGES[0], MESSAGES[3]
BAD_PATHS = ["../x", "/etc/x", "a/../../x", "a\x00b", "a\\b", "e\u0301", "", ".backer/x", "a//b"]

MALFORMED: dict[str, bytes] = {
    "empty": b"",
    "not msgpack": b"\xc1",
    "not a map": packed([1, 2]),
    "unknown type": packed({"t": 99}),
    "no type": packed({"r": h(1)}),
    "type is a bool": with_(MESSAGES[2], t=True),
    "type is a str": with_(MESSAGES[2], t="2"),
    "extra known key": with_(MESSAGES[2], i=1),
    "extra unknown key": with_(MESSAGES[2], zz=1),
    "missing key": with_(HELLO, d=_DROP),
    "duplicate key": b"\x83\xa1t\x02\xa1r\xc4\x20" + h(1) + b"\xa1r\xc4\x20" + h(2),
    "int map key": b"\x82\xa1t\x02\x01\x02",
    "trailing bytes": encode(HELLO) + b"\x00",
    "truncated": encode(HELLO)[:-1],
    "two messages": encode(HELLO) + encode(HELLO),
    "float version": with_(HELLO, v=1.0),
    "bool version": with_(HELLO, v=True),
    "negative version": with_(HELLO, v=-1),
    "huge version": with_(HELLO, v=2**32),
    "nil root": with_(HELLO, r=None),
    "str root": with_(HELLO, r="x" * 32),
    "short root": with_(HELLO, r=bytes(31)),
    "long device": with_(HELLO, d=bytes(33)),
    "ext root": packed({"t": 2, "r": msgpack.ExtType(1, bytes(32))}),
    "timestamp root": b"\x82\xa1t\x02\xa1r\xd6\xff\x00\x00\x00\x00",
    "non-UTF-8 key": b"\x81\xa2\xff\xfe\x01",
    "negative id": with_(GET_NODES, i=-1),
    "bool id": with_(GET_NODES, i=True),
    "id over int64": with_(GET_NODES, i=2**63),
    "hashes not a list": with_(GET_NODES, hs=h(1)),
    "empty hashes": with_(GET_NODES, hs=[]),
    "short hash in list": with_(GET_NODES, hs=[h(1), bytes(31)]),
    "nil hash in list": with_(GET_NODES, hs=[None]),
    "duplicate hashes": with_(GET_NODES, hs=[h(1), h(1)]),
    "too many node hashes": with_(GET_NODES, hs=[h(i % 256) + b"" for i in range(257)]),
    "too many group hashes": packed({"t": 7, "i": 1, "hs": [bytes(32)] * (MAX_BATCH_GROUPS + 1)}),
    "nested list of hashes": with_(GET_NODES, hs=[[h(1)]]),
    "too many nodes": packed({"t": 4, "i": 1, "n": [None] * (MAX_BATCH_NODES + 1)}),
    "oversized node": packed({"t": 4, "i": 1, "n": [bytes(MAX_NODE_BYTES + 1)]}),
    "empty node": packed({"t": 4, "i": 1, "n": [b""]}),
    "str node": packed({"t": 4, "i": 1, "n": ["abc"]}),
    "too many wanted": packed({"t": 5, "i": 1, "w": [[f"p{i}", h(1)] for i in range(129)]}),
    "wanted not a pair": packed({"t": 5, "i": 1, "w": [["a", h(1), 1]]}),
    "wanted flat": packed({"t": 5, "i": 1, "w": ["a", h(1)]}),
    "wanted short hash": packed({"t": 5, "i": 1, "w": [["a", bytes(31)]]}),
    "wanted duplicate path": packed({"t": 5, "i": 1, "w": [["a", h(1)], ["a", h(2)]]}),
    "wanted bytes path": packed({"t": 5, "i": 1, "w": [[b"a", h(1)]]}),
    "wanted shared prefix first": packed({"t": 5, "i": 1, "w": [[1, "bc", h(1)]]}),
    "wanted shared prefix too long": packed({"t": 5, "i": 1, "w": [["abc", h(1)], [4, "d", h(2)]]}),
    "wanted non-UTF-8 path": b"\x83\xa1t\x05\xa1i\x01\xa1w\x91\x92\xa1\xff\xc4\x20" + h(1),
    "too many entries": packed({"t": 6, "i": 1, "e": [None] * (MAX_BATCH_ENTRIES + 1)}),
    "entry not a map": packed({"t": 6, "i": 1, "e": [[1, 2]]}),
    "too many groups": packed({"t": 8, "i": 1, "g": [None] * (MAX_BATCH_GROUPS + 1)}),
    "oversized group": packed({"t": 8, "i": 1, "g": [bytes(MAX_GROUP_BYTES + 36)]}),
    "group of part records": packed({"t": 8, "i": 1, "g": [bytes(35)]}),
    "group with empty chunk": packed({"t": 8, "i": 1, "g": [bytes(36)]}),
    "group with oversized chunk": packed(
        {"t": 8, "i": 1, "g": [pack_chunks([(bytes(32), MAX_CHUNK + 1)])]}
    ),
    "chunk over MAX_CHUNK": packed({"t": 10, "i": 1, "cs": [bytes(MAX_CHUNK + 1)]}),
    "empty chunk": packed({"t": 10, "i": 1, "cs": [b""]}),
    "chunk as str": packed({"t": 10, "i": 1, "cs": ["data"]}),
    "chunks not a list": packed({"t": 10, "i": 1, "cs": bytes(10)}),
    "no chunks": packed({"t": 10, "i": 1, "cs": []}),
    "too many chunks": packed({"t": 10, "i": 1, "cs": [None] * (MAX_BATCH_CHUNKS + 1)}),
    "chunk size zero": packed({"t": 9, "i": 1, "cw": [[bytes(32), 0]]}),
    "chunk size negative": packed({"t": 9, "i": 1, "cw": [[bytes(32), -1]]}),
    "chunk size over max": packed({"t": 9, "i": 1, "cw": [[bytes(32), MAX_CHUNK + 1]]}),
    "chunk size bool": packed({"t": 9, "i": 1, "cw": [[bytes(32), True]]}),
    "chunk hash short": packed({"t": 9, "i": 1, "cw": [[bytes(31), 1]]}),
    "wanted chunk not a pair": packed({"t": 9, "i": 1, "cw": [[bytes(32), 1, 2]]}),
    "wanted chunks repeated": packed({"t": 9, "i": 1, "cw": [[bytes(32), 1], [bytes(32), 1]]}),
    "too many wanted chunks": packed(
        {"t": 9, "i": 1, "cw": [[bytes([i % 256, i // 256]) * 16, 1] for i in range(257)]}
    ),
    "old single-chunk request": packed({"t": 9, "i": 1, "h": bytes(32), "s": 1}),
    "error code negative": packed({"t": 11, "x": -1, "m": ""}),
    "error code too big": packed({"t": 11, "x": 65536, "m": ""}),
    "error text too long": packed({"t": 11, "x": 1, "m": "x" * (MAX_TEXT + 1)}),
    "error text bytes": packed({"t": 11, "x": 1, "m": b"x"}),
    "close reason too long": packed({"t": 12, "m": "é" * (MAX_TEXT // 2 + 1)}),
    "close reason int": packed({"t": 12, "m": 1}),
    "peers not a list": packed({"t": 13, "a": h(1)}),
    "too many peers": packed({"t": 13, "a": [[h(1), ["a:1"]]] * 65}),
    "peer not a pair": packed({"t": 13, "a": [[h(1)]]}),
    "peer short device": packed({"t": 13, "a": [[bytes(31), ["a:1"]]]}),
    "peer without addresses": packed({"t": 13, "a": [[h(1), []]]}),
    "peer too many addresses": packed({"t": 13, "a": [[h(1), ["a:1"] * 9]]}),
    "peer address without port": packed({"t": 13, "a": [[h(1), ["host"]]]}),
    "peer address port too big": packed({"t": 13, "a": [[h(1), ["host:65536"]]]}),
    "peer address unbracketed v6": packed({"t": 13, "a": [[h(1), ["::1:80"]]]}),
    "peer address with space": packed({"t": 13, "a": [[h(1), ["a b:1"]]]}),
    "peer address too long": packed({"t": 13, "a": [[h(1), ["a" * 300 + ":1"]]]}),
    "peer address bytes": packed({"t": 13, "a": [[h(1), [b"a:1"]]]}),
    "deeply nested": b"\x91" * 100_000,
    "map of many keys": b"\xde\xff\xff" + b"\xa1t\x02" * 10,
    "huge array header": with_(GET_NODES, hs=[]).replace(b"\x90", b"\xdd\xff\xff\xff\xff"),
    "huge bin header": b"\x82\xa1t\x02\xa1r\xc6\xff\xff\xff\xff",
    # entries
    "entry missing key": entries_with(v=_DROP),
    "first entry with a shared prefix": entries_with(q=2, p="cs/small.txt"),
    "shared prefix longer than the last path": second_entry_with(q=99),
    "shared prefix of nothing": second_entry_with(q=0),
    "shared prefix splitting a character": packed(
        {"t": 6, "i": 1, "e": [dict(ENTRY_MAP, p="d\u00e9"), {"p": "\x81x", "q": 2, "k": 0}]}
    ),
    "entry unknown key": entries_with(zz=1),
    "entry kind unknown": entries_with(k=7),
    "entry kind bool": entries_with(k=False),
    "entry deleted int": entries_with(x=0),
    "entry negative size": entries_with(s=-1),
    "entry bool size": entries_with(s=True),
    "entry mode too big": entries_with(o=0o10000),
    "entry mtime over int64": entries_with(m=2**63),
    "entry modifier negative": entries_with(y=-1),
    "entry target on a file": entries_with(l="x"),
    "entry empty version": entries_with(v=[]),
    "entry unsorted version": entries_with(v=vector((2, 1), (1, 1))),
    "entry zero counter": entries_with(v=vector((1, 0))),
    "entry flat version": entries_with(v=[1, 1]),
    "entry version too long": entries_with(v=vector(*((i, 1) for i in range(MAX_VECTOR + 1)))),
    "entry groups not whole hashes": entries_with(g=bytes(33), c=None),
    "entry groups as list": entries_with(g=[h(1)], c=None),
    "entry too many groups": entries_with(g=bytes(32 * (MAX_GROUPS_PER_ENTRY + 1)), c=None),
    "entry inline not matching groups": entries_with(g=h(1)),
    "entry inline wrong size": entries_with(s=ENTRY_MAP["s"] + 1),
    "entry inline too long": entries_with(c=bytes(MAX_INLINE_CHUNKS + 36)),
    "entry size without groups": entries_with(g=b"", c=None),
    "entry dir with groups": entries_with(k=1, c=None),
    "entry deleted with size": entries_with(x=True, g=b"", c=None),
}
for number, bad_path in enumerate(BAD_PATHS):
    MALFORMED[f"wanted path {number} {bad_path!r}"] = packed(
        {"t": 5, "i": 1, "w": [[bad_path, h(1)]]}
    )
    MALFORMED[f"entry path {number} {bad_path!r}"] = entries_with(p=bad_path)
MALFORMED["wanted path too long"] = packed({"t": 5, "i": 1, "w": [["a/" * 2049, h(1)]]})


@pytest.mark.parametrize("payload", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_payload_is_refused(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode(payload)
    assert str(info.value)


def test_malformed_cases_differ_from_valid_only_where_meant() -> None:
    # The helpers build valid payloads when nothing is changed.
    assert decode(with_(HELLO)) == HELLO
    assert decode(entries_with()) == Entries(id=1, entries=(RemoteEntry.from_entry(SMALL),))


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_field_has_its_type_checked(message: Message) -> None:
    for key, value in wire(message).items():
        for wrong in _wrong_values(value):
            with pytest.raises(RemoteProtocolError):
                decode(with_(message, **{key: wrong}))


def _wrong_values(value: object) -> list[object]:
    if isinstance(value, bool):
        return [0, None]
    if isinstance(value, int):
        return [True, str(value), float(value), None, [value]]
    if isinstance(value, bytes):
        return [value.decode("latin-1"), 1, [value]]  # None is valid where a bin is optional
    if isinstance(value, str):
        return [value.encode(), None, 1]
    if isinstance(value, list):
        return [{}, None, b"", 1]
    return [1, "x", [None]]


# --- frames --------------------------------------------------------------------------------------


STREAM = b"".join(frame(m) for m in MESSAGES[:6])
PAYLOADS = [encode(m) for m in MESSAGES[:6]]


def test_frames_split_at_every_byte_boundary_reassemble() -> None:
    for cut in range(len(STREAM) + 1):
        decoder = FrameDecoder()
        frames = decoder.feed(STREAM[:cut]) + decoder.feed(STREAM[cut:])
        assert frames == PAYLOADS
        assert decoder.buffered == 0


def test_frames_fed_byte_by_byte_and_in_random_pieces() -> None:
    decoder = FrameDecoder()
    frames = [f for i in range(len(STREAM)) for f in decoder.feed(STREAM[i : i + 1])]
    assert frames == PAYLOADS
    for _ in range(50):
        decoder, frames, i = FrameDecoder(), [], 0
        while i < len(STREAM):
            step = RNG.randint(0, 300)
            frames += decoder.feed(STREAM[i : i + step])
            i += step
        assert frames == PAYLOADS


def test_oversized_length_is_refused_before_its_body() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\x00\x80") == []  # half a header: nothing to judge yet
    with pytest.raises(RemoteProtocolError, match="length"):
        decoder.feed(b"\x00\x01")  # 8 MiB + 1 announced; not one body byte sent
    with pytest.raises(RemoteProtocolError):
        decoder.feed(b"\x00" * 10)  # a failed decoder stays failed
    assert decoder.buffered == 0


@pytest.mark.parametrize("length", [0, MAX_FRAME + 1, 2**32 - 1])
def test_bad_lengths(length: int) -> None:
    with pytest.raises(RemoteProtocolError):
        FrameDecoder().feed(length.to_bytes(4, "big"))


def test_largest_frame_is_accepted() -> None:
    data = encode_frame(bytes(MAX_FRAME))
    decoder = FrameDecoder()
    assert decoder.feed(data[:1000]) == []
    assert decoder.feed(data[1000:]) == [bytes(MAX_FRAME)]


def test_frames_before_a_bad_header_are_delivered_then_it_fails() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(STREAM + b"\x00\x00\x00\x00") == PAYLOADS
    assert decoder.failed
    with pytest.raises(RemoteProtocolError):
        decoder.feed(b"")


def test_encode_frame_refuses_what_no_peer_accepts() -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(b"")
    with pytest.raises(LocalProtocolError):
        encode_frame(bytes(MAX_FRAME + 1))


def test_decode_refuses_oversized_payload() -> None:
    with pytest.raises(RemoteProtocolError):
        decode(bytes(MAX_FRAME + 1))


# --- RemoteEntry ---------------------------------------------------------------------------------


def test_siblings_are_asked_for_by_their_names() -> None:
    wanted = tuple((f"photos/album-2026/photo-{i:04d}.jpg", h(i)) for i in range(100))
    message = GetEntries(id=1, wanted=wanted)
    assert decode(encode(message)) == message
    assert msgpack.unpackb(encode(message))["w"][2] == [
        len("photos/album-2026/photo-000"),
        "2.jpg",
        h(2),
    ]


def test_siblings_cost_their_names_not_their_paths_and_vectors() -> None:
    """A renamed directory's entries share a parent path, a version vector and a modifier:
    each entry after the first names only what differs from the one before it."""
    siblings = tuple(
        RemoteEntry.from_entry(
            Entry(
                path=f"photos/album-2026/photo-{i:04d}.jpg",
                kind=Kind.FILE,
                version=VV,
                modifier=3,
                deleted=True,
            )
        )
        for i in range(100)
    )
    message = Entries(id=1, entries=(*siblings[:50], None, *siblings[50:]))
    assert decode(encode(message)) == message
    later = msgpack.unpackb(encode(message))["e"][2]
    assert later == {"q": len("photos/album-2026/photo-000"), "p": "2.jpg", "k": 0, "x": True}
    assert decode(second_entry_with()) == Entries(
        id=1,
        entries=(
            RemoteEntry.from_entry(SMALL),
            RemoteEntry.from_entry(
                Entry(
                    path="docs/other.txt",
                    kind=Kind.FILE,
                    version=SMALL.version,
                    modifier=SMALL.modifier,
                )
            ),
        ),
    )


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.path)
def test_an_entry_s_fields_at_their_defaults_stay_off_the_wire(entry: Entry) -> None:
    """A tombstone is its path, kind, version, modifier, mark and signature: eight keys of empty
    values each cost a renamed directory's copy bytes for every file that moved away."""
    remote = RemoteEntry.from_entry(entry)
    sent = msgpack.unpackb(encode(Entries(id=1, entries=(remote,))))["e"][0]
    assert {"p", "k", "v", "y"} <= sent.keys()
    assert all(value not in (0, False, "", b"") for key, value in sent.items() if key not in "ky")
    assert decode(encode(Entries(id=1, entries=(remote,)))) == Entries(id=1, entries=(remote,))
    if entry is TOMBSTONE:
        assert sent.keys() == {"p", "k", "v", "y", "x"}


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.path)
def test_remote_entry_leaf_hash_and_round_trip(entry: Entry) -> None:
    remote = RemoteEntry.from_entry(entry)
    assert remote.leaf_hash() == entry.leaf_hash()
    assert remote.groups == tuple(group_hash(g) for g in chunk_groups(entry.chunks))
    assert remote.to_entry(entry.chunks) == entry
    if len(entry.chunks) <= MAX_INLINE_CHUNKS:
        assert remote.inline_entry() == entry
    else:
        assert remote.chunks is None
        assert remote.inline_entry() is None


def test_to_entry_refuses_chunks_that_are_not_its_groups() -> None:
    remote = RemoteEntry.from_entry(LARGE)
    with pytest.raises(RemoteProtocolError, match="groups"):
        remote.to_entry(LARGE.chunks[:-36])
    with pytest.raises(RemoteProtocolError):
        remote.to_entry(LARGE.chunks + b"x")
    with pytest.raises(RemoteProtocolError):
        remote.to_entry(SMALL.chunks)


def test_to_entry_refuses_a_size_its_chunks_do_not_add_up_to() -> None:
    fields = {f: getattr(RemoteEntry.from_entry(LARGE), f) for f in RemoteEntry.__slots__}
    lying = RemoteEntry(**{**fields, "size": LARGE.size + 1})
    assert lying.leaf_hash() != LARGE.leaf_hash()
    with pytest.raises(RemoteProtocolError, match="size"):
        lying.to_entry(LARGE.chunks)


def _many_groups(count: int, size: int) -> dict[str, Any]:
    """Wire fields of a file whose `count` groups are all one 256-record group."""
    group = pack_chunks([(bytes(31) + b"\xc0", MAX_CHUNK)] * 256)
    fields = {f: getattr(RemoteEntry.from_entry(LARGE), f) for f in RemoteEntry.__slots__}
    return {**fields, "groups": (group_hash(group),) * count, "chunks": None, "size": size}


def test_an_entry_with_more_groups_than_its_size_allows_chunks_is_refused_on_decode() -> None:
    fields = _many_groups(65536, 2**20)  # 1 MiB holds at most 128 chunks, so 128 groups
    lying = RemoteEntry.__new__(RemoteEntry)
    for name, value in fields.items():
        object.__setattr__(lying, name, value)
    with pytest.raises(RemoteProtocolError, match="groups are more than"):
        decode(encode(Entries(id=1, entries=(lying,))))
    RemoteEntry(**_many_groups(128, 2**20))  # as many as the size allows: fine


def test_fetched_groups_are_counted_against_the_size_before_they_are_joined() -> None:
    group = pack_chunks([(bytes(31) + b"\xc0", MAX_CHUNK)] * 256)
    fetched = {group_hash(group): group}
    # 65,536 groups fit 512 MiB, but these hold 16.7 M chunks where 512 MiB allows 65,536.
    lying = RemoteEntry(**_many_groups(65536, 2**29))
    with pytest.raises(RemoteProtocolError, match="chunks are more than 65536"):
        lying.check_groups(fetched)
    short = RemoteEntry(**_many_groups(2, 2 * 256 * MAX_CHUNK - 1))
    with pytest.raises(RemoteProtocolError, match="does not add up"):
        short.check_groups(fetched)
    RemoteEntry(**_many_groups(2, 2 * 256 * MAX_CHUNK)).check_groups(fetched)


def test_from_entry_refuses_what_the_protocol_cannot_carry() -> None:
    long_vector = VersionVector(tuple((i, 1) for i in range(MAX_VECTOR + 1)))
    with pytest.raises(ValueError, match="vector"):
        RemoteEntry.from_entry(Entry(path="a", kind=Kind.DIR, version=long_vector, modifier=1))


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(list(Kind)),
    deleted=st.booleans(),
    records=st.lists(
        st.tuples(st.binary(min_size=32, max_size=32), st.integers(CHUNK_MIN, MAX_CHUNK)),
        max_size=300,
    ),
    mtime=st.integers(-(2**63), 2**63 - 1),
    counters=st.dictionaries(st.integers(0, 2**64 - 1), st.integers(1, 2**64 - 1), min_size=1),
)
def test_leaf_hashes_agree_for_any_entry(
    kind: Kind,
    deleted: bool,
    records: list[tuple[bytes, int]],
    mtime: int,
    counters: dict[int, int],
) -> None:
    live_file = kind is Kind.FILE and not deleted
    chunks = pack_chunks(records) if live_file else b""
    entry = Entry(
        path="x/y",
        kind=kind,
        version=VersionVector(tuple(sorted(counters.items()))),
        modifier=min(counters),
        deleted=deleted,
        size=sum(length for _, length in records) if live_file else 0,
        mtime_ns=mtime,
        target="t" if kind is Kind.SYMLINK else "",
        chunks=chunks,
    )
    remote = RemoteEntry.from_entry(entry)
    assert remote.leaf_hash() == entry.leaf_hash()
    assert decode(encode(Entries(id=1, entries=(remote,)))) == Entries(id=1, entries=(remote,))


# --- answer prefixes -----------------------------------------------------------------------------


def test_answer_prefix_keeps_at_least_one_item_and_stops_at_the_budget() -> None:
    blobs: list[bytes | RemoteEntry | None] = [bytes(1000)] * 10
    assert answer_prefix(blobs, 10**9) == 10
    assert answer_prefix(blobs, 3100) == 3
    assert answer_prefix(blobs, 10) == 1
    assert answer_prefix([None] * 5, 3) == 3
    remote = RemoteEntry.from_entry(LARGE)
    size = len(encode(Entries(id=1, entries=(remote,))))
    assert answer_prefix([remote] * 4, 2 * size) == 2


def test_inline_entry_of_an_entry_without_content_needs_no_groups() -> None:
    remote = RemoteEntry(path="d", kind=Kind.DIR, version=VV, modifier=1, chunks=None)
    assert remote.inline_entry() == Entry(path="d", kind=Kind.DIR, version=VV, modifier=1)
