"""`bench/all.py` is the one command for docs/benchmarks.md: every section a script writes is
run by it (by default, or with --everything), and `--list` says what it would run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HAND_WRITTEN = {"Reproducing", "Side by side: where backer is behind, and why"}


def test_every_section_of_the_benchmarks_doc_is_written_by_a_step_of_all_py() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import all as one_command  # noqa: PLC0415 - bench/ is not a package
    finally:
        sys.path.remove(str(REPO / "bench"))
    doc = (REPO / "docs" / "benchmarks.md").read_text()
    sections = set(re.findall(r"^## (.+)$", doc, re.MULTILINE)) - HAND_WRITTEN
    steps = list(one_command.STEPS) + [step for step, _ in one_command.LEFT_OUT]
    assert sections == {step.section for step in steps}
    assert all((REPO / "bench" / step.script).is_file() for step in steps)


def test_the_listing_names_every_step() -> None:
    listing = subprocess.run(
        [sys.executable, "bench/all.py", "--list"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    for script in ("compare.py", "scan_bench.py", "encryption_bench.py", "node_bench.py"):
        assert script in listing
    assert "--everything" in listing
