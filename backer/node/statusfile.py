"""The running node's status, as a file other commands read: `backer peers` and `backer
status` show live state without a control socket.

Written atomically (temp file, rename) to `<home>/status.json` shortly after anything happens
and every few seconds regardless, so a reader can tell a live node (fresh `written`, its pid
alive) from a stopped or killed one. Imports node only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["STALE_AFTER", "STATUS_FILE", "read_status", "write_status_forever"]

STATUS_FILE = "status.json"
WRITE_EVERY = 5.0
STALE_AFTER = 3 * WRITE_EVERY  # a file older than this belongs to a node that is gone
SETTLE = 0.25  # after an event, wait this long for more before writing


async def write_status_forever(
    path: Path, status: Callable[[], dict[str, Any]], changed: asyncio.Event
) -> None:
    try:
        while True:
            await asyncio.to_thread(_write, path, {**status(), "written": time.time()})
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WRITE_EVERY):
                    await changed.wait()
                    await asyncio.sleep(SETTLE)  # batch a burst of events into one write
            changed.clear()
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def read_status(path: Path, *, now: float | None = None) -> dict[str, Any] | None:
    """The status a live node wrote, or None (no node running, or it died)."""
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    written = status.get("written") if isinstance(status, dict) else None
    if not isinstance(written, int | float):
        return None
    if (time.time() if now is None else now) - written > STALE_AFTER:
        return None
    if not _alive(status.get("pid")):  # killed before it could remove the file
        return None
    live: dict[str, Any] = status
    return live


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def _write(path: Path, status: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps(status, indent=1))
    os.replace(temp, path)
