"""The sync benchmark still runs: `bench/sync_bench.py --quick` on tiny data, end to end (dataset
generation, `backer serve` and `backer sync`, the rsync daemon behind the counting relay, the
in-process sessions, tree verification, the profiler), so a change to the CLI, its JSON or the
sync API cannot quietly break the benchmark. It asserts that the run completes and prints its
table, never a timing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sync_bench_quick_runs(tmp_path: Path) -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    before = doc.read_text() if doc.exists() else None
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "sync_bench.py"),
            "--quick",
            "--workdir",
            str(tmp_path),
        ],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    header = "measure  "
    assert header in result.stdout, result.stdout
    table = result.stdout[result.stdout.index(header) :]
    assert table.splitlines()[0].split() == ["measure", "backer", "rsync", "ratio", "target", "met"]
    for measure in (
        "initial sync `quick-small`",
        "initial sync `quick-large`",
        "4 KiB edit",
        "1-byte append",
        "nothing changed, wire bytes",
        "one file changed, session alone",
    ):
        assert measure in table, table
    assert "WARNING" not in result.stdout, "a run did other work than measured"
    assert "profile, initial sync" in result.stdout, result.stdout
    assert (doc.read_text() if doc.exists() else None) == before, "--quick must not write docs"
