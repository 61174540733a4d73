"""Discovery benchmark: time from starting a backer node to its first connected peer, found by
mDNS, by the UDP beacon and by the DHT, in real network namespaces; Syncthing's local discovery
beside it, in the same namespaces and the same run.

Every sample starts afresh: two new homes sharing one empty folder by its key alone (`backer
init`, `backer join`; no address configured anywhere), new namespaces (`tests/netns.py`), and
`backer run --events json` processes inside them (`tests/procs.py`). Host 1 is launched; once it
has reported `node_started` and SETTLE seconds more have passed, host 2 is launched. The clock
runs from just before host 2's process is spawned (so `ip netns exec`, the interpreter's
start-up and backer's imports are inside it) to the wall-clock stamp of host 2's first
`peer_connected` event; its first `peer_found` and its `node_started` show where the time goes.

  1. mDNS only (`--discovery mdns`): 2 hosts bridged on one /24 (`Lan(2)`). Target: under 2 s.
  2. the same with both hosts launched at once: from the first launch until both have a peer.
  3. beacon only (`--discovery beacon`): the same LAN, its switch dropping multicast.
  4. DHT only (`--discovery dht`): 2 hosts on two routed subnets with no multicast between them
     (`Routed(3)`), `backer dht --listen` on a third as the one bootstrap node. Target: under 5 s.
  5. Reference: Syncthing (Debian's package), two instances in the hosts of a `Lan(2)`, their
     config written by `bench/syncthing.py` and then changed: local discovery on (as by
     default: IPv4 broadcast and IPv6 multicast on port 21027, every 30 s and at once when a
     new device is heard), global discovery, relays and NAT traversal off, each listening on
     its host's IP, each knowing the other's device ID at address `dynamic` (so only local
     discovery can join them), the REST API on a Unix socket (reachable from outside the
     namespace). The clock runs from launching instance 2 until its `/rest/system/connections`
     (read every 20 ms) shows the other device connected; its event log gives the times of
     StartupComplete, DeviceDiscovered and DeviceConnected. Also with both launched at once.

The measures are interleaved, one sample of each per round, so that a busy spell of the
(possibly shared) machine hits them all alike. Nothing leaves the namespaces: they have no link
to the machine's own network.

Run from the repository root, as root (namespaces), with backer installed (`pip install -e .`):

    python bench/discovery_bench.py --write-doc   # full run (~6 min), rewrites "## Discovery"
    python bench/discovery_bench.py               # the same, printing only
    python bench/discovery_bench.py --quick       # smoke run (~10 s): one mDNS and one DHT
                                                  # sample, no Syncthing, never writes docs

`--json` also prints every raw figure as one JSON object (the smoke test reads it).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import syncthing
from common import (
    BenchError,
    CpuMeter,
    Row,
    machine,
    markdown_table,
    median,
    revision,
    text_table,
    tool_version,
    utc_date,
    wait_for_quiet,
    write_doc_section,
)
from measure import (
    run_measured,
)

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
COMMAND = "python bench/discovery_bench.py --write-doc"
sys.path.insert(0, str(REPO / "tests"))  # the namespaces and the process helper the tests use

from netns import Lan, Routed  # noqa: E402
from procs import PYTHON, Running, backer  # noqa: E402

NODE_PORT = 22100  # backer's listener (TCP; the DHT uses the same port on UDP)
DHT_PORT = 22200  # the bootstrap node's (UDP)
SYNCTHING_PORT = 22000
SETTLE = 3.0  # seconds host 1 runs after node_started before host 2 is launched
QUICK_SETTLE = 2.0
START_LIMIT = 30.0  # seconds for a process to start (node_started, REST API answering)
CONNECT_LIMIT = 60.0  # seconds for the first peer to connect
# Syncthing's: two instances dialling each other at once can lose 20 s per try (see the notes)
SYNCTHING_CONNECT_LIMIT = 180.0
FOUND_GRACE = 5.0  # seconds after the connection for a peer_found that has not come yet
LATE_FOUND = 20.0  # seconds: a Syncthing instance found this late waited for a periodic broadcast
POLL = 0.02  # seconds between two reads of Syncthing's REST API
MDNS_TARGET = 2.0
DHT_TARGET = 5.0

MDNS, MDNS_BOTH, BEACON, DHT = "mdns", "mdns-both", "beacon", "dht"
SYNCTHING, SYNCTHING_BOTH = "syncthing", "syncthing-both"
MEASURES = (MDNS, MDNS_BOTH, BEACON, DHT, SYNCTHING, SYNCTHING_BOTH)
TOGETHER = {MDNS_BOTH, SYNCTHING_BOTH}
TITLES = {
    MDNS: "backer, mDNS only, host 2 launched with host 1 up",
    MDNS_BOTH: "backer, mDNS only, both launched at once",
    BEACON: "backer, beacon only (switch drops multicast), host 2 launched with host 1 up",
    DHT: "backer, DHT only (2 routed subnets, 1 bootstrap node), host 2 launched with host 1 up",
    SYNCTHING: "Syncthing, local discovery, instance 2 launched with instance 1 up",
    SYNCTHING_BOTH: "Syncthing, local discovery, both launched at once",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    full: bool
    samples: int  # rounds: one sample of every measure per round
    measures: tuple[str, ...]
    settle: float


FULL = Plan(full=True, samples=10, measures=MEASURES, settle=SETTLE)
QUICK = Plan(full=False, samples=1, measures=(MDNS, DHT), settle=QUICK_SETTLE)


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """One launch of host 2 (instance 2), in seconds from just before its process was spawned."""

    started: float  # node_started (Syncthing: StartupComplete)
    found: float | None  # first peer_found (DeviceDiscovered); None: none within FOUND_GRACE
    connected: float  # first peer_connected (Syncthing: "connected" in the REST API)
    outgoing: bool  # host 2 dialled (False: its peer dialled it)
    via: str  # how host 2 first found its peer ("" when it reported none)
    both: float | None = None  # launched at once: from the first launch until both connected
    event: float | None = None  # Syncthing: DeviceConnected in its event log
    others: float = 0.0  # cores other processes used meanwhile
    notes: tuple[str, ...] = ()  # errors the nodes reported, unclean exits


@dataclass(slots=True)
class Report:
    plan: Plan
    date: str = ""
    load: str = ""
    backer_version: str = ""
    syncthing_version: str = ""
    others: float = 0.0
    seconds: float = 0.0
    python_start: list[float] = field(default_factory=list)  # `python -c pass`
    imports: list[float] = field(default_factory=list)  # importing backer's command line
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    # -- figures -----------------------------------------------------------------------------

    def headline(self, measure: str) -> list[float]:
        """The figure a measure is about: launch -> connected, or both connected."""
        samples = self.samples.get(measure, [])
        if measure in TOGETHER:
            return [s.both for s in samples if s.both is not None]
        return [s.connected for s in samples]

    def found(self, measure: str) -> list[float]:
        return [s.found for s in self.samples.get(measure, []) if s.found is not None]

    def started(self, measure: str) -> list[float]:
        return [s.started for s in self.samples.get(measure, [])]

    def rows(self) -> list[Row]:
        rows: list[Row] = []
        has = self.samples.__contains__
        st = self.headline(SYNCTHING)
        st_ref = _ref("Syncthing local discovery", st)
        if has(MDNS):
            rows.append(
                _row(
                    "mDNS: launch of host 2 -> its first peer connected",
                    self.headline(MDNS),
                    st_ref,
                    st,
                    MDNS_TARGET,
                )
            )
            st_found = [s.found for s in self.samples.get(SYNCTHING, []) if s.found is not None]
            rows.append(
                _row(
                    "mDNS: launch of host 2 -> its first peer found",
                    self.found(MDNS),
                    _ref("Syncthing DeviceDiscovered", st_found),
                    st_found,
                )
            )
            st_started = self.started(SYNCTHING)
            rows.append(
                _row(
                    "mDNS: launch of host 2 -> node_started",
                    self.started(MDNS),
                    _ref("Syncthing StartupComplete", st_started),
                    st_started,
                )
            )
        if has(MDNS_BOTH):
            both = self.headline(SYNCTHING_BOTH)
            rows.append(
                _row(
                    "mDNS, both launched at once: first launch -> both connected",
                    self.headline(MDNS_BOTH),
                    _ref("Syncthing local discovery", both),
                    both,
                )
            )
        if has(BEACON):
            rows.append(
                _row(
                    "beacon, multicast dropped: launch of host 2 -> its first peer connected",
                    self.headline(BEACON),
                    _ref("Syncthing local discovery (IPv4 broadcast; no filter)", st),
                    st,
                )
            )
            rows.append(
                _row(
                    "beacon, multicast dropped: launch of host 2 -> its first peer found",
                    self.found(BEACON),
                    "-",
                    [],
                )
            )
        if has(DHT):
            nothing = "- (Syncthing's global discovery needs its servers on the internet)"
            rows.append(
                _row(
                    "DHT, routed subnets: launch of host 2 -> its first peer connected",
                    self.headline(DHT),
                    nothing,
                    [],
                    DHT_TARGET,
                )
            )
            rows.append(
                _row(
                    "DHT, routed subnets: launch of host 2 -> its first peer found",
                    self.found(DHT),
                    "-",
                    [],
                )
            )
            rows.append(
                _row(
                    "DHT, routed subnets: launch of host 2 -> node_started",
                    self.started(DHT),
                    "-",
                    [],
                )
            )
        return rows

    def details(self) -> list[str]:
        """One line per measure with every sample, and what the samples have in common."""
        lines = []
        for measure in self.plan.measures:
            samples = self.samples.get(measure, [])
            if not samples:
                continue
            connected = " ".join(f"{s.connected:.3f}" for s in samples)
            found = " ".join("-" if s.found is None else f"{s.found:.3f}" for s in samples)
            started = " ".join(f"{s.started:.3f}" for s in samples)
            text = (
                f"{TITLES[measure]}: launch of {_second(measure)} -> connected {connected}; "
                f"-> found {found}; -> started {started}"
            )
            if measure in TOGETHER:
                both = " ".join(f"{s.both:.3f}" for s in samples if s.both is not None)
                text += f"; first launch -> both connected {both}"
            if measure.startswith(SYNCTHING):
                events = " ".join("-" if s.event is None else f"{s.event:.3f}" for s in samples)
                text += f"; -> DeviceConnected in its event log {events}"
            dialled = sum(s.outgoing for s in samples)
            text += (
                f"; the first connection was dialled by {_second(measure)} in {dialled} of "
                f"{len(samples)}, by the other side in {len(samples) - dialled}"
            )
            late = sum(1 for s in samples if s.found is not None and s.found > s.connected)
            if late:
                text += f"; found only after connected in {late} of {len(samples)}"
            slow = sum(1 for s in samples if s.found is not None and s.found > LATE_FOUND)
            if slow and measure.startswith(SYNCTHING):
                text += (
                    f"; DeviceDiscovered only after {LATE_FOUND:g} s in {slow} of {len(samples)} "
                    "(it heard the other first in that one's periodic broadcast, 30 s after "
                    "the start)"
                )
            missing = sum(1 for s in samples if s.found is None)
            if missing and measure.startswith(SYNCTHING):
                text += (
                    f"; no DeviceDiscovered about the other device in its event log (read once "
                    f"connected) in {missing} of {len(samples)}"
                )
            elif missing:
                text += (
                    f"; no peer_found within {FOUND_GRACE:g} s of the connection in "
                    f"{missing} of {len(samples)}"
                )
            vias = sorted({s.via for s in samples if s.via})
            if vias and not measure.startswith(SYNCTHING):
                text += f"; found via {', '.join(vias)}"
            busy = [s.others for s in samples]
            text += f"; other processes {median(busy):.2f} cores (max {max(busy):.2f})"
            lines.append(text)
            counted = Counter(note for s in samples for note in set(s.notes))
            lines += [
                f"  {TITLES[measure]}: {note} (in {count} of {len(samples)} samples)"
                for note, count in sorted(counted.items())
            ]
        return lines

    def where_time_goes(self) -> str:
        """Medians: how much of launch -> connected passes before node_started, and after."""
        parts = []
        for measure, name in ((MDNS, "mDNS"), (BEACON, "beacon"), (DHT, "DHT")):
            samples = self.samples.get(measure, [])
            if not samples:
                continue
            started = median([s.started for s in samples])
            connected = median([s.connected for s in samples])
            gap = median([s.connected - s.started for s in samples])
            parts.append(
                f"{name}: {started:.3f} s of {connected:.3f} s before node_started "
                f"({100 * started / connected:.0f} %), then {gap:.3f} s to connected"
            )
        if not parts:
            return ""
        text = "where the time goes, host 2 launched with host 1 up (medians): " + "; ".join(parts)
        if self.python_start:
            text += (
                f". For scale, outside the namespaces (median of {len(self.python_start)}): "
                f"`python -c pass` {median(self.python_start):.3f} s from launch to exit; "
                "importing `backer.cli.commands` (every module `backer run` loads), timed "
                f"inside a fresh interpreter, {median(self.imports):.3f} s"
            )
        st = [s for s in self.samples.get(SYNCTHING, []) if s.found is not None]
        if st:
            text += (
                f". Syncthing: StartupComplete {median(self.started(SYNCTHING)):.3f} s, then "
                f"{median([s.connected - s.found for s in st if s.found is not None]):.3f} s "
                "from DeviceDiscovered to connected"
            )
        return text

    # -- output ------------------------------------------------------------------------------

    def text(self) -> str:
        lines = [
            f"Discovery ({'full' if self.plan.full else 'quick'} run, {self.date}); "
            f"{self.backer_version}; {self.syncthing_version or 'no Syncthing'}",
            "",
            text_table(self.rows()),
            "",
            *self.details(),
        ]
        where = self.where_time_goes()
        if where:
            lines.append(where)
        lines.append(
            f"other processes used {self.others:.2f} cores on average during the run "
            f"(load average at the start: {self.load}); the run took {self.seconds:.0f} s"
        )
        return "\n".join(lines)

    def markdown(self) -> str:
        plan = self.plan
        tools = "; ".join(v for v in (self.backer_version, self.syncthing_version) if v)
        rows = self.rows()
        targets = [r for r in rows if r.met in ("yes", "**no**")]
        missed = [r for r in targets if r.met != "yes"]
        verdict = (
            f"All {len(targets)} targets met."
            if not missed
            else "Targets missed: " + "; ".join(r.measure for r in missed) + "."
        )
        parts = [
            f"Measured {self.date} on {machine()}; {tools}. Load average at the start: "
            f"{self.load}; other processes on the machine used {self.others:.2f} cores on "
            "average during the run (0 = idle).",
            "",
            "Command, from the repository root, as root (network namespaces), with backer "
            f"installed (`pip install -e .`): `{COMMAND}` (about {self.seconds / 60:.0f} "
            "minutes; without `--write-doc` it only prints; `--quick` is the smoke run the "
            "tests use).",
            "",
            "How: every sample starts afresh, with two new homes (new device keys) that share "
            "one empty folder by its key alone (`backer init`, `backer keys`, `backer join`; no "
            "address, no static peer) and new network namespaces (`tests/netns.py`): *Lan* is "
            "two hosts on one /24 behind a bridge, *Routed* two hosts alone on their own /24s "
            "joined by a router that forwards unicast and no multicast, plus a third subnet "
            "for the bootstrap node. Nothing leaves the namespaces (they have no link to the "
            "machine's network). Each node is `backer run --events json --listen HOST:22100 "
            "--discovery METHOD` inside its host (`ip netns exec`), as a user would run it. Host "
            f"1 is launched; {plan.settle:g} s after its `node_started`, host 2 is; the clock "
            "runs from just before host 2's process is spawned (so `ip netns exec`, the "
            "interpreter's start-up and backer's imports are inside the figure) to the "
            "wall-clock stamp (`time`) of host 2's first `peer_connected` event, and of its "
            "first `peer_found` and its `node_started` (listener up, finders started). "
            "*Both at once*: the two processes spawned back to back; from the first spawn until "
            "both have reported `peer_connected`. *Beacon*: the same Lan with multicast "
            "flooding off on every bridge port and snooping off (`Lan.block_multicast()`), "
            "broadcast still passing. *DHT*: `backer dht --listen HOST3:22200` on the third "
            "subnet, both nodes `--dht-bootstrap` to it. "
            "Syncthing (the reference): two instances in the hosts of a Lan, their config "
            "written by `bench/syncthing.py` (`SyncthingCluster`: `syncthing generate`, one "
            "shared `sendreceive` folder, usage and crash reporting, upgrades, NAT traversal, "
            "relays and global discovery off) and then changed: **local discovery on, as "
            "configured by default** (IPv4 broadcast and IPv6 multicast `[ff12::8384]` on port "
            "21027; Syncthing 1.19 broadcasts every 30 s, a compile-time constant with no "
            "config option, and at once when it hears a device it did not know), each "
            f"instance listening on `tcp://HOST:{SYNCTHING_PORT}` (its host's IP; TCP only, so "
            "no QUIC), each knowing the other's device ID at address `dynamic`, so only local "
            "discovery can join them; `reconnectionIntervalS` left at its default (60); the "
            "REST API on a Unix socket, read from outside the namespace. Its clock runs from "
            "just before instance 2's process is spawned until instance 2's "
            "`/rest/system/connections`, read every 20 ms, shows the other device connected; "
            "*found* and *started* are its DeviceDiscovered and StartupComplete events. The "
            "measures are interleaved, one sample of each per round, "
            f"{plan.samples} rounds. Figures: median (min-max) in seconds; ratio is backer / "
            "Syncthing, medians.",
            "",
            markdown_table(rows),
            "",
            verdict,
            "",
        ]
        parts += [f"- {line.strip()}" for line in self.details()]
        where = self.where_time_goes()
        if where:
            parts.append(f"- {where}")
        if self.others >= 0.5:
            parts.append(
                f"- other processes used {self.others:.2f} cores on average during this run: on "
                f"a {os.cpu_count()}-core machine every figure, backer's and Syncthing's, is "
                "slower than on an idle one (backer's start-up most: it is CPU-bound)"
            )
        return "\n".join(parts) + "\n"

    def as_json(self) -> dict[str, Any]:
        return {
            "plan": asdict(self.plan),
            "date": self.date,
            "load": self.load,
            "seconds": self.seconds,
            "backer": self.backer_version,
            "syncthing": self.syncthing_version,
            "others": self.others,
            "python_start": self.python_start,
            "imports": self.imports,
            "samples": {m: [asdict(s) for s in v] for m, v in self.samples.items()},
        }


def _second(measure: str) -> str:
    return "instance 2" if measure.startswith(SYNCTHING) else "host 2"


def _span(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"


def _ref(name: str, values: Sequence[float]) -> str:
    return f"{name} {_span(values)}" if values else "-"


def _row(
    measure: str,
    values: Sequence[float],
    reference: str,
    ref_values: Sequence[float],
    target: float | None = None,
) -> Row:
    ratio = "-"
    if values and ref_values:
        ratio = f"{median(values) / median(ref_values):.2f}x"
    met = "-"
    if target is not None and values:
        met = "yes" if median(values) < target else "**no**"
    suffix = f" (median of {len(values)}; min-max)" if values else ""
    return Row(
        measure=measure + suffix,
        backer=_span(values),
        reference=reference,
        ratio=ratio,
        target=f"median < {target:g} s" if target is not None else "-",
        met=met,
    )


# -- backer ---------------------------------------------------------------------------------------


def _wait(node: Running, kind: str, limit: float, what: str) -> dict[str, Any]:
    try:
        return node.wait_for(kind, deadline=limit)
    except AssertionError as exc:
        raise BenchError(f"{what}: {exc}") from None


def _maybe(node: Running, kind: str, limit: float) -> dict[str, Any] | None:
    try:
        return node.wait_for(kind, deadline=limit)
    except AssertionError:
        return None


def _events(node: Running) -> list[dict[str, Any]]:
    """Every event the node has printed so far (those not yet looked at too)."""
    with contextlib.suppress(AssertionError):
        node.wait_for("", deadline=0.0)  # no event has an empty type: this reads them all
    return node.events


def _stop(nodes: Sequence[Running]) -> list[int]:
    """SIGTERM to every node at once (they leave in parallel), then their exit codes. Once:
    a second SIGTERM would find a node past its handler, closing its event loop, and kill it."""
    for node in nodes:
        if node.process.poll() is None:
            node.process.terminate()
    codes = []
    for node in nodes:
        try:
            codes.append(node.process.wait(timeout=20))
        except subprocess.TimeoutExpired:
            node.process.kill()
            codes.append(node.process.wait())
    return codes


def _share(base: Path) -> tuple[Path, Path]:
    """Two homes joined to one empty folder by its key, nothing else configured."""
    homes = base / "home1", base / "home2"
    folder = base / "folder1"
    folder.mkdir(parents=True)
    try:
        backer(homes[0], "init", str(folder))
        found = re.search(r"bkw1\w+", backer(homes[0], "keys", str(folder)))
        if found is None:
            raise BenchError("`backer keys` printed no read-write key")
        backer(homes[1], "join", found.group(0), str(base / "folder2"))
    except subprocess.CalledProcessError as exc:
        raise BenchError(f"{' '.join(exc.cmd)} exited {exc.returncode}: {exc.stderr}") from exc
    return homes


@contextlib.contextmanager
def _dht_bootstrap(net: Routed, address: str) -> Iterator[None]:
    """`backer dht --listen ADDRESS` in host 3, until the block ends."""
    process = subprocess.Popen(
        net.exec_args(3, [*PYTHON, "dht", "--listen", address]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        if not process.stdout.readline():  # one line once it listens
            process.wait(timeout=10)
            assert process.stderr is not None
            raise BenchError(f"backer dht exited {process.returncode}: {process.stderr.read()}")
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def backer_sample(method: str, *, together: bool, settle: float, scratch: Path) -> Sample:
    """Launch two nodes with `--discovery method`; see the module's docstring."""
    base = Path(tempfile.mkdtemp(prefix=f"{method}-", dir=scratch))
    meter = CpuMeter()
    nodes: list[Running] = []
    try:
        homes = _share(base)
        net: Lan | Routed = Routed(3) if method == DHT else Lan(2)
        with net, contextlib.ExitStack() as stack:
            args = ["--discovery", method]
            if method == BEACON:
                assert isinstance(net, Lan)
                net.block_multicast()
            if method == DHT:
                assert isinstance(net, Routed)
                bootstrap = f"{net.address(3)}:{DHT_PORT}"
                stack.enter_context(_dht_bootstrap(net, bootstrap))
                args += ["--dht-bootstrap", bootstrap]

            def launch(i: int) -> float:
                listen = f"{net.address(i)}:{NODE_PORT}"
                at = time.time()
                nodes.append(
                    Running(homes[i - 1], ["--listen", listen, *args], prefix=net.exec_args(i, []))
                )
                return at

            try:
                first_at = launch(1)
                if not together:
                    _wait(nodes[0], "node_started", START_LIMIT, "host 1")
                    time.sleep(settle)
                second_at = launch(2)
                connected = _wait(nodes[1], "peer_connected", CONNECT_LIMIT, "host 2")
                both = None
                if together:
                    other = _wait(nodes[0], "peer_connected", CONNECT_LIMIT, "host 1")
                    both = max(connected["time"], other["time"]) - first_at
                started = _wait(nodes[1], "node_started", START_LIMIT, "host 2")
                found = _maybe(nodes[1], "peer_found", FOUND_GRACE)
                notes = [
                    f"host {i} reported: {event['message']}"
                    for i, node in enumerate(nodes, start=1)
                    for event in _events(node)
                    if event["type"] == "error_occurred"
                ]
            finally:
                codes = _stop(nodes)
        notes += [f"host {i} exited {code}" for i, code in enumerate(codes, 1) if code != 0]
        return Sample(
            started=started["time"] - second_at,
            found=None if found is None else found["time"] - second_at,
            connected=connected["time"] - second_at,
            outgoing=bool(connected["outgoing"]),
            via="" if found is None else str(found["via"]),
            both=both,
            others=meter.others(),
            notes=tuple(notes),
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- Syncthing ------------------------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket: Syncthing's REST API, listening inside a namespace."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass(slots=True)
class LanInstance(syncthing.SyncthingInstance):
    """A Syncthing instance in host `index` of a Lan, listening on that host's IP, its REST API
    on a Unix socket in its home."""

    host: str = ""
    index: int = 0

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.listen_port}"

    @property
    def socket_path(self) -> Path:
        return self.home / "gui.sock"

    def rest(self, path: str, **query: str) -> Any:
        if query:
            path += "?" + urllib.parse.urlencode(query)
        connection = _UnixHTTPConnection(str(self.socket_path), timeout=5)
        try:
            connection.request("GET", path, headers={"X-API-Key": self.api_key})
            response = connection.getresponse()
            body = response.read()
        except http.client.HTTPException as exc:
            raise OSError(f"REST {path}: {exc}") from exc
        finally:
            connection.close()
        if response.status != 200:
            raise OSError(f"REST {path}: HTTP {response.status}")
        return json.loads(body)


