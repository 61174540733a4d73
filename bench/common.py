"""Shared pieces of the benchmarks in bench/: deterministic datasets, measured child processes,
the machine description, result tables and the docs/benchmarks.md section writer.

Every benchmark script (`scan_bench.py`; later sync against rsync and Syncthing) runs as
`python bench/NAME.py`, so bench/ is on sys.path and this module imports as `common`. Nothing in
backer imports it, and it imports nothing from backer: a benchmark drives the `backer` command
like a user does.
"""

from __future__ import annotations

import contextlib
import json
import marshal
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import blake3

__all__ = [
    "OLD_MTIME",
    "BenchError",
    "CpuMeter",
    "Dataset",
    "DatasetSpec",
    "FileSig",
    "Measured",
    "MeasuredProcess",
    "ProfileSummary",
    "Row",
    "SigCache",
    "TcpCounters",
    "TreeDiff",
    "backer_command",
    "code_owner",
    "descendants",
    "ensure_command",
    "ensure_dataset",
    "file_digest",
    "free_port",
    "fresh_home",
    "grid_markdown",
    "grid_text",
    "machine",
    "markdown_table",
    "median",
    "peak_rss",
    "process_cpu",
    "reset_peak_rss",
    "revision",
    "run_measured",
    "short_path",
    "summarise_profile",
    "tcp_connections",
    "text_table",
    "tool_version",
    "tree_signatures",
    "utc_date",
    "wait_for_quiet",
    "warm_page_cache",
    "write_doc_section",
]

# Bump when the layout or content of generated data changes: cached datasets are then rebuilt.
GENERATOR_VERSION = 1
# Every generated file and directory gets this mtime (2020-09-13), far outside any "racy" window,
# so a rescan measures the steady state and not files re-read because they looked too recent.
OLD_MTIME = 1_600_000_000
_WRITE_BLOCK = 4 * 1024 * 1024
DOC_HEADER = """# Benchmarks

Each family of benchmarks has its own section below, written by its script in `bench/` (which
rewrites only its own section). Every figure stands beside a reference measured in the same run on
the same machine; the ratio is backer / reference. One command, `python3 bench/all.py` from the
repository root, reruns the scripts that fit in 15 minutes on 2 cores (section "Reproducing" says
which ran, for how long, and the commands of the others).
"""


class BenchError(Exception):
    """A benchmark could not measure what it set out to (a command failed, a result is absurd)."""


# -- datasets ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetSpec:
    """A deterministic tree of files: the same spec always yields the same names and bytes.

    Files are spread at random (seeded) over `dirs` leaf directories, grouped under about
    sqrt(dirs) parents; `dirs=0` puts every file at the top. Sizes are uniform in
    [min_size, max_size]; contents come from the same seeded generator.
    """

    name: str
    files: int
    min_size: int
    max_size: int
    dirs: int
    seed: int

    def layout(self) -> list[tuple[str, int]]:
        """(relative path, size) of every file, in the order they are generated."""
        rng = random.Random(f"{self.seed}:layout")
        parents = max(1, round(self.dirs**0.5))
        result = []
        for index in range(self.files):
            size = rng.randint(self.min_size, self.max_size)
            if self.dirs:
                leaf = rng.randrange(self.dirs)
                result.append((f"p{leaf % parents:03d}/d{leaf:05d}/f{index:07d}.dat", size))
            else:
                result.append((f"f{index:07d}.dat", size))
        return result


KIB = 1024
MIB = 1024 * KIB
# The datasets every benchmark shares (and caches in its workdir): one definition, so that the
# scan, sync and encryption figures are always about the same bytes.
LARGE = DatasetSpec(name="large", files=4, min_size=256 * MIB, max_size=256 * MIB, dirs=0, seed=1)
SMALL = DatasetSpec(name="small", files=20_000, min_size=KIB, max_size=64 * KIB, dirs=1000, seed=2)
MANY = DatasetSpec(name="many", files=100_000, min_size=0, max_size=2 * KIB, dirs=1000, seed=3)
QUICK_LARGE = DatasetSpec(
    name="quick-large", files=2, min_size=8 * MIB, max_size=8 * MIB, dirs=0, seed=1
)
QUICK_SMALL = DatasetSpec(
    name="quick-small", files=300, min_size=KIB, max_size=64 * KIB, dirs=10, seed=2
)
QUICK_MANY = DatasetSpec(
    name="quick-many", files=2000, min_size=0, max_size=2 * KIB, dirs=20, seed=3
)


