"""Replication in one call: two folders in memory, or one folder over any asyncio stream.

    await replicate(Path("a"), Path("b"))                  # both ways, in memory, until in sync
    await sync_stream(replica, reader, writer, ...)        # over TCP or anything asyncio speaks

Owns nothing but the composition of Replica, Link and run_session. Imports sync modules.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from backer.ids import Hash
from backer.keys import FolderKey
from backer.sync.link import StreamLink, memory_pipe
from backer.sync.peer import STUCK_AFTER, SessionResult, run_session
from backer.sync.replica import Replica

__all__ = ["PLAIN_FOLDER", "ReplicateResult", "replicate", "sync_stream"]

# The folder ID two replicas without folder keys agree on (keys bring real ones).
PLAIN_FOLDER = bytes(32)


@dataclass(frozen=True, slots=True)
class ReplicateResult:
    root_a: Hash
    root_b: Hash
    a: SessionResult
    b: SessionResult

    @property
    def in_sync(self) -> bool:
        return self.root_a == self.root_b


async def replicate(
    folder_a: Path,
    folder_b: Path,
    *,
    create: bool = True,
    key_a: FolderKey | None = None,
    key_b: FolderKey | None = None,
    stuck_after: float = STUCK_AFTER,
) -> ReplicateResult:
    """Scan both folders, then reconcile them both ways over an in-memory pipe until their
    roots are equal (or no progress is possible). Each folder acts as its own device (its ID
    kept in its index). With folder keys, versions are signed and checked (`Replica.open`)."""
    a = await Replica.open(folder_a, device=0, create=create, key=key_a)
    b = await Replica.open(folder_b, device=0, create=create, key=key_b)
    try:
        for replica in (a, b):
            replica.device = await asyncio.to_thread(replica.store.local_device)
            await replica.scan()
        end_a, end_b = memory_pipe()
        result_a, result_b = await asyncio.gather(
            run_session(
                a,
                end_a,
                device=_device_bytes(a),
                folder=_folder_id(key_a),
                until_in_sync=True,
                stuck_after=stuck_after,
            ),
            run_session(b, end_b, device=_device_bytes(b), folder=_folder_id(key_b)),
        )
        return ReplicateResult(a.root, b.root, result_a, result_b)
    finally:
        await a.close()
        await b.close()


def _folder_id(key: FolderKey | None) -> bytes:
    return key.discovery_id if key is not None else PLAIN_FOLDER


async def sync_stream(
    replica: Replica,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    device: bytes,
    folder: bytes = PLAIN_FOLDER,
    until_in_sync: bool = True,
) -> SessionResult:
    """Reconcile `replica` with the peer at the other end of (reader, writer)."""
    return await run_session(
        replica,
        StreamLink(reader, writer),
        device=device,
        folder=folder,
        until_in_sync=until_in_sync,
    )


def _device_bytes(replica: Replica) -> bytes:
    return replica.device.to_bytes(8, "big") + bytes(24)
