"""Index a folder with the Python API and print its merkle root and what changed.

    python examples/scan_folder.py DIR

Run it twice: the second run reads no file that did not change.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from backer.index.scan import scan
from backer.index.store import IndexStore


async def main(folder: Path) -> None:
    with IndexStore.open(folder, create=True) as store:
        # A device key of the folder's own; `backer scan` uses the node's device ID instead.
        report = await scan(folder, store, device=store.local_device())
    print(f"root {report.root.hex()}")
    print(f"{report.files} files, {report.updated} updated, read {report.hashed_bytes} bytes")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