class LanSyncthing(syncthing.SyncthingCluster):
    """Two Syncthing instances in the hosts of `lan`, joined by local discovery only."""

    def __init__(self, lan: Lan, *, binary: str) -> None:
        super().__init__(2, binary=binary)
        self.lan = lan

    def prepare(self) -> None:
        """Homes and configs; nothing runs yet (`launch` starts an instance)."""
        self.base = Path(tempfile.mkdtemp(prefix="syncthing-discovery-"))
        for index, name in enumerate("AB", start=1):
            instance = LanInstance(
                name=name,
                home=self.base / name / "home",
                folder=self.base / name / "folder",
                gui_port=0,
                listen_port=SYNCTHING_PORT,
                api_key=secrets.token_urlsafe(24),
                host=self.lan.address(index),
                index=index,
            )
            self._generate(instance)
            self.instances.append(instance)
        for member in self.instances:
            self._configure(member)

    def _configure(self, instance: syncthing.SyncthingInstance) -> None:
        """The harness's config, then: this host's IP, local discovery on, the other device
        at `dynamic`, the REST API on a Unix socket."""
        super()._configure(instance)
        assert isinstance(instance, LanInstance)
        path = instance.home / "config.xml"
        tree = ET.parse(path)
        root = tree.getroot()
        _element(root, "gui/address").text = str(instance.socket_path)
        options = _element(root, "options")
        for old in options.findall("listenAddress"):
            options.remove(old)
        ET.SubElement(options, "listenAddress").text = instance.address
        _element(options, "localAnnounceEnabled").text = "true"
        _element(options, "announceLANAddresses").text = "true"  # Syncthing's default
        for device in root.findall("device"):
            if device.get("id") != instance.device_id:
                _element(device, "address").text = "dynamic"
        tree.write(path, encoding="unicode")

    def _command(self, instance: syncthing.SyncthingInstance) -> list[str]:
        assert isinstance(instance, LanInstance)
        return self.lan.exec_args(instance.index, super()._command(instance))

    def launch(self, instance: LanInstance) -> float:
        """Start `instance`; the wall-clock time just before its process was spawned."""
        at = time.time()
        self._spawn(instance)
        return at


