"""Side by side: backer against Syncthing, rsync, and the `cp -a` and `b3sum` floors, on the same
trees and the same changes, in one run on one machine.

For each tree (`small`: 20,000 files of 1-64 KiB in 1,000 directories; `large`: 4 files of
256 MiB; `mixed`: code, a photo album of 500 files, documents and media; `source`: about 7,600
files shaped like a source checkout, two directories of 1,100 and 1,400 entries; `many`: 100,000
files of 256 B-4 KiB, 20,000 of them in one directory) every tool in turn:
  - syncs it from a source folder into an empty one: the *initial sync*, from the start of the
    first process until the copy holds every file and the tool says it is done;
  - the moment that is judged done (no quiet wait: a tool still busy with its own writes is
    caught), 1 KiB is written into one file of the tree's most crowded directory;
  - then carries changes over (each run a new change, seeded the same for every tool): on
    `large`, 1 byte appended to a file and 4 KiB overwritten in the middle of another; on
    `mixed`, 100 small files edited, 100 deleted and 100 added, and the album directory
    renamed. Daemons (backer, Syncthing) are timed from the change until the copy holds it
    and the tool says it is done; rsync, which has no watcher, as one `rsync -a --delete` run.
Figures: seconds, peak RSS (of each side; the larger is shown), CPU seconds (every process of
the tool, both sides), bytes on the wire (TCP payload both ways). After every phase the copy is
compared with the source, file by file (BLAKE3), outside the timing. Where backer takes longer
than Syncthing or rsync, the case runs once more with py-spy attached to both `backer run`
processes and the report says where the time goes. See `compare_tools` for how each tool runs
and is measured.

Run from the repository root with backer installed (`pip install -e .`), as root where rsync,
syncthing or b3sum are missing (they are installed with apt-get; py-spy with pip):

    python bench/compare.py            # full run, rewrites "## Side by side" in the docs
    python bench/compare.py --quick    # smoke run (~2 min) on tiny trees, writes no docs
    python bench/compare.py --trees many,source    # only these trees; writes no docs

`python bench/all.py` runs this and the other benchmarks that fit in 15 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from common import (
    BenchError,
    CpuMeter,
    backer_command,
    describe,
    ensure_command,
    machine,
    revision,
    tool_version,
    utc_date,
    wait_for_quiet,
    write_doc_section,
)
from compare_changes import EDIT_AFTER_INITIAL, MUTATIONS, Change, edit_after_initial
from compare_data import (
    FULL_TREES,
    QUICK_TREES,
    TOOL_FILES,
    Tree,
    TreeSpec,
)
from compare_oneshot import RsyncSession, b3sum_floor, cp_floor
from compare_profile import RATE, PySpy, ensure_py_spy
from compare_report import BACKER, Case, Results
from compare_tools import (
    SETTLE,
    BackerSession,
    Phase,
    Session,
    SyncthingSession,
)
from syncthing import WATCH_DELAY_S
from trees import (
    SigCache,
    TreeDiff,
    tree_signatures,
)

__all__ = ["FULL", "QUICK", "CompareSuite", "Plan", "main"]

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "Side by side"
COMMAND = "python bench/compare.py"
BUSY_CORES = 0.2  # other processes using more than this make the figures suspect


@dataclass(frozen=True, slots=True)
class Plan:
    trees: tuple[TreeSpec, ...]
    runs: int  # runs of each change (the median is reported); one initial sync each
    quiet_wait: float  # seconds to wait, before each tree, for other processes to go quiet
    full: bool
    profiled_trees: int = 0  # trees rerun under py-spy: those with the most slow cases (0: all)


FULL = Plan(trees=FULL_TREES, runs=3, quiet_wait=10, full=True)
QUICK = Plan(trees=QUICK_TREES, runs=1, quiet_wait=0, full=False, profiled_trees=1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run; writes no docs")
    parser.add_argument("--workdir", default="/tmp/backer-bench", help="datasets and scratch")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy reruns")
    parser.add_argument("--no-doc", action="store_true", help="print only, even a full run")
    parser.add_argument(
        "--doc",
        type=Path,
        help=f"write the section into this file instead of {DOC.relative_to(REPO)} (a quick "
        "run writes only with this)",
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument(
        "--trees",
        help="only these trees, comma-separated (small, large, mixed, source, many); such a "
        "run writes the docs only with --doc",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        if args.trees:
            plan = replace(plan, trees=pick_trees(plan.trees, args.trees))
        suite = CompareSuite(workdir, plan, profile=not args.no_profile)
        results = suite.run()
    except BenchError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 1
    minutes = (time.perf_counter() - started) / 60
    print()
    print(results.text())
    print(f"the run took {minutes:.1f} minutes")
    doc = args.doc or (DOC if plan.full and not (args.no_doc or args.trees) else None)
    if doc is not None:
        write_doc_section(doc, SECTION, suite.markdown(minutes))
        print(f"\nwrote the {SECTION} section of {doc}")
    if args.json:
        print(json.dumps(results.as_json()))
    return 0


def pick_trees(trees: Sequence[TreeSpec], names: str) -> tuple[TreeSpec, ...]:
    """The trees named (with or without the quick run's `quick-` prefix), in the suite's order."""
    known = {spec.name.removeprefix("quick-"): spec for spec in trees}
    wanted = {name.strip().removeprefix("quick-") for name in names.split(",") if name.strip()}
    unknown = sorted(wanted - set(known))
    if unknown or not wanted:
        raise BenchError(f"no tree named {', '.join(unknown)}: the trees are {', '.join(known)}")
    return tuple(spec for name, spec in known.items() if name in wanted)


@dataclass(slots=True)
class Versions:
    backer: str = ""
    syncthing: str = ""
    rsync: str = ""
    b3sum: str = ""
    cp: str = ""

    def line(self) -> str:
        return "; ".join((self.backer, self.syncthing, self.rsync, self.cp, self.b3sum))


@dataclass(slots=True)
class CompareSuite:
    workdir: Path
    plan: Plan
    profile: bool = True
    results: Results = field(default_factory=Results)
    versions: Versions = field(default_factory=Versions)
    date: str = ""
    load: str = ""
    others: float = 0.0
    profiler: PySpy | None = None
    profiled: dict[str, float] = field(default_factory=dict)  # case -> seconds under py-spy

    @property
    def base(self) -> Path:
        return self.workdir / "compare"

    def run(self) -> Results:
        self.date = utc_date()
        self.load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        self.check_tools()
        meter = CpuMeter()
        trees = [Tree.ensure(self.workdir, spec, log=_log) for spec in self.plan.trees]
        shutil.rmtree(self.base, ignore_errors=True)
        try:
            for tree in trees:
                self.tree_block(tree)
            if self.profile:
                self.profile_slow_cases(trees)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
        self.others = meter.others()
        if self.others > BUSY_CORES:
            self.results.notes.append(
                f"other processes used {self.others:.2f} cores on average during this run: on "
                "a 2-core machine the figures differ from an idle machine's"
            )
        return self.results

    def check_tools(self) -> None:
        for command, package in (
            ("rsync", "rsync"),
            ("syncthing", "syncthing"),
            ("b3sum", "b3sum"),
        ):
            ensure_command(command, package=package)
        backer = tool_version(backer_command(Path("/nonexistent"), "--version"))
        self.versions = Versions(
            backer=f"{backer} {revision(REPO)}",
            syncthing=" ".join(tool_version(["syncthing", "--version"]).split()[:2]),
            rsync=" ".join(tool_version(["rsync", "--version"]).split()[:3]),
            b3sum=tool_version(["b3sum", "--version"]),
            cp=tool_version(["cp", "--version"]),
        )
        if self.profile:
            binary = ensure_py_spy()
            if binary is None:
                self.results.notes.append("py-spy could not be installed: no profiles")
                self.profile = False
            else:
                self.profiler = PySpy(binary, self.workdir / "profiles" / "compare", REPO)
                self.versions.backer += f" (profiles: {tool_version([binary, '--version'])})"

    # -- one tree, every tool ---------------------------------------------------------------

    def tree_block(self, tree: Tree) -> None:
        if self.plan.quiet_wait:
            wait_for_quiet(self.plan.quiet_wait, busy=BUSY_CORES, log=_log)
        _log(f"-- {describe_tree(tree)}")
        sessions: list[tuple[str, Callable[[Path], Session]]] = [
            (BACKER, lambda base: BackerSession(tree, base)),
            ("Syncthing", lambda base: SyncthingSession(tree, base)),
            ("rsync", lambda base: RsyncSession(tree, base)),
        ]
        follow = edit_after_initial(tree)
        for tool, make in sessions:
            meter = CpuMeter()
            session = make(self.base / tool.lower())
            with session:
                self.session(tool, tree, session, follow)
            self.results.raw.append(
                f"{tool}, `{tree.name}`: other processes used {meter.others():.2f} cores"
            )
        floors = self.base / "floors"
        phase = cp_floor(tree, floors)
        self.verify(floors / "source", floors / "copy", f"cp -a's copy of {tree.name}")
        self.record(initial_case(tree), "cp -a", phase)
        self.record(initial_case(tree), "b3sum", b3sum_floor(tree, floors))
        shutil.rmtree(floors, ignore_errors=True)

    def session(
        self, tool: str, tree: Tree, session: Session, follow: Callable[[Path], Change]
    ) -> None:
        """The initial sync, the edit made the moment it is done, then each change in turn."""
        caches: tuple[SigCache, SigCache] = ({}, {})
        self.record(initial_case(tree), tool, session.initial())
        change = follow(session.source)
        phase = session.propagate(change, settle=False)
        self.record(change_case(tree, EDIT_AFTER_INITIAL), tool, phase)
        what = f"{tool}'s copy of {tree.name} after the initial sync and: {change.label}"
        self.verify(session.source, session.copy, what, caches)
        for key in tree.spec.mutations:
            mutation = MUTATIONS[key]
            for run in range(self.plan.runs):
                change = mutation.plan(tree, session.source, run)
                phase = session.propagate(change)
                what = f"{tool}'s copy of {tree.name} after: {change.label}"
                self.verify(session.source, session.copy, what, caches)
                self.record(change_case(tree, key), tool, phase)

    def record(self, case: Case, tool: str, phase: Phase) -> None:
        self.results.add(case, tool, phase)
        line = (
            f"{case.title}, {tool}: {phase.seconds:.3f} s, peak RSS "
            f"{'/'.join(f'{r / 1e6:.0f}' for r in phase.rss)} MB, CPU {phase.cpu:.2f} s, "
            f"wire {phase.wire:,} B" + (f" ({phase.detail})" if phase.detail else "")
        )
        self.results.raw.append(line)
        _log(f"   {line}")

    def verify(
        self, source: Path, copy: Path, what: str, caches: tuple[SigCache, SigCache] = ({}, {})
    ) -> None:
        """The copy holds the source's files and directories with the same contents (outside
        the timing); another mode or mtime is noted."""
        expected = tree_signatures(source, skip=TOOL_FILES, cache=caches[0])
        found = tree_signatures(copy, skip=TOOL_FILES, cache=caches[1])
        diff = TreeDiff.between(expected, found)
        if not diff.same_contents:
            raise BenchError(f"{what} differs from its source: {diff.describe()}")
        self.results.verified.append(what)
        if diff.meta:
            tool = what.split("'", 1)[0]
            note = (
                f"{tool}: copies keep other modes or mtimes than the source's (e.g. {diff.meta[0]})"
            )
            if note not in self.results.notes:
                self.results.notes.append(note)

    # -- profiles -------------------------------------------------------------------------------

    def profile_slow_cases(self, trees: Sequence[Tree]) -> None:
        """Each tree with a case in which backer took longer than a reference runs once more
        for backer, with py-spy attached during those cases only (in a quick run, only the
        tree with the most such cases)."""
        assert self.profiler is not None
        slow = {case.key for case in self.results.slow_cases()}
        counts = {t.name: sum(c.tree == t.name for c in self.results.slow_cases()) for t in trees}
        chosen = sorted((name for name, n in counts.items() if n), key=lambda name: -counts[name])
        if self.plan.profiled_trees:
            chosen = chosen[: self.plan.profiled_trees]
        for tree in (t for t in trees if t.name in chosen):
            initial, follow = initial_case(tree), change_case(tree, EDIT_AFTER_INITIAL)
            changes = [k for k in tree.spec.mutations if change_case(tree, k).key in slow]
            _log(f"-- profiling backer on {tree.name}")
            session = BackerSession(tree, self.base / "profiled")
            with session:
                session.profiler = self.profiler if initial.key in slow else None
                session.profile_as = initial.key
                seconds = session.initial().seconds
                if session.profiler is not None:
                    self.profiled[initial.key] = seconds
                if follow.key in slow:
                    # py-spy attaches first (ATTACH seconds): the edit comes that much later.
                    session.profiler, session.profile_as = self.profiler, follow.key
                    change = edit_after_initial(tree)(session.source)
                    self.profiled[follow.key] = session.propagate(change, settle=False).seconds
                for key in changes:
                    case = change_case(tree, key)
                    session.profiler, session.profile_as = self.profiler, case.key
                    change = MUTATIONS[key].plan(tree, session.source, self.plan.runs)
                    self.profiled[case.key] = session.propagate(change).seconds
        self.results.profiles = self.profiler.profiles

    # -- the report ---------------------------------------------------------------------------

    def markdown(self, minutes: float) -> str:
        results = self.results
        parts = [
            f"Measured {self.date} on {machine()}; {self.versions.line()}. Load average at the "
            f"start: {self.load}; other processes on the machine used {self.others:.2f} cores "
            f"on average during the run (0 = idle). The run took {minutes:.1f} minutes.",
            "",
            "Command, from the repository root: `python3 bench/all.py` (every section it lists; "
            f"see its docstring), or this section alone: `{COMMAND}` with backer installed "
            "(`pip install -e .`); the trees are generated once and cached in `--workdir`, "
            "default `/tmp/backer-bench`; `--trees many,source` runs only the trees named (and "
            "writes no docs); `--quick` is the smoke run the tests use.",
            "",
            _how(self.plan),
            "",
            "Trees: " + "; ".join(describe_tree(tree) for tree in self._trees()) + ".",
            "",
            results.markdown(),
        ]
        behind = results.behind()
        if behind:
            parts += ["Where backer is behind a reference:", ""]
            parts += [f"- {line}" for line in behind]
            parts.append("")
        if results.notes:
            parts += [*(f"- {note}" for note in results.notes), ""]
        parts += ["### Where backer's time goes", "", *self.profile_markdown()]
        parts += ["", "All runs:", "", *(f"- {line}" for line in results.raw)]
        return "\n".join(parts) + "\n"

    def _trees(self) -> list[Tree]:
        return [Tree.ensure(self.workdir, spec, log=_log) for spec in self.plan.trees]

    def profile_markdown(self) -> list[str]:
        profiles = self.results.profiles
        if not profiles:
            return ["backer was behind no reference in time; nothing was profiled."]
        assert self.profiler is not None
        example = " ".join(["py-spy", *self.profiler.command("PID", "OUT.txt")[1:]])
        lines = [
            "Each case in which backer took longer than Syncthing or rsync ran once more, with "
            f"py-spy attached to both `backer run` processes for that case alone (`{example}`, "
            f"{RATE} samples a second, every thread; samples of a thread waiting for work (a "
            "pool worker on its queue, the event loop in epoll, the watcher in poll) are "
            "counted apart, so shares are of busy thread time; C calls, fsync included, count "
            "at the Python line that made them). *running*: the innermost frame (function and "
            "line); *inside*: backer's functions with that sample anywhere below them (the "
            "command line's own frames left out).",
        ]
        for key, seconds in self.profiled.items():
            case = next(c for c in self.results.cases if c.key == key)
            lines += ["", f"**{case.title}** ({seconds:.2f} s with py-spy attached)", ""]
            for profile in (p for p in profiles if p.tag == key):
                lines += [profile.markdown(), ""]
        return lines


def initial_case(tree: Tree) -> Case:
    return Case(
        key=f"initial {tree.name}",
        title=f"initial sync `{tree.name}`",
        tree=tree.name,
        initial=True,
    )


def change_case(tree: Tree, key: str) -> Case:
    return Case(
        key=f"{key} {tree.name}",
        title=f"{MUTATIONS[key].title(tree.spec)} (`{tree.name}`)",
        tree=tree.name,
        initial=False,
    )


def describe_tree(tree: Tree) -> str:
    parts = [
        describe(dataset.spec, short=True) + (f" under `{prefix}/`" if prefix else "")
        for prefix, dataset in tree.parts
    ]
    files = len(tree.files)
    return f"`{tree.name}`: {files:,} files, {tree.total_bytes / 1e6:,.0f} MB ({'; '.join(parts)})"


def _how(plan: Plan) -> str:
    return (
        "How: the tools run one after another on 127.0.0.1, each from its own source folder "
        "holding the same tree (hard links to the cached files, so every tool reads the same "
        "page-cache pages, warmed before each initial sync; the files changed in place are "
        "private copies), each into an empty folder on the same disk. *backer*: two `backer run"
        " --events json` processes, each with its own home, the folder shared by its key "
        "(`backer init`, `backer join`; Noise-encrypted sessions), the copy's node given the "
        "source's address (`--peer`), discovery off (`--discovery none`). *Syncthing* (Debian's"
        " package): two instances, `bench/syncthing.py` (`SyncthingCluster`): loopback only; "
        "global and local discovery, relays and NAT traversal off; the watcher on with "
        f"`fsWatcherDelayS={WATCH_DELAY_S}`, its shortest; the second instance dials the first. "
        "*rsync*: `rsync -a --delete --stats SRC/ rsync://127.0.0.1:PORT/copy/` to `rsync "
        "--daemon --no-detach` (a new daemon per run). *Floors*: `cp -a SRC DST` and `b3sum` "
        "over every file (names through `xargs -0`). *Initial sync*: the daemons' clock runs "
        "from spawning the source's process (the copy's is spawned once the source's answers: "
        "its `node_started` event, or Syncthing's REST API) until every file of the tree is at "
        "its size in the copy and the tool says it is done (backer: both nodes' latest root, "
        "from their events, is the same and neither is pulling; Syncthing: `/rest/db/status` of"
        " both instances says `idle` with `needTotalItems` 0); rsync, cp and b3sum are timed "
        f"from start to exit. *Changes*: with both sides in step and {SETTLE:g} s of quiet (so "
        "Syncthing's watch timer has run out), the change is written into the source and the "
        "clock runs until every path it touched is as it must be in the copy (sizes and BLAKE3 "
        "hashes, each new version of a file read once) and the tool says it is done, as above; "
        "rsync has no watcher, so its figure is the writing of the change plus one `rsync -a "
        f"--delete` run. Each change is made {plan.runs} time(s) (each time a new one, the same "
        "for every tool; the median is shown), each initial sync once. *Edit right after the "
        "initial sync*: the same, but made the moment the initial sync is judged done, with no "
        "wait for quiet (a tool still busy with its own writes is caught; once per initial "
        "sync): 1 KiB written in place into the middle of one file of the tree's most crowded "
        "directory (in `many` its 20,000-entry one); rsync's is one more run. After every phase "
        "the copy is compared with its source file by file (BLAKE3 of the contents, outside the "
        "timing; the initial sync's copy after that edit). *Peak RSS*: of each side (node), the "
        "larger shown, both in *All runs*: for the daemons the kernel's "
        "high-water mark (VmHWM, reset at the start of each change through "
        "`/proc/PID/clear_refs`; Syncthing's monitor process and its syncing child added up); "
        "for rsync the client, and the daemon with the per-connection children it reaped; for "
        "cp and b3sum the command's (`wait4`; a command starts from the launcher that measures "
        "it, a small Python process, and Linux keeps its high-water mark across exec: a figure "
        "under about 7 MB is that floor). *CPU seconds*: user + system time of every process of"
        " the tool, both sides added up (daemons from `/proc/PID/stat` across the phase; rsync,"
        " cp and b3sum from `wait4`). *Bytes on the wire*: TCP payload both ways, from the "
        "kernel's tcp_info counters (`ss -ti`) of every connection between the two daemons' "
        "listening ports, counted at the dialling end (backer's and Syncthing's are encrypted: "
        "record headers and tags included); rsync's own `--stats` count (sent + received). MB "
        "and kB are 10^6 and 10^3 bytes; ratios are backer / the other tool."
    )


def _log(message: str) -> None:
    print(message, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
