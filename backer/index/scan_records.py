"""The scanner's writes: what a scan found on disk becomes index records, tombstones and forgets,
committed in batches, and a mass disappearance is refused before its tombstones are written.

Owns the rule that a path gets a new version only when a synced field changed, and the deletion
guard. Used by `backer.index.scan` (which owns the walking and reading); imports the index layer
only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from backer.errors import MassDeletionError
from backer.ids import Hash
from backer.index.entry import Entry, Kind, VersionVector
from backer.index.store import Forget, IndexStore, LocalState, Record, StatSig

__all__ = [
    "MASS_DELETE_MIN",
    "MAX_DELETE_SHARE",
    "Counts",
    "OnDisk",
    "Recorder",
    "Skipped",
]

BATCH_RECORDS = 2000
BATCH_BYTES = 256 * 1024 * 1024
MAX_DELETE_SHARE = 0.5  # of the folder's live paths, vanishing in one scan: a vanished disk?
MASS_DELETE_MIN = 10  # fewer vanished paths than this are never a mass deletion
MAX_VANISHED = 50_000  # vanished files a scan keeps for finding them moved (beyond: read)


@dataclass(frozen=True, slots=True)
class Skipped:
    path: str
    reason: str


@dataclass(slots=True)
class Counts:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    updated: int = 0
    deleted: int = 0
    hashed_files: int = 0
    hashed_bytes: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    unstable: list[str] = field(default_factory=list)


class OnDisk(NamedTuple):
    """The synced fields of what a path holds on disk now (an Entry without its version)."""

    path: str
    kind: Kind
    size: int = 0
    mtime_ns: int = 0
    mode: int = 0
    target: str = ""
    chunks: bytes = b""

    @classmethod
    def of(cls, entry: Entry) -> OnDisk:
        if entry.deleted:
            return cls(entry.path, entry.kind, -1)  # equals nothing on disk
        return cls(
            entry.path,
            entry.kind,
            entry.size,
            entry.mtime_ns,
            entry.mode,
            entry.target,
            entry.chunks,
        )


class Recorder:
    """One scan's changes to the index, batched; `finish()` commits the rest."""

    def __init__(
        self,
        folder: Path,
        store: IndexStore,
        *,
        device: int,
        clock: Callable[[], float],
        counts: Counts,
        allow_deletions: bool,
        max_delete_share: float,
    ) -> None:
        self.folder = folder
        self.store = store
        self.device = device
        self.clock = clock
        self.counts = counts
        self.allow_deletions = allow_deletions
        self.max_delete_share = max_delete_share
        self.batch: list[Record | Forget] = []
        self.batch_bytes = 0  # of files read for the batch: a commit frees their chunk lists
        self.tombstones: list[Record] = []  # recorded last, after the deletion guard
        # Files this scan found gone, by their indexed stat: a file met under a new path with
        # the very same stat moved there (a directory's rename leaves its files' inodes as
        # they were, ctime included), and needs no reading.
        self.vanished: dict[StatSig, Entry] = {}
        self.created = 0

    def update(self, fresh: OnDisk, local: LocalState, *, indexed: bool = True) -> None:
        """Record what is on disk now; a new version only if a synced field differs.
        `indexed=False` says the index has no record of the path (saves a lookup)."""
        previous = self.store.get(fresh.path) if indexed else None
        if previous and OnDisk.of(previous.entry) == fresh:
            self.add(Record(previous.entry, local))
            return
        base = previous.entry.version if previous else VersionVector()
        entry = Entry(
            version=base.bump(self.device, int(self.clock())),
            modifier=self.device,
            **fresh._asdict(),
        )
        self.add(Record(entry, local))
        self.counts.updated += 1
        if previous is None or previous.entry.deleted:
            self.created += 1

    def keep(self, path: str, local: LocalState) -> None:
        previous = self.store.get(path)
        if previous:
            self.add(Record(previous.entry, local))

    def tombstone(self, path: str) -> None:
        previous = self.store.get(path)
        if previous is None:
            return
        if previous.entry.kind is Kind.DIR:
            for below in self.store.descendants(path):
                self.tombstone_record(below)
        self.tombstone_record(previous)

    def tombstone_record(self, record: Record) -> None:
        old = record.entry
        if old.deleted:
            return
        stat = record.local.stat
        if (
            old.kind is Kind.FILE
            and old.size
            and stat is not None
            and not record.local.racy
            and len(self.vanished) < MAX_VANISHED
        ):
            self.vanished[stat] = old
        version = old.version.bump(self.device, int(self.clock()))
        tombstone = Entry(
            path=old.path, kind=old.kind, deleted=True, version=version, modifier=self.device
        )
        self.tombstones.append(Record(tombstone))

    def forget(self, path: str) -> None:
        for below in self.store.descendants(path):
            self.add(Forget(below.entry.path))
        self.add(Forget(path))

    def add(self, change: Record | Forget) -> None:
        self.batch.append(change)
        if len(self.batch) >= BATCH_RECORDS or self.batch_bytes >= BATCH_BYTES:
            self.commit()

    def commit(self) -> Hash:
        batch, self.batch, self.batch_bytes = self.batch, [], 0
        return self.store.commit(batch)

    def finish(self) -> Hash:
        """Commit the batch, then the tombstones unless they are a mass disappearance (then
        raise MassDeletionError); return the new root."""
        root = self.commit()
        if self.tombstones:
            self._guard_deletions()
            for record in self.tombstones:
                self.add(record)
            self.counts.updated += len(self.tombstones)
            self.counts.deleted += len(self.tombstones)
            root = self.commit()
        return root

    def _guard_deletions(self) -> None:
        """Refuse to record a mass disappearance: a vanished disk or a bad mount looks like
        "everything was deleted", and a mesh would faithfully delete it everywhere."""
        if self.allow_deletions:
            return
        stats = self.store.stats()
        live = stats.files + stats.dirs + stats.symlinks
        vanished = len(self.tombstones) - self.created  # a move deletes and creates alike
        if vanished >= MASS_DELETE_MIN and vanished > self.max_delete_share * live:
            raise MassDeletionError(
                f"{vanished} of {live} paths in {self.folder} vanished in one scan; not "
                "recording them as deleted, so no peer deletes its copies. If you did delete "
                "them, scan again allowing deletions (`backer scan --allow-deletions`)",
                vanished=vanished,
                live=live,
            )
