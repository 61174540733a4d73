"""Content-defined chunking (FastCDC 2020 via pyfastcdc) and BLAKE3 chunk hashes.

Owns the chunk-size parameters; every replica must cut identically, so they are part of the
protocol. Reads only from file objects it is given; never opens paths. Imports only `backer.ids`
and `backer.index.entry`.
"""

from __future__ import annotations

import io
from typing import BinaryIO

from pyfastcdc import FastCDC

from backer.ids import hash_bytes
from backer.index.entry import pack_chunks

__all__ = [
    "CHUNK_AVG",
    "CHUNK_MAX",
    "CHUNK_MIN",
    "SMALL_FILE",
    "chunk_bytes",
    "chunk_stream",
    "hash_chunk",
]

# Chosen in docs/design.md ("Chunks"): a 4 KiB edit anywhere in a large file then costs at most
# ~64 KiB of chunk data (measured: median 25 KB, worst 64 KB over 30 random edits), well under
# the 150 kB target with the chunk-list groups; a 1-byte append costs the last chunk (mean
# ~24 KiB). pyfastcdc's real mean is about avg + min = 24 KiB.
CHUNK_MIN = 8 * 1024
CHUNK_AVG = 16 * 1024
CHUNK_MAX = 64 * 1024
# Files up to this size are read in one call and cut in memory: fewer system calls per small file.
SMALL_FILE = 4 * 1024 * 1024
_PURPOSE = "chunk"


def _chunker() -> FastCDC:
    # A FastCDC object is not safe to share between threads; it is cheap to make.
    return FastCDC(CHUNK_AVG, min_size=CHUNK_MIN, max_size=CHUNK_MAX)


def hash_chunk(data: bytes | memoryview) -> bytes:
    return hash_bytes(_PURPOSE, data)


def chunk_bytes(data: bytes | memoryview) -> bytes:
    """Packed chunk list of an in-memory buffer."""
    if not data:
        return b""
    if len(data) <= CHUNK_MIN:
        return pack_chunks([(hash_chunk(data), len(data))])
    return pack_chunks([(hash_chunk(c.data), c.length) for c in _chunker().cut_buf(data)])


def chunk_stream(stream: BinaryIO | io.RawIOBase) -> tuple[bytes, int]:
    """Packed chunk list and byte count of everything left in `stream`.

    Streams rather than mmaps: a file truncated by another process while mapped would kill us
    with SIGBUS, and a scan must survive any file changing under it.
    """
    chunks = [(hash_chunk(c.data), c.length) for c in _chunker().cut_stream(stream)]
    return pack_chunks(chunks), sum(length for _, length in chunks)
