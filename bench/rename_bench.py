"""The `mixed` tree's directory rename (500 files) alone, for backer only: the seconds, CPU and
bytes on the wire of each run, measured as `compare.py` measures them (two `backer run`
processes, from the rename until the copy holds it and both are done), without the other
tools and trees that make a full comparison take an hour.

    python bench/rename_bench.py            # 3 runs on the full `mixed` tree
    python bench/rename_bench.py --quick    # the quick tree's 50-file album
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from common import BenchError
from compare_changes import MUTATIONS
from compare_data import FULL_TREES, QUICK_TREES, Tree
from compare_tools import BackerSession

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick tree (50 files)")
    parser.add_argument("--runs", type=int, default=3, help="renames, one after another")
    parser.add_argument("--workdir", default="/tmp/backer-bench", help="datasets and scratch")
    args = parser.parse_args(argv)
    trees = QUICK_TREES if args.quick else FULL_TREES
    spec = next(t for t in trees if t.name.endswith("mixed"))
    workdir = Path(args.workdir).resolve()
    tree = Tree.ensure(workdir, spec)
    base = workdir / "rename"
    rename = MUTATIONS["rename"]
    seconds, wire, cpu = [], [], []
    try:
        with BackerSession(tree, base) as session:
            initial = session.initial()
            print(f"initial sync: {initial.seconds:.2f} s, wire {initial.wire:,} B")
            for run in range(args.runs):
                change = rename.plan(tree, session.source, run)
                phase = session.propagate(change)
                print(
                    f"{change.label}: {phase.seconds:.3f} s, CPU {phase.cpu:.2f} s, "
                    f"wire {phase.wire:,} B"
                )
                seconds.append(phase.seconds)
                wire.append(phase.wire)
                cpu.append(phase.cpu)
    except BenchError as exc:
        print(f"rename_bench: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(
        f"median of {args.runs}: {statistics.median(seconds):.3f} s, "
        f"CPU {statistics.median(cpu):.2f} s, wire {statistics.median(wire):,.0f} B"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
