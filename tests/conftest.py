"""Shared fixtures. A skipped test fails the run: every test here must be able to run in CI."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from backer.index.store import IndexStore

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _skipped:
        terminalreporter.write_line(
            f"FAILED: {len(_skipped)} test(s) skipped; a test that cannot run must fail: "
            + ", ".join(_skipped),
            red=True,
        )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """An empty folder set up for backer (its `.backer/` index made)."""
    root = tmp_path / "folder"
    root.mkdir()
    IndexStore.open(root, create=True).close()
    return root


@pytest.fixture
def store(folder: Path) -> Iterator[IndexStore]:
    """The open index of `folder`."""
    with IndexStore.open(folder) as opened:
        yield opened


def folder_paths(root: Path) -> list[str]:
    """Every path under `root` but `.backer/`'s, relative and sorted: what a watcher would
    report after a pull wrote them all."""
    return sorted(
        os.path.relpath(os.path.join(top, name), root)
        for top, dirs, files in os.walk(root)
        for name in dirs + files
        if ".backer" not in os.path.join(top, name)
    )
