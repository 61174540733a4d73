"""Bytes <-> messages: length-prefixed frames, and msgpack maps read strictly by schema.

With `reader` (the strict value reader), the only module that knows msgpack or the frame format.
Decoding is schema-directed: each map key has one value type, checked from the type byte *before*
a value is unpacked, so a hostile frame can neither smuggle in types nor make us build large
nested containers (at most a few objects per wire byte, bounded by the batch limits). Every
failure is a RemoteProtocolError with a short reason; msgpack's own exceptions are caught around
each call and translated.

Pure: imports only errors, ids, paths, addresses, index and `protocol.messages` and `reader`;
no I/O.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from backer.addresses import MAX_ADDRESS_BYTES
from backer.errors import LocalProtocolError, RemoteProtocolError
from backer.ids import HASH_SIZE, Hash
from backer.index.entry import SIGNATURE_SIZE, Kind, VersionVector
from backer.paths import MAX_PATH_BYTES
from backer.protocol.messages import (
    MAX_ADDRESSES_PER_PEER,
    MAX_BATCH_CHUNKS,
    MAX_BATCH_ENTRIES,
    MAX_BATCH_GROUPS,
    MAX_BATCH_NODES,
    MAX_CHUNK,
    MAX_GROUP_BYTES,
    MAX_GROUPS_PER_ENTRY,
    MAX_INLINE_CHUNKS,
    MAX_NODE_BYTES,
    MAX_PEERS_LISTED,
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
from backer.protocol.reader import (
    BOOL,
    MAP,
    MAX_FRAME,
    NIL,
    Reader,
    read_bin,
    read_bool,
    read_hash,
    read_int,
    read_list,
    read_optional_bin,
    read_text,
)

__all__ = [
    "MAX_FRAME",
    "FrameDecoder",
    "answer_prefix",
    "decode",
    "encode",
    "encode_frame",
    "frame",
]

_HEADER = struct.Struct(">I")


def encode_frame(payload: bytes) -> bytes:
    """`payload` behind its 4-byte big-endian length."""
    if not 0 < len(payload) <= MAX_FRAME:
        raise LocalProtocolError(f"a frame payload is 1 to {MAX_FRAME} bytes, not {len(payload)}")
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Splits a byte stream into frame payloads, buffering a partial frame.

    A zero or oversized length raises RemoteProtocolError as soon as its 4 header bytes arrive
    (its body is never waited for). If complete frames came before it in the same `feed`, they
    are returned and the error is raised by the next `feed`; the decoder stays failed.

    What arrives is held as views of the pieces fed, and a payload is copied once, when it is
    complete: appending every piece to one buffer and slicing frames out of it copied each byte
    three times (a 1 MiB answer of chunks arrives in a few reads).
    """

    __slots__ = ("_failure", "_held", "_length", "_pieces")

    def __init__(self) -> None:
        self._pieces: deque[memoryview] = deque()
        self._held = 0  # bytes in _pieces
        self._length: int | None = None  # the payload size of the frame begun, header read
        self._failure: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes held of a frame not yet complete."""
        return self._held + (0 if self._length is None else _HEADER.size)

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def feed(self, data: bytes) -> list[bytes]:
        if self._failure is not None:
            raise RemoteProtocolError(self._failure)
        if data:
            self._pieces.append(memoryview(bytes(data)))  # no copy of a bytes object
            self._held += len(data)
        frames: list[bytes] = []
        while True:
            if self._length is None:
                if self._held < _HEADER.size:
                    break
                (length,) = _HEADER.unpack(self._take(_HEADER.size))
                if not 0 < length <= MAX_FRAME:
                    self._failure = f"frame length {length} is outside [1, {MAX_FRAME}]"
                    self._pieces.clear()
                    self._held = 0
                    if not frames:
                        raise RemoteProtocolError(self._failure)
                    return frames
                self._length = length
            if self._held < self._length:
                break
            frames.append(self._take(self._length))
            self._length = None
        return frames

    def _take(self, count: int) -> bytes:
        """The next `count` held bytes (there are that many), as one bytes object."""
        self._held -= count
        pieces = self._pieces
        first = pieces[0]
        if len(first) >= count:
            if len(first) == count:
                pieces.popleft()
            else:
                pieces[0] = first[count:]
            return bytes(first[:count])
        parts = []
        while count:
            piece = pieces[0]
            if len(piece) <= count:
                pieces.popleft()
            else:
                pieces[0], piece = piece[count:], piece[:count]
            parts.append(piece)
            count -= len(piece)
        return b"".join(parts)


def encode(message: Message) -> bytes:
    """The msgpack payload of `message` (no frame header)."""
    tag, fields = _SCHEMA_OF[type(message)]
    obj: dict[str, Any] = {"t": tag}
    for key, attr in fields.items():
        value = getattr(message, attr)
        writer = _WRITERS.get(key)
        obj[key] = writer(value) if writer else value
    return bytes(msgpack.packb(obj, use_bin_type=True))


def frame(message: Message) -> bytes:
    """`message` encoded and framed, ready for the wire."""
    return encode_frame(encode(message))


def decode(payload: bytes) -> Message:
    """The message `payload` encodes; RemoteProtocolError for anything else."""
    if not 0 < len(payload) <= MAX_FRAME:
        raise RemoteProtocolError(f"a message is 1 to {MAX_FRAME} bytes")
    reader = Reader(payload)
    fields = reader.map(_MESSAGE_FIELDS)
    reader.end()
    tag = fields.pop("t", None)
    if tag not in _SCHEMAS:
        raise RemoteProtocolError(f"unknown message type {tag!r}")
    cls, schema = _SCHEMAS[tag]
    if fields.keys() != schema.keys():
        missing = sorted(schema.keys() - fields.keys())
        extra = sorted(fields.keys() - schema.keys())
        raise RemoteProtocolError(f"{cls.__name__}: missing keys {missing}, extra keys {extra}")
    try:
        message: Message = cls(**{attr: fields[key] for key, attr in schema.items()})
    except ValueError as exc:  # the message's own validation, InvalidPathError included
        raise RemoteProtocolError(f"invalid {cls.__name__}: {exc}") from exc
    return message


def answer_prefix(items: Sequence[bytes | RemoteEntry | None], budget: int) -> int:
    """How many leading `items` of a batch answer fit in `budget` encoded bytes; at least one
    (any single item fits in a frame), so an answer always makes progress."""
    total = 0
    for count, item in enumerate(items):
        if item is None:
            total += 1
        elif isinstance(item, RemoteEntry):
            total += len(msgpack.packb(_entry_obj(item), use_bin_type=True))
        else:
            total += len(item) + 5
        if total > budget and count:
            return count
    return len(items)


# --- the schema ----------------------------------------------------------------------------------

# tag -> (message class, {map key: field name}). Every message map also holds "t": tag.
_SCHEMAS: dict[int, tuple[type[Any], dict[str, str]]] = {
    1: (Hello, {"v": "version", "d": "device", "f": "folder", "r": "root"}),
    2: (Root, {"r": "root"}),
    3: (GetNodes, {"i": "id", "hs": "hashes"}),
    4: (Nodes, {"i": "id", "n": "nodes"}),
    5: (GetEntries, {"i": "id", "w": "wanted", "in": "inline"}),
    6: (Entries, {"i": "id", "e": "entries"}),
    7: (GetGroups, {"i": "id", "hs": "hashes"}),
    8: (Groups, {"i": "id", "g": "groups"}),
    9: (GetChunks, {"i": "id", "cw": "wanted"}),
    10: (Chunks, {"i": "id", "cs": "chunks"}),
    11: (Error, {"x": "code", "m": "text"}),
    12: (Close, {"m": "reason"}),
    13: (Peers, {"a": "peers"}),
}
_SCHEMA_OF = {cls: (tag, fields) for tag, (cls, fields) in _SCHEMAS.items()}

# RemoteEntry field -> map key; groups travel as one bin of concatenated 32-byte hashes.
_ENTRY_KEYS = {
    "path": "p",
    "kind": "k",
    "version": "v",
    "modifier": "y",
    "deleted": "x",
    "size": "s",
    "mtime_ns": "m",
    "mode": "o",
    "target": "l",
    "groups": "g",
    "chunks": "c",
    "signature": "z",
}


# Entry fields left out of the map when they hold these values (a tombstone is a path, a
# version and a signature); a missing key decodes to its default. `c` is nil when the chunk list
# is not inline, so its default (empty, inline) differs from nil.
_ENTRY_DEFAULTS: dict[str, Any] = {
    "x": False,
    "s": 0,
    "m": 0,
    "o": 0,
    "l": "",
    "g": (),
    "c": b"",
    "z": b"",
}
_REQUIRED_ENTRY_KEYS = frozenset(_ENTRY_KEYS.values()) - _ENTRY_DEFAULTS.keys()
_FROM_PREVIOUS = {"v": "version", "y": "modifier"}  # may be left out after a first entry


def _wanted_obj(wanted: Sequence[tuple[str, Hash]]) -> list[list[Any]]:
    """[path, leaf] pairs; a path sharing enough with the one before as [q, rest, leaf]."""
    items: list[list[Any]] = []
    previous = b""
    for path, leaf in wanted:
        raw = path.encode()
        shared = _shared_prefix(previous, raw)
        if shared >= _MIN_SHARED:
            items.append([shared, raw[shared:].decode(), leaf])
        else:
            items.append([path, leaf])
        previous = raw
    return items


def _entries_obj(entries: Sequence[RemoteEntry | None]) -> list[dict[str, Any] | None]:
    """The entries of one message, each after the first written against the one before."""
    objs: list[dict[str, Any] | None] = []
    previous = None
    for entry in entries:
        objs.append(_entry_obj(entry, previous))
        previous = entry or previous
    return objs


def _entry_obj(
    entry: RemoteEntry | None, previous: RemoteEntry | None = None
) -> dict[str, Any] | None:
    """An entry's map; against `previous` (the message's entry before it), its version and
    modifier are left out when equal to that one's, and its path is given as the length of
    the UTF-8 prefix it shares with that one's (`q`) and the rest (`p`). Siblings of a
    renamed directory then cost their names, not their paths and vectors again."""
    if entry is None:
        return None
    obj = {}
    for attr, key in _ENTRY_KEYS.items():
        value = getattr(entry, attr)
        if key not in _ENTRY_DEFAULTS or value != _ENTRY_DEFAULTS[key]:
            obj[key] = value
    obj["k"] = int(entry.kind)
    obj["v"] = [list(pair) for pair in entry.version.counters]
    if entry.groups:
        obj["g"] = b"".join(entry.groups)
    if previous is not None:
        if entry.version == previous.version:
            del obj["v"]
        if entry.modifier == previous.modifier:
            del obj["y"]
        shared = _shared_prefix(previous.path.encode(), entry.path.encode())
        if shared >= _MIN_SHARED:
            obj["q"] = shared
            obj["p"] = entry.path.encode()[shared:].decode()
    return obj


# Fields written against their neighbours in a message (the readers are `_MESSAGE_FIELDS`').
_WRITERS: dict[str, Callable[[Any], Any]] = {"e": _entries_obj, "w": _wanted_obj}
_MIN_SHARED = 5  # bytes of a shared path prefix worth its `q` (a key and an int)


def _shared_prefix(before: bytes, path: bytes) -> int:
    """Bytes `path` shares with `before` from the start, cut back to a character boundary."""
    shared = 0
    for a, b in zip(before, path, strict=False):
        if a != b:
            break
        shared += 1
    while shared < len(path) and path[shared] & 0xC0 == 0x80:  # inside a UTF-8 sequence
        shared -= 1
    return shared


def _wanted_chunk(r: Reader) -> tuple[Hash, int]:
    r.array("wanted chunk", 2, 2)
    return read_hash("chunk hash")(r), read_int("chunk size")(r)


def _peer(r: Reader) -> tuple[Hash, tuple[str, ...]]:
    r.array("peer", 2, 2)
    device = read_hash("peer device")(r)
    addresses = read_list(
        "peer addresses", MAX_ADDRESSES_PER_PEER, read_text("address", MAX_ADDRESS_BYTES)
    )
    return device, addresses(r)


def _version(r: Reader) -> VersionVector:
    counters = []
    for _ in range(r.array("version", 0, MAX_VECTOR)):
        r.array("version counter", 2, 2)
        counters.append((read_int("device")(r), read_int("counter")(r)))
    try:
        return VersionVector(tuple(counters))
    except ValueError as exc:
        raise RemoteProtocolError(f"version vector: {exc}") from exc


def _kind(r: Reader) -> Kind:
    value = read_int("kind")(r)
    try:
        return Kind(value)
    except ValueError as exc:
        raise RemoteProtocolError(f"unknown kind {value}") from exc


def _groups(r: Reader) -> tuple[Hash, ...]:
    blob = read_bin("groups", HASH_SIZE * MAX_GROUPS_PER_ENTRY)(r)
    if len(blob) % HASH_SIZE:
        raise RemoteProtocolError(f"groups of {len(blob)} bytes, not whole hashes")
    return tuple(Hash(blob[i : i + HASH_SIZE]) for i in range(0, len(blob), HASH_SIZE))


_ENTRY_FIELDS: dict[str, Callable[[Reader], Any]] = {
    "p": read_text("path", MAX_PATH_BYTES),
    "k": _kind,
    "v": _version,
    "y": read_int("modifier"),
    "x": lambda r: bool(r.scalar("deleted", BOOL)),
    "s": read_int("size"),
    "m": read_int("mtime_ns"),
    "o": read_int("mode"),
    "l": read_text("target", MAX_PATH_BYTES),
    "g": _groups,
    "c": read_optional_bin("inline chunks", MAX_INLINE_CHUNKS),
    "z": read_bin("signature", SIGNATURE_SIZE),
    "q": read_int("shared path prefix"),
}


def _entries(r: Reader) -> tuple[RemoteEntry | None, ...]:
    """The entries of one message, each read against the last one before it."""
    entries: list[RemoteEntry | None] = []
    previous = None
    for _ in range(r.array("entries", 0, MAX_BATCH_ENTRIES)):
        entry = _entry(r, previous)
        entries.append(entry)
        previous = entry or previous
    return tuple(entries)


def _entry(r: Reader, previous: RemoteEntry | None) -> RemoteEntry | None:
    if r.expect("entry", MAP, NIL) == NIL:
        r.optional("entry", MAP)
        return None
    fields = r.map(_ENTRY_FIELDS)
    if previous is not None:
        for key, attr in _FROM_PREVIOUS.items():
            fields.setdefault(key, getattr(previous, attr))
    if not fields.keys() >= _REQUIRED_ENTRY_KEYS:
        lacking = sorted(_REQUIRED_ENTRY_KEYS - fields.keys())
        raise RemoteProtocolError(f"entry lacks keys {lacking}")
    if "q" in fields:
        before = previous.path if previous is not None else ""
        fields["p"] = _joined_path(before, fields.pop("q"), fields["p"])
    try:
        values: dict[str, Any] = {
            attr: fields[key] if key in fields else _ENTRY_DEFAULTS[key]
            for attr, key in _ENTRY_KEYS.items()
        }
        return RemoteEntry(**values)
    except ValueError as exc:  # InvalidPathError included
        raise RemoteProtocolError(f"invalid entry: {exc}") from exc


def _joined_path(previous: str, shared: int, rest: str) -> str:
    """The first `shared` UTF-8 bytes of the path before, then `rest`."""
    before = previous.encode()
    if not 0 < shared <= len(before):
        raise RemoteProtocolError(f"a path shares {shared} bytes with one of {len(before)}")
    try:
        return (before[:shared] + rest.encode()).decode()
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError("a shared path prefix splits a character") from exc


def _wanted_list(r: Reader) -> tuple[tuple[str, Hash], ...]:
    """GetEntries' (path, leaf hash) pairs, each path possibly against the one before."""
    items: list[tuple[str, Hash]] = []
    previous = ""
    for _ in range(r.array("wanted", 0, MAX_BATCH_ENTRIES)):
        if r.array("wanted item", 2, 3) == 3:
            shared = read_int("shared path prefix")(r)
            path = _joined_path(previous, shared, read_text("path", MAX_PATH_BYTES)(r))
        else:
            path = read_text("path", MAX_PATH_BYTES)(r)
        items.append((path, read_hash("leaf hash")(r)))
        previous = path
    return tuple(items)


_MESSAGE_FIELDS: dict[str, Callable[[Reader], Any]] = {
    "t": read_int("type"),
    "v": read_int("version"),
    "d": read_hash("device"),
    "f": read_hash("folder"),
    "r": read_hash("root"),
    "i": read_int("id"),
    "hs": read_list("hashes", max(MAX_BATCH_NODES, MAX_BATCH_GROUPS), read_hash("hash")),
    "n": read_list("nodes", MAX_BATCH_NODES, read_optional_bin("node", MAX_NODE_BYTES)),
    "w": _wanted_list,
    "in": read_bool("inline"),
    "e": _entries,
    "g": read_list("groups", MAX_BATCH_GROUPS, read_optional_bin("group", MAX_GROUP_BYTES)),
    "cw": read_list("wanted chunks", MAX_BATCH_CHUNKS, _wanted_chunk),
    "cs": read_list("chunks", MAX_BATCH_CHUNKS, read_optional_bin("chunk", MAX_CHUNK)),
    "x": read_int("code"),
    "m": read_text("text", MAX_TEXT),
    "a": read_list("peers", MAX_PEERS_LISTED, _peer),
}
