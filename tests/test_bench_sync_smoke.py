"""The sync benchmark still runs: `bench/sync_bench.py --quick` on tiny data, end to end (dataset
generation, `backer serve` and `backer sync`, the rsync daemon behind the counting relay, the
in-process sessions, tree verification, the profiler), so a change to the CLI, its JSON or the
sync API cannot quietly break the benchmark. It asserts that the run completes and prints its
table, never a timing."""

from __future__ import annotations

from pathlib import Path

from benchrun import run_quick


def test_sync_bench_quick_runs(tmp_path: Path) -> None:
    stdout = run_quick("sync_bench.py", tmp_path, timeout=120)
    header = "measure  "
    assert header in stdout, stdout
    table = stdout[stdout.index(header) :]
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
    assert "WARNING" not in stdout, "a run did other work than measured"
    assert "profile, initial sync" in stdout, stdout
