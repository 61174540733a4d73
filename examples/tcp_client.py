"""Keep a folder in sync with a server, reconnecting with backoff when the link drops.

    python examples/tcp_client.py FOLDER HOST:PORT [--once]

Each round scans local changes, reconciles both ways until both roots are equal, then waits and
does it again. When the server is unreachable it retries with exponential backoff and jitter.
"""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

from backer.sync.replica import Replica
from backer.sync.replicate import sync_stream

DEVICE = b"example-client".ljust(32, b"\0")
ROUND_EVERY = 10.0  # seconds between rounds while connected
BACKOFF_MAX = 60.0


async def main(folder: Path, host: str, port: int, *, once: bool) -> None:
    replica = await Replica.open(folder, device=0, create=True)
    replica.device = replica.store.local_device()
    delay = 1.0
    while True:
        try:
            await replica.scan()
            reader, writer = await asyncio.open_connection(host, port)
            result = await sync_stream(replica, reader, writer, device=DEVICE)
            print(f"{'in sync' if result.in_sync else result.reason}", flush=True)
            delay = 1.0
            wait = ROUND_EVERY
        except OSError as exc:
            print(f"cannot reach {host}:{port} ({exc}); retrying in {delay:.0f} s", flush=True)
            wait = delay * random.uniform(0.5, 1.5)  # jitter: clients do not retry in step
            delay = min(delay * 2, BACKOFF_MAX)
        if once:
            await replica.close()
            return
        await asyncio.sleep(wait)


if __name__ == "__main__":
    host, _, port = sys.argv[2].rpartition(":")
    asyncio.run(main(Path(sys.argv[1]), host, int(port), once="--once" in sys.argv))
