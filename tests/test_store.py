"""The SQLite index: persistence, atomic batches, chunk lookups, and surviving a killed scan."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backer.errors import FolderMissingError
from backer.index import merkle
from backer.index.entry import Entry, Kind, VersionVector, iter_chunks
from backer.index.scan import scan
from backer.index.store import Forget, IndexStore, Record, chunk_key

DEVICE = 7
FILES = 20_000


def entry(path: str, counter: int = 1) -> Entry:
    return Entry(
        path=path, kind=Kind.DIR, version=VersionVector(((DEVICE, counter),)), modifier=DEVICE
    )


def test_open_requires_marker_unless_creating(tmp_path: Path) -> None:
    with pytest.raises(FolderMissingError):
        IndexStore.open(tmp_path)
    with pytest.raises(FolderMissingError):
        IndexStore.open(tmp_path / "absent", create=True)
    IndexStore.open(tmp_path, create=True).close()
    assert (tmp_path / ".backer" / "index.db").exists()


def test_reopen_gives_same_root_and_entries(tmp_path: Path) -> None:
    with IndexStore.open(tmp_path, create=True) as store:
        assert store.root == merkle.EMPTY_ROOT
        root = store.commit([Record(entry("a")), Record(entry("a/b")), Record(entry("c"))])
    with IndexStore.open(tmp_path) as store:
        assert store.root == root
        assert sorted(e.path for e in store.entries()) == ["a", "a/b", "c"]
        assert merkle.lookup(store.read_node, root, "a/b") == entry("a/b").leaf_hash()


def test_failed_commit_leaves_previous_state(tmp_path: Path) -> None:
    with IndexStore.open(tmp_path, create=True) as store:
        root = store.commit([Record(entry("a"))])

        class Boom(Exception):
            pass

        def explode(*_: object) -> merkle.TreeUpdate:
            raise Boom

        original = merkle.update
        merkle.update = explode  # type: ignore[assignment]
        try:
            with pytest.raises(Boom):
                store.commit([Record(entry("b")), Record(entry("a", 2))])
        finally:
            merkle.update = original
        assert store.root == root
        assert [e.path for e in store.entries()] == ["a"]
        assert store.get("a") == Record(entry("a"))


def test_superseded_nodes_stay_briefly_then_go(tmp_path: Path) -> None:
    with IndexStore.open(tmp_path, create=True) as store:
        first = store.commit([Record(entry("a"))])
        store.commit([Record(entry("a", 2))])
        store.read_node(first)  # still readable for a peer walking the old root
        for counter in range(3, 40):
            store.commit([Record(entry("a", counter))])
        with pytest.raises(KeyError):
            store.read_node(first)
        assert set(merkle.reachable(store.read_node, store.root))


async def test_chunk_locations(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    data = os.urandom(200_000)
    (folder / "one").write_bytes(data)
    (folder / "sub").mkdir()
    (folder / "sub" / "two").write_bytes(data[:100_000])
    with IndexStore.open(folder, create=True) as store:
        await scan(folder, store, device=DEVICE)
        record = store.get("one")
        assert record is not None
        offset = 0
        for digest, length in iter_chunks(record.entry.chunks):
            places = store.find_chunks([digest]).get(chunk_key(digest), [])
            assert any(p.path == "one" and p.offset == offset and p.size == length for p in places)
            offset += length
        (folder / "one").unlink()
        await scan(folder, store, device=DEVICE)
        first = next(iter_chunks(record.entry.chunks))[0]
        assert all(p.path != "one" for p in store.find_chunks([first]).get(chunk_key(first), []))


def test_killed_scan_leaves_a_consistent_index(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    for i in range(FILES):
        path = folder / f"d{i % 60}" / f"file{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(64 + i % 500))
    IndexStore.open(folder, create=True).close()
    db = folder / ".backer" / "index.db"
    child = subprocess.Popen(
        [sys.executable, "-m", "backer", "--home", str(tmp_path / "home"), "scan", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    committed = 0
    try:
        while committed == 0 and child.poll() is None:
            assert time.monotonic() < deadline, "the scan never committed a batch"
            try:
                with sqlite3.connect(db, timeout=0.1) as probe:
                    committed = probe.execute("SELECT count(*) FROM entries").fetchone()[0]
            except sqlite3.OperationalError:
                continue
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with IndexStore.open(folder) as store:
        entries = list(store.entries())
        assert entries, "nothing was committed before the kill"
        assert len(entries) < FILES, "the scan finished before it was killed"
        built = merkle.build((e.path, e.leaf_hash()) for e in entries)
        assert built.root == store.root
        assert set(merkle.reachable(store.read_node, store.root))
    with IndexStore.open(folder) as store:
        report = asyncio.run(scan(folder, store, device=DEVICE))
        assert report.files == FILES
        live = {e.path for e in store.entries() if not e.deleted and e.kind is Kind.FILE}
        assert len(live) == FILES


def test_a_commit_after_another_process_committed_builds_on_its_tree(tmp_path: Path) -> None:
    """Found with `backer revert` run beside `backer run` on a read-only device: the node's
    next commit built on the tree it had cached, so the index's tree kept the reverted
    tombstone its entries no longer held, a root no peer could match, for good (a restart read
    it back)."""
    root = tmp_path / "f"
    root.mkdir()
    with IndexStore.open(root, create=True) as node, IndexStore.open(root) as other:
        node.commit([Record(entry("a")), Record(entry("b"))])
        node.note_covered(node.root)
        covered = node.root
        gone = Entry(
            path="b", kind=Kind.DIR, deleted=True, version=VersionVector(((DEVICE, 2),)), modifier=1
        )
        node.commit([Record(gone)])
        other.commit([Forget("b")])  # what revert does in its own process
        node.commit([Record(entry("c"))])
        rebuilt = merkle.build((e.path, e.leaf_hash()) for e in node.entries())
        assert node.root == rebuilt.root
        assert not node.covers(covered)  # a forgotten path makes that tree worth pulling again
    with IndexStore.open(root) as reopened:
        assert reopened.root == rebuilt.root
