"""The tools the comparison suite runs side by side, each behind one small interface: a
`Session` syncs one tree from a source folder into an empty copy (`initial`), then carries
changes made to the source over (`propagate`), and reports each as a `Phase`: seconds, peak
RSS of each side, CPU seconds of every process of the tool, bytes on the wire.

- backer: two `backer run --events json` processes with static peers (B knows A) and discovery
  off, one folder shared by its key (Noise-encrypted sessions), as users run it. A change has
  arrived when B's files hold it and both nodes report the same root (their JSON events).
- Syncthing: two instances from `syncthing.SyncthingCluster` (loopback only; discovery, relays
  and NAT off; watcher on, `fsWatcherDelayS=1`). A change has arrived when B's files hold it
  and the REST API of both says idle with nothing left to pull.
- rsync, and the floors for the initial copy (`cp -a`, `b3sum`): `compare_oneshot`.

Daemons (backer, Syncthing) are measured from /proc: CPU time of every process (utime+stime,
reaped children included) across the phase, and the memory high-water mark (VmHWM), reset at
the start of each phase; wire bytes are the kernel's tcp_info counters of every connection
between the two nodes' listening ports. Imports common, compare_data, compare_changes, measure
and syncthing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import syncthing
from common import (
    BenchError,
    backer_command,
    free_port,
    warm_page_cache,
)
from compare_changes import Change, Expectation, whole_tree
from compare_data import Tree, materialise
from measure import (
    TcpCounters,
    peak_rss,
    process_cpu,
    reset_peak_rss,
    tcp_connections,
)

__all__ = [
    "SETTLE",
    "BackerSession",
    "Phase",
    "Profiler",
    "Session",
    "SyncthingSession",
]

SETTLE = syncthing.WATCH_DELAY_S + syncthing.SETTLE_MARGIN  # quiet seconds before a change
POLL = 0.01  # seconds between two looks at a copy
SOURCE_SIDE, COPY_SIDE = "A (source)", "B (copy)"
PHASE_LIMIT = 1800.0  # seconds for one phase to finish (a first sync of `many` takes minutes)
START_LIMIT = 60.0  # seconds for a daemon to start


@dataclass(frozen=True, slots=True)
class Phase:
    """One measured sync: an initial copy or one change carried over."""

    seconds: float
    rss: tuple[int, ...]  # peak RSS of each side in bytes (source side first), or of a command
    cpu: float  # CPU seconds of every process of the tool, both sides added up
    wire: int  # bytes on the wire, both ways (0: none; a floor)
    detail: str = ""

    @property
    def peak_rss(self) -> int:
        return max(self.rss)


class Profiler(Protocol):
    """Something that profiles processes while a phase runs (compare_profile.PySpy)."""

    def attached(self, tag: str, pids: dict[str, int]) -> contextlib.AbstractContextManager[None]:
        """Profile the processes (side name -> pid) until the block ends."""
        ...


class Session(Protocol):
    """One tool syncing one tree, from `source` into `copy`."""

    source: Path
    copy: Path

    def __enter__(self) -> Session: ...

    def __exit__(self, *_: object) -> None: ...

    def initial(self) -> Phase: ...

    def propagate(self, change: Change, *, settle: bool = True) -> Phase:
        """Apply the change and time it until the copy holds it and the tool is done. With
        `settle` the tool is first left in step and quiet; without, the change is made at once
        (right after an initial sync, to catch a tool still busy with it)."""
        ...


# -- measuring daemons -------------------------------------------------------------------------


class DaemonMeter:
    """CPU, peak RSS and wire bytes of a pair of daemons over one phase. `sides` gives the
    pids of each side (they may change between calls: Syncthing restarts its child)."""

    def __init__(self, sides: Callable[[], list[list[int]]], ports: Sequence[int]) -> None:
        self.sides = sides
        self.ports = list(ports)
        self._cpu: dict[int, float] = {}
        self._wire: dict[str, TcpCounters] = {}
        self._stopped: tuple[dict[int, float], dict[str, TcpCounters]] | None = None

    def start(self, *, fresh: bool = False, carry: bool = False) -> None:
        """Take the starting counters; `fresh`: the processes are new, count from zero;
        `carry`: start where the last phase stopped (its end counters, read a moment ago), so
        that a phase can follow another without the wait of reading them again."""
        pids = [pid for side in self.sides() for pid in side]
        if fresh:
            self._cpu, self._wire = {}, {}
            return
        for pid in pids:
            reset_peak_rss(pid)
        if carry and self._stopped is not None:
            self._cpu, self._wire = self._stopped
            return
        self._cpu = {pid: process_cpu(pid) for pid in pids}
        self._wire = tcp_connections(self.ports)

    def stop(self, seconds: float) -> Phase:
        sides = self.sides()
        rss = tuple(sum(peak_rss(pid) for pid in side) for side in sides)
        ended = {pid: process_cpu(pid) for side in sides for pid in side}
        cpu = sum(ended[pid] - self._cpu.get(pid, 0.0) for pid in ended)
        now = tcp_connections(self.ports)
        self._stopped = (ended, now)
        wire = sum(
            counters.payload - (self._wire[local].payload if local in self._wire else 0)
            for local, counters in now.items()
        )
        lost = sorted(set(self._wire) - set(now))
        detail = f"{len(now)} connection(s)" + (
            f"; {len(lost)} closed during the phase, not counted" if lost else ""
        )
        return Phase(seconds=seconds, rss=rss, cpu=cpu, wire=wire, detail=detail)


def _wait(
    expectation: Expectation, done: Callable[[], bool], check: Callable[[], None], what: str
) -> float:
    """Poll until the copy meets the expectation and the tool says it is done; the
    perf_counter time at which both first held. `check` raises if the tool died."""
    deadline = time.perf_counter() + PHASE_LIMIT
    while True:
        if expectation.met() and done():
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise BenchError(
                f"{what} not done in {PHASE_LIMIT:g} s ({expectation.left} paths pending)"
            )
        check()
        time.sleep(POLL)


# -- backer ------------------------------------------------------------------------------------


class BackerNode:
    """One `backer run --events json` process; a thread reads its events and keeps what the
    suite needs: started, the folder's latest root, scans done, a pull in progress."""

    def __init__(self, home: Path, port: int, peers: Sequence[int], log: Path) -> None:
        argv = ["run", "--listen", f"127.0.0.1:{port}", "--discovery", "none", "--events", "json"]
        for peer in peers:
            argv += ["--peer", f"127.0.0.1:{peer}"]
        self.port = port
        self.log = log
        self.started = threading.Event()
        self.root = ""
        self.scans = 0
        self.pulling = False
        self.errors: list[str] = []
        with log.open("wb") as err:
            self.process = subprocess.Popen(
                backer_command(home, *argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,  # a Ctrl-C reaches only the suite, which stops it
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if b'"type": "file_' in line:
                continue  # per-file events: many, and nothing the suite needs
            try:
                event = json.loads(line)
            except ValueError:
                continue
            kind = event.get("type")
            if kind == "node_started":
                self.started.set()
            elif kind == "folder_scanned":
                self.root = event["root"]
                self.scans += 1
            elif kind == "pull_started":
                self.pulling = True
            elif kind == "pull_finished":
                self.root = event["root"]
                self.pulling = False
                if event.get("errors"):
                    self.errors += event["errors"]
            elif kind == "error":
                self.errors.append(event.get("message", str(event)))

    def check(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(f"`backer run` exited {self.process.returncode}: {self.tail()}")
        if self.errors:
            raise BenchError(f"`backer run` reported errors: {self.errors[:3]}")

    def wait_started(self) -> None:
        deadline = time.monotonic() + START_LIMIT
        while not self.started.wait(0.05):
            self.check()
            if time.monotonic() > deadline:
                raise BenchError(f"`backer run` did not start in {START_LIMIT:g} s")

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def stop(self) -> int:
        """SIGTERM, as a user's service manager would; its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode


@dataclass(slots=True)
class BackerSession:
    """Two `backer run` processes, A (the source) and B (the copy; it dials A)."""

    tree: Tree
    base: Path
    profiler: Profiler | None = None
    profile_as: str = ""  # the profiles' tag for the next phase
    source: Path = field(init=False)
    copy: Path = field(init=False)
    nodes: list[BackerNode] = field(default_factory=list)
    meter: DaemonMeter | None = None

    def __post_init__(self) -> None:
        self.source, self.copy = self.base / "a", self.base / "b"

    def __enter__(self) -> BackerSession:
        shutil.rmtree(self.base, ignore_errors=True)
        materialise(self.tree, self.source, private=self.tree.private())
        home_a, home_b = self.base / "home-a", self.base / "home-b"
        _backer(home_a, "init", str(self.source))
        keys = _backer(home_a, "keys", str(self.source))
        found = re.search(r"\bbkw1\w+", keys)
        if found is None:
            raise BenchError(f"`backer keys` printed no read-write key: {keys!r}")
        _backer(home_b, "join", found.group(0), str(self.copy))
        return self

    def __exit__(self, *_: object) -> None:
        codes = [node.stop() for node in self.nodes]
        shutil.rmtree(self.base, ignore_errors=True)
        if any(code != 0 for code in codes):
            raise BenchError(f"`backer run` exited {codes} on SIGTERM")

    def pids(self) -> list[list[int]]:
        return [[node.pid] for node in self.nodes]

    def in_step(self) -> bool:
        a, b = self.nodes
        return bool(a.scans and a.root == b.root and not a.pulling and not b.pulling)

    def check(self) -> None:
        for node in self.nodes:
            node.check()

    def initial(self) -> Phase:
        warm_page_cache(self.tree.paths())
        os.sync()
        ports = [free_port(), free_port()]
        self.meter = DaemonMeter(self.pids, ports)
        self.meter.start(fresh=True)
        started = time.perf_counter()
        a = BackerNode(self.base / "home-a", ports[0], [], self.base / "a.log")
        self.nodes.append(a)
        a.wait_started()
        # Each node is profiled from its node_started on (py-spy attaches to a live interpreter).
        with self._profiled({SOURCE_SIDE: a}):
            b = BackerNode(self.base / "home-b", ports[1], [ports[0]], self.base / "b.log")
            self.nodes.append(b)
            b.wait_started()
            with self._profiled({COPY_SIDE: b}):
                expectation = whole_tree(self.tree, self.copy)
                ended = _wait(expectation, self.in_step, self.check, "backer")
                phase = self.meter.stop(ended - started)
        return phase

    def propagate(self, change: Change, *, settle: bool = True) -> Phase:
        assert self.meter is not None
        if settle:
            self.settle()
        expectation = change.expectation(self.copy)
        a, b = self.nodes
        with self._profiled({SOURCE_SIDE: a, COPY_SIDE: b}):
            self.meter.start(carry=not settle)
            started = time.perf_counter()
            change.apply()
            ended = _wait(expectation, self.in_step, self.check, f"backer: {change.label}")
            phase = self.meter.stop(ended - started)
        return phase

    def settle(self) -> None:
        deadline = time.monotonic() + PHASE_LIMIT
        while not self.in_step():
            self.check()
            if time.monotonic() > deadline:
                raise BenchError("the backer nodes did not settle")
            time.sleep(POLL)
        time.sleep(SETTLE)

    @contextlib.contextmanager
    def _profiled(self, nodes: dict[str, BackerNode]) -> Iterator[None]:
        if self.profiler is None:
            yield
            return
        pids = {side: node.pid for side, node in nodes.items()}
        with self.profiler.attached(self.profile_as, pids):
            yield


def _backer(home: Path, *args: str) -> str:
    done = subprocess.run(backer_command(home, *args), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"backer {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done.stdout


# -- Syncthing ---------------------------------------------------------------------------------


@dataclass(slots=True)
class SyncthingSession:
    """Two Syncthing instances on 127.0.0.1; A's folder is seeded before either starts."""

    tree: Tree
    base: Path
    cluster: syncthing.SyncthingCluster = field(init=False)
    source: Path = field(init=False)
    copy: Path = field(init=False)
    meter: DaemonMeter | None = None

    def __post_init__(self) -> None:
        self.cluster = syncthing.SyncthingCluster(
            2, parent=self.base, seed=self._seed, settle=False
        )

    def _seed(self, instance: syncthing.SyncthingInstance) -> None:
        """A's folder gets the tree before either instance starts, then the cache is warmed and
        the links written out, as for backer's source before its first process starts."""
        if instance.name == "A":
            materialise(self.tree, instance.folder, private=self.tree.private())
            warm_page_cache(self.tree.paths())
            os.sync()

    def __enter__(self) -> SyncthingSession:
        shutil.rmtree(self.base, ignore_errors=True)
        self.base.mkdir(parents=True)
        return self

    def __exit__(self, *_: object) -> None:
        self.cluster.close()
        shutil.rmtree(self.base, ignore_errors=True)

    def pids(self) -> list[list[int]]:
        return [instance.pids() for instance in self.cluster.instances]

    def idle(self) -> bool:
        try:
            return all(instance.folder_settled() for instance in self.cluster.instances)
        except (OSError, ValueError, KeyError):
            return False

    def check(self) -> None:
        for instance in self.cluster.instances:
            instance.check_alive()

    def initial(self) -> Phase:
        self.cluster.__enter__()  # spawns A (seeded), then B, once each answers its REST API
        started = self.cluster.started
        a, b = self.cluster.instances
        self.source, self.copy = a.folder, b.folder
        ports = [a.listen_port, b.listen_port]
        self.meter = DaemonMeter(self.pids, ports)
        self.meter.start(fresh=True)
        ended = _wait(whole_tree(self.tree, self.copy), self.idle, self.check, "Syncthing")
        phase = self.meter.stop(ended - started)
        self.cluster.check_loopback_only()
        return phase

    def propagate(self, change: Change, *, settle: bool = True) -> Phase:
        assert self.meter is not None
        if settle:
            self.cluster.wait_idle()
            time.sleep(SETTLE)
        expectation = change.expectation(self.copy)
        self.meter.start(carry=not settle)
        started = time.perf_counter()
        change.apply()
        ended = _wait(expectation, self.idle, self.check, f"Syncthing: {change.label}")
        return self.meter.stop(ended - started)
