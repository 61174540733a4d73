"""The events a `Session` hands its owner: what the peer said, already validated and verified.

Frozen, slotted, keyword-only dataclasses; their values come from validated messages, so they do
not check themselves again. Pure: imports ids and protocol.messages only.
"""

from __future__ import annotations

from dataclasses import dataclass

from backer.ids import Hash
from backer.protocol.messages import RemoteEntry

__all__ = [
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
]


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerHello:
    device: bytes
    root: Hash


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerRoot:
    root: Hash


@dataclass(frozen=True, slots=True, kw_only=True)
class PeersAnnounced:
    """Devices of this folder the peer can reach, with addresses (`:port` = the peer's host)."""

    peers: tuple[tuple[bytes, tuple[str, ...]], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class NodesRequested:
    id: int
    hashes: tuple[Hash, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class EntriesRequested:
    id: int
    wanted: tuple[tuple[str, Hash], ...]
    inline: bool = True  # small chunk lists may travel inside their entries


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupsRequested:
    id: int
    hashes: tuple[Hash, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunksRequested:
    id: int
    wanted: tuple[tuple[Hash, int], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class NodesReceived:
    """Verified nodes by hash; `missing`: the peer lacks them; `unanswered`: ask again."""

    id: int
    nodes: dict[Hash, bytes]
    missing: tuple[Hash, ...]
    unanswered: tuple[Hash, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class EntriesReceived:
    """Verified entries; `missing` paths no longer have that leaf there; `unanswered`: ask again."""

    id: int
    entries: tuple[RemoteEntry, ...]
    missing: tuple[str, ...]
    unanswered: tuple[tuple[str, Hash], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupsReceived:
    id: int
    groups: dict[Hash, bytes]
    missing: tuple[Hash, ...]
    unanswered: tuple[Hash, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunksReceived:
    """Verified chunks by hash; `missing`: the peer lacks them; `unanswered`: ask again."""

    id: int
    chunks: dict[Hash, bytes]
    missing: tuple[Hash, ...]
    unanswered: tuple[tuple[Hash, int], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerError:
    code: int
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerClosed:
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ProtocolViolation:
    """The peer broke the protocol: CLOSED, an Error frame queued. Drop it and back off."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionLost:
    """The stream ended without Close or Error: CLOSED."""

    reason: str


Event = (
    PeerHello
    | PeerRoot
    | PeersAnnounced
    | NodesRequested
    | EntriesRequested
    | GroupsRequested
    | ChunksRequested
    | NodesReceived
    | EntriesReceived
    | GroupsReceived
    | ChunksReceived
    | PeerError
    | PeerClosed
    | ProtocolViolation
    | ConnectionLost
)
