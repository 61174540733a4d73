"""`backer` with a fault-injecting transport: `python tests/chaos_node.py --home H run ...`.

This machine's kernel has no netem, so the loss and delay of a bad network reach backer through
its byte streams instead. Every TCP link's reads and writes are, at random: delayed a little
(jitter); stalled for seconds (a burst of lost packets while TCP retransmits); reset (the
connection dies mid-message); or corrupted (one bit flipped, which the encrypted channel must
catch and close on). Partitions are not made here: the test cuts real links between network
namespaces.

How often each happens comes from the JSON file named by BACKER_CHAOS (chances per read or
write call, e.g. {"delay": 0.05, "stall": 0.003, "reset": 0.002, "corrupt": 0.001}), re-read
twice a second so the test can calm the network before it checks convergence; no file, no
faults. What was injected is counted into BACKER_CHAOS_COUNTS (JSON, rewritten as it grows).

The user edits at the apply step too (issue 14): at the disk's `before_swap` seam, the instant
between a pull's last look at a path and the swap that replaces or removes it, with the chance
"edit_at_swap" per swap, the file there is saved anew (temp and rename) or appended to. Each
such edit is written to BACKER_CHAOS_EDITS (JSON lines: the content written, and the one it
destroyed), for the test's ledger: what the user wrote there must never be lost.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

import blake3

from backer.cli.commands import main
from backer.sync.disk import FolderDisk
from backer.sync.link import StreamLink

KINDS = ("delay", "stall", "reset", "corrupt", "edit_at_swap")
rates = dict.fromkeys(KINDS, 0.0)
counts = dict.fromkeys(KINDS, 0)
chance = random.Random(int(os.environ.get("BACKER_CHAOS_SEED", "0")))
plain_read, plain_write = StreamLink.read, StreamLink.write


def follow_settings(settings: Path, tally: Path | None) -> None:
    written = dict(counts)
    while True:
        try:
            wanted = json.loads(settings.read_text())
            rates.update({kind: float(wanted.get(kind, 0.0)) for kind in KINDS})
        except (OSError, ValueError):
            rates.update(dict.fromkeys(KINDS, 0.0))
        if tally is not None and counts != written:
            written = dict(counts)
            temp = tally.with_suffix(".tmp")
            temp.write_text(json.dumps(written))
            temp.replace(tally)
        time.sleep(0.5)


def happens(kind: str) -> bool:
    if chance.random() < rates[kind]:
        counts[kind] += 1
        return True
    return False


async def disturb(link: StreamLink) -> bool:
    """Delay or stall this call; True if the connection was reset instead."""
    if happens("reset"):
        link._writer.transport.abort()
        return True
    if happens("stall"):
        await asyncio.sleep(chance.uniform(0.5, 3.0))
    elif happens("delay"):
        await asyncio.sleep(chance.uniform(0.0, 0.05))
    return False


async def chaotic_read(self: StreamLink) -> bytes:
    data = await plain_read(self)
    if data and await disturb(self):
        return b""
    return data


async def chaotic_write(self: StreamLink, data: bytes) -> None:
    if await disturb(self):
        raise ConnectionResetError("chaos: connection reset")
    if data and happens("corrupt"):
        at = chance.randrange(len(data))
        data = data[:at] + bytes([data[at] ^ (1 << chance.randrange(8))]) + data[at + 1 :]
    await plain_write(self, data)


edits_lock = threading.Lock()
edits = [0]


def edit_at_swap(journal: Path) -> None:
    """Patch the disk's seam: a user's save or append at the very step a swap replaces or
    removes a file (called in the pull's worker threads)."""

    def before_swap(self: FolderDisk, rel: str) -> None:
        if not happens("edit_at_swap"):
            return
        path = self.folder / rel
        if path.is_symlink() or not path.is_file():
            return  # no file to save there
        with edits_lock:
            edits[0] += 1
            tag = f"#swap-{os.getpid()}-{edits[0]}\n".encode()
        patch = tag + chance.randbytes(chance.randint(0, 8192))
        try:
            old = path.read_bytes()
        except OSError:
            return
        if chance.random() < 0.5:
            temp = path.with_name(f".{path.name}.~swap{edits[0]}")
            temp.write_bytes(patch)
            os.replace(temp, path)
            new, how = patch, "saved at the swap"
        else:
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
            try:
                os.write(fd, patch)
                new, how = os.pread(fd, os.fstat(fd).st_size, 0), "appended at the swap"
            finally:
                os.close(fd)
        line = {
            "path": rel,
            "how": how,
            "new": blake3.blake3(new).hexdigest(),
            "size": len(new),
            "old": blake3.blake3(old).hexdigest(),
        }
        with edits_lock, journal.open("a") as file:
            file.write(json.dumps(line) + "\n")

    FolderDisk.before_swap = before_swap  # type: ignore[method-assign]


if __name__ == "__main__":
    settings = os.environ.get("BACKER_CHAOS")
    if settings:
        tally = os.environ.get("BACKER_CHAOS_COUNTS")
        threading.Thread(
            target=follow_settings,
            args=(Path(settings), Path(tally) if tally else None),
            daemon=True,
        ).start()
        StreamLink.read = chaotic_read  # type: ignore[method-assign]
        StreamLink.write = chaotic_write  # type: ignore[method-assign]
        journal = os.environ.get("BACKER_CHAOS_EDITS")
        if journal:
            edit_at_swap(Path(journal))
    sys.exit(main(sys.argv[1:]))
