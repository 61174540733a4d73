"""Shared pieces of the benchmarks in bench/: the machine description, result tables, the
docs/benchmarks.md section writer and profile summaries, and (re-exported from `datagen`, which
makes and caches them) the deterministic datasets. Measuring processes (the launcher, /proc, TCP
counters) is `measure`'s job; signatures of whole trees, to check copies, are `trees`'.

Every benchmark script (`scan_bench.py`; later sync against rsync and Syncthing) runs as
`python bench/NAME.py`, so bench/ is on sys.path and this module imports as `common`. Nothing in
backer imports it, and it imports nothing from backer: a benchmark drives the `backer` command
like a user does.
"""

from __future__ import annotations

import marshal
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from datagen import (
    KIB,
    LARGE,
    MANY,
    MIB,
    OLD_MTIME,
    QUICK_LARGE,
    QUICK_MANY,
    QUICK_SMALL,
    SMALL,
    Dataset,
    DatasetSpec,
    Shape,
    SourceSpec,
    describe,
    ensure_dataset,
    warm_page_cache,
)

__all__ = [
    "KIB",
    "LARGE",
    "MANY",
    "MIB",
    "OLD_MTIME",
    "QUICK_LARGE",
    "QUICK_MANY",
    "QUICK_SMALL",
    "SMALL",
    "BenchError",
    "CpuMeter",
    "Dataset",
    "DatasetSpec",
    "ProfileSummary",
    "Row",
    "Shape",
    "SourceSpec",
    "backer_command",
    "code_owner",
    "describe",
    "ensure_command",
    "ensure_dataset",
    "free_port",
    "fresh_home",
    "grid_markdown",
    "grid_text",
    "machine",
    "markdown_table",
    "median",
    "revision",
    "short_path",
    "summarise_profile",
    "text_table",
    "tool_version",
    "utc_date",
    "wait_for_quiet",
    "warm_page_cache",
    "write_doc_section",
]

DOC_HEADER = """# Benchmarks

Each family of benchmarks has its own section below, written by its script in `bench/` (which
rewrites only its own section). Every figure stands beside a reference measured in the same run on
the same machine; the ratio is backer / reference. One command, `python3 bench/all.py` from the
repository root, reruns the scripts that fit in 15 minutes on 2 cores (section "Reproducing" says
which ran, for how long, and the commands of the others).
"""


class BenchError(Exception):
    """A benchmark could not measure what it set out to (a command failed, a result is absurd)."""


# -- commands and processes ----------------------------------------------------------------------


def ensure_command(command: str, *, package: str) -> str:
    """The path of `command`, installing Debian's `package` first where it is missing (needs
    root and apt). Raises BenchError if it is still not there."""
    found = shutil.which(command)
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", package]):
        try:
            done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise BenchError(f"cannot install {package}: {exc}") from exc
        if done.returncode != 0:
            tail = (done.stdout + done.stderr)[-2000:]
            raise BenchError(f"{' '.join(argv)} exited {done.returncode}:\n{tail}")
    found = shutil.which(command)
    if not found:
        raise BenchError(f"apt-get installed {package}, but there is no `{command}` on PATH")
    return found


def backer_command(home: Path, *args: str) -> list[str]:
    """`backer --home HOME ARGS` with the interpreter running this benchmark."""
    return [sys.executable, "-m", "backer", "--home", str(home), *args]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (it may be taken again before it is used)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def fresh_home(workdir: Path) -> Iterator[Path]:
    """An empty node home (new device key, no shared folders), removed afterwards."""
    parent = workdir / "homes"
    parent.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(dir=parent))
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# -- describing the run --------------------------------------------------------------------------


class CpuMeter:
    """How busy the rest of the machine was while a benchmark ran: the CPU time of the whole
    machine (from /proc/stat, steal included) less that of this process and its children, as an
    average number of cores. Other work on a 2-core machine moves every figure."""

    def __init__(self) -> None:
        self._started = time.perf_counter()
        self._machine = _machine_cpu()
        self._own = _own_cpu()

    def others(self) -> float:
        elapsed = time.perf_counter() - self._started
        other = (_machine_cpu() - self._machine) - (_own_cpu() - self._own)
        return max(other, 0.0) / max(elapsed, 1e-9)


def wait_for_quiet(
    limit: float, *, busy: float = 0.2, probe: float = 2.0, log: Callable[[str], None] = print
) -> float:
    """Wait up to `limit` seconds until other processes use under `busy` cores over a `probe`
    interval (the machine may be shared); return what they used in the last probe."""
    deadline = time.monotonic() + limit
    while True:
        meter = CpuMeter()
        time.sleep(probe)
        others = meter.others()
        if others < busy or time.monotonic() >= deadline:
            if others >= busy:
                log(f"WARNING the machine stays busy: other processes use {others:.2f} cores")
            return others
        log(f"waiting for the machine to go quiet (other processes use {others:.2f} cores)")


