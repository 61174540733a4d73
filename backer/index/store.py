"""The index store: one folder's entries, chunk locations and merkle tree in SQLite (WAL).

Owns `FOLDER/.backer/index.db` and the schema. Every `commit` is one transaction holding the
entries, their chunk references, the new tree nodes and the new root, so a crash leaves the last
committed, consistent state. The connection may be used from any one thread at a time (the
scanner runs in a worker thread); a lock serialises callers. Imports index modules only.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from backer.errors import FolderMissingError, IndexCorruptError
from backer.ids import Hash
from backer.index import merkle
from backer.index.entry import Entry, Kind, VersionVector, iter_chunks
from backer.paths import RESERVED_DIR, join, parent_of

__all__ = [
    "INDEX_FILE",
    "ChunkLocation",
    "Forget",
    "IndexStats",
    "IndexStore",
    "Known",
    "LocalState",
    "Record",
    "StatSig",
    "chunk_key",
]

INDEX_FILE = "index.db"
SCHEMA_VERSION = 2
# Superseded tree nodes stay readable for this many commits, so a peer descending an older root
# mostly finds what it asks for (DESIGN.md section 3); older ones are purged.
KEEP_GENERATIONS = 16
# Trees this index covers (its own past roots, roots pulled in full), remembered in memory so
# that a peer announcing one of them is not pulled from.
COVERED_KEPT = 4096

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS entries(
    id INTEGER PRIMARY KEY,
    parent TEXT NOT NULL,
    name TEXT NOT NULL,
    kind INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    mode INTEGER NOT NULL,
    target TEXT NOT NULL,
    chunks BLOB NOT NULL,
    version BLOB NOT NULL,
    modifier INTEGER NOT NULL,
    signature BLOB NOT NULL,
    leaf BLOB NOT NULL,
    st_size INTEGER,
    st_mtime_ns INTEGER,
    st_ino INTEGER,
    st_ctime_ns INTEGER,
    racy INTEGER NOT NULL DEFAULT 0,
    disk_name TEXT,
    UNIQUE(parent, name)
);
CREATE TABLE IF NOT EXISTS chunk_refs(
    prefix INTEGER NOT NULL,
    file_id INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY(prefix, file_id, offset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nodes(
    hash BLOB PRIMARY KEY,
    data BLOB NOT NULL,
    retired INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS nodes_retired ON nodes(retired) WHERE retired IS NOT NULL;
"""

_ENTRY_COLUMNS = (
    "parent, name, kind, deleted, size, mtime_ns, mode, target, chunks, version, modifier, "
    "signature"
)
_LOCAL_COLUMNS = "st_size, st_mtime_ns, st_ino, st_ctime_ns, racy, disk_name"
_ALL_COLUMNS = f"{_ENTRY_COLUMNS}, leaf, {_LOCAL_COLUMNS}"
_KNOWN_COLUMNS = f"kind, deleted, mode, target, {_LOCAL_COLUMNS}"
_LOOKUP_BATCH = 400  # (parent, name) pairs per lookup query


@dataclass(frozen=True, slots=True)
class StatSig:
    """What must stay equal for a file to be trusted unchanged without reading it."""

    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> StatSig:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class LocalState:
    """Local-only facts of one path: never synced, never part of a hash."""

    stat: StatSig | None = None
    racy: bool = False  # modified too close to the scan to trust the stat next time
    disk_name: str | None = None  # the on-disk name where it is not the NFC name


@dataclass(frozen=True, slots=True)
class Record:
    entry: Entry
    local: LocalState = LocalState()


@dataclass(frozen=True, slots=True)
class Known:
    """The few fields a rescan compares to decide whether a path changed, without decoding the
    whole entry (chunk lists, version vectors)."""

    kind: Kind
    deleted: bool
    mode: int
    target: str
    local: LocalState


@dataclass(frozen=True, slots=True)
class Forget:
    """Drop a path from the index without a tombstone (it became ignored)."""

    path: str


@dataclass(frozen=True, slots=True)
class ChunkLocation:
    path: str
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class IndexStats:
    files: int
    dirs: int
    symlinks: int
    deleted: int
    bytes: int
    chunks: int


def _signed(value: int) -> int:
    """SQLite integers are signed 64-bit; device IDs and hash prefixes are unsigned."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _unsigned(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


def chunk_key(digest: bytes) -> int:
    """The key `find_chunks` files a chunk's places under."""
    return _chunk_prefix(digest)


