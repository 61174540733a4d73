"""Measuring what the benchmarks run: child processes timed and measured by a small launcher
(wall time, peak RSS, CPU time, through wait4), and running processes read from /proc (CPU
time, the memory high-water mark and its reset, the process tree) and from the kernel's
tcp_info counters of their connections (`ss -ti`). Imports common only.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common import BenchError

__all__ = [
    "Measured",
    "MeasuredProcess",
    "TcpCounters",
    "descendants",
    "peak_rss",
    "process_cpu",
    "reset_peak_rss",
    "run_measured",
    "tcp_connections",
]


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