def _machine_cpu() -> float:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return 0.0
    # cpu user nice system idle iowait irq softirq steal ...: all but idle and iowait are busy.
    ticks = [int(f) for f in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def utc_date() -> str:
    return subprocess.run(["date", "-u"], capture_output=True, text=True, check=True).stdout.strip()


def revision(repo: Path) -> str:
    """Which backer was measured: the commit, and the files of backer/ changed since (read
    only: no optional locks, so git does not refresh its index)."""
    git = ["git", "--no-optional-locks", "-C", str(repo)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            [*git, "status", "--porcelain", "--", "backer"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "(not a git checkout)"
    files = [line[3:] for line in changed if line.strip()]
    if not files:
        return f"(commit {head})"
    return f"(commit {head}, with uncommitted changes to {len(files)} files of backer/)"


def tool_version(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"unavailable ({exc})"
    return (done.stdout or done.stderr).strip().splitlines()[0]


def machine() -> str:
    """One line: CPU model, cores, RAM, kernel and Python."""
    model = platform.processor() or "unknown CPU"
    memory = "unknown RAM"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024**2:.1f} GiB RAM"
                break
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} cores, {memory}; Linux {platform.release()}; "
        f"Python {platform.python_version()}"
    )


# -- results -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    """One line of a results table: backer beside its reference."""

    measure: str
    backer: str
    reference: str
    ratio: str
    target: str = "-"
    met: str = "-"

    HEADER = ("measure", "backer", "reference", "ratio", "target", "met")

    def cells(self) -> tuple[str, ...]:
        return (self.measure, self.backer, self.reference, self.ratio, self.target, self.met)


def markdown_table(rows: Sequence[Row]) -> str:
    return grid_markdown(Row.HEADER, [r.cells() for r in rows])


def text_table(rows: Sequence[Row]) -> str:
    return grid_text(Row.HEADER, [r.cells() for r in rows])


def grid_markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table; a `|` inside a cell is escaped."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def grid_text(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: columns padded to their widest cell, a rule under the header."""
    table = [tuple(header), *(tuple(row) for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in table]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in out)


def write_doc_section(doc: Path, title: str, body: str) -> None:
    """Replace the `## title` section of `doc` (up to the next `## ` heading) with `body`,
    creating the file with a short header, or appending the section, where missing."""
    text = doc.read_text() if doc.exists() else DOC_HEADER
    lines = text.splitlines(keepends=True)
    heading = f"## {title}\n"
    section = [heading, "\n", body.rstrip("\n") + "\n"]
    try:
        start = lines.index(heading)
    except ValueError:
        if lines and lines[-1].strip():
            lines.append("\n")
        lines += section
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        tail = lines[end:]
        lines[start:end] = [*section, *(["\n"] if tail else [])]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("".join(lines))


# -- profiles ------------------------------------------------------------------------------------

# Builtins in which a thread sits idle (a pool worker waiting for work, the event loop waiting for
# the worker): counted apart so "busy" time is work.
_WAITS = (
    "<method 'acquire' of '_thread.",
    "<method 'get' of '_queue.SimpleQueue'",
    "<method 'poll' of 'select.",
    "<built-in method time.sleep>",
)


@dataclass(frozen=True, slots=True)
class ProfileSummary:
    """A pstats file boiled down: busy time per owner (package or module) and the top functions."""

    busy: float  # seconds of thread time spent working, all threads added up
    waiting: float
    owners: tuple[tuple[str, float], ...]  # (owner, seconds of own time), largest first
    top: tuple[tuple[str, int, float, float], ...]  # (function, calls, own s, cumulative s)

    def lead(self, count: int = 4) -> str:
        """'A 41 %, B 22 %, ...': the owners of most busy time."""
        return ", ".join(
            f"{name} {100 * sec / self.busy:.0f} %" for name, sec in self.owners[:count]
        )

    def markdown(self, owners: int = 8, functions: int = 10) -> str:
        lines = ["| where (own time) | seconds | share of busy |", "|---|---|---|"]
        lines += [
            f"| {name} | {sec:.2f} | {100 * sec / self.busy:.0f} % |"
            for name, sec in self.owners[:owners]
        ]
        lines += ["", "| function | calls | own s | cumulative s |", "|---|---|---|---|"]
        lines += [
            f"| `{name}` | {calls:,} | {own:.2f} | {cum:.2f} |"
            for name, calls, own, cum in self.top[:functions]
        ]
        return "\n".join(lines)


def summarise_profile(path: Path, repo: Path) -> ProfileSummary:
    """Read a pstats file (as written by `bench/threadprof.py` or `cProfile -o`)."""
    raw = marshal.loads(path.read_bytes())
    owners: dict[str, float] = {}
    busy = waiting = 0.0
    functions = []
    for (filename, line, func), (_, calls, own, cum, _callers) in raw.items():
        if filename == "~" and func.startswith(_WAITS):
            waiting += own
            continue
        busy += own
        owner = code_owner(filename, func, repo)
        owners[owner] = owners.get(owner, 0.0) + own
        where = func if filename == "~" else f"{short_path(filename, repo)}:{line}({func})"
        functions.append((where, int(calls), float(own), float(cum)))
    functions.sort(key=lambda f: f[2], reverse=True)
    return ProfileSummary(
        busy=max(busy, 1e-9),
        waiting=waiting,
        owners=tuple(sorted(owners.items(), key=lambda o: o[1], reverse=True)),
        top=tuple(functions),
    )


def code_owner(filename: str, func: str, repo: Path) -> str:
    """Who owns a profiled function: a backer module, a package, a stdlib module, a builtin's
    module (sqlite3, blake3, posix ...)."""
    if filename == "~":
        found = re.search(r"of '([\w.]+)' objects", func) or re.search(
            r"<built-in method ([\w.]+)>", func
        )
        name = found.group(1) if found else func
        return f"{name.partition('.')[0] if '.' in name else 'builtins'} (C)"
    if filename.startswith("<frozen importlib"):
        return "importing modules"
    if filename.startswith("<"):
        return filename.strip("<>")
    path = Path(filename)
    parts = path.parts  # site-packages first: a virtualenv may live inside the repository
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1].removesuffix(".py")
    if path.is_relative_to(repo):
        return ".".join(path.relative_to(repo).with_suffix("").parts)
    return f"stdlib {path.stem}"


def short_path(filename: str, repo: Path) -> str:
    path = Path(filename)
    parts = path.parts
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1 :])
    if path.is_relative_to(repo):
        return str(path.relative_to(repo))
    return path.name
