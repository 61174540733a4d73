"""The assembler's writes: pieces that follow one another go out in one vectored write, and a
short write is finished, never silently dropped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backer.sync import assemble


def _pieces() -> list[tuple[int, bytes]]:
    # 1,030 neighbouring pieces (more than one pwritev takes), a gap, then two more.
    pieces = [(i * 3, bytes([i % 251]) * 3) for i in range(1030)]
    return [*pieces, (5000, b"after a gap"), (5011, b"!")]


def _expected(pieces: list[tuple[int, bytes]]) -> bytes:
    content = bytearray(max(offset + len(data) for offset, data in pieces))
    for offset, data in pieces:
        content[offset : offset + len(data)] = data
    return bytes(content)


def _write_and_check(path: Path, pieces: list[tuple[int, bytes]]) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        assemble._write_all(fd, pieces)
    finally:
        os.close(fd)
    assert path.read_bytes() == _expected(pieces)


def test_pieces_land_where_they_belong(tmp_path: Path) -> None:
    _write_and_check(tmp_path / "f", _pieces())


def test_a_short_vectored_write_is_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def short_pwritev(fd: int, buffers: list[bytes], offset: int) -> int:
        calls.append(len(buffers))
        first = buffers[0][:1]  # the kernel may write less than asked
        return os.pwrite(fd, first, offset)

    monkeypatch.setattr(os, "pwritev", short_pwritev)
    _write_and_check(tmp_path / "f", _pieces())
    assert calls == [assemble._IOV_MAX, 6, 2]
