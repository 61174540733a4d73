"""The scan benchmark still runs: `bench/scan_bench.py --quick` on tiny data, end to end (dataset
generation, backer, b3sum, find, the profiler), so a change to the CLI or its JSON cannot quietly
break the benchmarks. It asserts that the run completes and prints its table, never a timing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_scan_bench_quick_runs(tmp_path: Path) -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    before = doc.read_text() if doc.exists() else None
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "scan_bench.py"),
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
    for measure in ("first scan `quick-large`", "first scan `quick-small`", "peak RSS", "rescan"):
        assert measure in table, table
    assert "WARNING" not in result.stdout, "the scans did other work than measured"
    assert (doc.read_text() if doc.exists() else None) == before, "--quick must not write docs"