def _chunk_prefix(digest: bytes) -> int:
    return _signed(int.from_bytes(digest[:8], "big"))


class IndexStore:
    """A folder's persistent index. Open with `IndexStore.open(folder_root)`."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self._lock = threading.RLock()
        self.path = path
        self._root = Hash(self._meta("root", merkle.EMPTY_ROOT))
        self._generation = int.from_bytes(self._meta("generation", b"\0"), "big")
        self._covered: OrderedDict[Hash, None] = OrderedDict()
        # Signs every entry committed without a signature (a read-write device's own versions,
        # merged vectors, conflict copies); None on a read-only device or without a folder key.
        self.signer: Callable[[bytes], bytes] | None = None

    @classmethod
    def open(cls, folder_root: Path, *, create: bool = False) -> IndexStore:
        marker = folder_root / RESERVED_DIR
        if not folder_root.is_dir():
            raise FolderMissingError(f"folder {folder_root} does not exist (is its disk mounted?)")
        if not marker.is_dir():
            if not create:
                raise FolderMissingError(
                    f"{marker} is missing: the folder was never set up, or its disk is not mounted"
                )
            marker.mkdir(mode=0o700)
        db_path = marker / INDEX_FILE
        try:
            db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            found = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if found is None:
                db.execute("INSERT INTO meta VALUES('schema', ?)", (SCHEMA_VERSION,))
            elif found[0] != SCHEMA_VERSION:
                raise IndexCorruptError(
                    f"{db_path} has schema {found[0]}, expected {SCHEMA_VERSION}"
                )
        except sqlite3.Error as exc:
            raise IndexCorruptError(f"cannot open index {db_path}: {exc}") from exc
        return cls(db, db_path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def root(self) -> Hash:
        return self._root

    @property
    def generation(self) -> int:
        """Commits so far: a node replaced by commit g is kept until commit g+KEEP_GENERATIONS."""
        return self._generation

    def covers(self, root: Hash) -> bool:
        """Whether every entry of the tree `root` is here with the same or a dominating version
        (or was forgotten here, as ignored now), so a pull towards it can bring nothing: the
        empty tree, a root this index had before (an entry is only ever replaced by one whose
        version dominates it), or one noted by `note_covered`; the last COVERED_KEPT."""
        return root == merkle.EMPTY_ROOT or root in self._covered

    def note_covered(self, root: Hash) -> None:
        """Note a tree whose every entry was merged into this index (a pull with nothing
        skipped or failed): that stays true, as entries only move on to dominating versions."""
        self._covered[root] = None
        self._covered.move_to_end(root)
        if len(self._covered) > COVERED_KEPT:
            self._covered.popitem(last=False)

    def local_device(self) -> int:
        """A 64-bit device key of this index's own, for replicas used without a node home
        (the in-memory API, examples); made once and kept in the index."""
        with self._lock:
            found = self._meta("device", b"")
            if not found:
                found = secrets.token_bytes(8)
                self._set_meta("device", found)
        return int.from_bytes(found, "big")

    def devices(self) -> dict[str, int]:
        """The filesystem devices last seen at the folder's root ("") and at each directory on
        a filesystem other than its parent's: the scanner's record of the folder's mounts."""
        with self._lock:
            raw = self._meta("devices", b"")
        if not raw:
            return {}
        try:
            return {str(path): int(device) for path, device in msgpack.unpackb(raw)}
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise IndexCorruptError(f"the index's record of mounts does not decode: {exc}") from exc

    def set_devices(self, devices: dict[str, int]) -> None:
        with self._lock:
            self._set_meta("devices", msgpack.packb(sorted(devices.items())))

    def ignore_rules_seen(self) -> bytes:
        """The `.backerignore` text the last whole scan applied (b"" for none)."""
        with self._lock:
            return self._meta("ignore", b"")

    def set_ignore_rules_seen(self, text: bytes) -> None:
        with self._lock:
            self._set_meta("ignore", text)

    # -- reads ---------------------------------------------------------------------------------

    def get(self, path: str) -> Record | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_ENTRY_COLUMNS}, {_LOCAL_COLUMNS} FROM entries WHERE parent=? AND name=?",
                (parent_of(path), path.rpartition("/")[2]),
            ).fetchone()
        return None if row is None else _record(row)

    def get_many(self, paths: Iterable[str]) -> dict[str, Record]:
        """The records of those of `paths` the index holds, 400 paths per query."""
        found: dict[str, Record] = {}
        for row in self._by_path(f"{_ENTRY_COLUMNS}, {_LOCAL_COLUMNS}", paths):
            record = _record(row)
            found[record.entry.path] = record
        return found

    def known_many(self, paths: Iterable[str]) -> dict[str, Known]:
        """What is known of those of `paths` the index holds: one indexed lookup per path (by
        the (parent, name) key), 400 paths per query, never a whole directory's rows."""
        return {
            join(parent, name): _known(rest)
            for parent, name, *rest in self._by_path(f"parent, name, {_KNOWN_COLUMNS}", paths)
        }

    def trusted_stats(self, paths: Iterable[str]) -> dict[str, StatSig]:
        """The stat each of `paths` had when its chunks were indexed, for those whose stat a
        rescan would trust (recorded, not racy): a file still showing that stat holds the
        chunks its entry lists."""
        return {
            path: known.local.stat
            for path, known in self.known_many(paths).items()
            if known.local.stat is not None and not known.local.racy
        }

    def children(self, parent: str) -> dict[str, Known]:
        """What is known of every path directly inside directory `parent` ("" is the root)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT name, {_KNOWN_COLUMNS} FROM entries WHERE parent=?", (parent,)
            ).fetchall()
        return {name: _known(rest) for name, *rest in rows}

    def descendants(self, path: str) -> Iterator[Record]:
        """Every record strictly below `path`, deepest first (children before their parents)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_ENTRY_COLUMNS}, {_LOCAL_COLUMNS} FROM entries "
                "WHERE parent=? OR (parent>? AND parent<?) ORDER BY parent DESC, name",
                (path, path + "/", path + "0"),  # "0" is the character after "/"
            ).fetchall()
        return (_record(row) for row in rows)

    def entries(self) -> Iterator[Entry]:
        """Every entry, tombstones included, in no particular order. Reads in pages."""
        last_id = 0
        while True:
            with self._lock:
                rows = self._db.execute(
                    f"SELECT id, {_ENTRY_COLUMNS} FROM entries WHERE id>? ORDER BY id LIMIT 1000",
                    (last_id,),
                ).fetchall()
            if not rows:
                return
            for row in rows:
                yield _entry(row[1:])
            last_id = rows[-1][0]

    def unsigned(self) -> list[Entry]:
        """Entries without a signature: on a read-only device, its own local changes."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE length(signature)=0"
            ).fetchall()
        return [_entry(row) for row in rows]

    def sign_unsigned(self) -> int:
        """Sign every entry that has no signature yet (indexed before the folder had a key)."""
        if self.signer is None:
            return 0
        with self._lock:
            rows = self._db.execute(
                "SELECT id, leaf FROM entries WHERE length(signature)=0"
            ).fetchall()
            if rows:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(
                    "UPDATE entries SET signature=? WHERE id=?",
                    ((self.signer(bytes(leaf)), row_id) for row_id, leaf in rows),
                )
                self._db.execute("COMMIT")
        return len(rows)

    def read_node(self, node: Hash) -> bytes:
        """A tree node's bytes; KeyError if unknown or purged (merkle.NodeReader)."""
        if node == merkle.EMPTY_ROOT:
            return merkle.encode_node(merkle.Listing(()))
        with self._lock:
            row = self._db.execute("SELECT data FROM nodes WHERE hash=?", (node,)).fetchone()
        if row is None:
            raise KeyError(node.hex())
        data: bytes = row[0]
        return data

    def find_chunks(self, digests: Iterable[bytes]) -> dict[int, list[ChunkLocation]]:
        """Places of many chunks in a few queries, keyed by `chunk_key(digest)`; hints only."""
        prefixes = list({_chunk_prefix(d) for d in digests})
        found: dict[int, list[ChunkLocation]] = {}
        for start in range(0, len(prefixes), _LOOKUP_BATCH):
            part = prefixes[start : start + _LOOKUP_BATCH]
            with self._lock:
                rows = self._db.execute(
                    "SELECT c.prefix, e.parent, e.name, e.disk_name, c.offset, c.size "
                    "FROM chunk_refs c JOIN entries e ON e.id = c.file_id "
                    f"WHERE c.prefix IN ({','.join('?' * len(part))})",
                    part,
                ).fetchall()
            for prefix, parent, name, disk_name, offset, size in rows:
                found.setdefault(prefix, []).append(
                    ChunkLocation(join(parent, disk_name or name), offset, size)
                )
        return found

    def stats(self) -> IndexStats:
        with self._lock:
            kinds = dict.fromkeys(Kind, 0)
            for kind, count in self._db.execute(
                "SELECT kind, count(*) FROM entries WHERE deleted=0 GROUP BY kind"
            ):
                kinds[Kind(kind)] = count
            deleted, size, chunk_bytes = self._db.execute(
                "SELECT coalesce(sum(deleted), 0), coalesce(sum(size), 0), "
                "coalesce(sum(length(chunks)), 0) FROM entries"
            ).fetchone()
        return IndexStats(
            files=kinds[Kind.FILE],
            dirs=kinds[Kind.DIR],
            symlinks=kinds[Kind.SYMLINK],
            deleted=deleted,
            bytes=size,
            chunks=chunk_bytes // 36,
        )

    # -- writes --------------------------------------------------------------------------------

    def commit(self, changes: Sequence[Record | Forget]) -> Hash:
        """Apply records and forgets in one transaction, update the tree, return the new root.
        When a path appears more than once, its last change counts."""
        if not changes:
            return self._root
        latest = {(c.path if isinstance(c, Forget) else c.entry.path): c for c in changes}
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._catch_up()
                leaf_changes = self._write_entries(latest)
                tree = merkle.update(self.read_node, self._root, leaf_changes)
                self._generation += 1
                self._db.executemany(
                    "INSERT INTO nodes VALUES(?, ?, NULL) "
                    "ON CONFLICT(hash) DO UPDATE SET retired=NULL",
                    tree.added.items(),
                )
                self._db.executemany(
                    "UPDATE nodes SET retired=? WHERE hash=?",
                    ((self._generation, node) for node in tree.removed),
                )
                self._db.execute(
                    "DELETE FROM nodes WHERE retired IS NOT NULL AND retired<?",
                    (self._generation - KEEP_GENERATIONS,),
                )
                self._set_meta("root", tree.root)
                self._set_meta("generation", self._generation.to_bytes(8, "big"))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                self._generation = int.from_bytes(self._meta("generation", b"\0"), "big")
                raise
        if tree.root != self._root:
            self.note_covered(self._root)
        self._root = tree.root
        return tree.root

    def refresh(self) -> bool:
        """Catch up with a commit another process made (`backer revert` beside `backer run`);
        True if there was one. Costs one indexed read."""
        with self._lock:
            return self._catch_up()

    def _catch_up(self) -> bool:
        """Take the root another connection committed, or the next commit would build on a tree
        whose entries are no longer those of the table: a root no peer can ever match. What it
        forgot may be worth pulling again, so the covered trees are forgotten too."""
        generation = int.from_bytes(self._meta("generation", b"\0"), "big")
        if generation == self._generation:
            return False
        self._generation = generation
        self._root = Hash(self._meta("root", merkle.EMPTY_ROOT))
        self._covered.clear()
        return True

    def _write_entries(self, changes: dict[str, Record | Forget]) -> dict[str, Hash | None]:
        """Write rows and chunk references with one statement per kind of write, not per row
        (a first scan commits thousands of records at a time)."""
        existing = self._existing(changes.keys())
        next_id: int = self._db.execute("SELECT coalesce(max(id), 0) FROM entries").fetchone()[0]
        inserts, updates, deletes = [], [], []
        drop_refs: list[tuple[int, int, int]] = []
        add_refs: list[tuple[int, int, int, int]] = []
        leaves: dict[str, Hash | None] = {}
        for path, change in changes.items():
            old = existing.get(path)
            if isinstance(change, Forget):
                leaves[path] = None
                if old is not None:
                    deletes.append((old[0],))
                    drop_refs.extend(_refs(old[0], old[1]))
                continue
            entry = change.entry
            leaf = leaves[path] = entry.leaf_hash()
            values = self._row(change, leaf)
            if old is None:
                next_id += 1
                inserts.append((next_id, *values))
                add_refs.extend(_refs(next_id, entry.chunks, sized=True))
            else:
                updates.append((*values, old[0]))
                if old[1] != entry.chunks:
                    drop_refs.extend(_refs(old[0], old[1]))
                    add_refs.extend(_refs(old[0], entry.chunks, sized=True))
        marks = ",".join("?" * (_ALL_COLUMNS.count(",") + 2))  # the columns and the row id
        self._db.executemany(f"INSERT INTO entries(id, {_ALL_COLUMNS}) VALUES({marks})", inserts)
        self._db.executemany(
            f"UPDATE entries SET ({_ALL_COLUMNS}) = ({marks[2:]}) WHERE id=?", updates
        )
        self._db.executemany("DELETE FROM entries WHERE id=?", deletes)
        self._db.executemany(
            "DELETE FROM chunk_refs WHERE prefix=? AND file_id=? AND offset=?",
            (ref[:3] for ref in drop_refs),
        )
        self._db.executemany("INSERT OR REPLACE INTO chunk_refs VALUES(?,?,?,?)", add_refs)
        return leaves

    def _existing(self, paths: Iterable[str]) -> dict[str, tuple[int, bytes]]:
        """(row id, chunk list) of each of `paths` the index already holds."""
        return {
            join(parent, name): (row_id, chunks)
            for parent, name, row_id, chunks in self._by_path("parent, name, id, chunks", paths)
        }

    def _by_path(self, columns: str, paths: Iterable[str]) -> Iterator[Sequence[Any]]:
        """`columns` of the rows of those of `paths` the index holds, looked up by their
        (parent, name) key, `_LOOKUP_BATCH` paths per query."""
        pairs = [(parent_of(p), p.rpartition("/")[2]) for p in paths]
        for start in range(0, len(pairs), _LOOKUP_BATCH):
            part = pairs[start : start + _LOOKUP_BATCH]
            with self._lock:
                # Joined, not `(parent, name) IN (VALUES ...)`: SQLite answers that with a
                # scan of the whole table, and this with one index search per path.
                rows = self._db.execute(
                    f"SELECT {columns} FROM (VALUES {','.join(['(?,?)'] * len(part))}) AS wanted "
                    "CROSS JOIN entries ON parent=wanted.column1 AND name=wanted.column2",
                    [value for pair in part for value in pair],
                ).fetchall()
            yield from rows

    def _row(self, record: Record, leaf: Hash) -> tuple[Any, ...]:
        entry, local, stat = record.entry, record.local, record.local.stat
        return (
            parent_of(entry.path),
            entry.name,
            int(entry.kind),
            int(entry.deleted),
            entry.size,
            entry.mtime_ns,
            entry.mode,
            entry.target,
            entry.chunks,
            msgpack.packb(entry.version.counters),
            _signed(entry.modifier),
            entry.signature or (self.signer(leaf) if self.signer else b""),
            leaf,
            *((stat.size, stat.mtime_ns, stat.ino, stat.ctime_ns) if stat else (None,) * 4),
            int(local.racy),
            local.disk_name,
        )

    # -- helpers -------------------------------------------------------------------------------

    def _meta(self, key: str, default: bytes) -> bytes:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else bytes(row[0])

    def _set_meta(self, key: str, value: bytes) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES(?, ?)", (key, value))


