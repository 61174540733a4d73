"""A replica: the local side of every session of one folder — its index, its disk, its versions.

Owns serialisation of changes to one folder (scans and pulls take turns under one lock), the
answers to a peer's requests (tree nodes, entries, chunk-list groups, chunks) and the
notification that the local root changed. Blocking work (SQLite, file reads, hashing) runs in
worker threads. Imports index, protocol and sync modules below it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from backer.errors import InvalidPathError
from backer.ids import Hash
from backer.index.entry import Entry, Kind, chunk_groups, group_hash, signed_message
from backer.index.merkle import EMPTY_ROOT
from backer.index.scan import ScanReport, scan
from backer.index.scan_records import DeletionWindow
from backer.index.store import KEEP_GENERATIONS, Forget, IndexStore
from backer.keys import FolderKey
from backer.paths import is_reserved
from backer.protocol.messages import RemoteEntry
from backer.sync.chunkread import read_chunks
from backer.sync.disk import FolderDisk
from backer.sync.recent import RecentWrites
from backer.sync.versions import Versions

__all__ = ["Replica", "signer_for"]

# Groups of chunk lists recently sent to peers, kept so that the peer's follow-up GET_GROUPS can
# be answered without an index from group hash to file.
GROUP_CACHE_BYTES = 64 * 1024 * 1024


def signer_for(key: FolderKey | None) -> Callable[[bytes], bytes] | None:
    """What signs this device's versions of a folder: only a read-write key can."""
    if key is None or not key.can_write:
        return None
    signing = key.signing_key
    return lambda leaf: bytes(signing.sign(signed_message(leaf)).signature)


