"""The hostile-node benchmark runs (short phases), so it cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "hostile_bench.py"


def test_hostile_bench_short_phases() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--seconds", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for row in ("| dashboard, worst answer", "| peak RSS of the node", "| exit on SIGTERM"):
        assert row in done.stdout, done.stdout
    offered = int(done.stdout.rsplit("bombs offered under attack: ", 1)[1].split()[0])
    assert offered > 0
