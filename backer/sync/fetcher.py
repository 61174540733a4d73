"""What a pull asks of its peers (`Fetcher`) and what it reports (`PullReport`): shared by the
pull, the file assembler, the session and the swarm, so none of them imports another for it.
Imports ids and protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from backer.errors import BackerError
from backer.ids import Hash
from backer.protocol.messages import RemoteEntry

__all__ = ["Fetcher", "PeerMovedOn", "PullReport"]


class Fetcher(Protocol):
    """What a pull needs from a peer. Every answer is already verified against what was asked."""

    async def nodes(self, hashes: Sequence[Hash]) -> dict[Hash, bytes]: ...

    async def entries(
        self, wanted: Sequence[tuple[str, Hash]], *, inline: bool = True
    ) -> list[RemoteEntry]:
        """The entries of `wanted`; without `inline`, chunk lists named by their groups only
        (the pull has most of them already)."""
        ...

    async def groups(self, hashes: Sequence[Hash]) -> dict[Hash, bytes]: ...

    async def chunks(self, wanted: Sequence[tuple[Hash, int]]) -> dict[Hash, bytes]:
        """The chunks of these (hash, size) pairs the peer has (those it lacks are left out),
        fetched together: the run, not the chunk, is the unit of transfer."""
        ...


class PeerMovedOn(BackerError):
    """The peer's tree changed under the pull; it starts again from the peer's new root."""


@dataclass(slots=True)
class PullReport:
    nodes: int = 0
    entries: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    deleted: int = 0
    conflicts: int = 0
    bytes_fetched: int = 0
    bytes_local: int = 0
    skipped: int = 0  # paths left for a later pull (content no longer on the peer)
    refused: int = 0  # versions without a valid signature (made by a read-only device?)
    deferred: int = 0  # files left for the next pull: their chunk lists exceeded this one's cap
    errors: list[str] = field(default_factory=list)  # paths refused or failed, with the reason
    planned_files: int = 0  # files this pull set out to write...
    planned_bytes: int = 0  # ...and their bytes (what is left = planned - fetched - local)
