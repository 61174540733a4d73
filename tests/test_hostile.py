"""A peer holding the right key but sending hostile data: nothing is written outside the folder,
the bad path is refused with a reason, and the replica goes on."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
from evil import chunks_of, file_entry

from backer.errors import InvalidPathError, RemoteProtocolError
from backer.ids import Hash
from backer.index import merkle
from backer.index.chunker import hash_chunk
from backer.index.entry import Entry, chunk_groups, group_hash
from backer.protocol.messages import RemoteEntry
from backer.protocol.session import Session
from backer.sync.disk import FolderDisk
from backer.sync.link import memory_pipe
from backer.sync.peer import PeerSession, run_session
from backer.sync.pull import pull
from backer.sync.replica import Replica


class EvilFetcher:
    """Serves a tree built from whatever entries and chunk data the attacker chose."""

    def __init__(self, entries: list[Entry], data: dict[Hash, bytes]) -> None:
        built = merkle.build((e.path, e.leaf_hash()) for e in entries)
        self.root = built.root
        self.tree = built.added
        self.entries_by_path = {e.path: e for e in entries}
        self.data = data
        self.chunks_asked = 0

    async def nodes(self, hashes: Sequence[Hash]) -> dict[Hash, bytes]:
        return {h: self.tree[h] for h in hashes if h in self.tree}

    async def entries(
        self, wanted: Sequence[tuple[str, Hash]], *, inline: bool = True
    ) -> list[RemoteEntry]:
        return [RemoteEntry.from_entry(self.entries_by_path[path]) for path, _ in wanted]

    async def groups(self, hashes: Sequence[Hash]) -> dict[Hash, bytes]:
        return {}

    async def chunks(self, wanted: Sequence[tuple[Hash, int]]) -> dict[Hash, bytes]:
        self.chunks_asked += len(wanted)
        return {digest: self.data[digest] for digest, _ in wanted if digest in self.data}


@pytest.fixture
async def victim(tmp_path: Path) -> Replica:
    folder = tmp_path / "victim"
    folder.mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", folder / "link")
    (folder / "own.txt").write_bytes(b"mine")
    replica = await Replica.open(folder, device=1, create=True)
    await replica.scan()
    return replica


async def test_write_through_a_symlink_the_victim_has_is_refused(
    victim: Replica, tmp_path: Path
) -> None:
    payload = b"planted" * 100
    evil = EvilFetcher(
        [file_entry("link/planted.sh", payload), file_entry("fine.txt", b"ok")],
        chunks_of(payload) | chunks_of(b"ok"),
    )
    try:
        report = await pull(victim, evil, evil.root)
    finally:
        await victim.close()
    assert list((tmp_path / "outside").iterdir()) == []
    assert any("link/planted.sh" in error for error in report.errors)
    assert (victim.folder / "fine.txt").read_bytes() == b"ok"  # the rest still applies
    assert os.path.islink(victim.folder / "link")


async def test_chunks_that_do_not_match_are_never_written(victim: Replica) -> None:
    wanted = os.urandom(100_000)
    entry = file_entry("target.bin", wanted)
    lying = {digest: os.urandom(len(data)) for digest, data in chunks_of(wanted).items()}

    class Liar(EvilFetcher):
        async def chunks(self, wanted: Sequence[tuple[Hash, int]]) -> dict[Hash, bytes]:
            for digest, _ in wanted:
                if hash_chunk(lying[digest]) != digest:  # the session's check on the wire
                    raise RemoteProtocolError("chunk does not match its hash")
            return {digest: lying[digest] for digest, _ in wanted}

    evil = Liar([entry], lying)
    try:
        with pytest.raises(RemoteProtocolError):
            await pull(victim, evil, evil.root)
    finally:
        await victim.close()
    assert not (victim.folder / "target.bin").exists()
    # An abandoned transfer's temp file is kept for the next attempt, holding verified bytes only.
    for temp in (victim.folder / ".backer/tmp").glob("*.part"):
        assert temp.read_bytes().strip(b"\0") == b""


def test_disk_refuses_parents_that_are_symlinks(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    (folder / ".backer").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", folder / "link")
    disk = FolderDisk(folder)
    fd, temp = disk.temp_file("x")
    with pytest.raises(InvalidPathError):
        disk.install_file(fd, temp, "link/x", mode=0o644, mtime_ns=0)
    with pytest.raises(InvalidPathError):
        disk.make_dir("link/sub", 0o755)
    assert list((tmp_path / "outside").iterdir()) == []


async def test_garbage_from_a_peer_ends_the_session_with_a_reason(victim: Replica) -> None:
    ours, theirs = memory_pipe()
    session = asyncio.create_task(run_session(victim, ours, device=b"v" * 32, folder=bytes(32)))
    await theirs.write(b"\x00\x00\x00\x05hello")  # a frame that is not a message
    result = await asyncio.wait_for(session, 10)
    await victim.close()
    assert not result.clean
    assert "protocol" in result.reason or "msgpack" in result.reason
    answer = await theirs.read()  # our Hello, then an Error frame for the peer
    assert answer


async def test_a_hello_naming_another_device_than_the_proved_one_ends_the_session(
    victim: Replica,
) -> None:
    ours, theirs = memory_pipe()
    peer = PeerSession(victim, ours, device=b"v" * 32, folder=bytes(32), expect_device=b"p" * 32)
    running = asyncio.create_task(peer.run())
    liar = Session(b"q" * 32, bytes(32), merkle.EMPTY_ROOT)
    await theirs.write(liar.start())
    result = await asyncio.wait_for(running, 10)
    await victim.close()
    assert not result.clean and "another device" in result.reason


async def test_a_pull_expands_a_bounded_number_of_chunk_records_and_leaves_the_rest(
    victim: Replica, monkeypatch: pytest.MonkeyPatch
) -> None:
    contents = {f"big{n}.bin": os.urandom(4 * 1024 * 1024) for n in range(3)}
    entries = [file_entry(path, data) for path, data in contents.items()]
    groups = {group_hash(g): g for e in entries for g in chunk_groups(e.chunks)}

    class Serving(EvilFetcher):
        async def groups(self, hashes: Sequence[Hash]) -> dict[Hash, bytes]:
            return {h: groups[h] for h in hashes if h in groups}

    evil = Serving(
        entries, {d: c for data in contents.values() for d, c in chunks_of(data).items()}
    )
    # Each 4 MiB file may hold 512 chunk records: one file fits the budget, two do not.
    monkeypatch.setattr("backer.sync.pull.PULL_CHUNK_RECORDS", 700)
    try:
        first = await pull(victim, evil, evil.root)
        assert (first.files, first.deferred) == (1, 2)
        second = await pull(victim, evil, evil.root)
        third = await pull(victim, evil, evil.root)
    finally:
        await victim.close()
    assert (second.files, second.deferred, third.files, third.deferred) == (1, 1, 1, 0)
    for path, data in contents.items():
        assert (victim.folder / path).read_bytes() == data


async def test_the_watcher_naming_a_nested_share_is_not_an_error(victim: Replica) -> None:
    for rel in ("sub/.backer/index.db", ".Backer/x"):
        (victim.folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (victim.folder / rel).write_bytes(b"not ours")
    try:
        await victim.scan(["sub/.backer/index.db", ".Backer/x", "sub"])
        assert victim.store.get("sub") is not None
        assert victim.store.get("sub/.backer/index.db") is None
        assert victim.store.get(".Backer/x") is None
    finally:
        await victim.close()
