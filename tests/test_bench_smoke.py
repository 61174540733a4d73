"""The scan benchmark still runs: `bench/scan_bench.py --quick` on tiny data, end to end (dataset
generation, backer, b3sum, find, the profiler), so a change to the CLI or its JSON cannot quietly
break the benchmarks. It asserts that the run completes and prints its table, never a timing."""

from __future__ import annotations

from pathlib import Path

from benchrun import run_quick


def test_scan_bench_quick_runs(tmp_path: Path) -> None:
    stdout = run_quick("scan_bench.py", tmp_path, timeout=120)
    header = "measure  "
    assert header in stdout, stdout
    table = stdout[stdout.index(header) :]
    for measure in ("first scan `quick-large`", "first scan `quick-small`", "peak RSS", "rescan"):
        assert measure in table, table
    assert "WARNING" not in stdout, "the scans did other work than measured"
