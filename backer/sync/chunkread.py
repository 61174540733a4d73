"""Reading the chunks a peer asked for: neighbouring chunks of one file in one read, hashed
only where the file may have changed since its scan.

Owns the answering side's trust rule: a chunk is served unhashed when its file's stat, before
and after the read, is the stat the index trusts for it (`IndexStore.trusted_stats`), the rule
a rescan applies before it skips a file; anything else is hashed and, if wrong, looked for in
the chunk's other places. The requester checks every chunk in any case. Imports index and
sync.disk.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from backer.ids import Hash
from backer.index.chunker import hash_chunk
from backer.index.store import ChunkLocation, IndexStore, StatSig, chunk_key
from backer.sync.disk import FolderDisk

__all__ = ["read_chunks"]

SPAN_BYTES = 4 * 1024 * 1024  # neighbouring chunks read with one call, at most


@dataclass(slots=True)
class _Span:
    path: str
    offset: int
    length: int = 0
    members: list[int] = field(default_factory=list)  # indices into `wanted`


def read_chunks(
    store: IndexStore, disk: FolderDisk, wanted: Sequence[tuple[Hash, int]]
) -> list[bytes | None]:
    """Each chunk of `wanted` (hash, size), as the bytes it names, or None where this folder
    has it nowhere any more."""
    places = store.find_chunks(digest for digest, _ in wanted)
    candidates = [
        [p for p in places.get(chunk_key(digest), ()) if p.size == size] for digest, size in wanted
    ]
    spans = _spans([found[0] if found else None for found in candidates])
    trusted = store.trusted_stats({span.path for span in spans})
    answers: list[bytes | None] = [None] * len(wanted)
    with disk.opener() as open_regular:
        for span in spans:
            _read_span(open_regular, span, wanted, trusted.get(span.path), answers)
        for index, (digest, size) in enumerate(wanted):
            if answers[index] is None and len(candidates[index]) > 1:  # the first was read
                answers[index] = _search(open_regular, digest, size, candidates[index][1:])
    return answers


def _spans(picks: list[ChunkLocation | None]) -> list[_Span]:
    spans: list[_Span] = []
    for index, place in enumerate(picks):
        if place is None:
            continue
        last = spans[-1] if spans else None
        if (
            last is None
            or last.path != place.path
            or last.offset + last.length != place.offset
            or last.length + place.size > SPAN_BYTES
        ):
            last = _Span(place.path, place.offset)
            spans.append(last)
        last.length += place.size
        last.members.append(index)
    return spans


def _read_span(
    open_regular: Callable[[str], int | None],
    span: _Span,
    wanted: Sequence[tuple[Hash, int]],
    trusted: StatSig | None,
    answers: list[bytes | None],
) -> None:
    fd = open_regular(span.path)
    if fd is None:
        return
    try:
        before = StatSig.of(os.fstat(fd))
        data = os.pread(fd, span.length, span.offset)
        unchanged = trusted == before == StatSig.of(os.fstat(fd))
    except OSError:
        return
    view = memoryview(data)
    at = 0
    for index in span.members:
        digest, size = wanted[index]
        piece = view[at : at + size]
        at += size
        if len(piece) == size and (unchanged or hash_chunk(piece) == digest):
            answers[index] = data if len(data) == size else bytes(piece)


def _search(
    open_regular: Callable[[str], int | None], digest: Hash, size: int, places: list[ChunkLocation]
) -> bytes | None:
    """The chunk from any of its other places, each read hashed."""
    for place in places:
        fd = open_regular(place.path)
        if fd is None:
            continue
        try:
            data = os.pread(fd, size, place.offset)
        except OSError:
            continue
        if len(data) == size and hash_chunk(data) == digest:
            return data
    return None