def describe(spec: DatasetSpec, *, short: bool = False) -> str:
    """A dataset in words, for tables and reports."""
    if spec.min_size == spec.max_size:
        sizes = f"{spec.min_size / MIB:g} MiB"
    else:
        sizes = f"{spec.min_size / KIB:g}-{spec.max_size / KIB:g} KiB"
    where = f" in {spec.dirs:,} directories" if spec.dirs else ""
    if short:
        return f"{spec.files:,} x {sizes}"
    return f"`{spec.name}`: {spec.files:,} files of {sizes}{where}"


@dataclass(frozen=True, slots=True)
class Dataset:
    spec: DatasetSpec
    root: Path
    files: tuple[tuple[str, int], ...]  # relative path, size

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def paths(self) -> list[Path]:
        return [self.root / rel for rel, _ in self.files]


def ensure_dataset(workdir: Path, spec: DatasetSpec, log: Callable[[str], None] = print) -> Dataset:
    """The dataset for `spec` under `workdir/data/`, generated only if the cached one is missing,
    was made from another spec or generator version, or no longer matches its manifest (a size
    or an mtime differs)."""
    data = workdir / "data"
    root = data / spec.name
    manifest = data / f"{spec.name}.json"
    files = tuple(spec.layout())
    dataset = Dataset(spec, root, files)
    expected = {
        "generator": GENERATOR_VERSION,
        "spec": asdict(spec),
        "files": len(files),
        "bytes": dataset.total_bytes,
        "mtime": OLD_MTIME,
    }
    try:
        cached = json.loads(manifest.read_text())
    except (OSError, ValueError):
        cached = None
    if cached == expected and _intact(dataset):
        return dataset
    log(f"generating dataset {spec.name}: {len(files):,} files, {_mb(dataset.total_bytes)} ...")
    started = time.perf_counter()
    manifest.unlink(missing_ok=True)
    shutil.rmtree(root, ignore_errors=True)
    _generate(dataset)
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps(expected, indent=1) + "\n")
    tmp.replace(manifest)
    log(f"  done in {time.perf_counter() - started:.1f} s")
    return dataset


def _generate(dataset: Dataset) -> None:
    rng = random.Random(f"{dataset.spec.seed}:content")
    dirs: set[Path] = {dataset.root}
    dataset.root.mkdir(parents=True)
    for rel, size in dataset.files:
        path = dataset.root / rel
        if path.parent not in dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            dirs.update(path.parents)
        with path.open("wb") as out:
            left = size
            while left:
                block = min(left, _WRITE_BLOCK)
                out.write(rng.randbytes(block))
                left -= block
        os.utime(path, (OLD_MTIME, OLD_MTIME))
    for directory in sorted(d for d in dirs if d.is_relative_to(dataset.root)):
        os.utime(directory, (OLD_MTIME, OLD_MTIME))


def _intact(dataset: Dataset) -> bool:
    mtime_ns = OLD_MTIME * 1_000_000_000
    try:
        for path, (_, size) in zip(dataset.paths(), dataset.files, strict=True):
            st = os.stat(path)
            if st.st_size != size or st.st_mtime_ns != mtime_ns:
                return False
    except OSError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class FileSig:
    """What a copy of a file must match: size, permission bits, mtime and contents."""

    size: int  # -1 for a directory
    mode: int
    mtime_ns: int
    content: str  # BLAKE3 hex ("" for a directory)


# (inode, size, mtime, ctime) of a file when it was hashed, and what it hashed to: any write
# changes the ctime, so a file whose key is unchanged need not be read again.
SigCache = dict[str, tuple[tuple[int, int, int, int], FileSig]]


def file_digest(path: Path | str, buffer: bytearray | None = None) -> str:
    """BLAKE3 of a file's contents, hex (every core hashing, as b3sum does)."""
    buffer = buffer if buffer is not None else bytearray(4 * MIB)
    view = memoryview(buffer)
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb", buffering=0) as stream:
        while count := stream.readinto(buffer):
            hasher.update(view[:count])
    return hasher.hexdigest()


def tree_signatures(
    root: Path, *, skip: Collection[str] = (".backer",), cache: SigCache | None = None
) -> dict[str, FileSig]:
    """Every file under `root` with its signature, the names in `skip` at the top left out (a
    tool's own index or markers); directories as entries of size -1, so that a missing empty
    directory is seen too. With a `cache`, a file unchanged since it was last hashed (same
    inode, size, mtime and ctime) is not read again."""
    found: dict[str, FileSig] = {}
    buffer = bytearray(4 * MIB)
    for directory, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(directory, root)
        if rel_dir == ".":
            dirs[:] = [d for d in dirs if d not in skip]
            files = [f for f in files if f not in skip]
            rel_dir = ""
        for name in dirs:
            found[os.path.join(rel_dir, name) + "/"] = FileSig(-1, 0, 0, "")
        for name in files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            known = cache.get(path) if cache is not None else None
            if known is not None and known[0] == key:
                sig = known[1]
            else:
                sig = FileSig(
                    st.st_size, st.st_mode & 0o7777, st.st_mtime_ns, file_digest(path, buffer)
                )
                if cache is not None:
                    cache[path] = (key, sig)
            found[os.path.join(rel_dir, name)] = sig
    return found


