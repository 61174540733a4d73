"""Mirror two folders in memory, in one call — the Python rendering of `a.pipe(b).pipe(a)`.

    python examples/in_memory.py FOLDER_A FOLDER_B

Both folders end with the union of their contents; concurrent edits keep both copies.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from backer.sync.replicate import replicate


async def main(a: Path, b: Path) -> None:
    result = await replicate(a, b)
    state = "in sync" if result.in_sync else "NOT in sync"
    print(f"{a} <-> {b}: {state}, root {result.root_a.hex()[:16]}")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2])))