def _element(parent: ET.Element, path: str) -> ET.Element:
    found = parent.find(path)
    if found is None:
        raise BenchError(f"no <{path}> in the config syncthing generated")
    return found


def _event_time(stamp: str) -> float:
    """Syncthing's RFC 3339 times (nanoseconds, an offset or Z) as a Unix time."""
    matched = re.fullmatch(r"(.+T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", stamp)
    if matched is None:
        raise BenchError(f"an event time Syncthing wrote: {stamp!r}")
    whole, fraction, zone = matched.groups()
    zone = "+00:00" if zone == "Z" else zone
    return datetime.fromisoformat(whole + zone).timestamp() + float(f"0.{fraction or 0}")


def _wait_connected(pending: dict[str, tuple[LanInstance, str]], limit: float) -> dict[str, float]:
    """Read every pending instance's connections until it shows its peer's device ID
    connected; the wall-clock time each was first seen so, by name."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + limit
    while len(seen) < len(pending):
        for name, (instance, peer) in pending.items():
            if name in seen:
                continue
            instance.check_alive()
            try:
                if peer in instance.connected_to():
                    seen[name] = time.time()
            except (OSError, ValueError, KeyError):
                pass  # not answering yet
        if time.monotonic() >= deadline:
            missing = [name for name in pending if name not in seen]
            raise BenchError(
                f"Syncthing {', '.join(missing)} not connected after {limit:g} s:\n"
                + "\n".join(
                    f"-- {pending[n][0].name}:\n{pending[n][0].log_tail()}" for n in missing
                )
            )
        time.sleep(POLL)
    return seen


def syncthing_sample(binary: str, *, together: bool, settle: float) -> Sample:
    meter = CpuMeter()
    with Lan(2) as lan:
        cluster = LanSyncthing(lan, binary=binary)
        try:
            cluster.prepare()
            first, second = (i for i in cluster.instances if isinstance(i, LanInstance))
            first_at = cluster.launch(first)
            if not together:
                _wait_startup(first)
                time.sleep(settle)
            second_at = cluster.launch(second)
            pending = {"B": (second, first.device_id)}
            if together:
                pending["A"] = (first, second.device_id)
            seen = _wait_connected(pending, SYNCTHING_CONNECT_LIMIT)
            kind = second.rest("/rest/system/connections")["connections"][first.device_id]
            events = second.rest("/rest/events", since="0", timeout="1")
            notes = _hello_failures(cluster.instances)
        finally:
            cluster.close()
    # The first of each kind, about the other device where the kind names one.
    times: dict[str, float] = {}
    for event in events:
        data = event.get("data") or {}
        about = data.get("device", data.get("id", first.device_id))
        if about == first.device_id:
            times.setdefault(event["type"], _event_time(event["time"]) - second_at)
    startup = times.get("StartupComplete")
    if startup is None:
        raise BenchError("Syncthing reported no StartupComplete event")
    return Sample(
        started=startup,
        found=times.get("DeviceDiscovered"),
        connected=seen["B"] - second_at,
        outgoing=str(kind.get("type", "")).endswith("-client"),
        via="local discovery" if "DeviceDiscovered" in times else "",
        both=max(seen.values()) - first_at if together else None,
        event=times.get("DeviceConnected"),
        others=meter.others(),
        notes=notes,
    )


def _hello_failures(instances: Sequence[syncthing.SyncthingInstance]) -> tuple[str, ...]:
    """What the logs say of failed Hello exchanges (the first messages after TLS), above all
    on a connection from the listening port to the listening port: a simultaneous TCP open,
    both instances dialling at once from their listening port (SO_REUSEPORT), on which both
    play TLS client and the handshake waits for its 20 s timeout."""
    failed = same_port = 0
    for instance in instances:
        for line in instance.log_tail(1 << 24).splitlines():
            if "Failed to exchange Hello" not in line:
                continue
            failed += 1
            ports = re.search(r":(\d+)-[^ ]*:(\d+)/tcp", line)
            if ports and ports.group(1) == ports.group(2) == str(SYNCTHING_PORT):
                same_port += 1
    if not failed:
        return ()
    if same_port:
        return (
            f"the first connection failed its Hello exchange, on a connection from port "
            f"{SYNCTHING_PORT} to port {SYNCTHING_PORT} (the logs): a simultaneous TCP open of "
            "two instances dialling each other at once from their listening port, on which "
            "both play TLS client until a 20 s timeout, then a retry",
        )
    return ("a connection failed its Hello exchange first (the logs)",)


def _wait_startup(instance: LanInstance) -> None:
    """Until the instance's REST API answers and its start-up is complete."""
    deadline = time.monotonic() + START_LIMIT
    while True:
        instance.check_alive()
        with contextlib.suppress(OSError, ValueError):
            events = instance.rest("/rest/events", since="0", timeout="0")
            if any(e.get("type") == "StartupComplete" for e in events):
                return
        if time.monotonic() >= deadline:
            raise BenchError(f"Syncthing {instance.name} did not start:\n{instance.log_tail()}")
        time.sleep(POLL)