@dataclass(frozen=True, slots=True)
class TreeDiff:
    """How a copy's signatures differ from the original's (paths, sorted)."""

    missing: list[str]
    extra: list[str]
    content: list[str]  # in both, other sizes or contents
    meta: list[str]  # same contents, another mode or mtime

    @classmethod
    def between(cls, expected: dict[str, FileSig], found: dict[str, FileSig]) -> TreeDiff:
        both = set(expected) & set(found)
        return cls(
            missing=sorted(set(expected) - set(found)),
            extra=sorted(set(found) - set(expected)),
            content=sorted(
                p
                for p in both
                if (expected[p].size, expected[p].content) != (found[p].size, found[p].content)
            ),
            meta=sorted(p for p in both if expected[p] != found[p]),
        )

    @property
    def same_contents(self) -> bool:
        return not (self.missing or self.extra or self.content)

    def describe(self) -> str:
        return (
            f"missing {self.missing[:3]} ({len(self.missing)}), extra {self.extra[:3]} "
            f"({len(self.extra)}), other contents {self.content[:3]} ({len(self.content)})"
        )


def warm_page_cache(paths: Sequence[Path]) -> None:
    """Read every file once, so timed runs read from memory and compare computation."""
    buffer = bytearray(_WRITE_BLOCK)
    for path in paths:
        with path.open("rb", buffering=0) as stream:
            while stream.readinto(buffer):
                pass


# -- processes -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Measured:
    """One finished child process: its wall time, peak RSS, CPU time and output."""

    argv: tuple[str, ...]
    wall: float  # seconds, time.perf_counter around fork and reaping
    max_rss: int  # bytes, ru_maxrss of the child from wait4
    returncode: int
    stdout: bytes
    stderr: bytes
    cpu: float = 0.0  # seconds, user + system, of the child and the descendants it reaped


# The launcher between the benchmark and what it measures. Linux keeps the memory high-water mark
# of a process across exec, and Python's subprocess starts children with vfork, so a child
# spawned directly by the (large) benchmark process reports the benchmark's own peak RSS as its
# ru_maxrss. This small interpreter forks the command afresh (its floor: about 5 MB), writes the
# command's pid as a first line to a pipe, times it with perf_counter from fork to reaping, and
# writes "wall maxrss_kib returncode user_s system_s" as a second. wait4's figures cover the
# command and every descendant it reaped (an rsync daemon's per-connection children).
_LAUNCHER = """
import os, sys, time
report = int(sys.argv[1])
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.close(report)
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as exc:
        os.write(2, f"cannot run {sys.argv[2]}: {exc}\\n".encode())
    os._exit(127)
os.write(report, f"{pid}\\n".encode())
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
code = os.waitstatus_to_exitcode(status)
cpu = f"{usage.ru_utime!r} {usage.ru_stime!r}"
os.write(report, f"{wall!r} {usage.ru_maxrss} {code} {cpu}".encode())
"""


def run_measured(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    stdin: bytes | None = None,
    stdout: Literal["capture", "discard"] = "capture",
    check: bool = True,
) -> Measured:
    """Run `argv` to completion; its wall time, peak RSS and CPU time come from `_LAUNCHER`.

    Output goes to temporary files (never a pipe, so nothing can block on a full pipe and no
    reader thread competes for the CPU); `stdout="discard"` sends it to /dev/null. `stdin`, if
    given, is fed from a temporary file.
    """
    with MeasuredProcess(argv, cwd=cwd, stdin=stdin, stdout=stdout) as process:
        return process.wait(check=check)


