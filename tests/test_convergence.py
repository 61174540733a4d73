"""Stateful property test: three replicas, random local changes and random pairwise syncs.

After every sync, every content that existed anywhere before it still exists somewhere (a live
file, a conflict copy, or a kept version): backer never loses anything. At the end, syncing all
pairs makes every root equal.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from backer.index.store import IndexStore
from backer.sync.disk import FolderDisk
from backer.sync.replicate import replicate

NAMES = ["a.txt", "b.txt", "dir/c.txt", "dir/d.txt", "dir/sub/e.txt", "f"]
REPLICAS = 3


def contents(folder: Path) -> set[bytes]:
    """Every file's bytes in the folder and in its versions area."""
    return set(copies(folder))


def copies(folder: Path) -> list[bytes]:
    """`contents`, once for each file that holds them."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            relative = path.relative_to(folder).parts
            if relative[0] == ".backer" and relative[1] != "versions":
                continue
            found.append(path.read_bytes())
    return found


def live_roots(folders: list[Path]) -> set[bytes]:
    roots: set[bytes] = set()
    for folder in folders:
        with IndexStore.open(folder) as store:
            roots.add(store.root)
    return roots


class Replicas(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.base = Path(tempfile.mkdtemp(prefix="backer-convergence-"))
        self.folders = [self.base / f"r{i}" for i in range(REPLICAS)]
        self.counter = itertools.count()

    @initialize()
    def make_folders(self) -> None:
        for folder in self.folders:
            folder.mkdir()
            IndexStore.open(folder, create=True).close()

    def _unique(self) -> bytes:
        return f"content #{next(self.counter)}\n".encode() * 3

    @rule(replica=st.integers(0, REPLICAS - 1), name=st.sampled_from(NAMES))
    def write(self, replica: int, name: str) -> None:
        path = self.folders[replica] / name
        if path.parent.exists() and not path.parent.is_dir():
            return
        if path.is_dir():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self._unique())
        stamp = 1_600_000_000 + next(self.counter)
        os.utime(path, (stamp, stamp))

    @rule(replica=st.integers(0, REPLICAS - 1), name=st.sampled_from(NAMES))
    def delete(self, replica: int, name: str) -> None:
        path = self.folders[replica] / name
        if path.is_file():
            path.unlink()

    @rule(
        replica=st.integers(0, REPLICAS - 1), old=st.sampled_from(NAMES), new=st.sampled_from(NAMES)
    )
    def rename(self, replica: int, old: str, new: str) -> None:
        source, target = self.folders[replica] / old, self.folders[replica] / new
        if (
            source.is_file()
            and not target.exists()
            and (not target.parent.exists() or target.parent.is_dir())
        ):
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(source, target)

    @rule(one=st.integers(0, REPLICAS - 1), other=st.integers(0, REPLICAS - 1))
    def sync(
        self, one: int, other: int, made: Sequence[bytes] = (), excused: Sequence[bytes] = ()
    ) -> None:
        """`made` is written and `excused` destroyed by the user during the sync."""
        if one == other:
            return
        before = set().union(*(contents(f) for f in self.folders))
        asyncio.run(replicate(self.folders[one], self.folders[other]))
        after = set().union(*(contents(f) for f in self.folders))
        owed = (before - set(excused)) | set(made)
        assert owed <= after, f"lost: {owed - after}"

    @rule(
        one=st.integers(0, REPLICAS - 1), other=st.integers(0, REPLICAS - 1), atomic=st.booleans()
    )
    def sync_with_an_edit_at_the_swap(self, one: int, other: int, atomic: bool) -> None:
        """The user saves (atomically, or appends in place) the first path a pull is about to
        replace or remove, at that exact step: the edit must survive too. What it overwrites
        is excused if that was its only copy (no sync tool keeps what the user destroys)."""
        made: list[bytes] = []
        excused: list[bytes] = []
        data = self._unique()

        def edit(disk: FolderDisk, rel: str) -> None:
            path = disk.folder / rel
            if made or path.is_symlink() or path.is_dir() or not path.parent.is_dir():
                return
            if path.is_file():
                old = path.read_bytes()
                if sum(copies(f).count(old) for f in self.folders) == 1:
                    excused.append(old)
            if atomic:
                (path.parent / ".save.tmp").write_bytes(data)
                os.rename(path.parent / ".save.tmp", path)
                made.append(data)
            elif path.is_file():
                with path.open("ab") as file:
                    file.write(data)
                made.append(path.read_bytes())

        with mock.patch.object(FolderDisk, "before_swap", edit):
            self.sync(one, other, made, excused)

    @invariant()
    def nothing_outside(self) -> None:
        assert {p.name for p in self.base.iterdir()} <= {f.name for f in self.folders}

    def teardown(self) -> None:
        try:
            if all(f.exists() for f in self.folders):
                before = set().union(*(contents(f) for f in self.folders))
                for _ in range(3):
                    for one, other in itertools.combinations(range(REPLICAS), 2):
                        asyncio.run(replicate(self.folders[one], self.folders[other]))
                    if len(live_roots(self.folders)) == 1:
                        break
                assert len(live_roots(self.folders)) == 1, "replicas did not converge"
                after = set().union(*(contents(f) for f in self.folders))
                assert before <= after, f"lost: {before - after}"
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


Replicas.TestCase.settings = settings(max_examples=60, stateful_step_count=20, deadline=None)
TestReplicas = Replicas.TestCase
