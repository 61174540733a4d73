"""`backer demo` runs on a fresh machine with no arguments, converges, and cleans up."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_the_demo_converges_and_cleans_up(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "backer", "--home", str(tmp_path / "unused"), "demo"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={"TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for step in ("synced", "the edit reached", "deleted everywhere", "conflict: both versions"):
        assert step in out, out
    assert re.search(r"same root [0-9a-f]{16}", out), out
    assert "cleaned up" in out
    started = out.index("started laptop, desktop and server")
    found = re.findall(r"\] (laptop|desktop|server) found (laptop|desktop|server) by ", out)
    assert found and out.index(" found ") > started, out  # by name, after "started"
    assert "found a peer at" not in out and "127.0.0.1" not in out
    assert not list(tmp_path.glob("backer-demo-*"))  # nothing left behind
    assert not (tmp_path / "unused").exists()  # the user's home is not touched
