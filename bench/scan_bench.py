"""Scan benchmark: `backer scan` against b3sum and a `find` stat walk, on generated data.

Measures, each beside a reference measured in the same run:
  1. first scan of `large` (4 files of 256 MiB) against `b3sum` over the same files, in GB/s;
  2. first scan of `small` (20,000 files of 1-64 KiB) against b3sum, files/s and MB/s (b3sum
     gets the names through `xargs -0`, as in 1);
  3. rescan of `many` (100,000 files of 0-2 KiB, none changed) against
     `find DIR -printf '%s %T@\\n'`, the floor for walking and stat'ing;
  4. rescan of `many` with one file changed (same reference);
  5. first scan of `many` against b3sum; its peak RSS (against `backer --version`: the
     interpreter and imports alone) and index bytes per file (against b3sum's text listing).
Targets (from the scanner issue): a first scan at least half of b3sum's throughput; an unchanged
100k-file rescan under 2 s; peak RSS under 150 MB at 100k files. Each timed figure is the median
of 3 runs with the page cache warm; every backer run uses a fresh `--home` and a first scan starts
with no index. Both the `backer` process's wall time and the scan's own `seconds` are reported
(the difference is interpreter start-up and imports). Finally one first scan of each dataset
runs under `bench/threadprof.py` (cProfile in every thread) to show where the time goes. The
machine may be shared: each block waits up to 30 s for other processes to go quiet, and the
CPU they used anyway is reported beside the figures.

Run from the repository root with backer installed (`pip install -e .`) and b3sum on PATH:

    python bench/scan_bench.py                 # full run, rewrites "## Scan" in docs/benchmarks.md
    python bench/scan_bench.py --quick         # tiny smoke run (~10 s), writes no docs

Datasets are generated once (seeded, fixed old mtimes) and cached in `--workdir`
(default /tmp/backer-bench) with a manifest; later runs reuse them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    LARGE,
    MANY,
    OLD_MTIME,
    QUICK_LARGE,
    QUICK_MANY,
    QUICK_SMALL,
    SMALL,
    BenchError,
    CpuMeter,
    Dataset,
    DatasetSpec,
    ProfileSummary,
    Row,
    backer_command,
    describe,
    ensure_dataset,
    fresh_home,
    machine,
    markdown_table,
    median,
    summarise_profile,
    text_table,
    tool_version,
    utc_date,
    wait_for_quiet,
    warm_page_cache,
    write_doc_section,
)
from measure import (
    Measured,
    run_measured,
)

__all__ = ["main"]

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"

# Targets from the issue.
TARGET_THROUGHPUT_RATIO = 0.5  # of b3sum's
TARGET_RESCAN_SECONDS = 2.0
TARGET_RSS_BYTES = 150_000_000
# More than this many cores used by other processes makes the figures suspect: wait, or say so.
BUSY_CORES = 0.2


@dataclass(frozen=True, slots=True)
class Plan:
    large: DatasetSpec
    small: DatasetSpec
    many: DatasetSpec
    runs: int
    quiet_wait: float  # seconds to wait, before each block, for other processes to go quiet


FULL = Plan(
    large=LARGE,
    small=SMALL,
    many=MANY,
    runs=3,
    quiet_wait=30,
)
QUICK = Plan(
    large=QUICK_LARGE,
    small=QUICK_SMALL,
    many=QUICK_MANY,
    runs=1,
    quiet_wait=0,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark `backer scan` against b3sum and find.")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; writes no docs")
    parser.add_argument("--workdir", default="/tmp/backer-bench", help="datasets and scratch")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = ScanBench(workdir, plan).run()
    except BenchError as exc:
        print(f"scan_bench: {exc}", file=sys.stderr)
        return 1
    print()
    print(text_table(report.rows))
    print(report.verdict())
    print(f"other processes used {report.others:.2f} cores on average during the run")
    for note in report.notes:
        print(f"note: {note}")
    for name, summary in report.profiles:
        print(f"\nprofile, {name}: busy thread time {summary.busy:.2f} s: {summary.lead(6)}")
    if not args.quick:
        write_doc_section(DOC, "Scan", report.markdown(plan))
        print(f"\nwrote the Scan section of {DOC}")
    return 0


# -- the measurements ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScanRun:
    """One `backer scan --json` run: the process as measured, and what the scan said."""

    wall: float
    max_rss: int
    seconds: float
    files: int
    updated: int
    hashed_files: int
    hashed_bytes: int
    index_bytes: int
    problems: int  # skipped + unstable paths

    @classmethod
    def parse(cls, measured: Measured) -> ScanRun:
        lines = measured.stdout.decode().strip().splitlines()
        try:
            summary: dict[str, Any] = json.loads(lines[-1])
            return cls(
                wall=measured.wall,
                max_rss=measured.max_rss,
                seconds=float(summary["seconds"]),
                files=int(summary["files"]),
                updated=int(summary["updated"]),
                hashed_files=int(summary["hashed_files"]),
                hashed_bytes=int(summary["hashed_bytes"]),
                index_bytes=int(summary["index_bytes"]),
                problems=len(summary["skipped"]) + len(summary["unstable"]),
            )
        except (IndexError, ValueError, KeyError, TypeError) as exc:
            raise BenchError(f"`backer scan --json` printed no valid summary: {lines!r}") from exc


@dataclass(slots=True)
class Report:
    date: str
    others: float = 0.0  # average cores used by other processes during the run
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    profiles: list[tuple[str, ProfileSummary]] = field(default_factory=list)
    profile_commands: list[str] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)

    def verdict(self) -> str:
        """One sentence: which targets were missed, plainly, or that all were met."""
        missed = [r for r in self.rows if r.met == _yes(False)]
        met = [r for r in self.rows if r.met == _yes(True)]
        if not missed:
            return f"All {len(met)} target rows met."
        listed = "; ".join(f"{r.measure}: {r.ratio} of the reference ({r.target})" for r in missed)
        return f"Targets missed ({len(missed)} of {len(missed) + len(met)} rows): {listed}."

    def markdown(self, plan: Plan) -> str:
        b3sum = tool_version(["b3sum", "--version"])
        find = tool_version(["find", "--version"])
        parts = [
            f"Measured {self.date} on {machine()}; {b3sum}; {find}. Other processes on the "
            f"machine used {self.others:.2f} cores on average during the run (0 = idle).",
            "",
            "Command, from the repository root with backer installed (`pip install -e .`):",
            "`python bench/scan_bench.py` (datasets are generated once and cached in "
            "`--workdir`, default `/tmp/backer-bench`; `--quick` is the smoke run the tests "
            "use). b3sum gets the file names through `xargs -0`; the stat walk is "
            "`find DIR -printf '%s %T@\\n' > /dev/null`.",
            "",
            f"Datasets (seeded random bytes, every mtime {OLD_MTIME} so no file is racy): "
            f"{describe(plan.large)}; {describe(plan.small)}; {describe(plan.many)}. "
            f"Page cache warm for every timed run; each figure is the median of {plan.runs} "
            "runs; GB and MB are 10^9 and 10^6 bytes; ratio is backer / "
            "reference. *wall* is the `backer` process from start to exit (interpreter start-up "
            "and imports included), *scan s* the scan's own `seconds`. Each backer run has a "
            "fresh `--home`; a first scan starts with no `.backer/`.",
            "",
            markdown_table(self.rows),
            "",
            self.verdict(),
        ]
        if self.notes:
            parts += ["", *(f"- {note}" for note in self.notes)]
        parts += ["", "All runs, seconds:", "", *(f"- {line}" for line in self.raw)]
        parts += [
            "",
            "### Where the time goes",
            "",
            "Profiled once each with cProfile in every thread (`bench/threadprof.py`; plain "
            "`python -m cProfile` sees only the main thread, which just waits for the scan):",
            "",
            *(f"    {command}" for command in self.profile_commands),
            "",
            "Threads run in parallel, so their times add up to more than the wall time; a C "
            "call that releases the GIL (reads, fstat, blake3, SQLite) also counts, as its own "
            "time, the wait to take the GIL back. pyfastcdc (Cython) and the blake3 constructor "
            "are invisible to cProfile: their time is the own time of the Python function that "
            "calls them (`chunker.py`, `ids.py`). Read a profile with `python -m pstats FILE`.",
        ]
        for name, summary in self.profiles:
            parts += [
                "",
                f"**{name}**: busy thread time {summary.busy:.2f} s (plus {summary.waiting:.2f} s "
                f"waiting); most of it in {summary.lead()}.",
                "",
                summary.markdown(),
            ]
        return "\n".join(parts) + "\n"


class ScanBench:
    def __init__(self, workdir: Path, plan: Plan) -> None:
        self.workdir = workdir
        self.plan = plan
        self.report = Report(date=utc_date())
        b3sum = shutil.which("b3sum")
        if b3sum is None:
            raise BenchError("b3sum is not installed (Debian: apt-get install b3sum)")
        self.b3sum = b3sum
        self.block = CpuMeter()

    def run(self) -> Report:
        plan = self.plan
        meter = CpuMeter()
        large = ensure_dataset(self.workdir, plan.large, log=_log)
        small = ensure_dataset(self.workdir, plan.small, log=_log)
        many = ensure_dataset(self.workdir, plan.many, log=_log)
        self.first_scan(large)
        self.first_scan(small)
        self.many(many)
        for dataset in (large, small, many):
            self.profile(dataset)
        self.report.others = meter.others()
        if self.report.others > BUSY_CORES:
            self.report.notes.append(
                f"other processes used {self.report.others:.2f} cores on average during this "
                "run (per block in the list of runs): figures differ from an idle machine's"
            )
        return self.report

    # -- 1, 2: first scans against b3sum ---------------------------------------------------------

    def start_block(self, dataset: Dataset, *, warm: bool = True) -> None:
        """Warm the page cache, let the machine go quiet, and start counting others' CPU."""
        if warm:
            warm_page_cache(dataset.paths())
        if self.plan.quiet_wait:
            wait_for_quiet(self.plan.quiet_wait, busy=BUSY_CORES, log=_log)
        self.block = CpuMeter()

    def first_scans(self, dataset: Dataset) -> tuple[list[ScanRun], list[Measured]]:
        """`runs` first scans and as many b3sum runs over the same files, alternating."""
        self.start_block(dataset)
        scans, references = [], []
        for _ in range(self.plan.runs):
            references.append(self.b3sum_files(dataset, keep_output=False))
            run = self.scan(dataset, first=True)
            self.expect(f"first scan of {dataset.spec.name}", run, hashed=len(dataset.files))
            scans.append(run)
        self.raw(f"first scan {dataset.spec.name}", scans, references)
        return scans, references

    def first_scan(self, dataset: Dataset) -> None:
        scans, references = self.first_scans(dataset)
        ref_seconds = median([r.wall for r in references])
        what = f"first scan `{dataset.spec.name}` ({describe(dataset.spec, short=True)})"
        for label, seconds in _wall_and_scan(scans):
            ratio = ref_seconds / seconds
            self.report.rows.append(
                Row(
                    measure=f"{what}, {label}",
                    backer=_rate(dataset, seconds),
                    reference=f"b3sum {_rate(dataset, ref_seconds)}",
                    ratio=f"{ratio:.2f}x",
                    target=f">= {TARGET_THROUGHPUT_RATIO}x b3sum",
                    met=_yes(ratio >= TARGET_THROUGHPUT_RATIO),
                )
            )

    # -- 3, 4, 5: the many-small-files folder ----------------------------------------------------

    def many(self, dataset: Dataset) -> None:
        name, count = dataset.spec.name, len(dataset.files)
        rows = self.report.rows
        self.start_block(dataset)

        # 5: first scans with their peak RSS; the index of the last one is measured and kept.
        firsts, listings = [], []
        for _ in range(self.plan.runs):
            listings.append(self.b3sum_files(dataset, keep_output=True))
            run = self.scan(dataset, first=True)
            self.expect(f"first scan of {name}", run, hashed=count)
            firsts.append(run)
        first, listing = firsts[-1], listings[-1]
        with fresh_home(self.workdir) as home:
            idle = run_measured(backer_command(home, "--version"))
        self.raw(f"first scan {name}", firsts, listings)
        seconds = median([r.wall for r in firsts])
        ref_seconds = median([r.wall for r in listings])
        rss = max(r.max_rss for r in firsts)
        rows.append(
            Row(
                measure=f"first scan `{name}` ({describe(dataset.spec, short=True)}), wall",
                backer=f"{count / seconds:,.0f} files/s ({seconds:.2f} s)",
                reference=f"b3sum {count / ref_seconds:,.0f} files/s ({ref_seconds:.2f} s)",
                ratio=f"{ref_seconds / seconds:.2f}x",
            )
        )
        rows.append(
            Row(
                measure=f"peak RSS, first scan `{name}` (highest run)",
                backer=f"{rss / 1e6:.0f} MB",
                reference=f"`backer --version` {idle.max_rss / 1e6:.0f} MB",
                ratio=f"{rss / idle.max_rss:.2f}x",
                target=f"< {TARGET_RSS_BYTES / 1e6:.0f} MB",
                met=_yes(rss < TARGET_RSS_BYTES),
            )
        )
        per_file = first.index_bytes / max(first.files, 1)
        listing_per_file = len(listing.stdout) / count
        at_rest = sum(f.stat().st_size for f in (dataset.root / ".backer").glob("index.db*"))
        rows.append(
            Row(
                measure=f"index bytes per file after first scan `{name}`",
                backer=f"{per_file:,.0f} B ({first.index_bytes / 1e6:.1f} MB with WAL; "
                f"{at_rest / count:,.0f} B at rest after exit)",
                reference=f"b3sum listing {listing_per_file:,.0f} B",
                ratio=f"{per_file / listing_per_file:.2f}x",
            )
        )

        # 3: unchanged rescans against a stat walk.
        self.start_block(dataset, warm=False)
        rescans, walks = [], []
        for _ in range(self.plan.runs):
            walks.append(self.stat_walk(dataset))
            run = self.scan(dataset, first=False)
            self.expect(f"unchanged rescan of {name}", run, hashed=0, updated=0)
            rescans.append(run)
        self.raw(f"unchanged rescan {name}", rescans, walks)
        walk = median([w.wall for w in walks])
        for label, seconds in _wall_and_scan(rescans):
            rows.append(
                Row(
                    measure=f"rescan `{name}`, nothing changed, {label}",
                    backer=f"{seconds:.2f} s",
                    reference=f"find -printf stat walk {walk:.2f} s",
                    ratio=f"{seconds / walk:.1f}x",
                    target=f"< {TARGET_RESCAN_SECONDS:.0f} s (100k files)",
                    met=_yes(seconds < TARGET_RESCAN_SECONDS) if count >= 100_000 else "n/a",
                )
            )

        # 4: one file changed (appended to, with a new, old-enough mtime) per rescan.
        self.start_block(dataset, warm=False)
        changed = dataset.root / dataset.files[count // 2][0]
        original_size = changed.stat().st_size
        rescans = []
        try:
            for index in range(self.plan.runs):
                with changed.open("ab") as out:
                    out.write(b"appended by scan_bench\n")
                mtime = OLD_MTIME + 3600 * (index + 1)
                os.utime(changed, (mtime, mtime))
                run = self.scan(dataset, first=False)
                self.expect(f"one-change rescan of {name}", run, hashed=1, updated=1)
                rescans.append(run)
        finally:  # leave the cached dataset as generated
            with changed.open("r+b") as out:
                out.truncate(original_size)
            os.utime(changed, (OLD_MTIME, OLD_MTIME))
        self.raw(f"one-change rescan {name}", rescans, walks)
        for label, seconds in _wall_and_scan(rescans):
            rows.append(
                Row(
                    measure=f"rescan `{name}`, one file changed, {label}",
                    backer=f"{seconds:.2f} s",
                    reference=f"find -printf stat walk {walk:.2f} s",
                    ratio=f"{seconds / walk:.1f}x",
                )
            )

    # -- profiles --------------------------------------------------------------------------------

    def profile(self, dataset: Dataset) -> None:
        name = dataset.spec.name
        out = self.workdir / "profiles" / f"scan-{name}.prof"
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dataset.root / ".backer", ignore_errors=True)
        with fresh_home(self.workdir) as home:
            argv = [
                sys.executable,
                str(REPO / "bench" / "threadprof.py"),
                "-o",
                str(out),
                "-m",
                "backer",
                "--home",
                str(home),
                "scan",
                str(dataset.root),
                "--json",
            ]
            measured = run_measured(argv)
        run = ScanRun.parse(measured)
        self.expect(f"profiled first scan of {name}", run, hashed=len(dataset.files))
        self.report.profile_commands.append(
            f"python bench/threadprof.py -o {out} -m backer --home $(mktemp -d) scan "
            f"{dataset.root} --json"
        )
        summary = summarise_profile(out, REPO)
        label = (
            f"first scan `{name}` under the profiler ({measured.wall:.2f} s wall, "
            f"{run.seconds:.2f} s scan)"
        )
        self.report.profiles.append((label, summary))

    # -- running things --------------------------------------------------------------------------

    def scan(self, dataset: Dataset, *, first: bool) -> ScanRun:
        if first:
            shutil.rmtree(dataset.root / ".backer", ignore_errors=True)
        with fresh_home(self.workdir) as home:
            measured = run_measured(backer_command(home, "scan", str(dataset.root), "--json"))
        return ScanRun.parse(measured)

    def b3sum_files(self, dataset: Dataset, *, keep_output: bool) -> Measured:
        """b3sum over the dataset's files, named relative to its root, in argument batches."""
        names = b"".join(rel.encode() + b"\0" for rel, _ in dataset.files)
        return run_measured(
            ["xargs", "-0", self.b3sum],
            cwd=dataset.root,
            stdin=names,
            stdout="capture" if keep_output else "discard",
        )

    def stat_walk(self, dataset: Dataset) -> Measured:
        return run_measured(["find", str(dataset.root), "-printf", "%s %T@\\n"], stdout="discard")

    def expect(self, what: str, run: ScanRun, *, hashed: int, updated: int | None = None) -> None:
        """Note (and print) a scan that did other work than the measurement assumes."""
        problems = []
        if run.hashed_files != hashed:
            problems.append(f"read {run.hashed_files} files, expected {hashed}")
        if updated is not None and run.updated != updated:
            problems.append(f"updated {run.updated} entries, expected {updated}")
        if run.problems:
            problems.append(f"{run.problems} paths skipped or unstable")
        if problems:
            note = f"{what}: {'; '.join(problems)}"
            if note not in self.report.notes:
                self.report.notes.append(note)
                _log(f"WARNING {note}")

    def raw(self, what: str, scans: Sequence[ScanRun], references: Sequence[Measured]) -> None:
        line = (
            f"{what}: backer wall {_list(s.wall for s in scans)}, "
            f"scan s {_list(s.seconds for s in scans)}; "
            f"reference {_list(r.wall for r in references)}; "
            f"other processes {self.block.others():.2f} cores"
        )
        self.report.raw.append(line)
        _log(line)


# -- helpers -------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(message, flush=True)


def _yes(met: bool) -> str:
    return "yes" if met else "**no**"


def _wall_and_scan(scans: Sequence[ScanRun]) -> list[tuple[str, float]]:
    """The two times of a set of runs, as medians: the process's wall, the scan's own."""
    return [
        ("wall", median([s.wall for s in scans])),
        ("scan s", median([s.seconds for s in scans])),
    ]


def _rate(dataset: Dataset, seconds: float) -> str:
    """GB/s for a few large files; files/s and MB/s for many small ones."""
    size = dataset.total_bytes
    if len(dataset.files) <= 16:
        return f"{size / seconds / 1e9:.2f} GB/s ({seconds:.2f} s)"
    files = len(dataset.files)
    return f"{files / seconds:,.0f} files/s, {size / seconds / 1e6:,.0f} MB/s ({seconds:.2f} s)"


def _list(values: Iterable[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


if __name__ == "__main__":
    raise SystemExit(main())
