"""The tools of the comparison suite that run once per phase and exit: rsync, and the floors of
an initial copy, `cp -a` and `b3sum` over the same files. Each is measured by `measure`'s
launcher (wait4: wall time, CPU seconds, peak RSS).

- rsync: `rsync -a --delete` to a loopback rsync daemon (`rsyncd.RsyncDaemon`), one run per
  phase; it has no watcher, so a change is timed as the writing of it plus one run after it.
Imports common, compare_data, compare_changes, compare_tools (Phase), measure and rsyncd.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import warm_page_cache
from compare_changes import Change
from compare_data import Tree, materialise
from compare_tools import Phase
from measure import run_measured
from rsyncd import RsyncDaemon

__all__ = ["RsyncSession", "b3sum_floor", "cp_floor"]


@dataclass(slots=True)
class RsyncSession:
    """`rsync -a --delete --stats SOURCE/ rsync://127.0.0.1:PORT/copy/`, one daemon per run."""

    tree: Tree
    base: Path
    source: Path = field(init=False)
    copy: Path = field(init=False)

    def __post_init__(self) -> None:
        self.source, self.copy = self.base / "source", self.base / "copy"

    def __enter__(self) -> RsyncSession:
        shutil.rmtree(self.base, ignore_errors=True)
        materialise(self.tree, self.source, private=self.tree.private())
        self.copy.mkdir(parents=True)
        return self

    def __exit__(self, *_: object) -> None:
        shutil.rmtree(self.base, ignore_errors=True)

    def initial(self) -> Phase:
        warm_page_cache(self.tree.paths())
        return self._push(None)

    def propagate(self, change: Change, *, settle: bool = True) -> Phase:
        return self._push(change)  # no watcher: nothing to settle

    def _push(self, change: Change | None) -> Phase:
        os.sync()
        with RsyncDaemon(self.base / "daemon", {"copy": self.copy}) as daemon:
            started = time.perf_counter()
            if change is not None:
                change.apply()
            applied = time.perf_counter() - started
            client, stats = daemon.push(self.source, "copy", daemon.port, options=["--delete"])
        server = daemon.usage
        assert server is not None
        return Phase(
            seconds=applied + client.wall,
            rss=(client.max_rss, server.max_rss),
            cpu=client.cpu + server.cpu,
            wire=stats.total,
            detail=f"literal data {stats.literal:,} B",
        )


def cp_floor(tree: Tree, base: Path) -> Phase:
    """`cp -a` of the tree (the source is hard links to the cached data) to a new folder."""
    source, copy = base / "source", base / "copy"
    shutil.rmtree(base, ignore_errors=True)
    materialise(tree, source)
    warm_page_cache(tree.paths())
    os.sync()
    measured = run_measured(["cp", "-a", str(source), str(copy)])
    return Phase(seconds=measured.wall, rss=(measured.max_rss,), cpu=measured.cpu, wire=0)


def b3sum_floor(tree: Tree, base: Path) -> Phase:
    """`b3sum` over every file of the tree, names through `xargs -0` (as bench/scan_bench.py)."""
    source = base / "source"
    if not source.exists():
        materialise(tree, source)
    warm_page_cache(tree.paths())
    names = b"".join(rel.encode() + b"\0" for rel, _ in tree.files)
    measured = run_measured(["xargs", "-0", "b3sum"], cwd=source, stdin=names, stdout="discard")
    return Phase(seconds=measured.wall, rss=(measured.max_rss,), cpu=measured.cpu, wire=0)
