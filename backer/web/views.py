"""What the dashboard's JSON endpoints answer, built from the node: its status, its peers
flattened across folders, the recent changes from the event stream, and the conflict copies in
each folder's index.

Only reads the node; the conflict listing reads the index in a worker thread and is cached per
folder root, so a dashboard refreshing often costs nothing while nothing changes. Imports
events, index, sync.merge and node.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterable, Mapping
from typing import Any

from backer.errors import BackerError
from backer.events import ConflictFound, Event, FileUpdated
from backer.index.store import IndexStore
from backer.node.bus import stamped_json
from backer.node.node import Node
from backer.sync.merge import is_conflict_copy

__all__ = ["MAX_CONFLICTS_LISTED", "ConflictLister", "peers_view", "recent_changes"]

MAX_CONFLICTS_LISTED = 500  # per folder; the count is always complete


def peers_view(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every connected peer of every folder, one row each, with the folder it serves."""
    rows = []
    for folder in status.get("folders", []):
        for peer in folder.get("peers", []):
            rows.append({"folder": folder["path"], **peer})
    return rows


def recent_changes(recent: Iterable[tuple[float, Event]], limit: int = 200) -> list[dict[str, Any]]:
    """The files written, deleted or kept as conflict copies lately, newest first."""
    changes = [s for s in recent if isinstance(s[1], FileUpdated | ConflictFound)]
    return [stamped_json(stamped) for stamped in reversed(changes[-limit:])]


class ConflictLister:
    """Lists each folder's conflict copies, once per folder root."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[bytes, list[str]]] = {}

    async def list(self, node: Node) -> list[dict[str, Any]]:
        folders: list[dict[str, Any]] = []
        for runner in list(node.folders.values()):
            root = runner.replica.root
            cached = self._cache.get(runner.label)
            if cached is not None and cached[0] == root:
                paths = cached[1]
            else:
                try:
                    paths = await asyncio.to_thread(_conflict_copies, runner.replica.store)
                except (sqlite3.Error, BackerError, OSError) as exc:
                    folders.append(
                        {"folder": runner.label, "error": str(exc), "count": 0, "paths": []}
                    )
                    continue
                self._cache[runner.label] = (root, paths)
            folders.append(
                {
                    "folder": runner.label,
                    "count": len(paths),
                    "paths": paths[:MAX_CONFLICTS_LISTED],
                }
            )
        return folders


def _conflict_copies(store: IndexStore) -> list[str]:
    return sorted(e.path for e in store.entries() if not e.deleted and is_conflict_copy(e.path))