class MeasuredProcess:
    """`argv` started under `_LAUNCHER` and left running: `pid` is the command's own (to signal
    it or read /proc), `wait()` reaps it and returns its `Measured`. A context manager: leaving
    it kills the command if it still runs."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        stdin: bytes | None = None,
        stdout: Literal["capture", "discard"] = "capture",
    ) -> None:
        self.argv = tuple(argv)
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self._err = tempfile.TemporaryFile()  # noqa: SIM115
        read_end, write_end = os.pipe()
        self._report = os.fdopen(read_end, "rb")
        try:
            with tempfile.TemporaryFile() as feed:
                if stdin is not None:
                    feed.write(stdin)
                    feed.seek(0)
                self._launcher = subprocess.Popen(
                    [sys.executable, "-S", "-I", "-c", _LAUNCHER, str(write_end), *argv],
                    cwd=cwd,
                    stdin=feed if stdin is not None else subprocess.DEVNULL,
                    stdout=self._out if stdout == "capture" else subprocess.DEVNULL,
                    stderr=self._err,
                    pass_fds=(write_end,),
                )
        except BaseException:
            self._close_files()
            raise
        finally:
            os.close(write_end)
        first = self._report.readline()
        self.pid = int(first) if first.strip().isdigit() else 0
        self.result: Measured | None = None

    def __enter__(self) -> MeasuredProcess:
        return self

    def __exit__(self, *_: object) -> None:
        if self.result is None:
            if self.pid and self._launcher.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            self._launcher.wait()
        self._close_files()

    def running(self) -> bool:
        return self.result is None and self._launcher.poll() is None

    def wait(self, *, check: bool = True) -> Measured:
        """Reap the command (however long it runs) and return what it measured."""
        if self.result is None:
            fields = self._report.read().split()
            self._launcher.wait()
            self._out.seek(0)
            self._err.seek(0)
            if self._launcher.returncode != 0 or len(fields) != 5:
                raise BenchError(
                    f"the launcher failed on {' '.join(self.argv)}: {self._err.read()!r}"
                )
            self.result = Measured(
                argv=self.argv,
                wall=float(fields[0]),
                max_rss=int(fields[1]) * 1024,  # Linux reports KiB
                returncode=int(fields[2]),
                stdout=self._out.read(),
                stderr=self._err.read(),
                cpu=float(fields[3]) + float(fields[4]),
            )
        result = self.result
        if check and result.returncode != 0:
            tail = result.stderr.decode(errors="replace")[-2000:]
            raise BenchError(f"{' '.join(self.argv)} exited {result.returncode}:\n{tail}")
        return result

    def _close_files(self) -> None:
        for stream in (self._out, self._err, self._report):
            stream.close()


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


# -- running processes: CPU, memory, TCP --------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """`pid` and every live process below it, from the parent fields of /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses.
        fields = text[text.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(text.split(" ", 1)[0]))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a live process so far, its threads and reaped children
    included; 0 if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # Fields after "(COMM) ": state is [0]; utime, stime, cutime, cstime are [11]-[14].
    fields = text[text.rindex(")") + 2 :].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def peak_rss(pid: int) -> int:
    """The memory high-water mark (VmHWM) of a live process in bytes; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss(pid: int) -> None:
    """Start a new high-water mark at the current RSS (Linux >= 4.0: "5" to clear_refs), so
    that `peak_rss` then covers only what follows."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


@dataclass(frozen=True, slots=True)
class TcpCounters:
    """The kernel's counters (tcp_info) of one TCP socket."""

    local: str  # the socket's address, to tell a new connection from the old
    remote: str
    bytes_sent: int
    bytes_received: int
    segs_out: int  # every segment sent, pure ACKs included
    segs_in: int
    data_segs_out: int  # segments that carried data
    data_segs_in: int

    @property
    def payload(self) -> int:
        """TCP payload bytes both ways."""
        return self.bytes_sent + self.bytes_received


def tcp_connections(ports: Sequence[int]) -> dict[str, TcpCounters]:
    """The tcp_info counters of every established TCP connection to 127.0.0.1 at one of `ports`,
    read at its dialling end (so each connection once, whichever side dialled), by the dialling
    socket's local address. From `ss -tin`, which omits a counter that is zero."""
    argv = ["ss", "-tinH", "state", "established", "("]
    for index, port in enumerate(ports):
        argv += [*(["or"] if index else []), "dst", f"127.0.0.1:{port}"]
    argv.append(")")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BenchError(f"cannot read TCP counters with `{' '.join(argv)}`: {exc}") from exc
    found: dict[str, TcpCounters] = {}
    ends: set[frozenset[str]] = set()
    for block in re.split(r"\n(?=\S)", done.stdout.strip()):
        if not block:
            continue

        def counter(name: str, block: str = block) -> int:
            match = re.search(rf"\b{name}:(\d+)", block)
            return int(match.group(1)) if match else 0

        local, remote = block.split()[2:4]
        # Both ends match when a program dials from its own listening port (Syncthing does):
        # keep one socket of each connection.
        if frozenset((local, remote)) in ends:
            continue
        ends.add(frozenset((local, remote)))
        found[local] = TcpCounters(
            local=local,
            remote=remote,
            bytes_sent=counter("bytes_sent"),
            bytes_received=counter("bytes_received"),
            segs_out=counter("segs_out"),
            segs_in=counter("segs_in"),
            data_segs_out=counter("data_segs_out"),
            data_segs_in=counter("data_segs_in"),
        )
    return found


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


def _mb(count: int) -> str:
    return f"{count / 1e6:,.0f} MB"
