"""Sync benchmark: `backer serve` + `backer sync` against `rsync -a` to an rsync daemon, on
loopback.

Measures, each beside rsync measured in the same run on the same data:
  1. initial sync of `small` (20,000 files of 1-64 KiB) from an unindexed source into an empty
     destination, timed from start to a complete copy: for backer from starting `backer serve`
     (its start-up and first scan included) until `backer sync` exits; for rsync the
     `rsync -a` client run. Every copy is verified afterwards (outside the timing) by
     comparing the trees, with a BLAKE3 hash of every file;
  2. the same for `large` (4 files of 256 MiB);
  3. a 4 KiB edit in the middle of one 256 MiB file, and 4. a 1-byte append to it, on copies
     already in sync and indexed on both sides: bytes on the wire and seconds;
  5. reconcile of an unchanged 100,000-file folder (`many`), both sides in sync and indexed:
     bytes on the wire and time of one `backer sync` run, and the session alone; 6. the same
     with one file changed.
Wire bytes are counted the same way for both tools: the client connects to a counting TCP relay
on 127.0.0.1 (this process, both directions) that forwards to the server or the rsync daemon.
rsync's own `--stats` totals are reported beside them. The timed runs of 1 and 2 connect
directly (a relay in Python would add its own CPU time to both tools on a 2-core machine); their
byte figures are the tools' own (backer's `bytes_fetched`, rsync's `--stats`).

Targets (from the replication issue): large files at least as fast as rsync; small files
within 2.5x rsync's time; a 4 KiB edit of a 256 MiB file under 150 kB on the wire and a 1-byte
append under 64 kB, chunk lists included; one change in 100k files under 64 kB and 50 ms.
After the measurements, every case that missed a target runs once more with each backer process
under `bench/threadprof.py` (cProfile in every thread), and the report says where the time goes.

Run from the repository root with backer installed (`pip install -e .`) and rsync on PATH:

    python bench/sync_bench.py            # full run, rewrites "## Sync" in docs/benchmarks.md
    python bench/sync_bench.py --quick    # tiny smoke run (~10 s), writes no docs

Datasets are the scan benchmark's (`common.ensure_dataset`, cached in `--workdir`, default
/tmp/backer-bench); the two indexed copies of `many` used by 5 and 6 are kept there as well.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pstats
import random
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from common import (
    KIB,
    LARGE,
    MANY,
    MIB,
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
    grid_markdown,
    grid_text,
    machine,
    median,
    revision,
    summarise_profile,
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
from rsyncd import RsyncDaemon
from trees import (
    FileSig,
    TreeDiff,
    tree_signatures,
)

from backer.config import Home
from backer.index.chunker import chunk_stream
from backer.index.entry import chunk_groups, group_hash, iter_chunks
from backer.sync.peer import SessionResult
from backer.sync.replica import Replica
from backer.sync.replicate import PLAIN_FOLDER, sync_stream

__all__ = ["main"]

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
THREADPROF = REPO / "bench" / "threadprof.py"
HEADER = ("measure", "backer", "rsync", "ratio", "target", "met")

# Targets from the issue.
TARGET_LARGE_RATIO = 1.0  # backer time / rsync time
TARGET_SMALL_RATIO = 2.5
TARGET_EDIT_BYTES = 150_000
TARGET_APPEND_BYTES = 64_000
TARGET_RECONCILE_BYTES = 64_000
TARGET_RECONCILE_SECONDS = 0.050
EDIT_SIZE = 4 * KIB
# More than this many cores used by other processes makes the figures suspect: wait, or say so.
BUSY_CORES = 0.2
# Above this share of all cores busy with backer's two processes, a sync is said to be CPU-bound.
CPU_BOUND = 0.6
SERVER_START_LIMIT = 600.0  # seconds for `backer serve` to scan and listen
_T = TypeVar("_T")
# A measured case, to run again under the profiler if it missed a target: (kind, dataset name),
# kind one of "initial", "edit", "append", "reconcile".
Case = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Plan:
    large: DatasetSpec
    small: DatasetSpec
    many: DatasetSpec
    runs: int
    quiet_wait: float  # seconds to wait, before each block, for other processes to go quiet
    full: bool  # whether the targets, stated for the full sizes, apply


# The scan benchmark's datasets (same specs, so the cached data is shared).
FULL = Plan(
    large=LARGE,
    small=SMALL,
    many=MANY,
    runs=3,
    quiet_wait=15,
    full=True,
)
QUICK = Plan(
    large=QUICK_LARGE,
    small=QUICK_SMALL,
    many=QUICK_MANY,
    runs=1,
    quiet_wait=0,
    full=False,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark backer replication against rsync.")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; writes no docs")
    parser.add_argument("--workdir", default="/tmp/backer-bench", help="datasets and scratch")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # A shell starts background jobs with SIGINT ignored, and children inherit that: the servers
    # are stopped with SIGINT (so that a profiled one writes its profile), so let it through.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        report = SyncBench(workdir, plan).run()
    except BenchError as exc:
        print(f"sync_bench: {exc}", file=sys.stderr)
        return 1
    print()
    print(_text_table(report.rows))
    print(report.verdict())
    print(
        f"other processes used {report.others:.2f} cores on average during the run "
        f"(load average at the start: {report.load})"
    )
    for note in report.notes:
        print(f"note: {note}")
    for profile in report.profiles:
        print(f"\n{profile.summary_line()}")
    if not args.quick:
        write_doc_section(DOC, "Sync", report.markdown(plan))
        print(f"\nwrote the Sync section of {DOC}")
    return 0


# -- what a run produced ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SyncOutcome:
    """What `backer sync --json` printed."""

    in_sync: bool
    reason: str
    files: int
    bytes_fetched: int
    bytes_local: int
    errors: int

    @classmethod
    def parse(cls, measured: Measured) -> SyncOutcome:
        lines = measured.stdout.decode().strip().splitlines()
        try:
            summary: dict[str, Any] = json.loads(lines[-1])
            return cls(
                in_sync=bool(summary["in_sync"]),
                reason=str(summary["reason"]),
                files=int(summary["files"]),
                bytes_fetched=int(summary["bytes_fetched"]),
                bytes_local=int(summary["bytes_local"]),
                errors=len(summary["errors"]),
            )
        except (IndexError, ValueError, KeyError, TypeError) as exc:
            raise BenchError(f"`backer sync --json` printed no valid summary: {lines!r}") from exc


@dataclass(frozen=True, slots=True)
class Traffic:
    """Payload bytes that crossed the counting relay, by direction."""

    up: int  # client to server
    down: int  # server to client
    connections: int
    lingered: int = 0  # connections the server kept open after the client had left

    @property
    def total(self) -> int:
        return self.up + self.down


@dataclass(frozen=True, slots=True)
class Cpu:
    user: float = 0.0
    system: float = 0.0

    @property
    def total(self) -> float:
        return self.user + self.system

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.user - other.user, self.system - other.system)

    def __str__(self) -> str:
        return f"{self.total:.1f} s ({self.system:.1f} s of it in the kernel)"


@dataclass(frozen=True, slots=True)
class Run:
    """One timed run of either tool."""

    seconds: float
    wire: Traffic | None = None  # None: not relayed
    app_bytes: int = 0  # backer: bytes_fetched; rsync: --stats total
    detail: str = ""  # for the list of runs
    cpu: Cpu = Cpu()  # CPU time of `backer sync`, where measured
    server_cpu: Cpu = Cpu()  # and of `backer serve`
    scan: float = 0.0  # seconds of the client's scan before an in-process session


@dataclass(slots=True)
class CaseProfile:
    """One case run again with each backer process under the profiler."""

    case: str
    wall: float
    server: ProfileSummary
    client: ProfileSummary
    facts: list[str]
    commands: list[str]

    def summary_line(self) -> str:
        return (
            f"profile, {self.case} ({self.wall:.2f} s under the profiler): "
            f"server busy {self.server.busy:.2f} s: {self.server.lead(4)}; "
            f"client busy {self.client.busy:.2f} s: {self.client.lead(4)}"
        )


@dataclass(slots=True)
class Report:
    date: str
    load: str
    others: float = 0.0
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    missed: list[Case] = field(default_factory=list)  # cases with a row that missed its target
    profiles: list[CaseProfile] = field(default_factory=list)

    def add(self, case: Case, row: Row) -> None:
        self.rows.append(row)
        if row.met == _yes(False) and case not in self.missed:
            self.missed.append(case)

    def verdict(self) -> str:
        missed = [r for r in self.rows if r.met == _yes(False)]
        met = [r for r in self.rows if r.met == _yes(True)]
        if not missed and not met:
            return "No target applies at these sizes (the targets are for the full run's)."
        if not missed:
            return f"All {len(met)} target rows met."
        listed = "; ".join(f"{r.measure}: {r.backer} ({r.target})" for r in missed)
        return f"Targets missed ({len(missed)} of {len(missed) + len(met)} rows): {listed}."

    def markdown(self, plan: Plan) -> str:
        rsync = " ".join(tool_version(["rsync", "--version"]).split())
        backer = (
            f"{tool_version(backer_command(Path('/nonexistent'), '--version'))} {revision(REPO)}"
        )
        parts = [
            f"Measured {self.date} on {machine()}; {backer}; {rsync}. Load average at the "
            f"start: {self.load}; other processes on the machine used {self.others:.2f} cores "
            "on average during the run (0 = idle).",
            "",
            "Command, from the repository root with backer installed (`pip install -e .`):",
            "`python bench/sync_bench.py` (datasets are the scan benchmark's, generated once "
            "and cached in `--workdir`, default `/tmp/backer-bench`; `--quick` is the smoke run "
            "the tests use).",
            "",
            "How: both tools run on this machine over 127.0.0.1. backer: `backer --home H1 "
            "serve SRC --listen 127.0.0.1:0` and `backer --home H2 sync DST 127.0.0.1:PORT "
            "--json`, each side with its own home. rsync: `rsync -a --stats SRC/ "
            "rsync://127.0.0.1:PORT/MODULE/` to `rsync --daemon --no-detach` (module on the "
            "destination, `use chroot = no`). *Initial sync*: the source has no index and the "
            "destination is empty; backer's time runs from starting `backer serve` (its "
            "start-up and first scan, until it prints `serving`) to the exit of `backer sync`; "
            "every copy is then checked file by file (BLAKE3 of the contents, size, mode, "
            "mtime), outside the timing. *Edit, append, reconcile*: both sides already in sync "
            "and indexed (the second copy is made with `cp -a`, index included, then "
            "rescanned: the state a finished sync leaves); the change is made on the client's "
            "side (backer: the folder of `backer sync`, which the server then pulls from; "
            "rsync: the source). *Wire* bytes are counted by a TCP relay on 127.0.0.1 in the "
            "benchmark process, both directions, for both tools; rsync's own `--stats` total is "
            "given beside it. The timed initial syncs connect directly; their byte figures are "
            "each tool's own count. kB is 1,000 bytes. *Session, in-process*: `backer sync`'s "
            "own steps run in the benchmark process with the Python API (`Replica.scan`, then "
            "`sync_stream` to the running `backer serve`), the session timed alone. *Session "
            "alone*: both replicas in the benchmark process joined over loopback TCP, neither "
            "scanning, so only the protocol and the pull are timed. Page cache warm; each "
            f"figure is the median of {plan.runs} runs; ratio is backer / rsync.",
            "",
            f"Datasets: {describe(plan.small)}; {describe(plan.large)}; "
            f"{describe(plan.many)} (seeded random bytes, mtimes {OLD_MTIME}).",
            "",
            _markdown_table(self.rows),
            "",
            self.verdict(),
        ]
        if self.notes:
            parts += ["", *(f"- {note}" for note in self.notes)]
        parts += ["", "All runs:", "", *(f"- {line}" for line in self.raw)]
        parts += ["", "### Where the time goes", ""]
        if not self.profiles:
            parts.append("Every target was met; nothing was profiled.")
        else:
            parts += [
                "Each case that missed a target ran once more with every backer process under "
                "`bench/threadprof.py` (cProfile in every thread; thread times add up, and a C "
                "call that releases the GIL also counts the wait to take it back; so does "
                "waiting for a lock taken with `with`, which cProfile does not see: the index's "
                "lock counts in the own time of `IndexStore.get` and `find_chunks`). Read a "
                "profile with `python -m pstats FILE`.",
            ]
            for profile in self.profiles:
                parts += [
                    "",
                    f"**{profile.case}** ({profile.wall:.2f} s under the profiler). "
                    + " ".join(profile.facts),
                    "",
                    *(f"    {command}" for command in profile.commands),
                    "",
                    f"Server (`backer serve`): busy thread time {profile.server.busy:.2f} s "
                    f"(plus {profile.server.waiting:.2f} s waiting); most of it in "
                    f"{profile.server.lead()}.",
                    "",
                    profile.server.markdown(owners=6, functions=8),
                    "",
                    f"Client (`backer sync`): busy thread time {profile.client.busy:.2f} s "
                    f"(plus {profile.client.waiting:.2f} s waiting); most of it in "
                    f"{profile.client.lead()}.",
                    "",
                    profile.client.markdown(owners=6, functions=8),
                ]
        return "\n".join(parts) + "\n"


# -- the benchmark -------------------------------------------------------------------------------


class SyncBench:
    def __init__(self, workdir: Path, plan: Plan) -> None:
        self.workdir = workdir
        self.plan = plan
        self.base = workdir / "sync"
        self.profiles = workdir / "profiles"
        load = os.getloadavg()
        self.report = Report(date=utc_date(), load=" ".join(f"{x:.2f}" for x in load))
        if shutil.which("rsync") is None:
            raise BenchError("rsync is not installed (Debian: apt-get install rsync)")
        self.block = CpuMeter()
        self.step = 0  # makes every edited mtime new
        self.source_trees: dict[Path, dict[str, FileSig]] = {}
        self.explain: dict[Case, str] = {}  # measured figures that explain a case's profile
        self.profiled: dict[str, str] = {}  # side -> the last profiled command, for the report

    def run(self) -> Report:
        plan = self.plan
        meter = CpuMeter()
        small = ensure_dataset(self.workdir, plan.small, log=_log)
        large = ensure_dataset(self.workdir, plan.large, log=_log)
        many = ensure_dataset(self.workdir, plan.many, log=_log)
        self.base.mkdir(parents=True, exist_ok=True)
        modules = {
            "initial": self.base / "initial-rsync",
            "edit": self.base / "edit" / "rsync-dst",
            "reconcile": self.base / "reconcile" / "rsync-dst",
        }
        with RsyncDaemon(self.base, modules) as daemon:
            self.rsync = daemon
            self.initial(small, target=TARGET_SMALL_RATIO)
            self.initial(large, target=TARGET_LARGE_RATIO)
            self.edits(large)
            self.reconcile(many)
            datasets = {d.spec.name: d for d in (small, large, many)}
            for kind, name in self.report.missed if plan.full else [("initial", small.spec.name)]:
                self.profile(kind, datasets[name])
        self.report.others = meter.others()
        if self.report.others > BUSY_CORES:
            self.report.notes.append(
                f"other processes used {self.report.others:.2f} cores on average during this "
                "run (per block in the list of runs): figures differ from an idle machine's"
            )
        return self.report

    # -- 1, 2: initial sync into an empty folder ---------------------------------------------

    def initial(self, dataset: Dataset, *, target: float) -> None:
        name = dataset.spec.name
        # Every run writes a new folder; all are removed before and after the block, not between
        # runs (freeing 1 GB just before a timed run slows that run's writes).
        self.clear_initial()
        self.start_block([dataset])
        backers: list[Run] = []
        rsyncs: list[Run] = []
        tools: list[tuple[list[Run], Callable[[Dataset, str], Run]]] = [
            (rsyncs, self.rsync_initial),
            (backers, self.backer_initial),
        ]
        for index in range(self.plan.runs):
            # Alternate which tool goes first, so neither always follows the other's writes.
            for runs, measure in tools if index % 2 == 0 else tools[::-1]:
                runs.append(measure(dataset, f"run{index}"))
        self.clear_initial()
        self.raw(f"initial {name}", backers, rsyncs)
        seconds = median([r.seconds for r in backers])
        reference = median([r.seconds for r in rsyncs])
        ratio = seconds / reference
        what = f"initial sync `{name}` ({describe(dataset.spec, short=True)})"
        self.report.add(
            ("initial", name),
            Row(
                measure=f"{what}, seconds",
                backer=f"{_rate(dataset, seconds)}",
                reference=f"{_rate(dataset, reference)}",
                ratio=f"{ratio:.2f}x",
                target=f"<= {target:g}x rsync",
                met=_yes(ratio <= target) if self.plan.full else "n/a",
            ),
        )
        typical = sorted(backers, key=lambda r: r.seconds)[len(backers) // 2]
        cores = os.cpu_count() or 1
        busy = (typical.cpu.total + typical.server_cpu.total) / (typical.seconds * cores)
        self.explain[("initial", name)] = (
            f"Measured without the profiler (the median run, {typical.seconds:.1f} s): "
            f"`backer sync` used {typical.cpu} of CPU and `backer serve` "
            f"{typical.server_cpu} (its first scan included), so the two kept the "
            f"{cores} cores {100 * busy:.0f} % busy"
            + (
                ": the sync is bound by CPU, not by waiting on the disk or the network."
                if busy > CPU_BOUND
                else "."
            )
        )
        self.report.add(
            ("initial", name),
            Row(
                measure=f"{what}, bytes sent+received (own count)",
                backer=f"{_kb(backers[-1].app_bytes)} fetched",
                reference=f"{_kb(rsyncs[-1].app_bytes)} (--stats)",
                ratio=f"{backers[-1].app_bytes / max(rsyncs[-1].app_bytes, 1):.2f}x",
            ),
        )

    def clear_initial(self) -> None:
        """Remove the copies of the initial syncs, and let the disk settle."""
        for copies in (self.base / "initial-backer", self.rsync.modules["initial"]):
            _fresh_dir(copies)
        os.sync()

    def backer_initial(self, dataset: Dataset, run: str, *, profile: str | None = None) -> Run:
        dest = self.base / "initial-backer" / run
        _fresh_dir(dest)
        shutil.rmtree(dataset.root / ".backer", ignore_errors=True)
        os.sync()  # the previous run's writes go to disk outside the timing
        with fresh_home(self.workdir) as server_home, fresh_home(self.workdir) as client_home:
            serve = ["serve", str(dataset.root), "--listen", "127.0.0.1:0"]
            before = _children_cpu()
            with BackerServer(
                self.backer(server_home, *serve, profile=profile, side="server")
            ) as s:
                sync = ["sync", str(dest), f"127.0.0.1:{s.port}", "--json"]
                client = run_measured(self.backer(client_home, *sync, profile=profile))
                client_cpu = _children_cpu()
            server_cpu = _children_cpu() - client_cpu
            client_cpu -= before
        outcome = SyncOutcome.parse(client)
        if not outcome.in_sync or outcome.files != len(dataset.files) or outcome.errors:
            raise BenchError(f"initial sync of {dataset.spec.name} went wrong: {outcome}")
        self.verify(dataset.root, dest, f"backer's copy of {dataset.spec.name}")
        return Run(
            seconds=s.ready + client.wall,
            app_bytes=outcome.bytes_fetched,
            detail=f"serve ready {s.ready:.2f} + sync {client.wall:.2f}; CPU sync "
            f"{client_cpu.total:.1f}, serve {server_cpu.total:.1f}",
            cpu=client_cpu,
            server_cpu=server_cpu,
        )

    def rsync_initial(self, dataset: Dataset, run: str) -> Run:
        dest = self.rsync.modules["initial"] / run
        _fresh_dir(dest)
        os.sync()
        measured, stats = self.rsync.push(dataset.root, f"initial/{run}", self.rsync.port)
        self.verify(dataset.root, dest, f"rsync's copy of {dataset.spec.name}")
        return Run(seconds=measured.wall, app_bytes=stats.total)

    # -- 3, 4: a small edit and an append in one large file ------------------------------------

    def edits(self, large: Dataset) -> None:
        source = large.paths()[0]
        name = source.name
        size = source.stat().st_size
        edit_dir = self.base / "edit"
        rsync_src, rsync_dst = edit_dir / "rsync-src", self.rsync.modules["edit"]
        self.start_block([large])
        with fresh_home(self.workdir) as home_a, fresh_home(self.workdir) as home_b:
            pair = Pair(
                a=edit_dir / "backer-a", b=edit_dir / "backer-b", home_a=home_a, home_b=home_b
            )
            for folder in (pair.a, pair.b, rsync_src, rsync_dst):
                _fresh_dir(folder)
            for folder in (pair.a, rsync_src, rsync_dst):
                shutil.copy2(source, folder / name)
            self.indexed_copy(pair)
            _, stats = self.rsync.push(rsync_src, "edit", self.rsync.port)
            if stats.literal:
                raise BenchError(f"the rsync copies of {name} differ before the edits: {stats}")
            for append in (False, True):
                self.edit_block(pair, rsync_src, name, size, append=append, case=large.spec.name)
        self.verify(rsync_src, rsync_dst, "rsync's edited copy")
        for folder in (pair.a, pair.b, rsync_src, rsync_dst):
            _fresh_dir(folder)  # 1 GB of copies, made anew by every run

    def edit_block(
        self, pair: Pair, rsync_src: Path, name: str, size: int, *, append: bool, case: str
    ) -> None:
        """`runs` edits (or appends) of file `name`, each followed by a sync with either tool."""
        what = "1-byte append to" if append else f"{EDIT_SIZE // KIB} KiB edit in the middle of"
        a, b, home_a, home_b = pair.a, pair.b, pair.home_a, pair.home_b
        backers, rsyncs = [], []
        serve = ["serve", str(a), "--listen", "127.0.0.1:0"]
        with BackerServer(self.backer(home_a, *serve)) as server, Relay(server.port) as relay:
            self.settle(b, home_b, relay, f"the copies of {name}")
            for _ in range(self.plan.runs):
                self.step += 1
                rng = random.Random(f"edit:{self.step}")
                change = rng.randbytes(1 if append else EDIT_SIZE)
                mtime = OLD_MTIME + 3600 * self.step
                for folder in (b, rsync_src):
                    _change(folder / name, change, None if append else size // 2, mtime)
                sync = ["sync", str(b), f"127.0.0.1:{relay.port}", "--json"]
                measured = run_measured(self.backer(home_b, *sync))
                outcome = SyncOutcome.parse(measured)
                if not outcome.in_sync:
                    raise BenchError(f"the {what} {name} did not sync: {outcome}")
                backers.append(Run(seconds=measured.wall, wire=relay.take()))
                with Relay(self.rsync.port) as rsync_relay:
                    rsync_run, stats = self.rsync.push(rsync_src, "edit", rsync_relay.port)
                    rsyncs.append(
                        Run(seconds=rsync_run.wall, wire=rsync_relay.take(), app_bytes=stats.total)
                    )
        self.verify(b, a, f"backer's copies after the {what} {name}")
        label = "append" if append else "edit"
        self.raw(f"{label} {name}", backers, rsyncs)
        target = TARGET_APPEND_BYTES if append else TARGET_EDIT_BYTES
        full_size = self.plan.full and size >= 256 * MIB
        wire = int(median([r.wire.total for r in backers if r.wire]))
        reference = int(median([r.wire.total for r in rsyncs if r.wire]))
        stats_total = int(median([r.app_bytes for r in rsyncs]))
        what = f"{what} a {size / MIB:g} MiB file"
        self.report.add(
            (label, case),
            Row(
                measure=f"{what}, wire bytes",
                backer=_kb(wire),
                reference=f"{_kb(reference)} (--stats {_kb(stats_total)})",
                ratio=f"{wire / reference:.2f}x",
                target=f"< {_kb(target)}",
                met=_yes(wire < target) if full_size else "n/a",
            ),
        )
        seconds = median([r.seconds for r in backers])
        reference_s = median([r.seconds for r in rsyncs])
        self.report.add(
            (label, case),
            Row(
                measure=f"{what}, seconds (`backer sync` process)",
                backer=f"{seconds:.2f} s",
                reference=f"{reference_s:.2f} s",
                ratio=f"{seconds / reference_s:.2f}x",
            ),
        )

    # -- 5, 6: reconcile a folder of many files --------------------------------------------------

    def reconcile(self, many: Dataset) -> None:
        name, count = many.spec.name, len(many.files)
        pair = self.reconcile_pair(many)
        rsync_dst = self.rsync.modules["reconcile"]
        self.start_block([])
        changed_rel = many.files[count // 2][0]
        blocks = [ReconcileRuns(changed=False), ReconcileRuns(changed=True)]
        serve = ["serve", str(pair.a), "--listen", "127.0.0.1:0"]
        self.rsync.push(many.root, "reconcile", self.rsync.port)  # in sync before measuring
        with BackerServer(self.backer(pair.home_a, *serve)) as server, Relay(server.port) as relay:
            self.settle(pair.b, pair.home_b, relay, f"the copies of {name}")
            for block in blocks:
                for _ in range(self.plan.runs):
                    if block.changed:
                        self.touch(pair.b / changed_rel, b"changed by sync_bench\n")
                    sync = ["sync", str(pair.b), f"127.0.0.1:{relay.port}", "--json"]
                    measured = run_measured(self.backer(pair.home_b, *sync))
                    outcome = SyncOutcome.parse(measured)
                    if not outcome.in_sync:
                        raise BenchError(f"reconcile of {name} did not end in sync: {outcome}")
                    block.cli.append(Run(seconds=measured.wall, wire=relay.take()))
                    if block.changed:
                        self.touch(pair.b / changed_rel, b"changed again\n")
                    scan_s, session_s, result = asyncio.run(
                        _client_session(pair.b, pair.home_b, server.port)
                    )
                    if not result.in_sync:
                        raise BenchError(f"in-process reconcile of {name}: {result.reason}")
                    block.in_process.append(
                        Run(seconds=session_s, scan=scan_s, detail=f"scan {scan_s:.3f}")
                    )
                    if block.changed:  # rsync sends the source's file back over the changed one
                        self.touch(rsync_dst / changed_rel, b"changed by sync_bench\n")
                    with Relay(self.rsync.port) as rsync_relay:
                        rsync_run, stats = self.rsync.push(many.root, "reconcile", rsync_relay.port)
                        wire = rsync_relay.take()
                    block.rsync.append(
                        Run(seconds=rsync_run.wall, wire=wire, app_bytes=stats.total)
                    )
        # The session alone: both replicas in this process, neither scanning while timed.
        for block in blocks:
            for _ in range(self.plan.runs):
                if block.changed:
                    self.touch(pair.b / changed_rel, b"changed alone\n")
                seconds, result = asyncio.run(_sessions_alone(pair))
                if not result.in_sync:
                    raise BenchError(f"reconcile of {name} in one process: {result.reason}")
                block.alone.append(Run(seconds=seconds))
        for block in blocks:
            self.reconcile_rows(many, block)

    def reconcile_rows(self, many: Dataset, runs: ReconcileRuns) -> None:
        cli, rsyncs = runs.cli, runs.rsync
        count = len(many.files)
        what = f"reconcile `{many.spec.name}` ({count:,} files), " + (
            "one file changed" if runs.changed else "nothing changed"
        )
        applies = self.plan.full and count >= 100_000
        label = "reconcile one change" if runs.changed else "reconcile unchanged"
        self.raw(f"{label} {many.spec.name}, `backer sync`", cli, rsyncs)
        self.raw(f"{label} {many.spec.name}, session in-process", runs.in_process, [])
        self.raw(f"{label} {many.spec.name}, session alone", runs.alone, [])
        wire = int(median([r.wire.total for r in cli if r.wire]))
        reference = int(median([r.wire.total for r in rsyncs if r.wire]))
        stats_total = int(median([r.app_bytes for r in rsyncs]))
        rsync_s = median([r.seconds for r in rsyncs])
        rsync_cell = f"{rsync_s * 1000:,.0f} ms (`rsync` process)"
        self.report.add(
            ("reconcile", many.spec.name),
            Row(
                measure=f"{what}, wire bytes",
                backer=_kb(wire),
                reference=f"{_kb(reference)} (--stats {_kb(stats_total)})",
                ratio=f"{wire / reference:.3f}x",
                target=f"< {_kb(TARGET_RECONCILE_BYTES)}",
                met=_yes(wire < TARGET_RECONCILE_BYTES) if applies else "n/a",
            ),
        )
        if runs.changed:
            scan = median([r.scan for r in runs.in_process])
            session = median([r.seconds for r in runs.in_process])
            alone = median([r.seconds for r in runs.alone])
            self.explain[("reconcile", many.spec.name)] = (
                f"Measured without the profiler (medians): the session against `backer serve` "
                f"took {session * 1000:,.0f} ms, the session alone {alone * 1000:,.0f} ms, and "
                f"the client's rescan of its own copy of the folder {scan * 1000:,.0f} ms"
                + (
                    ": the difference is about one rescan of the folder, which `backer serve` "
                    "does before it answers each session (`serve` in cli.py)."
                    if abs(session - alone - scan) < 0.5 * scan
                    else "."
                )
            )
        for timed, how, target in (
            (cli, "`backer sync` process", False),
            (runs.in_process, "session (in-process client, `backer serve`)", True),
            (runs.alone, "session alone (both in-process, no scans)", True),
        ):
            seconds = median([r.seconds for r in timed])
            self.report.add(
                ("reconcile", many.spec.name),
                Row(
                    measure=f"{what}, {how}",
                    backer=f"{seconds * 1000:,.0f} ms",
                    reference=rsync_cell,
                    ratio=f"{seconds / rsync_s:.2f}x",
                    target=f"< {TARGET_RECONCILE_SECONDS * 1000:.0f} ms" if target else "-",
                    met=(_yes(seconds < TARGET_RECONCILE_SECONDS) if applies else "n/a")
                    if target
                    else "-",
                ),
            )

    def reconcile_pair(self, many: Dataset) -> Pair:
        """Two indexed copies of `many` in sync (kept in the workdir: making them takes a
        minute), and a plain copy for rsync's destination."""
        where = self.base / "reconcile"
        pair = Pair(
            a=where / "backer-a",
            b=where / "backer-b",
            home_a=where / "home-a",
            home_b=where / "home-b",
        )
        rsync_dst = self.rsync.modules["reconcile"]
        manifest = where / "pair.json"
        expected = {"spec": asdict(many.spec), "layout": 1}
        try:
            cached = json.loads(manifest.read_text())
        except (OSError, ValueError):
            cached = None
        if (
            cached == expected
            and (pair.a / ".backer").is_dir()
            and (pair.b / ".backer").is_dir()
            and (rsync_dst / many.files[-1][0]).is_file()
        ):
            return pair
        _log(f"making two indexed copies of {many.spec.name} (kept for later runs) ...")
        started = time.perf_counter()
        manifest.unlink(missing_ok=True)
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True)
        for copy in (pair.a, rsync_dst):
            _copy_tree(many.root, copy)
        for home in (pair.home_a, pair.home_b):
            home.mkdir()
        self.indexed_copy(pair)
        manifest.write_text(json.dumps(expected) + "\n")
        _log(f"  done in {time.perf_counter() - started:.1f} s")
        return pair

    # -- profiles --------------------------------------------------------------------------------

    def profile(self, kind: str, dataset: Dataset) -> None:
        """Run a case once more with both backer processes under the profiler."""
        self.profiles.mkdir(parents=True, exist_ok=True)
        name = dataset.spec.name
        tag = f"sync-{kind}-{name}"
        facts = [self.explain.get((kind, name), "")]
        started = time.perf_counter()
        if kind == "initial":
            self.clear_initial()
            self.backer_initial(dataset, "profiled", profile=tag)
            self.clear_initial()
            label = f"initial sync `{name}`"
        elif kind in ("edit", "append"):
            facts += self.profile_edit(dataset, tag, append=kind == "append")
            label = f"{'1-byte append' if kind == 'append' else '4 KiB edit'} in a `{name}` file"
        else:
            self.profile_reconcile(dataset, tag)
            label = f"reconcile `{name}`, one file changed (`backer sync`)"
        wall = time.perf_counter() - started
        server, client = (self.profiles / f"{tag}-{side}.prof" for side in ("server", "client"))
        self.report.profiles.append(
            CaseProfile(
                case=label,
                wall=wall,
                server=summarise_profile(server, REPO),
                client=summarise_profile(client, REPO),
                facts=[f for f in facts if f] + _facts(server, client),
                commands=[self.profiled["server"], self.profiled["client"]],
            )
        )
        _log(self.report.profiles[-1].summary_line())

    def profile_edit(self, large: Dataset, tag: str, *, append: bool) -> list[str]:
        """The edit (or append) once more, profiled; returns what it changed in the chunks."""
        source = large.paths()[0]
        edit_dir = self.base / "edit"
        with fresh_home(self.workdir) as home_a, fresh_home(self.workdir) as home_b:
            a, b = edit_dir / "backer-a", edit_dir / "backer-b"
            _fresh_dir(a)
            shutil.copy2(source, a / source.name)
            self.indexed_copy(Pair(a=a, b=b, home_a=home_a, home_b=home_b))
            serve = ["serve", str(a), "--listen", "127.0.0.1:0"]
            with BackerServer(self.backer(home_a, *serve, profile=tag, side="server")) as server:
                self.step += 1
                change = random.Random(f"edit:{self.step}").randbytes(1 if append else EDIT_SIZE)
                size = source.stat().st_size
                offset = None if append else size // 2
                _change(b / source.name, change, offset, OLD_MTIME + 3600 * self.step)
                sync = ["sync", str(b), f"127.0.0.1:{server.port}", "--json"]
                run_measured(self.backer(home_b, *sync, profile=tag))
        changed = _chunk_change(source, b / source.name)
        for folder in (a, b):
            _fresh_dir(folder)
        return [changed]

    def profile_reconcile(self, many: Dataset, tag: str) -> None:
        pair = self.reconcile_pair(many)
        self.touch(pair.b / many.files[len(many.files) // 2][0], b"changed for the profile\n")
        serve = ["serve", str(pair.a), "--listen", "127.0.0.1:0"]
        with BackerServer(self.backer(pair.home_a, *serve, profile=tag, side="server")) as server:
            sync = ["sync", str(pair.b), f"127.0.0.1:{server.port}", "--json"]
            run_measured(self.backer(pair.home_b, *sync, profile=tag))

    # -- helpers ---------------------------------------------------------------------------------

    def backer(
        self, home: Path, *args: str, profile: str | None = None, side: str = "client"
    ) -> list[str]:
        """`backer --home HOME ARGS`, under the thread profiler when `profile` names the case."""
        if profile is None:
            return backer_command(home, *args)
        out = self.profiles / f"{profile}-{side}.prof"
        command = backer_command(home, *args)
        # As the report quotes it: from the repository root, a fresh home, port as it was.
        self.profiled[side] = " ".join(
            ["python bench/threadprof.py -o", str(out), "-m backer --home $(mktemp -d)", *args]
        )
        return [sys.executable, str(THREADPROF), "-o", str(out), *command[1:]]

    def indexed_copy(self, pair: Pair) -> None:
        """Index `a`, copy it (index included) to `b` and rescan `b`: two replicas in sync."""
        shutil.rmtree(pair.a / ".backer", ignore_errors=True)
        scan_a = ["scan", str(pair.a), "--json"]
        root_a = _scan_root(run_measured(self.backer(pair.home_a, *scan_a)))
        _copy_tree(pair.a, pair.b, keep_index=True)
        scan_b = ["scan", str(pair.b), "--json"]
        root_b = _scan_root(run_measured(self.backer(pair.home_b, *scan_b)))
        if root_a != root_b:
            raise BenchError(f"a copy of {pair.a} with its index has another root after a rescan")

    def settle(self, folder: Path, home: Path, relay: Relay, what: str) -> None:
        """One untimed sync first: it must find the two sides in sync (or bring them there)."""
        sync = ["sync", str(folder), f"127.0.0.1:{relay.port}", "--json"]
        outcome = SyncOutcome.parse(run_measured(self.backer(home, *sync)))
        relay.take()
        if not outcome.in_sync:
            raise BenchError(f"{what} are not in sync before the measurement: {outcome}")
        if outcome.files:
            _log(f"note: the first sync of {what} brought {outcome.files} files across")

    def touch(self, path: Path, data: bytes) -> None:
        """Append `data` to a file and give it a new (old enough) mtime: one changed file."""
        self.step += 1
        _change(path, data, None, OLD_MTIME + 3600 * self.step)

    def verify(self, source: Path, copy: Path, what: str) -> None:
        """The copy holds the same files as the source: contents, sizes, modes and mtimes."""
        if source not in self.source_trees or source.is_relative_to(self.base):
            self.source_trees[source] = tree_signatures(source)
        expected, found = self.source_trees[source], tree_signatures(copy)
        diff = TreeDiff.between(expected, found)
        if not diff.same_contents:
            raise BenchError(f"{what} differs from {source}: {diff.describe()}")
        meta = diff.meta
        if meta:
            note = (
                f"{what}: {len(meta)} files with another mode or mtime than the source's, e.g. "
                f"{meta[0]}: {expected[meta[0]]} vs {found[meta[0]]}"
            )
            if note not in self.report.notes:
                self.report.notes.append(note)
                _log(f"WARNING {note}")

    def start_block(self, datasets: Sequence[Dataset]) -> None:
        for dataset in datasets:
            warm_page_cache(dataset.paths())
        if self.plan.quiet_wait:
            wait_for_quiet(self.plan.quiet_wait, busy=BUSY_CORES, log=_log)
        self.block = CpuMeter()

    def raw(self, what: str, backers: Sequence[Run], rsyncs: Sequence[Run]) -> None:
        def runs(items: Sequence[Run]) -> str:
            cells = []
            for r in items:
                cell = f"{r.seconds:.3f} s" + (f" ({r.detail})" if r.detail else "")
                if r.wire is not None:
                    cell += f" {r.wire.up:,}+{r.wire.down:,} B"
                cells.append(cell)
            return "[" + ", ".join(cells) + "]"

        lingered = sum(r.wire.lingered for r in (*backers, *rsyncs) if r.wire is not None)
        if lingered:
            note = (
                f"{what}: a server kept {lingered} connection(s) open for over "
                f"{Relay.CLOSE_GRACE:.0f} s after its client had left (the relay closed them)"
            )
            self.report.notes.append(note)
            _log(f"WARNING {note}")
        line = f"{what}: backer {runs(backers)}"
        if rsyncs:
            line += f"; rsync {runs(rsyncs)}"
        line += f"; other processes {self.block.others():.2f} cores"
        self.report.raw.append(line)
        _log(line)


@dataclass(slots=True)
class ReconcileRuns:
    changed: bool  # one file changed before each run, or none
    cli: list[Run] = field(default_factory=list)  # `backer sync`, relayed
    in_process: list[Run] = field(default_factory=list)  # its session, against `backer serve`
    alone: list[Run] = field(default_factory=list)  # the session with both sides in process
    rsync: list[Run] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Pair:
    a: Path  # served by `backer serve`
    b: Path  # synced by `backer sync`
    home_a: Path
    home_b: Path


# -- the client's steps in this process -----------------------------------------------------------


async def _client_session(
    folder: Path, home: Path, port: int
) -> tuple[float, float, SessionResult]:
    """What `backer sync` does, with the Python API: (scan seconds, session seconds, result).
    The session starts at the connection; the server rescans its folder before it answers."""
    device = Home(home).device_id()
    replica = await Replica.open(folder, device=device.short)
    try:
        started = time.perf_counter()
        await replica.scan()
        scanned = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        result = await sync_stream(replica, reader, writer, device=device.raw, folder=PLAIN_FOLDER)
        ended = time.perf_counter()
    finally:
        await replica.close()
    return scanned - started, ended - scanned, result


async def _sessions_alone(pair: Pair) -> tuple[float, SessionResult]:
    """Both replicas in this process, scanned first; the session between them is timed alone."""
    server_device, client_device = Home(pair.home_a).device_id(), Home(pair.home_b).device_id()
    a = await Replica.open(pair.a, device=server_device.short)
    b = await Replica.open(pair.b, device=client_device.short)
    served: asyncio.Future[SessionResult] = asyncio.get_running_loop().create_future()
    try:
        await a.scan()
        await b.scan()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            result = await sync_stream(
                a, reader, writer, device=server_device.raw, until_in_sync=False
            )
            if not served.done():
                served.set_result(result)

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        result = await sync_stream(b, reader, writer, device=client_device.raw)
        seconds = time.perf_counter() - started
        await asyncio.wait_for(served, 30)
        server.close()
        await server.wait_closed()
    finally:
        await a.close()
        await b.close()
    return seconds, result


# -- processes: the backer server, the rsync daemon ----------------------------------------------


class BackerServer:
    """`backer serve` as a child process. `ready` is the seconds from starting the process to its
    `serving DIR on HOST:PORT` line (interpreter start-up and the folder's scan); `port` where it
    listens. Stopped with SIGINT (a profiled server then writes its profile)."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self.port = 0
        self.ready = 0.0
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> BackerServer:
        started = time.perf_counter()
        self.process = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr
        )
        try:
            line = self._first_line()
            self.ready = time.perf_counter() - started
            found = re.search(rb"^serving .* on [\d.]+:(\d+)\s*$", line)
            if found is None:
                raise BenchError(f"`backer serve` printed {line!r}, not `serving ... on ...`")
            self.port = int(found.group(1))
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, error: type[BaseException] | None, *_: object) -> None:
        code = self._stop()
        self._stderr.close()
        if error is None and code not in (0, 130, -signal.SIGINT):
            raise BenchError(f"`backer serve` exited {code}: {self._errors()}")

    def _first_line(self) -> bytes:
        assert self.process is not None and self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + SERVER_START_LIMIT
        line = b""
        while not line.endswith(b"\n"):
            ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                raise BenchError(f"`backer serve` did not start in {SERVER_START_LIMIT:.0f} s")
            data = os.read(fd, 4096)
            if not data:
                self.process.wait()
                raise BenchError(
                    f"`backer serve` exited {self.process.returncode}: {self._errors()}"
                )
            line += data
        return line.splitlines()[0]

    def _stop(self) -> int | None:
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()
        self.process = None
        return process.returncode

    def _errors(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-2000:]


def _children_cpu() -> Cpu:
    """CPU seconds of every child process reaped so far, with its own reaped children: a
    child's CPU time is the difference across its run."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Cpu(usage.ru_utime, usage.ru_stime)


# -- the counting relay --------------------------------------------------------------------------


class Relay:
    """A TCP relay on 127.0.0.1 to one port that counts the payload bytes of each direction:
    what a client sends and receives on its socket. It runs its own event loop in a thread, so
    that the benchmark can wait for child processes meanwhile; all counting happens there."""

    READ_SIZE = 1024 * 1024
    CLOSE_GRACE = 5.0  # seconds a server may take to close after its client has

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="relay", daemon=True)
        self._up = self._down = self._connections = self._open = self._lingered = 0
        self._transports: set[asyncio.WriteTransport] = set()
        self._idle: asyncio.Event | None = None
        self._server: asyncio.Server | None = None

    def __enter__(self) -> Relay:
        self._thread.start()
        self._call(self._listen())
        return self

    def __exit__(self, *_: object) -> None:
        with contextlib.suppress(TimeoutError):
            self._call(self._shutdown(), timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def take(self, timeout: float = 60) -> Traffic:
        """What crossed since the last `take`, once every connection through it has ended."""
        return self._call(self._take(), timeout)

    def _call(self, work: Coroutine[Any, Any, _T], timeout: float = 30) -> _T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout)

    async def _listen(self) -> None:
        self._idle = asyncio.Event()
        self._idle.set()
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        for transport in list(self._transports):
            transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _take(self) -> Traffic:
        assert self._idle is not None
        await self._idle.wait()
        traffic = Traffic(
            up=self._up, down=self._down, connections=self._connections, lingered=self._lingered
        )
        self._up = self._down = self._connections = self._lingered = 0
        return traffic

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection. It counts as done for `take` once the client has ended its side and
        the server has answered that with its own end (or failed to within `CLOSE_GRACE`)."""
        assert self._idle is not None
        self._open += 1
        self._idle.clear()
        transports = [writer.transport]
        self._transports.update(transports)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
            except OSError:
                return
            transports.append(up_writer.transport)
            self._transports.add(up_writer.transport)
            self._connections += 1
            down = asyncio.create_task(self._pump(up_reader, writer, up=False))
            await self._pump(reader, up_writer, up=True)  # until the client's end
            _, late = await asyncio.wait([down], timeout=self.CLOSE_GRACE)
            if late:
                self._lingered += 1
                down.cancel()
        finally:
            for transport in transports:
                transport.close()
                self._transports.discard(transport)
            self._open -= 1
            if not self._open:
                self._idle.set()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        """Copy one direction until its end, counting; then pass the end on (half-close)."""
        try:
            while data := await reader.read(self.READ_SIZE):
                if up:
                    self._up += len(data)
                else:
                    self._down += len(data)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except ConnectionError:
            writer.transport.abort()  # the other direction ends too


# -- trees ---------------------------------------------------------------------------------------


def _copy_tree(source: Path, dest: Path, *, keep_index: bool = False) -> None:
    """`cp -a`: contents, modes and mtimes; backer's index only if `keep_index`."""
    shutil.rmtree(dest, ignore_errors=True)
    subprocess.run(["cp", "-a", str(source), str(dest)], check=True)
    if not keep_index:
        shutil.rmtree(dest / ".backer", ignore_errors=True)


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _change(path: Path, data: bytes, offset: int | None, mtime: int) -> None:
    """Write `data` at `offset` (None: append) and set the mtime."""
    with path.open("r+b") as out:
        out.seek(0 if offset is None else offset, os.SEEK_END if offset is None else os.SEEK_SET)
        out.write(data)
    os.utime(path, (mtime, mtime))


def _scan_root(measured: Measured) -> str:
    try:
        root: str = json.loads(measured.stdout.decode().strip().splitlines()[-1])["root"]
    except (IndexError, ValueError, KeyError) as exc:
        raise BenchError(f"`backer scan --json` printed no root: {measured.stdout!r}") from exc
    return root


# -- profiles ------------------------------------------------------------------------------------


# Functions whose cumulative time says where a sync's time goes: (file, function, what it is).
# Blocking work runs in worker threads, so these are plain functions, not coroutines (cProfile
# counts every resumption of a coroutine as a call).
_KNOWN_COSTS = (
    ("backer/index/scan.py", "run", "the folder scan (`scan()`'s worker)"),
    ("~", "<built-in method posix.fsync>", "fsync"),
    ("backer/sync/disk.py", "install_file", "`FolderDisk.install_file` (fsync, rename)"),
    ("backer/sync/versions.py", "archive", "`Versions.archive` (moving a replaced file away)"),
    ("backer/sync/disk.py", "directory", "`FolderDisk.directory` (a path opened part by part)"),
    ("backer/index/store.py", "find_chunks", "`IndexStore.find_chunks` (local chunks)"),
    ("backer/index/store.py", "get", "`IndexStore.get`"),
    ("backer/index/store.py", "commit", "`IndexStore.commit`"),
)
_WORTH = 0.05  # a cost under this share of a process's busy thread time is not mentioned


def _facts(server: Path, client: Path) -> list[str]:
    """Sentences on the known costs of a sync, read from the two profiles: each known function
    that took a noticeable share of a process's busy thread time, with calls and seconds."""
    facts = []
    for side, path in (("`backer serve`", server), ("`backer sync`", client)):
        stats = _function_stats(path)
        busy = summarise_profile(path, REPO).busy
        found = []
        for where, func, what in _KNOWN_COSTS:
            calls, _own, cumulative = stats.get((where, func), (0, 0.0, 0.0))
            if cumulative >= _WORTH * busy:
                found.append(f"{what} {cumulative:.2f} s in {calls:,} calls")
        if found:
            facts.append(f"In {side} (thread times, cumulative): {'; '.join(found)}.")
    return facts


def _chunk_change(before: Path, after: Path) -> str:
    """What an edit changed in the file's chunks and chunk-list groups (what a peer must fetch
    besides the protocol's own messages), as a sentence."""
    lists = []
    for path in (before, after):
        with path.open("rb", buffering=0) as stream:
            lists.append(chunk_stream(stream)[0])
    old, new = lists
    known = set(iter_chunks(old))
    fresh = [size for digest, size in iter_chunks(new) if (digest, size) not in known]
    old_groups = {group_hash(g) for g in chunk_groups(old)}
    groups = chunk_groups(new)
    fresh_groups = [len(g) for g in groups if group_hash(g) not in old_groups]
    return (
        f"The change left {len(fresh)} chunk(s) the peer did not have, "
        f"{_kb(sum(fresh))} of chunk data ({', '.join(f'{n:,}' for n in fresh)} bytes), and "
        f"{len(fresh_groups)} new chunk-list group(s) of the {len(groups)}, "
        f"{_kb(sum(fresh_groups))}; the entry names its {len(groups)} groups by hash, "
        f"{_kb(32 * len(groups))}."
    )


def _function_stats(path: Path) -> dict[tuple[str, str], tuple[int, float, float]]:
    """(file relative to the repository or '~', function) -> (calls, own s, cumulative s)."""
    result: dict[tuple[str, str], tuple[int, float, float]] = {}
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]]
    raw = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    for (filename, _line, func), (_, calls, own, cum, _callers) in raw.items():
        where = filename
        with contextlib.suppress(ValueError):
            where = str(Path(filename).relative_to(REPO))
        key = (where, func)
        old = result.get(key, (0, 0.0, 0.0))
        result[key] = (old[0] + calls, old[1] + own, old[2] + cum)
    return result


# -- formatting ----------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(message, flush=True)


def _yes(met: bool) -> str:
    return "yes" if met else "**no**"


def _kb(count: float) -> str:
    if count >= 10_000_000:
        return f"{count / 1e6:,.1f} MB"
    return f"{count / 1000:,.1f} kB"


def _rate(dataset: Dataset, seconds: float) -> str:
    size = dataset.total_bytes
    if len(dataset.files) <= 16:
        return f"{seconds:.2f} s ({size / seconds / 1e6:,.0f} MB/s)"
    return f"{seconds:.2f} s ({len(dataset.files) / seconds:,.0f} files/s)"


def _text_table(rows: Sequence[Row]) -> str:
    return grid_text(HEADER, [r.cells() for r in rows])


def _markdown_table(rows: Sequence[Row]) -> str:
    return grid_markdown(HEADER, [r.cells() for r in rows])


if __name__ == "__main__":
    raise SystemExit(main())
