"""Entries and version vectors: pure values, validated on construction."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backer.errors import InvalidPathError
from backer.index.entry import (
    CHUNK_RECORD,
    GROUP_MAX,
    Entry,
    Kind,
    Ordering,
    VersionVector,
    chunk_groups,
    chunk_list_root,
    pack_chunks,
)

A, B, C = 1, 2, 3


def vv(**counts: int) -> VersionVector:
    ids = {"a": A, "b": B, "c": C}
    return VersionVector(tuple(sorted((ids[k], v) for k, v in counts.items())))


def test_bump_uses_time_and_never_goes_back() -> None:
    assert vv().bump(A, now=100) == vv(a=100)
    assert vv(a=100).bump(A, now=50) == vv(a=101)  # clock went back: still increases
    assert vv(a=5, b=7).bump(B, now=0) == vv(a=5, b=8)


@pytest.mark.parametrize(
    ("left", "right", "expected"),
    [
        (vv(), vv(), Ordering.EQUAL),
        (vv(a=1), vv(), Ordering.GREATER),
        (vv(), vv(a=1), Ordering.LESSER),
        (vv(a=2, b=1), vv(a=1, b=1), Ordering.GREATER),
        (vv(a=2), vv(b=1), Ordering.CONCURRENT),
        (vv(a=2, b=1), vv(a=1, b=2), Ordering.CONCURRENT),
        (vv(a=1, b=1), vv(a=1, b=1), Ordering.EQUAL),
    ],
)
def test_compare(left: VersionVector, right: VersionVector, expected: Ordering) -> None:
    assert left.compare(right) is expected


vectors = st.dictionaries(st.integers(0, 5), st.integers(1, 10)).map(
    lambda d: VersionVector(tuple(sorted(d.items())))
)


@given(vectors, vectors)
def test_merge_dominates_both(left: VersionVector, right: VersionVector) -> None:
    merged = left.merge(right)
    assert merged.compare(left) in (Ordering.GREATER, Ordering.EQUAL)
    assert merged.compare(right) in (Ordering.GREATER, Ordering.EQUAL)
    assert merged == right.merge(left)


@given(vectors, st.integers(0, 5), st.integers(0, 20))
def test_bump_dominates(vector: VersionVector, device: int, now: int) -> None:
    assert vector.bump(device, now).compare(vector) is Ordering.GREATER


def test_vector_validation() -> None:
    with pytest.raises(ValueError, match="unique and sorted"):
        VersionVector(((2, 1), (1, 1)))
    with pytest.raises(ValueError, match="positive"):
        VersionVector(((1, 0),))


def file_entry(**overrides: object) -> Entry:
    fields: dict[str, object] = {
        "path": "dir/file.txt",
        "kind": Kind.FILE,
        "version": vv(a=1),
        "modifier": A,
        "size": 10,
        "mtime_ns": 5,
        "mode": 0o644,
        "chunks": pack_chunks([(b"h" * 32, 4), (b"i" * 32, 6)]),
    }
    fields.update(overrides)
    return Entry(**fields)  # type: ignore[arg-type]


def test_leaf_hash_covers_every_synced_field() -> None:
    base = file_entry()
    variants = [
        file_entry(path="dir/other.txt"),
        file_entry(mtime_ns=6),
        file_entry(mode=0o600),
        file_entry(version=vv(a=2)),
        file_entry(modifier=B),
        file_entry(chunks=pack_chunks([(b"h" * 32, 5), (b"i" * 32, 5)])),
        file_entry(kind=Kind.DIR, size=0, chunks=b""),
        file_entry(deleted=True, size=0, chunks=b""),
    ]
    hashes = {base.leaf_hash(), *(v.leaf_hash() for v in variants)}
    assert len(hashes) == len(variants) + 1
    assert file_entry().leaf_hash() == base.leaf_hash()


def test_same_content_ignores_version() -> None:
    assert file_entry().same_content(file_entry(version=vv(b=3), modifier=B))
    assert not file_entry().same_content(file_entry(mode=0o600))


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"path": "../x"}, InvalidPathError),
        ({"path": "/abs"}, InvalidPathError),
        ({"path": ".backer/index.db"}, InvalidPathError),
        ({"size": 11}, ValueError),  # chunks do not add up
        ({"chunks": b"short"}, ValueError),
        ({"mode": 0o17777}, ValueError),
        ({"target": "x"}, ValueError),  # only symlinks have targets
        ({"deleted": True}, ValueError),  # tombstones carry no content
        ({"version": VersionVector()}, ValueError),
    ],
)
def test_invalid_entries_refused(overrides: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        file_entry(**overrides)


def test_chunk_groups_are_content_defined() -> None:
    rng = random.Random(3)
    records = [(rng.randbytes(32), rng.randint(1, 9)) for _ in range(2000)]
    groups = chunk_groups(pack_chunks(records))
    assert b"".join(groups) == pack_chunks(records)
    assert 10 < len(groups) < 80
    assert all(len(g) <= GROUP_MAX * CHUNK_RECORD for g in groups)
    # Inserting a chunk near the start changes one group; the later groups are the same bytes.
    edited = chunk_groups(pack_chunks([*records[:5], (rng.randbytes(32), 3), *records[5:]]))
    assert len(set(edited) - set(groups)) == 1
    whole = chunk_list_root(pack_chunks(records))
    assert chunk_list_root(pack_chunks(records)) == whole
    assert chunk_list_root(pack_chunks(records[:-1])) != whole


def test_group_size_is_bounded() -> None:
    same = [(b"\xff" * 32, 1)] * 10 + [(b"\x00" * 32, 1)] * 600
    sizes = [len(g) // CHUNK_RECORD for g in chunk_groups(pack_chunks(same))]
    assert sizes[:10] == [1] * 10
    assert sizes[10:] == [256, 256, 88]
