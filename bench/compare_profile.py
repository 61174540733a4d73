"""Where backer's time goes in a slow case of the comparison suite: py-spy attached to both
`backer run` processes for exactly one phase (an initial sync, one change), and its samples
boiled down to the code that was running.

py-spy samples from outside (`--nonblocking`: the target is never paused), so the daemons run
as measured, and it can attach to a process that is already running: a change can be profiled
alone, without the initial sync before it. cProfile (`bench/threadprof.py`) would need the
processes started under it and would profile their whole life. py-spy leaves out threads it
sees idle (waiting in a system call), so its samples are busy thread time; time in C (blake3,
SQLite, the cipher) counts at the Python line that called it. Imports common.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common import BenchError, code_owner, short_path

__all__ = ["RATE", "PySpy", "SampledProfile", "ensure_py_spy"]

RATE = 100  # samples a second
ATTACH = 0.3  # seconds py-spy is given to attach before the phase starts
# Where a thread waits for work (a pool worker on its queue, the event loop in epoll, the
# watcher in poll): py-spy's own idle detection does not see these here, so a sample whose
# innermost frame is one of them counts as waiting, not as busy.
WAITS = (
    "thread.py:_worker",
    "threading.py:Condition.wait",
    "threading.py:Event.wait",
    "queue.py:Queue.get",
    "selectors.py:EpollSelector.select",
    "inotify_c.py:InotifyFD._check_inotify_fd",
)
# The command line that starts the node: on every stack of the main thread, it says nothing
# about where the time goes.
ENTRY = ("backer/__main__.py", "backer/cli/")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*):(?P<line>\d+)\)$")


def ensure_py_spy() -> str | None:
    """The py-spy command beside this interpreter or on PATH, installed with pip into this
    interpreter's environment where missing; None if that fails."""
    here = str(Path(sys.executable).parent)
    found = shutil.which("py-spy", path=here) or shutil.which("py-spy")
    if found:
        return found
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "py-spy"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return None
    return shutil.which("py-spy", path=here) or shutil.which("py-spy")


@dataclass(frozen=True, slots=True)
class SampledProfile:
    """One process's samples during one phase."""

    tag: str  # the phase
    side: str  # which process
    samples: int  # busy samples
    waiting: int  # samples of threads waiting for work
    owners: tuple[
        tuple[str, int], ...
    ]  # (package or backer module, samples as leaf), largest first
    leaves: tuple[tuple[str, int], ...]  # (function and line, samples as innermost frame)
    spans: tuple[tuple[str, int], ...]  # (backer function, samples with it on the stack)

    @property
    def seconds(self) -> float:
        return self.samples / RATE

    def share(self, count: int) -> str:
        return f"{100 * count / max(self.samples, 1):.0f} %"

    def lead(self, count: int = 4) -> str:
        return ", ".join(f"{name} {self.share(n)}" for name, n in self.owners[:count])

    def markdown(self, rows: int = 6) -> str:
        lines = [
            f"{self.side}: {self.seconds:.1f} s of busy thread time sampled (and "
            f"{self.waiting / RATE:.1f} s of threads waiting for work); most of it in "
            f"{self.lead()}.",
            "",
            "| running (innermost frame) | share | | inside (backer function) | share |",
            "|---|---|---|---|---|",
        ]
        for index in range(rows):
            leaf = self.leaves[index] if index < len(self.leaves) else ("", 0)
            span = self.spans[index] if index < len(self.spans) else ("", 0)
            lines.append(
                f"| {_code(leaf[0])} | {self.share(leaf[1]) if leaf[0] else ''} | "
                f"| {_code(span[0])} | {self.share(span[1]) if span[0] else ''} |"
            )
        return "\n".join(lines)

    @classmethod
    def read(cls, path: Path, tag: str, side: str, repo: Path) -> SampledProfile:
        """Summarise py-spy's `--format raw` output (one "frame;frame;... count" per stack,
        outermost frame first)."""
        owners: Counter[str] = Counter()
        leaves: Counter[str] = Counter()
        spans: Counter[str] = Counter()
        total = waiting = 0
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [_parse(frame, repo) for frame in stack.split(";")]
            name, owner, _ = frames[-1]
            if name.endswith(WAITS):
                waiting += count
                continue
            total += count
            leaves[f"{name} line {_line(stack)}"] += count
            owners[owner] += count
            for ours in {where for where, _, in_repo in frames if in_repo}:
                if not ours.startswith(ENTRY):
                    spans[ours] += count
        return cls(
            tag=tag,
            side=side,
            samples=total,
            waiting=waiting,
            owners=tuple(owners.most_common()),
            leaves=tuple(leaves.most_common()),
            spans=tuple(spans.most_common()),
        )


def _parse(frame: str, repo: Path) -> tuple[str, str, bool]:
    """(function as file:function, owner, whether it is backer's code) of one frame."""
    found = _FRAME.match(frame)
    if found is None:
        return frame, frame, False
    func, filename = found.group("func"), found.group("file")
    in_repo = Path(filename).is_relative_to(repo / "backer")
    return f"{short_path(filename, repo)}:{func}", code_owner(filename, func, repo), in_repo


def _line(stack: str) -> str:
    """The line number of a stack's innermost frame: the statement that was running."""
    found = _FRAME.match(stack.rpartition(";")[2])
    return found.group("line") if found else "?"


def _slug(text: str) -> str:
    return re.sub(r"[^\w]+", "-", text).strip("-").lower()


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


class PySpy:
    """Runs `py-spy record` attached to processes for the length of a block; the profiles are
    kept in `out` and summarised in `profiles`."""

    def __init__(self, binary: str, out: Path, repo: Path) -> None:
        self.binary = binary
        self.out = out
        self.repo = repo
        self.profiles: list[SampledProfile] = []
        out.mkdir(parents=True, exist_ok=True)

    def command(self, pid: int | str, output: Path | str) -> list[str]:
        return [
            self.binary,
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(RATE),
            "--full-filenames",
            "--format",
            "raw",
            "--output",
            str(output),
        ]

    @contextlib.contextmanager
    def attached(self, tag: str, pids: dict[str, int]) -> Iterator[None]:
        running = []
        for side, pid in pids.items():
            output = self.out / f"{_slug(tag)[:60]}-{_slug(side)}.txt"
            output.unlink(missing_ok=True)
            with (self.out / "py-spy.log").open("ab") as log:
                process = subprocess.Popen(
                    self.command(pid, output),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            running.append((side, process, output))
        time.sleep(ATTACH)
        try:
            yield
        finally:
            for _side, process, _output in running:
                if process.poll() is None:
                    os.kill(process.pid, signal.SIGINT)  # py-spy writes its output and exits
            for _side, process, _output in running:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for side, _process, output in running:
            if not output.exists():
                raise BenchError(
                    f"py-spy wrote no profile of {side}; see {self.out / 'py-spy.log'}"
                )
            self.profiles.append(SampledProfile.read(output, tag, side, self.repo))
