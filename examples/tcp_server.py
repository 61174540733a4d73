"""Serve a folder over TCP: every client that connects is reconciled with it, both ways.

    python examples/tcp_server.py FOLDER [HOST:PORT]

The same as `backer serve FOLDER --listen HOST:PORT`, in a dozen lines of the Python API.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from backer.sync.replica import Replica
from backer.sync.replicate import sync_stream

DEVICE = b"example-server".ljust(32, b"\0")


async def main(folder: Path, host: str, port: int) -> None:
    replica = await Replica.open(folder, device=0, create=True)
    replica.device = replica.store.local_device()
    await replica.scan()

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await replica.scan()  # pick up local changes before each peer
        result = await sync_stream(replica, reader, writer, device=DEVICE, until_in_sync=False)
        print(f"peer left: {result.reason}", flush=True)

    server = await asyncio.start_server(session, host, port)
    print(f"serving {folder} on {host}:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    where = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1:22000"
    host, _, port = where.rpartition(":")
    asyncio.run(main(Path(sys.argv[1]), host, int(port)))
