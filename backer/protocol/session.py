"""The per-connection state machine (sans-IO, in the manner of h11): bytes in, events out; calls
in, bytes out.

Owns the session states, request ids, and the checks that make a hostile peer harmless: every
answer is matched against what we asked and verified by hash before an event carries it; every
violation ends the session with an Error frame queued for the peer and a `ProtocolViolation`
event, never an exception. Our own misuse raises LocalProtocolError.

Pure: imports only errors, ids, index and `protocol`; no I/O, no clock, no threads.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from backer.errors import DecodeError, LocalProtocolError, RemoteProtocolError
from backer.ids import Hash
from backer.index.chunker import hash_chunk
from backer.index.entry import Entry, group_hash
from backer.index.merkle import decode_node, node_hash
from backer.protocol.codec import FrameDecoder, answer_prefix, decode, frame
from backer.protocol.events import (
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
)
from backer.protocol.messages import (
    MAX_TEXT,
    PROTOCOL_VERSION,
    Chunks,
    Close,
    Entries,
    Error,
    ErrorCode,
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
    check_hash,
)

__all__ = [
    "ANSWER_BUDGET",
    "ChunksReceived",
    "ChunksRequested",
    "ConnectionLost",
    "EntriesReceived",
    "EntriesRequested",
    "Event",
    "GroupsReceived",
    "GroupsRequested",
    "NodesReceived",
    "NodesRequested",
    "PeerClosed",
    "PeerError",
    "PeerHello",
    "PeerRoot",
    "PeersAnnounced",
    "ProtocolViolation",
    "Session",
    "State",
]

ANSWER_BUDGET = 4 * 1024 * 1024  # a batch answer stops before its items pass this many bytes


class State(enum.Enum):
    AWAIT_HELLO = "await hello"  # the peer has not said Hello yet
    OPEN = "open"
    CLOSED = "closed"  # every input is ignored, nothing may be sent


_R = TypeVar("_R", GetNodes, GetEntries, GetGroups, GetChunks)
_REQUESTS = (GetNodes, GetEntries, GetGroups, GetChunks)
_ANSWERS = (Nodes, Entries, Groups, Chunks)
_ENDINGS = (Error, Close)

# The whole machine. Receiving: the messages the peer may send in each state and the state each
# leads to (anything else is a violation). Sending: the messages we may send in each state
# (anything else is a LocalProtocolError); our Hello is `start()`, once, before anything else.
_RECEIVE: dict[State, dict[type[Any], State]] = {
    State.AWAIT_HELLO: {Hello: State.OPEN} | dict.fromkeys(_ENDINGS, State.CLOSED),
    State.OPEN: dict.fromkeys((Root, Peers, *_REQUESTS, *_ANSWERS), State.OPEN)
    | dict.fromkeys(_ENDINGS, State.CLOSED),
    State.CLOSED: {},
}
_SEND: dict[State, frozenset[type[Any]]] = {
    State.AWAIT_HELLO: frozenset(_ENDINGS),
    State.OPEN: frozenset((Root, Peers, *_REQUESTS, *_ANSWERS, *_ENDINGS)),
    State.CLOSED: frozenset(),
}


_Request = GetNodes | GetEntries | GetGroups | GetChunks
_Answer = Nodes | Entries | Groups | Chunks


class _Violation(Exception):
    def __init__(self, reason: str, code: int = ErrorCode.PROTOCOL) -> None:
        super().__init__(reason)
        self.reason, self.code = reason, code


# --- the session ---------------------------------------------------------------------------------


class Session:
    """One connection's protocol state. Feed it bytes with `receive_data`, pull events with
    `next_event` until it returns None, send what `data_to_send` returns after each receive."""

    def __init__(
        self,
        device: bytes,
        folder: bytes,
        root: Hash,
        max_peer_requests: int = 512,
        *,
        peer_device: bytes | None = None,
    ) -> None:
        """`peer_device`, when the transport proved who the peer is (the encrypted channel):
        a Hello naming another device is a violation."""
        try:
            check_hash("device", device)
            check_hash("folder", folder)
            check_hash("root", root)
        except ValueError as exc:
            raise LocalProtocolError(str(exc)) from exc
        if max_peer_requests < 1:
            raise LocalProtocolError("max_peer_requests must be positive")
        self._device, self._folder, self._root = device, folder, root
        self._max_peer_requests = max_peer_requests
        self._state = State.AWAIT_HELLO
        self._started = False
        self._decoder = FrameDecoder()
        self._inbox: deque[bytes | RemoteProtocolError] = deque()
        self._input_failed = False
        self._eof = False
        self._outbox = bytearray()
        self._next_id = 1
        self._ours: dict[int, _Request] = {}  # our open requests
        self._theirs: dict[int, _Request] = {}  # the peer's, until we answer
        self._last_peer_id = -1
        self._proved_device = peer_device
        self.peer_device: bytes | None = None
        self.peer_root: Hash | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def pending_requests(self) -> int:
        """Our requests the peer has not answered yet."""
        return len(self._ours)

    @property
    def peer_requests(self) -> int:
        """The peer's requests we have not answered yet."""
        return len(self._theirs)

    # --- input ---

    @property
    def partial_frame(self) -> int:
        """Bytes received of a frame not yet complete (the pump bounds how long one may take)."""
        return self._decoder.buffered

    def receive_data(self, data: bytes) -> None:
        if self._state is State.CLOSED or self._input_failed or self._eof:
            return
        try:
            self._inbox.extend(self._decoder.feed(data))
            if self._decoder.failed:
                self._decoder.feed(b"")  # raises the failure held back for the frames before it
        except RemoteProtocolError as exc:
            self._inbox.append(exc)
            self._input_failed = True

    def receive_eof(self) -> None:
        self._eof = True

    def next_event(self) -> Event | None:
        """The next event, or None when more data is needed (or the session is CLOSED)."""
        if self._state is State.CLOSED:
            return None
        if self._inbox:
            item = self._inbox.popleft()
            try:
                if isinstance(item, RemoteProtocolError):
                    raise _Violation(str(item))
                try:
                    message = decode(item)
                except RemoteProtocolError as exc:
                    raise _Violation(str(exc)) from exc
                return self._receive(message)
            except _Violation as violation:
                self._send_error(violation.code, violation.reason)
                return ProtocolViolation(reason=violation.reason)
        if self._eof:
            truncated = self._decoder.buffered > 0
            self._shut()
            return ConnectionLost(
                reason="stream ended inside a frame" if truncated else "stream ended"
            )
        return None

    def data_to_send(self) -> bytes:
        """Frames the session decided to send itself (an Error after a violation); cleared."""
        data = bytes(self._outbox)
        self._outbox.clear()
        return data

    # --- output: hello, gossip, endings ---

    def start(self) -> bytes:
        """Our Hello: the first bytes we send."""
        if self._started or self._state is State.CLOSED:
            raise LocalProtocolError("start() is called once, before the session closes")
        self._started = True
        return frame(
            Hello(
                version=PROTOCOL_VERSION, device=self._device, folder=self._folder, root=self._root
            )
        )

    def announce_root(self, root: Hash) -> bytes:
        data = self._send(lambda: Root(root=root))
        self._root = root
        return data

    def announce_peers(self, peers: Iterable[tuple[bytes, Iterable[str]]]) -> bytes:
        """Tell the peer about other devices of the folder and where to dial them."""
        return self._send(
            lambda: Peers(peers=tuple((device, tuple(addrs)) for device, addrs in peers))
        )

    def close(self, reason: str = "") -> bytes:
        data = self._send(lambda: Close(reason=reason))
        self._shut()
        return data

    def error(self, code: int, text: str) -> bytes:
        data = self._send(lambda: Error(code=code, text=text))
        self._shut()
        return data

    # --- output: requests ---

    def request_nodes(self, hashes: Iterable[Hash]) -> tuple[int, bytes]:
        return self._request(lambda i: GetNodes(id=i, hashes=tuple(hashes)))

    def request_entries(
        self, wanted: Iterable[tuple[str, Hash]], *, inline: bool = True
    ) -> tuple[int, bytes]:
        pairs = tuple((p, h) for p, h in wanted)
        return self._request(lambda i: GetEntries(id=i, wanted=pairs, inline=inline))

    def request_groups(self, hashes: Iterable[Hash]) -> tuple[int, bytes]:
        return self._request(lambda i: GetGroups(id=i, hashes=tuple(hashes)))

    def request_chunks(self, wanted: Iterable[tuple[Hash, int]]) -> tuple[int, bytes]:
        return self._request(lambda i: GetChunks(id=i, wanted=tuple(wanted)))

    # --- output: answers. Pass everything asked (or a prefix); the session sends the prefix that
    # fits in ANSWER_BUDGET and checks each item is what was asked (else LocalProtocolError).

    def answer_nodes(self, id: int, nodes: Sequence[bytes | None]) -> bytes:
        asked = self._open(id, GetNodes).hashes
        items = self._fit(id, nodes, asked, lambda node, digest: node_hash(node) == digest)
        return self._answer(id, lambda: Nodes(id=id, nodes=items))

    def answer_entries(self, id: int, entries: Sequence[Entry | RemoteEntry | None]) -> bytes:
        asked = self._open(id, GetEntries).wanted
        try:
            remote = [RemoteEntry.from_entry(e) if isinstance(e, Entry) else e for e in entries]
        except ValueError as exc:
            raise LocalProtocolError(f"answer to {id}: {exc}") from exc
        items = self._fit(id, remote, asked, lambda e, want: (e.path, e.leaf_hash()) == want)
        return self._answer(id, lambda: Entries(id=id, entries=items))

    def answer_groups(self, id: int, groups: Sequence[bytes | None]) -> bytes:
        asked = self._open(id, GetGroups).hashes
        items = self._fit(id, groups, asked, lambda group, digest: group_hash(group) == digest)
        return self._answer(id, lambda: Groups(id=id, groups=items))

    def answer_chunks(
        self, id: int, chunks: Sequence[bytes | None], *, verified: bool = False
    ) -> bytes:
        """Read from files that may have changed? Pass None unless a chunk still hashes right.
        `verified=True` says the caller vouches for each chunk (a replica's read: hashed, or
        from a file unchanged since the scan that hashed it): the session then checks sizes
        only, so no answered byte is hashed twice on its way out."""
        asked = self._open(id, GetChunks).wanted
        items = self._fit(id, chunks, asked, _is_chunk_size if verified else _is_chunk)
        return self._answer(id, lambda: Chunks(id=id, chunks=items))

    # --- receiving, by message type ---

    def _receive(self, message: Message) -> Event:
        following = _RECEIVE[self._state].get(type(message))
        if following is None:
            raise _Violation(f"{type(message).__name__} is not allowed in {self._state.value}")
        match message:
            case Hello():
                event: Event = self._on_hello(message)
            case Root(root=root):
                self.peer_root = root
                event = PeerRoot(root=root)
            case Peers(peers=peers):
                event = PeersAnnounced(peers=peers)
            case GetNodes() | GetEntries() | GetGroups() | GetChunks():
                event = self._on_request(message)
            case Nodes() | Groups():
                event = self._on_hashed(message)
            case Entries():
                event = self._on_entries(message)
            case Chunks():
                event = self._on_chunks(message)
            case Error(code=code, text=text):
                event = PeerError(code=code, text=text)
            case Close(reason=reason):
                event = PeerClosed(reason=reason)
        if following is State.CLOSED:
            self._shut()
        self._state = following
        return event

    def _on_hello(self, hello: Hello) -> Event:
        if hello.version != PROTOCOL_VERSION:
            raise _Violation(
                f"protocol version {hello.version}, we speak {PROTOCOL_VERSION}", ErrorCode.VERSION
            )
        if hello.folder != self._folder:
            raise _Violation("Hello names another folder", ErrorCode.FOLDER)
        if self._proved_device is not None and hello.device != self._proved_device:
            raise _Violation("Hello names another device than the channel proved")
        self.peer_device, self.peer_root = hello.device, hello.root
        return PeerHello(device=hello.device, root=hello.root)

    def _on_request(self, request: _Request) -> Event:
        if request.id <= self._last_peer_id:
            raise _Violation(f"request id {request.id} does not increase")
        if len(self._theirs) >= self._max_peer_requests:
            raise _Violation(f"more than {self._max_peer_requests} unanswered requests")
        self._last_peer_id = request.id
        self._theirs[request.id] = request
        match request:
            case GetNodes(id=i, hashes=hashes):
                return NodesRequested(id=i, hashes=hashes)
            case GetEntries(id=i, wanted=wanted, inline=inline):
                return EntriesRequested(id=i, wanted=wanted, inline=inline)
            case GetGroups(id=i, hashes=hashes):
                return GroupsRequested(id=i, hashes=hashes)
            case GetChunks(id=i, wanted=wanted):
                return ChunksRequested(id=i, wanted=wanted)

    def _asked(self, answer: _Answer) -> _Request:
        """The request `answer` answers (closed now), checked for type and length."""
        request = self._ours.pop(answer.id, None)
        if request is None:
            raise _Violation(f"answer to unknown request {answer.id}")
        if _ANSWER_OF[type(request)] is not type(answer):
            raise _Violation(f"{type(answer).__name__} answers {type(request).__name__}")
        asked, items = _items(request), _items(answer)
        if len(items) > len(asked):
            raise _Violation(f"answer of {len(items)} items to a request of {len(asked)}")
        return request

    def _on_hashed(self, answer: Nodes | Groups) -> Event:
        request = self._asked(answer)
        assert isinstance(request, GetNodes | GetGroups)
        nodes = isinstance(answer, Nodes)
        found: dict[Hash, bytes] = {}
        missing = []
        for digest, blob in zip(request.hashes, _items(answer), strict=False):
            if blob is None:
                missing.append(digest)
                continue
            if (node_hash(blob) if nodes else group_hash(blob)) != digest:
                raise _Violation(f"{'node' if nodes else 'group'} does not match its hash")
            if nodes:
                try:
                    decode_node(blob)
                except DecodeError as exc:
                    raise _Violation(f"node {digest.hex()[:16]}: {exc}") from exc
            found[digest] = blob
        rest = request.hashes[len(_items(answer)) :]
        if nodes:
            return NodesReceived(id=answer.id, nodes=found, missing=tuple(missing), unanswered=rest)
        return GroupsReceived(id=answer.id, groups=found, missing=tuple(missing), unanswered=rest)

    def _on_entries(self, answer: Entries) -> Event:
        request = self._asked(answer)
        assert isinstance(request, GetEntries)
        entries, missing = [], []
        for (path, leaf), entry in zip(request.wanted, answer.entries, strict=False):
            if entry is None:
                missing.append(path)
            elif entry.path != path:
                raise _Violation(f"entry {entry.path!r} answers {path!r}")
            elif entry.leaf_hash() != leaf:
                raise _Violation(f"entry {path!r} does not match its leaf hash")
            else:
                entries.append(entry)
        rest = request.wanted[len(answer.entries) :]
        return EntriesReceived(
            id=answer.id, entries=tuple(entries), missing=tuple(missing), unanswered=rest
        )

    def _on_chunks(self, answer: Chunks) -> Event:
        request = self._asked(answer)
        assert isinstance(request, GetChunks)
        found: dict[Hash, bytes] = {}
        missing = []
        for (digest, size), data in zip(request.wanted, answer.chunks, strict=False):
            if data is None:
                missing.append(digest)
            elif not _is_chunk(data, (digest, size)):
                raise _Violation(f"chunk {digest.hex()[:16]} is not the size and hash asked")
            else:
                found[digest] = data
        rest = request.wanted[len(answer.chunks) :]
        return ChunksReceived(id=answer.id, chunks=found, missing=tuple(missing), unanswered=rest)

    # --- sending helpers ---

    def _send(self, build: Callable[[], Message]) -> bytes:
        return frame(self._check(build))

    def _check(self, build: Callable[[], Message]) -> Message:
        """The message `build` makes, if it is valid and we may send it now."""
        try:
            message = build()
        except ValueError as exc:
            raise LocalProtocolError(str(exc)) from exc
        if type(message) not in _SEND[self._state]:
            raise LocalProtocolError(
                f"cannot send {type(message).__name__} in state {self._state.value}"
            )
        if not self._started and not isinstance(message, _ENDINGS):
            raise LocalProtocolError("call start() before sending anything else")
        return message

    def _request(self, build: Callable[[int], Message]) -> tuple[int, bytes]:
        message = self._check(lambda: build(self._next_id))
        assert isinstance(message, _REQUESTS)
        self._ours[message.id] = message
        self._next_id += 1
        return message.id, frame(message)

    def _open(self, request_id: int, kind: type[_R]) -> _R:
        if self._state is State.CLOSED:
            raise LocalProtocolError("the session is closed")
        request = self._theirs.get(request_id)
        if not isinstance(request, kind):
            raise LocalProtocolError(f"no open {kind.__name__} request {request_id}")
        return request

    def _fit(
        self,
        request_id: int,
        items: Sequence[Any],
        asked: tuple[Any, ...],
        matches: Callable[[Any, Any], bool],
    ) -> tuple[Any, ...]:
        """The prefix of `items` to send, each checked against what was asked."""
        if not 1 <= len(items) <= len(asked):
            raise LocalProtocolError(f"an answer has 1 to {len(asked)} items, not {len(items)}")
        prefix = tuple(items[: answer_prefix(items, ANSWER_BUDGET)])
        for item, want in zip(prefix, asked, strict=False):
            if item is not None and not matches(item, want):
                raise LocalProtocolError(f"answer to {request_id}: an item is not what was asked")
        return prefix

    def _answer(self, request_id: int, build: Callable[[], Message]) -> bytes:
        data = self._send(build)
        del self._theirs[request_id]
        return data

    def _send_error(self, code: int, reason: str) -> None:
        text = reason.encode("utf-8", "replace")[:MAX_TEXT].decode("utf-8", "ignore")
        self._outbox += frame(Error(code=code, text=text))
        self._shut()

    def _shut(self) -> None:
        self._state = State.CLOSED
        self._inbox.clear()
        self._ours.clear()
        self._theirs.clear()


_ANSWER_OF: dict[type[Any], type[Any]] = dict(zip(_REQUESTS, _ANSWERS, strict=True))


def _items(message: _Request | _Answer) -> tuple[Any, ...]:
    """What a request asks for, or what an answer gives, in order."""
    match message:
        case GetNodes(hashes=items) | GetGroups(hashes=items) | GetEntries(wanted=items):
            return items
        case Nodes(nodes=items) | Groups(groups=items) | Entries(entries=items):
            return items
        case GetChunks(wanted=items) | Chunks(chunks=items):
            return items


def _is_chunk_size(data: bytes, wanted: tuple[Hash, int]) -> bool:
    return len(data) == wanted[1]


def _is_chunk(data: bytes, wanted: tuple[Hash, int]) -> bool:
    """Whether `data` is the chunk asked: its exact size, then its BLAKE3 chunk hash."""
    digest, size = wanted
    return len(data) == size and hash_chunk(data) == digest