def _refs(file_id: int, chunks: bytes, *, sized: bool = False) -> list[Any]:
    """chunk_refs rows (prefix, file, offset[, size]) of a file's chunk list."""
    refs = []
    offset = 0
    for digest, length in iter_chunks(chunks):
        ref = (_chunk_prefix(digest), file_id, offset)
        refs.append((*ref, length) if sized else ref)
        offset += length
    return refs


def _entry(row: Sequence[Any]) -> Entry:
    (
        parent,
        name,
        kind,
        deleted,
        size,
        mtime_ns,
        mode,
        target,
        chunks,
        version,
        modifier,
        signature,
    ) = row[:12]
    try:
        counters = msgpack.unpackb(version)
        return Entry(
            path=join(parent, name),
            kind=Kind(kind),
            deleted=bool(deleted),
            size=size,
            mtime_ns=mtime_ns,
            mode=mode,
            target=target,
            chunks=bytes(chunks),
            version=VersionVector(tuple((int(d), int(c)) for d, c in counters)),
            modifier=_unsigned(modifier),
            signature=bytes(signature),
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise IndexCorruptError(f"index entry {parent}/{name} does not decode: {exc}") from exc


def _local(columns: Sequence[Any]) -> LocalState:
    st_size, st_mtime_ns, st_ino, st_ctime_ns, racy, disk_name = columns
    stat = None if st_size is None else StatSig(st_size, st_mtime_ns, st_ino, st_ctime_ns)
    return LocalState(stat=stat, racy=bool(racy), disk_name=disk_name)


def _known(columns: Sequence[Any]) -> Known:
    kind, deleted, mode, target, *local = columns
    return Known(Kind(kind), bool(deleted), mode, target, _local(local))


def _record(row: Sequence[Any]) -> Record:
    return Record(_entry(row), _local(row[12:18]))