# -- the run --------------------------------------------------------------------------------------


_IMPORT_TIMER = (
    "import time; started = time.perf_counter(); import backer.cli.commands; "
    "print(time.perf_counter() - started)"
)


def _import_seconds() -> float:
    """How long a fresh interpreter takes to import backer's command line (so every module of
    `backer run`), timed inside it."""
    done = run_measured([sys.executable, "-c", _IMPORT_TIMER])
    return float(done.stdout.decode().strip())


def run(plan: Plan, workdir: Path, log: Callable[[str], None] = print) -> Report:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise BenchError("the discovery benchmark needs root and `ip` (network namespaces)")
    report = Report(plan=plan)
    report.date = utc_date()
    report.load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    report.backer_version = f"{tool_version([*PYTHON, '--version'])} {revision(REPO)}"
    binary = ""
    if any(m.startswith(SYNCTHING) for m in plan.measures):
        binary = syncthing.ensure_syncthing()
        report.syncthing_version = " ".join(tool_version([binary, "--version"]).split()[:2])
    scratch = workdir / "discovery"
    scratch.mkdir(parents=True, exist_ok=True)
    if plan.full:
        wait_for_quiet(60.0, log=log)
    started = time.perf_counter()
    meter = CpuMeter()
    report.samples = {measure: [] for measure in plan.measures}
    for round_ in range(plan.samples):
        if plan.full:  # interpreter start-up alone, for scale, in every round
            report.python_start.append(run_measured([sys.executable, "-c", "pass"]).wall)
            report.imports.append(_import_seconds())
        for measure in plan.measures:
            together = measure in TOGETHER
            if measure.startswith(SYNCTHING):
                sample = syncthing_sample(binary, together=together, settle=plan.settle)
            else:
                method = MDNS if measure == MDNS_BOTH else measure
                sample = backer_sample(
                    method, together=together, settle=plan.settle, scratch=scratch
                )
            report.samples[measure].append(sample)
            found = "-" if sample.found is None else f"{sample.found:.3f}"
            both = "" if sample.both is None else f", both connected {sample.both:.3f}"
            log(
                f"round {round_ + 1}/{plan.samples} {measure}: connected {sample.connected:.3f} s"
                f"{both} (found {found}, started {sample.started:.3f}, "
                f"{'dialled' if sample.outgoing else 'was dialled'})"
            )
    report.others = meter.others()
    report.seconds = time.perf_counter() - started
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run; never writes docs")
    parser.add_argument("--samples", type=int, help="rounds (default 10; quick: 1)")
    parser.add_argument("--write-doc", action="store_true", help="rewrite ## Discovery")
    parser.add_argument("--workdir", default="/tmp/backer-bench", help="scratch directory")
    parser.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    args = parser.parse_args(argv)
    if args.quick and args.write_doc:
        parser.error("--quick never writes the docs")
    plan = QUICK if args.quick else FULL
    if args.samples is not None:
        plan = Plan(
            full=plan.full, samples=args.samples, measures=plan.measures, settle=plan.settle
        )
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = run(plan, workdir)
    except BenchError as exc:
        print(f"discovery_bench: {exc}", file=sys.stderr)
        return 1
    print()
    print(report.text())
    if args.write_doc:
        write_doc_section(DOC, "Discovery", report.markdown())
        print(f"\nwrote the Discovery section of {DOC}")
    if args.json:
        print(json.dumps(report.as_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
