"""The folder watcher's own CPU while another process writes many small files, either under
`.backer/tmp` (a pull's temp files) or in the folder itself, and how many inotify events it
parsed in Python to get there. Runs against whichever backer is importable, so the same script
measures an older checkout too (e.g. the watchdog-based watcher: `PYTHONPATH=<checkout>`).

    python3 bench/watch_bench.py [reserved|folder] [files]      # one JSON line
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from backer.watch import Watcher

WRITER = """
import os, sys
target, count = sys.argv[1], int(sys.argv[2])
for i in range(count):
    with open(os.path.join(target, f"{i:05}.part"), "wb") as f:
        f.write(os.urandom(1024 + i % 3072))
"""


def count_parsed_events() -> tuple[str, list[int]]:
    """Wrap the watcher's event parser; returns its name and a one-item counter."""
    parsed = [0]
    try:
        low: Any = importlib.import_module("backer.inotify")
    except ImportError:  # a checkout from before backer.inotify: watchdog parses
        inotify_c: Any = importlib.import_module("watchdog.observers.inotify_c")
        parse_buffer = inotify_c.InotifyFD._parse_event_buffer

        def counted_buffer(buffer: bytes) -> Iterator[Any]:
            for item in parse_buffer(buffer):
                parsed[0] += 1
                yield item

        inotify_c.InotifyFD._parse_event_buffer = staticmethod(counted_buffer)
        return "watchdog", parsed
    parse = low.parse

    def counted(data: bytes) -> Any:
        events = parse(data)
        parsed[0] += len(events)
        return events

    low.parse = counted
    return "backer.inotify", parsed


async def measure(where: str, files: int) -> dict[str, Any]:
    watcher_kind, parsed = count_parsed_events()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "folder"
        target = folder / ".backer" / "tmp" if where == "reserved" else folder / "incoming"
        target.mkdir(parents=True)
        (folder / "d").mkdir()
        async with Watcher(folder) as watcher:
            batches = 0

            async def drain() -> None:  # as the node does: take every batch
                nonlocal batches
                while "d/marker" not in await watcher.changes():
                    batches += 1

            draining = asyncio.create_task(drain())
            cpu, wall = time.process_time(), time.monotonic()
            writer = await asyncio.create_subprocess_exec(
                sys.executable, "-c", WRITER, str(target), str(files)
            )
            await writer.wait()
            (folder / "d" / "marker").write_text("written last")
            await asyncio.wait_for(draining, 120)
            cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    return {
        "watcher": watcher_kind,
        "where": where,
        "files": files,
        "python_events": parsed[0],
        "cpu_s": round(cpu, 3),
        "wall_s": round(wall, 3),
        "batches": batches,
    }


if __name__ == "__main__":
    where = sys.argv[1] if len(sys.argv) > 1 else "reserved"
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000
    print(json.dumps(asyncio.run(measure(where, count))))
