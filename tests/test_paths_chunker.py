"""Path validation (the gate every peer-supplied name passes) and the chunker's determinism."""

from __future__ import annotations

import io
import os
import random

import pytest

from backer.errors import InvalidPathError
from backer.index.chunker import CHUNK_MAX, CHUNK_MIN, chunk_bytes, chunk_stream
from backer.index.entry import iter_chunks
from backer.paths import check_path


@pytest.mark.parametrize(
    "path",
    ["a", "a/b/c", "ünïcode/ok", "x" * 255, " spaces ", "-dash", ".hidden", "a/.backerignore"],
)
def test_valid_paths(path: str) -> None:
    assert check_path(path) == path


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/etc/passwd",
        "../x",
        "a/../../x",
        "a/./b",
        "a//b",
        "a/",
        "nul\x00byte",
        "back\\slash",
        ".backer",
        ".backer/index.db",
        ".Backer/x",
        ".BACKER",
        "sub/.backer/index.db",
        "a/b/.bAcKeR",
        "x" * 256,
        "e\u0301",  # NFD
        "bad\udcff",  # a surrogate from an undecodable byte
        "/".join(["d"] * 2100),
    ],
)
def test_invalid_paths(path: str) -> None:
    with pytest.raises(InvalidPathError):
        check_path(path)


def test_an_indexed_path_may_hold_a_nested_reserved_name_so_that_it_can_be_forgotten() -> None:
    assert check_path("sub/.backer/index.db", indexed=True) == "sub/.backer/index.db"
    with pytest.raises(InvalidPathError):
        check_path(".backer/index.db", indexed=True)


def test_stream_and_buffer_cut_identically() -> None:
    data = random.Random(7).randbytes(3 * 1024 * 1024 + 17)
    from_buffer = chunk_bytes(data)
    from_stream, size = chunk_stream(io.BytesIO(data))
    assert from_buffer == from_stream and size == len(data)
    lengths = [n for _, n in iter_chunks(from_buffer)]
    assert sum(lengths) == len(data)
    assert all(CHUNK_MIN <= n <= CHUNK_MAX for n in lengths[:-1])


def test_insertion_shifts_only_nearby_chunks() -> None:
    data = random.Random(8).randbytes(4 * 1024 * 1024)
    edited = data[:2_000_000] + b"inserted" + data[2_000_000:]
    before = {h for h, _ in iter_chunks(chunk_bytes(data))}
    after = [h for h, _ in iter_chunks(chunk_bytes(edited))]
    assert sum(h not in before for h in after) <= 2


def test_tiny_and_empty() -> None:
    assert chunk_bytes(b"") == b""
    assert [n for _, n in iter_chunks(chunk_bytes(b"abc"))] == [3]
    assert chunk_bytes(os.urandom(10)) != chunk_bytes(os.urandom(10))
