"""The side-by-side benchmark still runs: `bench/compare.py --quick` on tiny trees, end to end
(backer's two `backer run` processes, two Syncthing instances, the rsync daemon, the cp and
b3sum floors, every change, the copy checks, py-spy on the slow cases), so a change to the CLI,
its events or a tool's setup cannot quietly break it. It asserts that every tool and every
change has figures and that every copy was verified, never a timing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DAEMONS = ("backer", "Syncthing", "rsync")
FLOORS = ("cp -a", "b3sum")


def test_compare_quick_runs(tmp_path: Path) -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    before = doc.read_text() if doc.exists() else None
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "compare.py"),
            "--quick",
            "--json",
            "--workdir",
            str(tmp_path),
        ],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    cases = {case["key"]: case for case in report["cases"]}
    trees = ("quick-small", "quick-large", "quick-mixed")
    changes = ("append quick-large", "edit quick-large", "churn quick-mixed", "rename quick-mixed")
    assert set(cases) == {f"initial {tree}" for tree in trees} | set(changes)
    for key, case in cases.items():
        tools = report["phases"][key]
        expected = {*DAEMONS, *FLOORS} if case["initial"] else set(DAEMONS)
        assert set(tools) == expected, (key, sorted(tools))
        for tool, runs in tools.items():
            assert runs and all(run["seconds"] > 0 for run in runs), (key, tool)
            if tool in DAEMONS:
                assert all(run["wire"] > 0 and run["cpu"] > 0 for run in runs), (key, tool)
    # Every daemon's copy after its initial sync and after every change, and cp's copies.
    verified = report["verified"]
    assert len(verified) == 3 * (len(trees) + len(changes)) + len(trees), verified
    for tool in (*DAEMONS, "cp -a"):
        assert any(line.startswith(f"{tool}'s copy") for line in verified), tool
    slow = [line for line in report["behind"] if line.startswith("behind on seconds")]
    if slow:
        assert report["profiles"], "backer was slower somewhere, but nothing was profiled"
    assert "the run took" in result.stdout
    assert (doc.read_text() if doc.exists() else None) == before, "--quick must not write docs"