class Replica:
    """One folder on this device. Use `await Replica.open(folder, device=...)`."""

    def __init__(
        self,
        folder: Path,
        store: IndexStore,
        *,
        device: int,
        clock: Callable[[], float] = time.time,
        key: FolderKey | None = None,
    ) -> None:
        self.folder = folder
        self.key = key
        store.signer = signer_for(key)
        self._verify = VerifyKey(key.verify_key) if key is not None else None
        self.store = store
        self.clock = clock
        self.versions = Versions(folder)
        self.disk = FolderDisk(folder, self.versions, clock=clock)
        self.recent = RecentWrites(self.disk)  # what pulls wrote, for the watcher to skip
        self.device = device
        self.lock = asyncio.Lock()
        self.deletions = DeletionWindow()  # what this folder's scans found vanished lately
        self._pull_began_at: Hash | None = None  # our root when the pull under way began
        self._pull_began_generation = 0
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._listeners: set[asyncio.Event] = set()
        self._groups: OrderedDict[Hash, bytes] = OrderedDict()
        self._group_bytes = 0

    @classmethod
    async def open(
        cls,
        folder: Path,
        *,
        device: int,
        create: bool = False,
        clock: Callable[[], float] = time.time,
        key: FolderKey | None = None,
    ) -> Replica:
        """Open a folder's replica. With a folder key, every version this device makes is
        signed (read-write key) and every version from a peer must carry a valid signature."""
        store = await asyncio.to_thread(IndexStore.open, folder, create=create)
        replica = cls(folder, store, device=device, clock=clock, key=key)
        await asyncio.to_thread(store.sign_unsigned)
        return replica

    async def close(self) -> None:
        await asyncio.to_thread(self.store.close)

    @property
    def device(self) -> int:
        return self.disk.device

    @device.setter
    def device(self, device: int) -> None:
        self.disk.device = device  # the disk names the conflict copies of local edits

    @property
    def root(self) -> Hash:
        return self.store.root

    @property
    def settled_root(self) -> Hash:
        """The root to announce: ours, but while a pull fills the replica, the one it began
        from. A half-filled tree is a mix of ours and the peer's, with nothing a peer lacks: a
        peer pulling towards it would walk it for nothing (and an initial sync of a large
        folder passes through hundreds of them). Once the pull has committed so often that the
        old tree's nodes are about to be purged (a peer could no longer walk it, and it may hold
        a change of ours), the current root is announced after all; the empty tree has none."""
        began = self._pull_began_at
        if began is None:
            return self.root
        commits = self.store.generation - self._pull_began_generation
        if began == EMPTY_ROOT or commits < KEEP_GENERATIONS // 2:
            return began
        return self.root

    @contextlib.asynccontextmanager
    async def pulling(self) -> AsyncIterator[None]:
        """Hold the replica for a pull; announce (notify) the root it leads to once it ends."""
        async with self.lock:
            before = self._pull_began_at = self.root
            self._pull_began_generation = self.store.generation
            try:
                yield
            finally:
                self._pull_began_at = None
                if self.root != before:
                    self.notify()

    def has_all_of(self, root: Hash) -> bool:
        """Whether a pull towards a peer's `root` cannot bring anything: it is ours, the empty
        tree, one we had before or one we pulled in full (`IndexStore.covers`)."""
        return root == self.root or self.store.covers(root)

    # -- local changes ---------------------------------------------------------------------

    async def scan(self, paths: Iterable[str] | None = None) -> ScanReport:
        async with self.lock:
            return await self.scan_locked(paths)

    async def scan_locked(self, paths: Iterable[str] | None = None) -> ScanReport:
        """Scan while the caller already holds `lock` (a pull that found a local edit)."""
        if paths is not None:  # the watcher reports a nested share's `.backer/` too: never ours
            paths = [p for p in paths if not any(map(is_reserved, p.split("/")))]
        else:
            self.recent.forget()  # a full scan looks at everything
        before = self.root
        await asyncio.to_thread(self.store.refresh)  # a commit by another process, if any
        report = await scan(
            self.folder,
            self.store,
            device=self.device,
            paths=paths,
            clock=self.clock,
            window=self.deletions,
        )
        if report.root != before:
            self.notify()
        return report

    async def revert(self) -> list[str]:
        """Undo this read-only device's own changes: what it added or edited goes to the
        versions area, and its index forgets them, so the next sync brings back the mesh's
        versions (Syncthing's "Revert Local Changes"). Returns the paths reverted."""
        async with self.lock:
            await self.scan_locked()
            return await asyncio.to_thread(self._revert)

    def _revert(self) -> list[str]:
        local = sorted(self.store.unsigned(), key=lambda e: e.path, reverse=True)  # deepest first
        for entry in local:
            if entry.deleted:
                continue
            if entry.kind is Kind.DIR:
                with contextlib.suppress(OSError, InvalidPathError):
                    self.disk.remove_dir(entry.path)
            else:
                self.versions.archive(entry.path, self.clock())
        self.store.commit([Forget(entry.path) for entry in local])
        if local:
            self.notify_threadsafe()
        return [entry.path for entry in reversed(local)]

    def notify_threadsafe(self) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self.notify)

    def watch_root(self) -> asyncio.Event:
        """An event set whenever the local root changes (clear it after reading)."""
        event = asyncio.Event()
        self._listeners.add(event)
        return event

    def unwatch_root(self, event: asyncio.Event) -> None:
        self._listeners.discard(event)

    def notify(self) -> None:
        for event in self._listeners:
            event.set()

    def trusted(self, entry: Entry | RemoteEntry) -> bool:
        """Whether a peer's version may be accepted: signed with the folder's key, when the
        folder has one (a read-only device cannot sign, so its versions are refused). Check the
        wire form: its leaf hash costs one step per group, not per chunk."""
        if self._verify is None:
            return True
        try:
            self._verify.verify(signed_message(entry.leaf_hash()), entry.signature)
        except (BadSignatureError, ValueError):
            return False
        return True

    # -- answering peers (call from worker threads) ------------------------------------------

    def read_nodes(self, hashes: Iterable[Hash]) -> list[bytes | None]:
        found: list[bytes | None] = []
        for node in hashes:
            try:
                found.append(self.store.read_node(node))
            except KeyError:
                found.append(None)
        return found

    def read_entries(
        self, wanted: Iterable[tuple[str, Hash]], *, inline: bool = True
    ) -> list[RemoteEntry | None]:
        """The entries of `wanted` as they travel (None where the leaf is not ours); without
        `inline`, every chunk list named by its groups, which `read_groups` then serves."""
        wanted = list(wanted)
        records = self.store.get_many(path for path, _ in wanted)  # one query, not one a path
        answers: list[RemoteEntry | None] = []
        for path, leaf in wanted:
            record = records.get(path)
            if record is None or record.entry.leaf_hash() != leaf:
                answers.append(None)
                continue
            remote = RemoteEntry.from_entry(record.entry)
            if not inline and remote.groups:
                remote = dataclasses.replace(remote, chunks=None)
            if remote.chunks is None:
                self._remember_groups(record.entry.chunks)
            answers.append(remote)
        return answers

    def read_groups(self, hashes: Iterable[Hash]) -> list[bytes | None]:
        return [self._groups.get(h) for h in hashes]

    def read_chunks(self, wanted: Sequence[tuple[Hash, int]]) -> list[bytes | None]:
        """Many chunks, looked up in a few queries, read a span of neighbours at a time, each
        checked unless its file is unchanged since its scan; None where absent."""
        return read_chunks(self.store, self.disk, wanted)

    def _remember_groups(self, chunks: bytes) -> None:
        for group in chunk_groups(chunks):
            digest = group_hash(group)
            if digest in self._groups:
                self._groups.move_to_end(digest)
                continue
            self._groups[digest] = group
            self._group_bytes += len(group)
        while self._group_bytes > GROUP_CACHE_BYTES:
            _, dropped = self._groups.popitem(last=False)
            self._group_bytes -= len(dropped)
