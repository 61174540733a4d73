"""Running a benchmark script's smoke run (`bench/NAME.py --quick`) the way CI does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"


def run_quick(script: str, workdir: Path, *extra: str, timeout: float) -> str:
    """`python bench/SCRIPT --quick --workdir WORKDIR EXTRA...`; its stdout. Fails with the
    end of its output if it fails, and if it wrote the docs (a --quick run must not)."""
    before = DOC.read_text() if DOC.exists() else None
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / script),
            "--quick",
            *extra,
            "--workdir",
            str(workdir),
        ],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (DOC.read_text() if DOC.exists() else None) == before, "--quick must not write docs"
    return result.stdout
