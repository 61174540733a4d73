"""The side-by-side benchmark still runs: `bench/compare.py --quick` on tiny trees, end to end
(backer's two `backer run` processes, two Syncthing instances, the rsync daemon, the cp and
b3sum floors, every change, the edit right after each initial sync, the copy checks, py-spy on
the slow cases), so a change to the CLI, its events or a tool's setup cannot quietly break it. It
asserts that every tool and every change has figures and that every copy was verified, never a
timing."""

from __future__ import annotations

import json
from pathlib import Path

from benchrun import run_quick

DAEMONS = ("backer", "Syncthing", "rsync")
FLOORS = ("cp -a", "b3sum")


def test_compare_quick_runs(tmp_path: Path) -> None:
    stdout = run_quick("compare.py", tmp_path, "--json", timeout=300)
    report = json.loads(stdout.strip().splitlines()[-1])
    cases = {case["key"]: case for case in report["cases"]}
    trees = ("quick-small", "quick-large", "quick-mixed", "quick-source", "quick-many")
    changes = ("append quick-large", "edit quick-large", "churn quick-mixed", "rename quick-mixed")
    right_after = {f"edit-after-initial {tree}" for tree in trees}
    assert set(cases) == {f"initial {tree}" for tree in trees} | set(changes) | right_after
    for key, case in cases.items():
        tools = report["phases"][key]
        expected = {*DAEMONS, *FLOORS} if case["initial"] else set(DAEMONS)
        assert set(tools) == expected, (key, sorted(tools))
        for tool, runs in tools.items():
            assert runs and all(run["seconds"] > 0 for run in runs), (key, tool)
            if tool in DAEMONS:
                # CPU comes in clock ticks (10 ms): a quick change may take less than one.
                assert all(run["wire"] > 0 and run["cpu"] >= 0 for run in runs), (key, tool)
    # The peak RSS of each node (source and copy) of a daemon, in the many-file tree too.
    for tool in ("backer", "Syncthing"):
        (run,) = report["phases"]["initial quick-many"][tool]
        assert len(run["rss"]) == 2 and min(run["rss"]) > 0, (tool, run)
    # Every daemon's copy after its initial sync (and the edit right after it) and after every
    # other change, and cp's copies.
    verified = report["verified"]
    assert len(verified) == 3 * (len(trees) + len(changes)) + len(trees), verified
    for tool in (*DAEMONS, "cp -a"):
        assert any(line.startswith(f"{tool}'s copy") for line in verified), tool
    slow = [line for line in report["behind"] if line.startswith("behind on seconds")]
    if slow:
        assert report["profiles"], "backer was slower somewhere, but nothing was profiled"
    assert "the run took" in stdout
