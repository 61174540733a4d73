"""The answering side's chunk reads: neighbours in one read, no hash where the file is
unchanged since its scan, a hash (and the chunk's other places) wherever it may have changed."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backer.ids import Hash
from backer.index.entry import iter_chunks
from backer.sync import chunkread
from backer.sync.replica import Replica

OLD = 1_600_000_000  # an mtime well before any scan: not racy


@pytest.fixture
async def replica(tmp_path: Path) -> AsyncIterator[Replica]:
    folder = tmp_path / "f"
    folder.mkdir()
    opened = await Replica.open(folder, device=0, create=True)
    yield opened
    await opened.close()


async def _indexed(replica: Replica, name: str, content: bytes) -> list[tuple[Hash, int]]:
    path = replica.folder / name
    path.write_bytes(content)
    os.utime(path, (OLD, OLD))
    await replica.scan()
    record = replica.store.get(name)
    assert record is not None
    return list(iter_chunks(record.entry.chunks))


def _counting(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(chunkread, name) if hasattr(chunkread, name) else getattr(os, name)

    def counted(*args: object) -> object:
        calls.append(1)
        return original(*args)

    if name == "pread":
        monkeypatch.setattr(os, "pread", counted)
    else:
        monkeypatch.setattr(chunkread, name, counted)
    return calls


async def test_an_unchanged_file_is_read_in_spans_and_not_hashed(
    replica: Replica, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = os.urandom(3 * 1024 * 1024)
    wanted = await _indexed(replica, "big.bin", content)
    hashes = _counting(monkeypatch, "hash_chunk")
    reads = _counting(monkeypatch, "pread")
    got = replica.read_chunks(wanted)
    assert b"".join(g for g in got if g is not None) == content
    assert hashes == [] and len(reads) == 1


async def test_a_file_changed_since_its_scan_is_hashed_and_a_wrong_chunk_withheld(
    replica: Replica, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = os.urandom(1024 * 1024)
    wanted = await _indexed(replica, "big.bin", content)
    with open(replica.folder / "big.bin", "r+b") as f:  # an edit the index has not seen
        f.write(b"\0" * 100)
    hashes = _counting(monkeypatch, "hash_chunk")
    got = replica.read_chunks(wanted)
    assert got[0] is None  # the first chunk changed and is nowhere else
    assert b"".join(g for g in got[1:] if g is not None) == content[wanted[0][1] :]
    assert len(hashes) == len(wanted)


async def test_a_chunk_gone_from_its_first_place_is_found_in_another(replica: Replica) -> None:
    content = os.urandom(512 * 1024)
    wanted = await _indexed(replica, "a.bin", content)
    await _indexed(replica, "b.bin", content)
    for name in ("a.bin", "b.bin"):  # spoil one of the two copies, whichever is picked first
        path = replica.folder / name
        with open(path, "r+b") as f:
            f.write(b"\0" * 100)
        got = replica.read_chunks(wanted)
        assert b"".join(g for g in got if g is not None) == content
        path.write_bytes(content)
        os.utime(path, (OLD, OLD))
        await replica.scan()
