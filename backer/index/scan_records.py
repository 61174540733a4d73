"""The scanner's writes: what a scan found on disk becomes index records, tombstones and forgets,
committed in batches, and a mass disappearance is refused before its tombstones are written.

Owns the rule that a path gets a new version only when a synced field changed, and the deletion
guard: what vanished with its filesystem (a directory whose device changed, or a mount point
gone) is unavailable, not deleted, and vanished paths are counted over the scans of the last
minutes, so that a disk going away in small steps trips the guard too. Used by
`backer.index.scan` (which owns the walking and reading); imports the index layer only.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from backer.errors import MassDeletionError, MountGoneError
from backer.ids import Hash
from backer.index.entry import Entry, Kind, VersionVector
from backer.index.store import Forget, IndexStore, LocalState, Record, StatSig

__all__ = [
    "MASS_DELETE_MIN",
    "MAX_DELETE_SHARE",
    "Counts",
    "DeletionWindow",
    "Mounts",
    "OnDisk",
    "Recorder",
    "Skipped",
]

BATCH_RECORDS = 2000
BATCH_BYTES = 256 * 1024 * 1024
MAX_DELETE_SHARE = 0.5  # of the folder's live paths, vanishing in one scan: a vanished disk?
MASS_DELETE_MIN = 10  # fewer vanished paths than this are never a mass deletion
DELETION_WINDOW = 600.0  # seconds over which vanished paths add up for the guard
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


class DeletionWindow:
    """The paths recorded as vanished by the scans of the last `seconds` (monotonic time): the
    watcher hands a long `rm -rf` or a failing disk to the scanner in batches of a second, each
    one a small share of the folder."""

    def __init__(
        self, seconds: float = DELETION_WINDOW, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.seconds = seconds
        self.clock = clock
        self._recent: deque[tuple[float, int]] = deque()

    def total(self) -> int:
        now = self.clock()
        while self._recent and now - self._recent[0][0] > self.seconds:
            self._recent.popleft()
        return sum(count for _, count in self._recent)

    def add(self, vanished: int) -> None:
        if vanished > 0:
            self._recent.append((self.clock(), vanished))

    def clear(self) -> None:
        self._recent.clear()


class Mounts:
    """The devices of the folder's root and of its mount points, as recorded by the last scans,
    against what this scan finds. A directory whose device is not the recorded one (its disk was
    unmounted, leaving the bare mount point, or another was mounted over it), or a recorded
    mount point that vanished, is unavailable: what vanished below it is not a deletion."""

    def __init__(self, recorded: dict[str, int]) -> None:
        self.recorded = recorded
        self.found: dict[str, int] = {}  # visited directories on a filesystem of their own
        self.plain: set[str] = set()  # visited directories on their parent's filesystem
        self.changed: dict[str, tuple[int, int]] = {}  # path: (device expected, device found)

    def visit(self, path: str, device: int, parent: int | None, *, indexed: bool) -> None:
        """Note directory `path` ("" the root) found on `device`, its parent's being `parent`
        (None when not known). `indexed`: the index holds it as a live directory."""
        expected = self.recorded.get(path)
        if expected is None and indexed and path:
            expected = parent if parent is not None else self._nearest(path)
        if expected is not None and device != expected:
            self.changed[path] = (expected, device)
        if not path or (parent is not None and device != parent):
            self.found[path] = device
        elif parent is not None:
            self.plain.add(path)

    def _nearest(self, path: str) -> int | None:
        while path:
            path = path.rpartition("/")[0]
            if path in self.recorded:
                return self.recorded[path]
        return None

    def unavailable(self, vanished: Iterable[str]) -> dict[str, str]:
        """Of the `vanished` paths, those below an unavailable directory: path -> why."""
        vanished = set(vanished)
        reasons = {
            top: f"was on device {was}, now {now}" for top, (was, now) in self.changed.items()
        }
        for top in self.recorded.keys() & vanished:
            reasons.setdefault(top, "was a mount point and is gone")
        return {
            path: f"{top or '.'} {why}"
            for top, why in reasons.items()
            for path in vanished
            if not top or path == top or path.startswith(top + "/")
        }

    def updated(self, vanished: Iterable[str]) -> dict[str, int]:
        """The record to keep once this scan's findings are accepted."""
        devices = {p: d for p, d in self.recorded.items() if p not in self.plain}
        devices.update(self.found)
        for path in vanished:
            devices.pop(path, None)
        return devices


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
        mounts: Mounts,
        window: DeletionWindow | None,
    ) -> None:
        self.folder = folder
        self.store = store
        self.device = device
        self.clock = clock
        self.counts = counts
        self.allow_deletions = allow_deletions
        self.max_delete_share = max_delete_share
        self.mounts = mounts
        self.window = window
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
        """Commit the batch, then the tombstones unless they are a mass disappearance or went
        with their filesystem (then raise MassDeletionError or MountGoneError); return the new
        root."""
        root = self.commit()
        vanished = [record.entry.path for record in self.tombstones]
        if self.tombstones:
            self._guard_deletions(vanished)
            for record in self.tombstones:
                self.add(record)
            self.counts.updated += len(self.tombstones)
            self.counts.deleted += len(self.tombstones)
            root = self.commit()
        devices = self.mounts.updated(vanished)
        if devices != self.mounts.recorded:
            self.store.set_devices(devices)
        return root

    def _guard_deletions(self, vanished: list[str]) -> None:
        """Refuse to record a mass disappearance: a vanished disk or a bad mount looks like
        "everything was deleted", and a mesh would faithfully delete it everywhere."""
        if self.allow_deletions:
            if self.window is not None:
                self.window.clear()
            return
        gone = self.mounts.unavailable(vanished)
        if gone:
            path, why = min(gone.items())
            raise MountGoneError(
                f"{len(gone)} paths in {self.folder} are gone with their disk ({why}, e.g. "
                f"{path!r} is missing): not recording them as deleted, and the folder is paused "
                "until it is mounted again. If you did delete them, scan again allowing "
                "deletions (`backer scan --allow-deletions`)"
            )
        stats = self.store.stats()
        live = stats.files + stats.dirs + stats.symlinks
        now = len(self.tombstones) - self.created  # a move deletes and creates alike
        window = self.window or DeletionWindow(0.0)
        earlier = window.total()
        total, base = now + earlier, live + earlier  # base: about the paths when they began
        if now > 0 and total >= MASS_DELETE_MIN and total > self.max_delete_share * base:
            within = f" within {window.seconds:g} s" if earlier else " in one scan"
            raise MassDeletionError(
                f"{total} of {base} paths in {self.folder} vanished{within}; not "
                "recording them as deleted, so no peer deletes its copies. If you did delete "
                "them, scan again allowing deletions (`backer scan --allow-deletions`)",
                vanished=total,
                live=base,
            )
        window.add(now)
