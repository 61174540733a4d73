"""Node benchmark: whole backer nodes (listener, mesh, gossip, watcher, puller) on 127.0.0.1.

The nodes run in this process, as `tests/nodes.py` runs them: each `backer.node.Node` with its
own home (device key), folder and listener on 127.0.0.1, every folder shared with one folder key
(so every session is encrypted), each with the `FolderOptions` and config a user gets unless a
measure says otherwise, but with discovery off (the topologies are the static ones below).
Measures (issue 5's list), each beside a reference from the same run where one exists:

  1. single-hop latency: two nodes; a new 1 KiB file (random bytes, a unique name) written and
     closed in A, until the same bytes are at the same path in B (read every 3 ms); 20 samples.
     Reference: Syncthing's single-hop latency, `bench/syncthing.py`, 10 samples in the same
     run (its best case, `fsWatcherDelayS=1`, is about 1 s). Target: median under 0.25 s.
  2. 5-node line: node i knows only node i-1 and tells nobody of other addresses
     (`FolderOptions(share_addresses=False)`, else the line fills in to a mesh); from a write at
     one end to the same bytes at the other; 10 samples. Target: under 1 s.
  3. idle traffic of one session: two connected nodes, nothing changing, over a 90 s window
     (the default gossip every 30 s, the channel keepalive after 45 s of silence): the bytes and
     packets crossing the TCP connection both ways, from the kernel's tcp_info of the dialling
     socket (`ss -ti`); Syncthing's connection (harness of item 1) measured by the same means
     over the same window. Target: under 1 kB a minute.
  4. convergence: 2, 5, 10 and 20 nodes, each dialling every node started before it (a full
     mesh, within the default limit of 16 peers); a tree of 200 files of 1-16 KiB (seeded)
     written into the first node, until every node holds the same root, the first node's index
     holding every file; the wire bytes each node received (counted at every connection's
     dialling end, see `WireMeter`). Should the default peer limit leave the nodes in islands
     (it did for 20 nodes until the limit applied to dialled sessions only: 17 filled up and
     refused the rest), that is reported, and the runs are made with `max_peers` raised to
     allow a full mesh.

Run from the repository root with backer installed (`pip install -e .`):

    python bench/node_bench.py            # full run (~7 min), rewrites "## Node" in the docs
    python bench/node_bench.py --quick    # smoke run (~10 s): few samples, no Syncthing, no docs

`--json` also prints every raw figure as one JSON object (the smoke test reads it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import resource
import secrets
import shutil
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import syncthing
from common import (
    KIB,
    BenchError,
    CpuMeter,
    DatasetSpec,
    Row,
    backer_command,
    describe,
    ensure_dataset,
    grid_markdown,
    grid_text,
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
    TcpCounters,
    tcp_connections,
)

from backer.config import DEFAULT_MAX_PEERS, FolderConfig, Home, NodeConfig
from backer.events import FolderScanned, PullFinished
from backer.index.store import IndexStore
from backer.keys import FolderKey
from backer.mesh.peers import KEEPALIVE, FolderMesh
from backer.mesh.preface import PREFACE_SIZE
from backer.mesh.transport import dial
from backer.node.bus import EventBus
from backer.node.folder import FolderOptions, FolderRunner
from backer.node.node import Node, NodeOptions
from backer.sync.link import Link
from backer.sync.peer import GOSSIP_EVERY

__all__ = ["FULL", "QUICK", "NodeBench", "Plan", "Report", "main"]

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
COMMAND = "python bench/node_bench.py"

TARGET_HOP = 0.25  # seconds, median single-hop latency
TARGET_LINE = 1.0  # seconds, median end-to-end latency of the 5-node line
TARGET_IDLE = 1000  # bytes a minute per idle session, both directions (TCP payload)
SAMPLE_SIZE = 1024
POLL = 0.003  # seconds between two looks at the target file
CONVERGE_POLL = 0.005  # seconds between two looks at every node's root
SAMPLE_LIMIT = 30.0  # seconds for one file to arrive
CONVERGE_LIMIT = 300.0  # seconds for one tree to reach every node
SETTLE = 0.3  # seconds of quiet before each sample (debounce 0.05 s, max_delay 1 s after a burst)
MESH_LIMIT = 60.0  # seconds for a cluster's sessions to form
MESH_STABLE = 2.0  # seconds without a change after which an incomplete mesh counts as formed
PARTITION_AFTER = 10.0  # seconds without a change after which islands count as for good
PROBE_WAIT = 10.0  # seconds a file written into a partitioned cluster is given to spread
# A segment on the wire carries at least Ethernet (14 B), IPv4 (20 B) and TCP (20 B) headers,
# plus the TCP timestamp option Linux puts in every segment (12 B).
HEADER_BYTES = 66
# Each node would have its own process, and each process asyncio's default pool of worker
# threads: a cluster in one process gets that many threads per node.
POOL_PER_NODE = min(32, (os.cpu_count() or 1) + 4)
BUSY_CORES = 0.2  # other processes using more than this make the figures suspect
_T = TypeVar("_T")
_E = TypeVar("_E")


@dataclass(frozen=True, slots=True)
class Plan:
    hop_samples: int
    syncthing_samples: int  # 0: no Syncthing
    line_nodes: int
    line_samples: int
    idle_window: float  # seconds
    idle_settle: float  # seconds between the session's start and the window
    gossip_every: float | None  # None: the default (GOSSIP_EVERY)
    sizes: tuple[int, ...]  # cluster sizes for convergence
    trees: tuple[DatasetSpec, ...]  # one per convergence run
    quiet_wait: float  # seconds to wait, before each block, for other processes to go quiet
    full: bool  # whether the targets apply


def _trees(prefix: str, files: int, runs: int) -> tuple[DatasetSpec, ...]:
    return tuple(
        DatasetSpec(
            name=f"{prefix}-{run}",
            files=files,
            min_size=KIB,
            max_size=16 * KIB,
            dirs=10,
            seed=50 + run,
        )
        for run in range(runs)
    )


FULL = Plan(
    hop_samples=20,
    syncthing_samples=10,
    line_nodes=5,
    line_samples=10,
    # A whole number of gossip rounds (30 s) and keepalive checks (45 s), and of Syncthing's ping
    # check (every 45 s, a ping if nothing was sent for 45 s; at most one per 90 s): every timer
    # fires the same number of times whatever its phase.
    idle_window=90.0,
    idle_settle=3.0,
    gossip_every=None,
    sizes=(2, 5, 10, 20),
    trees=_trees("node-tree", 200, 3),
    quiet_wait=15,
    full=True,
)
QUICK = Plan(
    hop_samples=3,
    syncthing_samples=0,
    line_nodes=5,
    line_samples=2,
    idle_window=3.0,
    idle_settle=0.5,
    gossip_every=1.0,  # so that a 3 s window sees a few rounds
    sizes=(2, 3),
    trees=_trees("quick-node-tree", 30, 1),
    quiet_wait=0,
    full=False,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run; writes no docs")
    parser.add_argument("--workdir", default="/tmp/backer-bench", help="datasets and scratch")
    parser.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = NodeBench(workdir, plan).run()
    except BenchError as exc:
        print(f"node_bench: {exc}", file=sys.stderr)
        return 1
    print()
    print(report.text())
    if not args.quick:
        write_doc_section(DOC, "Node", report.markdown())
        print(f"\nwrote the Node section of {DOC}")
    if args.json:
        print(json.dumps(report.results.as_json()))
    return 0


# -- what a run produced ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One file sent from one node to another (or along a line)."""

    seconds: float  # from the file closed at the source to the same bytes at the target
    scanned: float | None  # the source's scan that indexed it, seconds after the close
    pulled: tuple[float | None, ...]  # each other node's pull of it finished (source excluded)


@dataclass(frozen=True, slots=True)
class Traffic:
    """What crossed one TCP connection during a window, seen from its dialling end."""

    seconds: float
    sent: int  # TCP payload bytes, dialling end to listening end
    received: int  # and back
    packets: int  # segments both ways, pure ACKs included
    data_packets: int
    link_bytes: int = -1  # backer: the same, counted at the nodes' links (a cross-check)

    @property
    def total(self) -> int:
        return self.sent + self.received

    def per_minute(self, count: float) -> float:
        return count * 60 / self.seconds

    @classmethod
    def between(cls, first: TcpCounters, last: TcpCounters, seconds: float) -> Traffic:
        if first.local != last.local:
            raise BenchError(f"the connection changed during the window: {first} -> {last}")
        return cls(
            seconds=seconds,
            sent=last.bytes_sent - first.bytes_sent,
            received=last.bytes_received - first.bytes_received,
            packets=last.segs_out + last.segs_in - first.segs_out - first.segs_in,
            data_packets=last.data_segs_out
            + last.data_segs_in
            - first.data_segs_out
            - first.data_segs_in,
        )


@dataclass(frozen=True, slots=True)
class Convergence:
    """One tree written into node 0 of a cluster, until every node had it."""

    nodes: int
    tree_files: int
    tree_bytes: int
    sessions: tuple[int, ...]  # sessions of each node when the run started
    write: float  # seconds writing the tree
    seconds: float  # from the last file closed until every node held the same root
    received: tuple[int, ...]  # wire bytes each node received, node 0 (the writer) first
    sent: tuple[int, ...]
    dials: int  # connections opened during the run
    cpu: float  # CPU seconds of this process (every node) over the run
    others: float  # cores used by other processes meanwhile
    max_peers: int = DEFAULT_MAX_PEERS  # the peer limit in every node's config

    @property
    def others_received(self) -> list[int]:
        return list(self.received[1:])


@dataclass(slots=True)
class Results:
    hop: list[Sample] = field(default_factory=list)
    syncthing: list[float] = field(default_factory=list)
    line: list[Sample] = field(default_factory=list)
    idle: Traffic | None = None
    idle_syncthing: Traffic | None = None
    convergence: dict[int, list[Convergence]] = field(default_factory=dict)
    mesh: dict[int, str] = field(default_factory=dict)  # how each cluster's mesh formed
    partitions: dict[int, str] = field(default_factory=dict)  # sizes the default limit split
    blocks: list[tuple[str, float]] = field(default_factory=list)  # (block, others' cores)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Report:
    plan: Plan
    date: str
    load: str
    results: Results = field(default_factory=Results)
    backer_version: str = ""  # and revision, taken when the run starts (the code it imported)
    syncthing_version: str = ""
    others: float = 0.0
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def verdict(self) -> str:
        missed = [r for r in self.rows if r.met == _yes(False)]
        met = [r for r in self.rows if r.met == _yes(True)]
        if not missed and not met:
            return "No target applies to a quick run."
        if not missed:
            return f"All {len(met)} targets met."
        listed = "; ".join(f"{r.measure}: {r.backer} ({r.target})" for r in missed)
        return f"Targets missed ({len(missed)} of {len(missed) + len(met)}): {listed}."

    def text(self) -> str:
        lines = [text_table(self.rows), "", self.verdict(), "", _convergence_text(self)]
        lines += [
            "",
            f"other processes used {self.others:.2f} cores on average during the run "
            f"(load average at the start: {self.load})",
        ]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def markdown(self) -> str:
        plan = self.plan
        tools = "; ".join(v for v in (self.backer_version, self.syncthing_version) if v)
        tree = plan.trees[0]
        window = (
            " (a whole number of 30 s gossip rounds and 45 s keepalive periods, and of "
            "Syncthing's 45 s ping check)"
            if plan.full
            else ""
        )
        parts = [
            f"Measured {self.date} on {machine()}; {tools}. Load "
            f"average at the start: {self.load}; other processes on the machine used "
            f"{self.others:.2f} cores on average during the run (0 = idle).",
            "",
            "Command, from the repository root with backer installed (`pip install -e .`):",
            f"`{COMMAND}` (about 7 minutes; the trees are generated once and cached in "
            "`--workdir`, default `/tmp/backer-bench`; `--quick` is the smoke run the tests "
            "use).",
            "",
            "How: every backer node is a `backer.node.Node` in the benchmark's process (one "
            "event loop, so one GIL for all of them; each node gets its own pool of "
            f"{POOL_PER_NODE} worker threads, as a process of its own would), with its own home "
            "and device key, its own folder and a listener on 127.0.0.1:0, every folder shared "
            "with one folder key (Noise-encrypted sessions), the watcher on, and the default "
            "`FolderOptions` (debounce 0.05 s, gossip every "
            f"{GOSSIP_EVERY:g} s) and config (at most {DEFAULT_MAX_PEERS} peers) except where "
            "said, but with discovery off (`discovery = []`): each topology below is the static "
            "one described, and nothing leaves 127.0.0.1. A node's static peers are given to "
            "its mesh (`FolderMesh.learn(address, source='static')`, what the node does with "
            "`peers` of its config) once its dialler is wrapped to count bytes. "
            "*Latency*: a new file of 1 KiB of random bytes with a unique name is written and "
            "closed in the source's folder; the clock runs from the close until the target "
            "file, read every 3 ms, holds the same bytes; before each sample every node holds "
            f"the same root and {SETTLE:g} s pass. Syncthing: `bench/syncthing.py` "
            "(`SyncthingPair().measure_latency`, same file size and polling), two instances "
            "on 127.0.0.1 with `fsWatcherDelayS=1`, its shortest. *Line*: node i statically "
            "knows node i-1 only, and `share_addresses=False` (not the default) keeps it a "
            "line; the file goes from node 0 to node "
            f"{plan.line_nodes - 1}. *Idle*: two nodes, B dialling A, nothing changing; the "
            f"window starts {plan.idle_settle:g} s after the session did and lasts "
            f"{plan.idle_window:g} s{window}. Bytes and packets are the kernel's "
            "tcp_info counters of the dialling socket (`ss -ti`: bytes_sent, bytes_received, "
            "segs_out + segs_in, data segments), so TCP payload as it crossed the wire: "
            "ciphertext with the record headers and tags (backer: 2-byte length + 16-byte tag "
            "per record; Syncthing: TLS records). The same bytes counted at the backer nodes' "
            "links agree (below). TCP/IP headers are estimated at "
            f"{HEADER_BYTES} B a packet (Ethernet, IPv4, TCP with timestamps). Syncthing's "
            "connection is measured over the same window, both pairs idle side by side. "
            "*Convergence*: node "
            "i dials every node started before it (a full mesh where the peer limit allows; "
            "address sharing on, as by default), and the run starts once the mesh has formed "
            "and every root is equal. A tree of "
            f"{describe(tree)} (seeded random bytes; a different tree per run, so no chunk is "
            "already local) is written into node 0 (in a worker thread, so that the nodes run "
            "meanwhile); the clock runs from the last file closed until every node holds one "
            "root and node 0's index holds every file of the tree (all copies then checked "
            "byte for byte, outside the timing). Bytes are wire bytes (TCP payload, the "
            "folder preface included) counted at the dialling end of every connection by a "
            "wrapper around the mesh's dialler, credited to both ends. kB and MB are 10^3 and "
            "10^6 bytes; ratio is backer / reference.",
            "",
            markdown_table(self.rows),
            "",
            self.verdict(),
        ]
        if self.notes:
            parts += ["", *(f"- {note}" for note in self.notes)]
        parts += ["", "### Convergence", "", _convergence_markdown(self)]
        parts += ["", "All runs:", "", *(f"- {line}" for line in _raw(self))]
        return "\n".join(parts) + "\n"


# -- nodes in this process -------------------------------------------------------------------------


@dataclass(slots=True)
class Member:
    """One node of a cluster."""

    index: int
    node: Node
    folder: Path

    @property
    def runner(self) -> FolderRunner:
        return next(iter(self.node.folders.values()))

    @property
    def mesh(self) -> FolderMesh:
        return self.runner.mesh

    @property
    def root(self) -> bytes:
        return self.runner.replica.root

    @property
    def address(self) -> str:
        return self.node.listen_address

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


class CountingLink:
    """A dialled Link that tells a `WireMeter` every byte written to and read from it."""

    def __init__(self, link: Link, meter: WireMeter, dialler: int, far: int) -> None:
        self._link = link
        self._meter = meter
        self._dialler = dialler
        self._far = far

    async def read(self) -> bytes:
        data = await self._link.read()
        self._meter.add(self._far, self._dialler, len(data))
        return data

    async def write(self, data: bytes) -> None:
        await self._link.write(data)
        self._meter.add(self._dialler, self._far, len(data))

    async def close(self) -> None:
        await self._link.close()


class WireMeter:
    """TCP payload bytes of every connection the nodes of a cluster dial, by node.

    Each node's mesh dials through `dialer(index)`: the real `mesh.transport.dial` (which sends
    the folder preface), its link wrapped in a `CountingLink`. So every connection is counted
    once, at its dialling end, and each byte is credited as sent by one node and received by
    the other (the far end is known by its listening address)."""

    def __init__(self) -> None:
        self.owners: dict[str, int] = {}  # listening address -> node
        self.sent: Counter[int] = Counter()
        self.received: Counter[int] = Counter()
        self.dials = 0

    def dialer(self, me: int) -> Callable[[str, bytes], Coroutine[Any, Any, Link]]:
        async def counted(address: str, discovery_id: bytes) -> Link:
            link = await dial(address, discovery_id)
            far = self.owners.get(address, -1)
            self.dials += 1
            self.add(me, far, PREFACE_SIZE)
            return CountingLink(link, self, me, far)

        return counted

    def add(self, sender: int, receiver: int, count: int) -> None:
        self.sent[sender] += count
        self.received[receiver] += count

    def snapshot(self) -> tuple[Counter[int], Counter[int], int]:
        return Counter(self.sent), Counter(self.received), self.dials


@contextlib.asynccontextmanager
async def cluster(
    base: Path,
    count: int,
    *,
    options: FolderOptions,
    peers_of: Callable[[int], Sequence[int]],
    meter: WireMeter,
    max_peers: int = DEFAULT_MAX_PEERS,
) -> AsyncIterator[list[Member]]:
    """`count` nodes started in order, sharing one folder key; node i statically knows the
    nodes `peers_of(i)` (all started before it). `max_peers` is the config's."""
    key = FolderKey.generate()
    members: list[Member] = []
    async with contextlib.AsyncExitStack() as stack:
        for index in range(count):
            home = Home(base / f"n{index}" / "home")
            folder = base / f"n{index}" / "folder"
            folder.mkdir(parents=True)
            IndexStore.open(folder, create=True).close()
            config = NodeConfig(
                folders=(FolderConfig(path=str(folder), key=str(key)),),
                listen="127.0.0.1:0",
                max_peers=max_peers,
                discovery=(),  # the topology is the static one asked for, on 127.0.0.1 alone
            )
            node = Node(
                home,
                config,
                options=NodeOptions(folder=options),
                bus=EventBus(clock=time.perf_counter),
            )
            await stack.enter_async_context(node)
            member = Member(index, node, folder)
            meter.owners[member.address] = index
            member.mesh.dialer = meter.dialer(index)
            for peer in peers_of(index):
                member.mesh.learn(members[peer].address, source="static")
            members.append(member)
        # Leaving: every node is asked to stop first, so that they shut down side by side (each
        # closes its index, a checkpoint and an fsync), then each is awaited.
        stack.callback(_stop_all, members)
        yield members


def _stop_all(members: Sequence[Member]) -> None:
    for member in members:
        member.node.stop()


def _run_nodes(count: int, work: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run `work()` in a new event loop whose default pool has threads for `count` nodes."""

    async def run() -> _T:
        pool = ThreadPoolExecutor(max_workers=count * POOL_PER_NODE, thread_name_prefix="node")
        asyncio.get_running_loop().set_default_executor(pool)
        return await work()

    return asyncio.run(run())


async def _until(check: Callable[[], bool], *, limit: float, what: str, poll: float = 0.01) -> None:
    deadline = time.perf_counter() + limit
    while not check():
        if time.perf_counter() > deadline:
            raise BenchError(f"not within {limit:g} s: {what}")
        await asyncio.sleep(poll)


def _converged(members: Sequence[Member]) -> bool:
    return len({member.root for member in members}) == 1


def _sessions(members: Sequence[Member]) -> set[tuple[int, int]]:
    """Node pairs with a session open at both ends."""
    index = {member.mesh.own: member.index for member in members}
    ends = {
        (member.index, index[device])
        for member in members
        for device in member.mesh.connections
        if device in index
    }
    return {(a, b) for a, b in ends if a < b and (b, a) in ends}


def _islands(count: int, pairs: set[tuple[int, int]]) -> list[list[int]]:
    """The connected components of the nodes, largest first."""
    links: dict[int, set[int]] = {node: set() for node in range(count)}
    for a, b in pairs:
        links[a].add(b)
        links[b].add(a)
    islands, placed = [], set()
    for start in range(count):
        if start in placed:
            continue
        island, todo = {start}, [start]
        while todo:
            for there in links[todo.pop()] - island:
                island.add(there)
                todo.append(there)
        placed |= island
        islands.append(sorted(island))
    return sorted(islands, key=len, reverse=True)


def _nodes(indices: Sequence[int]) -> str:
    """'0-16' for a run of node numbers, '0, 3, 5' otherwise."""
    if len(indices) > 2 and list(indices) == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}-{indices[-1]}"
    return ", ".join(str(i) for i in indices)


class Partitioned(Exception):
    """The sessions of a cluster settled into islands: some nodes can never reach others."""


async def _mesh_formed(members: Sequence[Member]) -> str:
    """Wait until every node has a session with every other, or (where the peer limit forbids
    that) the sessions connect every node and have not changed for MESH_STABLE seconds; say
    how it ended. Raises Partitioned if they leave the nodes in islands, unchanged for
    PARTITION_AFTER seconds."""
    count = len(members)
    started = time.perf_counter()
    last: set[tuple[int, int]] = set()
    since = started
    while True:
        now = time.perf_counter()
        pairs = _sessions(members)
        if pairs != last:
            last, since = pairs, now
        degrees = sorted(sum(i in pair for pair in pairs) for i in range(count))
        shape = (
            f"{len(pairs)} of {count * (count - 1) // 2} possible sessions, sessions per node "
            f"{degrees[0]}-{degrees[-1]}"
        )
        if len(pairs) == count * (count - 1) // 2:
            return f"full mesh after {now - started:.1f} s ({shape})"
        connected = not _islands(count, pairs)[1:]
        if connected and now - since >= MESH_STABLE:
            return f"stable after {now - started:.1f} s: {shape}"
        if not connected and now - since >= PARTITION_AFTER:
            islands = " and ".join(_nodes(island) for island in _islands(count, pairs))
            raise Partitioned(
                f"the sessions split the {count} nodes into islands, unchanged for "
                f"{now - since:.0f} s: nodes {islands} ({shape})"
            )
        if now - started > MESH_LIMIT:
            if not connected:
                raise BenchError(f"{count} nodes not connected after {MESH_LIMIT:g} s: {shape}")
            return f"still changing after {MESH_LIMIT:g} s: {shape}"
        await asyncio.sleep(0.05)


def _since(
    member: Member, kind: type[_E], since: float, matches: Callable[[_E], bool]
) -> float | None:
    """Seconds from `since` to the node's first event of `kind` that `matches`, if any."""
    for stamp, event in member.node.bus.recent:
        if stamp >= since and isinstance(event, kind) and matches(event):
            return stamp - since
    return None


def _marks(
    members: Sequence[Member], src: Member, started: float
) -> tuple[float | None, tuple[float | None, ...]]:
    """When, after `started`, the source's scan indexed a new file, and each other node's pull
    of it finished (None: not yet)."""
    scanned = _since(src, FolderScanned, started, lambda e: e.changed > 0)
    pulled = tuple(
        _since(member, PullFinished, started, lambda e: e.files > 0)
        for member in members
        if member is not src
    )
    return scanned, pulled


def _settled(members: Sequence[Member], src: Member, started: float) -> bool:
    scanned, pulled = _marks(members, src, started)
    return _converged(members) and None not in (scanned, *pulled)


async def _propagation(
    members: Sequence[Member], *, source: int, target: int, samples: int
) -> list[Sample]:
    """Seconds from a new file closed in `source`'s folder until the same bytes are at the same
    path in `target`'s, one figure per sample; every node settles between samples."""
    src, dst = members[source], members[target]
    found = []
    for index in range(samples):
        await _until(
            lambda: _converged(members), limit=SAMPLE_LIMIT, what="equal roots between samples"
        )
        await asyncio.sleep(SETTLE)
        name = f"latency-{index:04d}-{secrets.token_hex(4)}.bin"
        payload = os.urandom(SAMPLE_SIZE)
        arrived = dst.folder / name
        with (src.folder / name).open("wb") as out:
            out.write(payload)
        started = time.perf_counter()
        deadline = started + SAMPLE_LIMIT
        while True:
            try:
                if arrived.read_bytes() == payload:
                    break
            except FileNotFoundError:
                pass
            if time.perf_counter() > deadline:
                raise BenchError(f"{name} did not reach node {target} in {SAMPLE_LIMIT:g} s")
            await asyncio.sleep(POLL)
        seconds = time.perf_counter() - started
        # The file is in place a moment before the pull that brought it commits and reports
        # its end: wait for every node's events (outside the timing).
        await _until(
            functools.partial(_settled, members, src, started),
            limit=SAMPLE_LIMIT,
            what="equal roots and every node's scan or pull event",
        )
        scanned, pulled = _marks(members, src, started)
        found.append(Sample(seconds=seconds, scanned=scanned, pulled=pulled))
    return found


async def _probe(members: Sequence[Member]) -> str:
    """Write a file into node 0 of a partitioned cluster; say which nodes it reached in
    PROBE_WAIT seconds."""
    payload = os.urandom(SAMPLE_SIZE)
    name = f"probe-{secrets.token_hex(4)}.bin"
    (members[0].folder / name).write_bytes(payload)
    started = time.perf_counter()

    def reached() -> list[int]:
        found = []
        for member in members[1:]:
            with contextlib.suppress(OSError):
                if (member.folder / name).read_bytes() == payload:
                    found.append(member.index)
        return found

    with contextlib.suppress(BenchError):
        await _until(
            lambda: len(reached()) == len(members) - 1, limit=PROBE_WAIT, what="", poll=0.05
        )
    got = reached()
    missing = sorted(set(range(1, len(members))) - set(got))
    return (
        f"a file written into node 0 reached nodes {_nodes(got) or 'none'}"
        + (f", and after {PROBE_WAIT:g} s still not nodes {_nodes(missing)}" if missing else "")
        + f" ({time.perf_counter() - started:.1f} s)"
    )


# -- the benchmark -------------------------------------------------------------------------------


class NodeBench:
    def __init__(self, workdir: Path, plan: Plan) -> None:
        self.workdir = workdir
        self.plan = plan
        self.base = workdir / "node"
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        self.report = Report(plan=plan, date=utc_date(), load=load)
        backer = tool_version(backer_command(Path("/nonexistent"), "--version"))
        self.report.backer_version = f"{backer} {revision(REPO)}"
        self.results = self.report.results
        self._block: tuple[str, CpuMeter] | None = None

    def run(self) -> Report:
        plan = self.plan
        meter = CpuMeter()
        trees = [self.tree(spec) for spec in plan.trees]
        shutil.rmtree(self.base, ignore_errors=True)
        try:
            self.start_block("single hop")
            self.results.hop = _run_nodes(2, self.hop)
            self.start_block("line")
            self.results.line = _run_nodes(plan.line_nodes, self.line)
            if plan.syncthing_samples:
                self.with_syncthing()
            else:
                self.start_block("idle")
                self.results.idle = _run_nodes(2, lambda: self.idle(None))[0]
            for count in plan.sizes:
                self.start_block(f"convergence {count}")
                self.results.convergence[count] = self.converge(count, trees)
            self.end_block()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
        self.report.others = meter.others()
        self.finish()
        return self.report

    def finish(self) -> None:
        """The report's rows and notes, from the results."""
        self.rows()
        if self.report.others > BUSY_CORES or any(o > BUSY_CORES for _, o in self.results.blocks):
            busy = ", ".join(f"{name} {others:.2f}" for name, others in self.results.blocks)
            self.report.notes.append(
                f"other processes used {self.report.others:.2f} cores on average during this "
                f"run (by block: {busy}): on a 2-core machine the figures differ from an idle "
                "machine's, the latencies and convergence times most"
            )

    def start_block(self, name: str) -> None:
        self.end_block()
        if self.plan.quiet_wait:
            wait_for_quiet(self.plan.quiet_wait, log=_log)
        _log(f"-- {name}")
        self._block = (name, CpuMeter())

    def end_block(self) -> None:
        if self._block is not None:
            name, meter = self._block
            self.results.blocks.append((name, meter.others()))
            self._block = None

    def tree(self, spec: DatasetSpec) -> list[tuple[str, bytes]]:
        dataset = ensure_dataset(self.workdir, spec, log=_log)
        return [
            (rel, path.read_bytes())
            for (rel, _), path in zip(dataset.files, dataset.paths(), strict=True)
        ]

    # -- 1, 2: latency -----------------------------------------------------------------------

    async def hop(self) -> list[Sample]:
        async with cluster(
            self.base / "hop", 2, options=FolderOptions(), peers_of=_previous, meter=WireMeter()
        ) as members:
            return await _propagation(members, source=0, target=1, samples=self.plan.hop_samples)

    async def line(self) -> list[Sample]:
        count = self.plan.line_nodes
        options = FolderOptions(share_addresses=False)
        async with cluster(
            self.base / "line", count, options=options, peers_of=_previous, meter=WireMeter()
        ) as members:
            want = {(i, i + 1) for i in range(count - 1)}
            await _until(
                lambda: _sessions(members) == want, limit=MESH_LIMIT, what="the line's sessions"
            )
            samples = await _propagation(
                members, source=0, target=count - 1, samples=self.plan.line_samples
            )
            if _sessions(members) != want:
                raise BenchError(f"the line did not stay a line: {sorted(_sessions(members))}")
            return samples

    # -- 3: idle traffic, and Syncthing ------------------------------------------------------

    def with_syncthing(self) -> None:
        binary = syncthing.ensure_syncthing()
        self.report.syncthing_version = " ".join(tool_version([binary, "--version"]).split()[:2])
        self.start_block("Syncthing latency")
        with syncthing.SyncthingPair() as pair:
            self.results.syncthing = pair.measure_latency(self.plan.syncthing_samples)
            # B, the later instance, dials A: its socket is the one connected to A's port.
            port = pair.instances[0].listen_port
            self.start_block("idle (backer and Syncthing side by side)")
            backer, reference = _run_nodes(2, lambda: self.idle(lambda: _tcp_counters(port)))
            pair.check_loopback_only()
        self.results.idle, self.results.idle_syncthing = backer, reference

    async def idle(
        self, reference: Callable[[], TcpCounters] | None
    ) -> tuple[Traffic, Traffic | None]:
        """Two nodes connected and idle: what crossed their connection over the window (and,
        with `reference`, that connection's over the same window)."""
        plan = self.plan
        options = (
            FolderOptions()
            if plan.gossip_every is None
            else FolderOptions(gossip_every=plan.gossip_every)
        )
        meter = WireMeter()
        async with cluster(
            self.base / "idle", 2, options=options, peers_of=_previous, meter=meter
        ) as members:
            a = members[0]
            await _until(lambda: bool(_sessions(members)), limit=MESH_LIMIT, what="a session")
            await asyncio.sleep(plan.idle_settle)
            first = await asyncio.to_thread(_tcp_counters, a.port)
            other_first = reference() if reference is not None else None
            links_first = sum(meter.sent.values())
            started = time.perf_counter()
            await asyncio.sleep(plan.idle_window)
            last = await asyncio.to_thread(_tcp_counters, a.port)
            other_last = reference() if reference is not None else None
            seconds = time.perf_counter() - started
            links = sum(meter.sent.values()) - links_first
            if len(_sessions(members)) != 1 or meter.dials != 1:
                raise BenchError(f"the idle session was replaced ({meter.dials} dials)")
        traffic = Traffic.between(first, last, seconds)
        traffic = Traffic(
            seconds=traffic.seconds,
            sent=traffic.sent,
            received=traffic.received,
            packets=traffic.packets,
            data_packets=traffic.data_packets,
            link_bytes=links,
        )
        syncthing_traffic = None
        if other_first is not None and other_last is not None:
            syncthing_traffic = Traffic.between(other_first, other_last, seconds)
        return traffic, syncthing_traffic

    # -- 4: convergence ----------------------------------------------------------------------

    def converge(self, count: int, trees: Sequence[list[tuple[str, bytes]]]) -> list[Convergence]:
        """The runs of one cluster size, with the default peer limit; if that leaves the nodes
        in islands (which no write can cross), the finding is recorded and the runs are made
        with a limit that allows a full mesh instead."""
        try:
            return _run_nodes(count, functools.partial(self.convergence, count, trees))
        except Partitioned as exc:
            self.results.partitions[count] = str(exc)
            _log(f"   {count} nodes: {exc}")
        return _run_nodes(
            count, functools.partial(self.convergence, count, trees, max_peers=count - 1)
        )

    async def convergence(
        self,
        count: int,
        trees: Sequence[list[tuple[str, bytes]]],
        max_peers: int = DEFAULT_MAX_PEERS,
    ) -> list[Convergence]:
        meter = WireMeter()
        base = self.base / f"mesh{count}-{max_peers}"
        async with cluster(
            base,
            count,
            options=FolderOptions(),
            peers_of=_all_before,
            meter=meter,
            max_peers=max_peers,
        ) as members:
            try:
                self.results.mesh[count] = await _mesh_formed(members)
            except Partitioned as exc:
                raise Partitioned(f"{exc}; {await _probe(members)}") from None
            _log(f"   {count} nodes, max_peers {max_peers}: {self.results.mesh[count]}")
            runs = []
            for run, tree in enumerate(trees):
                runs.append(await self.converge_once(members, meter, f"run{run}", tree))
                runs[-1] = dataclasses.replace(runs[-1], max_peers=max_peers)
                _log(f"   run {run}: {runs[-1].seconds:.2f} s")
        return runs

    async def converge_once(
        self,
        members: Sequence[Member],
        meter: WireMeter,
        prefix: str,
        tree: list[tuple[str, bytes]],
    ) -> Convergence:
        await _until(lambda: _converged(members), limit=CONVERGE_LIMIT, what="equal roots")
        await asyncio.sleep(SETTLE)
        source = members[0]
        initial = source.root
        sessions = tuple(len(member.mesh.connections) for member in members)
        files = [(f"{prefix}/{rel}", data) for rel, data in tree]
        sizes = {path: len(data) for path, data in files}
        sent, received, dials = meter.snapshot()
        cpu, others = _cpu_seconds(), CpuMeter()
        began = time.perf_counter()
        await asyncio.to_thread(_write_tree, source.folder, files)
        written = time.perf_counter()
        deadline = written + CONVERGE_LIMIT
        while True:
            seen = time.perf_counter()
            roots = {member.root for member in members}
            if (
                len(roots) == 1
                and initial not in roots
                and await asyncio.to_thread(_indexed, source, sizes)
            ):
                break
            if seen > deadline:
                raise BenchError(
                    f"{len(members)} nodes did not converge in {CONVERGE_LIMIT:g} s "
                    f"({len(roots)} distinct roots)"
                )
            await asyncio.sleep(CONVERGE_POLL)
        result = Convergence(
            nodes=len(members),
            tree_files=len(files),
            tree_bytes=sum(sizes.values()),
            sessions=sessions,
            write=written - began,
            seconds=seen - written,
            received=tuple(meter.received[m.index] - received[m.index] for m in members),
            sent=tuple(meter.sent[m.index] - sent[m.index] for m in members),
            dials=meter.dials - dials,
            cpu=_cpu_seconds() - cpu,
            others=others.others(),
        )
        if meter.sent[-1] or meter.received[-1]:
            raise BenchError("a node dialled an address no node of the cluster listens on")
        await asyncio.to_thread(_check_copies, members, files)
        return result

    # -- the report --------------------------------------------------------------------------

    def rows(self) -> None:
        plan, results, rows = self.plan, self.results, self.report.rows
        full = plan.full
        hop = [s.seconds for s in results.hop]
        hop_median = median(hop)
        reference, ratio = "not measured (quick run)", "-"
        if results.syncthing:
            st = results.syncthing
            reference = f"Syncthing {_spread(st)}, median of {len(st)}"
            ratio = f"{hop_median / median(st):.2f}x"
        rows.append(
            Row(
                measure=f"single-hop latency, new 1 KiB file, 2 nodes (median of {len(hop)}; "
                "min-max)",
                backer=_spread(hop),
                reference=reference,
                ratio=ratio,
                target=f"median < {TARGET_HOP:g} s",
                met=_yes(hop_median < TARGET_HOP) if full else "n/a",
            )
        )
        line = [s.seconds for s in results.line]
        hops = plan.line_nodes - 1
        rows.append(
            Row(
                measure=f"{plan.line_nodes}-node line, one end to the other (median of "
                f"{len(line)}; min-max)",
                backer=_spread(line),
                reference=f"{hops} x single-hop median = {hops * hop_median:.3f} s",
                ratio=f"{median(line) / (hops * hop_median):.2f}x",
                target=f"median < {TARGET_LINE:g} s",
                met=_yes(median(line) < TARGET_LINE) if full else "n/a",
            )
        )
        idle, st_idle = results.idle, results.idle_syncthing
        assert idle is not None
        window = f"{idle.seconds:.0f} s window"
        rows.append(
            Row(
                measure=f"idle session, TCP payload both ways, per minute ({window})",
                backer=_idle_bytes(idle),
                reference="Syncthing " + _idle_bytes(st_idle) if st_idle else "-",
                ratio=_ratio(idle, st_idle, lambda t: t.total),
                target=f"< {TARGET_IDLE / 1000:g} kB/min",
                met=_yes(idle.per_minute(idle.total) < TARGET_IDLE) if full else "n/a",
            )
        )
        rows.append(
            Row(
                measure=f"idle session, packets both ways per minute; TCP/IP headers at "
                f"{HEADER_BYTES} B each ({window})",
                backer=_idle_packets(idle),
                reference="Syncthing " + _idle_packets(st_idle) if st_idle else "-",
                ratio=_ratio(idle, st_idle, lambda t: t.packets),
            )
        )
        for count, runs in results.convergence.items():
            limit = runs[0].max_peers
            peers = "" if limit == DEFAULT_MAX_PEERS else f", max_peers {limit} (not the default)"
            seconds = median([r.seconds for r in runs])
            tree_bytes = median([r.tree_bytes for r in runs])
            got = median([median(r.others_received) for r in runs])
            most = max(max(r.others_received) for r in runs)
            rows.append(
                Row(
                    measure=f"convergence, {count} nodes{peers}, {runs[0].tree_files} files "
                    f"written into one, seconds (median of {len(runs)})",
                    backer=f"{seconds:.2f} s",
                    reference="-",
                    ratio="-",
                )
            )
            rows.append(
                Row(
                    measure=f"convergence, {count} nodes{peers}, wire bytes received per other "
                    "node (median; max)",
                    backer=f"{_mb(got)}; max {_mb(most)}",
                    reference=f"the tree, {_mb(tree_bytes)}",
                    ratio=f"{got / tree_bytes:.2f}x",
                )
            )
        for count, partition in results.partitions.items():
            self.report.notes.append(
                f"**{count} nodes with the default peer limit ({DEFAULT_MAX_PEERS}) never form "
                f"one mesh**: {partition}. No change can cross from one island to another. The "
                f"{count}-node convergence figures are therefore with `max_peers = {count - 1}` "
                "in every node's config."
            )
        if results.idle and results.idle.link_bytes != results.idle.total:
            self.report.notes.append(
                f"the idle session's bytes counted at the links ({results.idle.link_bytes:,}) "
                f"differ from the kernel's count ({results.idle.total:,})"
            )


# -- helpers -------------------------------------------------------------------------------------


def _previous(index: int) -> Sequence[int]:
    return [index - 1] if index else []


def _all_before(index: int) -> Sequence[int]:
    return range(index)


def _tcp_counters(port: int) -> TcpCounters:
    """The tcp_info counters of the one established TCP connection to 127.0.0.1:`port`, from
    its dialling end."""
    sockets = list(tcp_connections([port]).values())
    if len(sockets) != 1:
        raise BenchError(f"expected one connection to port {port}, found {len(sockets)}")
    return sockets[0]


def _write_tree(root: Path, files: Sequence[tuple[str, bytes]]) -> None:
    for rel, data in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _indexed(member: Member, sizes: dict[str, int]) -> bool:
    """Whether the node's index holds every path of `sizes`, live and of that size."""
    records = member.runner.replica.store.get_many(sizes)
    return all(
        path in records and not records[path].entry.deleted and records[path].entry.size == size
        for path, size in sizes.items()
    )


def _check_copies(members: Sequence[Member], files: Sequence[tuple[str, bytes]]) -> None:
    for member in members:
        for rel, data in files:
            try:
                same = (member.folder / rel).read_bytes() == data
            except OSError:
                same = False
            if not same:
                raise BenchError(f"node {member.index} holds the same root but not {rel}")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _log(message: str) -> None:
    print(message, flush=True)


def _yes(met: bool) -> str:
    return "yes" if met else "**no**"


def _spread(values: Sequence[float]) -> str:
    return f"{median(values):.3f} s ({min(values):.3f}-{max(values):.3f})"


def _ratio(traffic: Traffic, reference: Traffic | None, what: Callable[[Traffic], int]) -> str:
    """backer / Syncthing of a per-minute figure."""
    if reference is None or not what(reference):
        return "-"
    return f"{traffic.per_minute(what(traffic)) / reference.per_minute(what(reference)):.2f}x"


def _mb(count: float) -> str:
    if count >= 1_000_000:
        return f"{count / 1e6:.2f} MB"
    return f"{count / 1e3:.1f} kB"


def _idle_bytes(traffic: Traffic | None) -> str:
    if traffic is None:
        return "-"
    return (
        f"{traffic.per_minute(traffic.total):,.0f} B/min ({traffic.per_minute(traffic.sent):,.0f} "
        f"dialler to listener + {traffic.per_minute(traffic.received):,.0f} back)"
    )


def _idle_packets(traffic: Traffic | None) -> str:
    if traffic is None:
        return "-"
    packets = traffic.per_minute(traffic.packets)
    return (
        f"{packets:.1f}/min ({traffic.per_minute(traffic.data_packets):.1f} with data), "
        f"{packets * HEADER_BYTES:,.0f} B/min of headers"
    )


def _optional(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _convergence_rows(report: Report) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for count, runs in report.results.convergence.items():
        for run, result in enumerate(runs):
            others = result.others_received
            cores = result.cpu / (result.seconds + result.write)
            rows.append(
                (
                    str(count),
                    str(run),
                    f"{min(result.sessions)}-{max(result.sessions)}"
                    + (
                        ""
                        if result.max_peers == DEFAULT_MAX_PEERS
                        else f" (max {result.max_peers})"
                    ),
                    f"{result.seconds:.2f}",
                    f"{result.write:.2f}",
                    f"{_mb(median(others))} ({_mb(min(others))}-{_mb(max(others))})",
                    _mb(result.sent[0]),
                    _mb(sum(result.sent)),
                    str(result.dials),
                    f"{result.cpu:.1f} s ({cores:.2f} cores)",
                    f"{result.others:.2f}",
                )
            )
    return rows


_CONVERGENCE_HEADER = (
    "nodes",
    "run",
    "sessions per node",
    "seconds",
    "writing s",
    "received per other node, median (min-max)",
    "sent by the writer",
    "all wire bytes",
    "new connections",
    "CPU of all nodes",
    "other processes, cores",
)


def _convergence_text(report: Report) -> str:
    return grid_text(_CONVERGENCE_HEADER, _convergence_rows(report))


def _convergence_markdown(report: Report) -> str:
    tree = report.plan.trees[0]
    lines = [
        f"Each run writes a new tree ({describe(tree, short=True)}) into node 0; *seconds* from "
        "the last file closed until every node holds the same root; *writing s* is the writing "
        "itself (the nodes already at work); bytes are wire bytes (TCP payload) over the run; "
        "*new connections* are the connections dialled during the run; CPU is this process's, "
        "every node together (the nodes share one GIL).",
        "",
        grid_markdown(_CONVERGENCE_HEADER, _convergence_rows(report)),
    ]
    lines += ["", *(f"- {count} nodes: {how}" for count, how in report.results.mesh.items())]
    return "\n".join(lines)


def _raw(report: Report) -> list[str]:
    results = report.results
    lines = []
    if results.hop:
        lines.append(
            "single hop, seconds: "
            + " ".join(f"{s.seconds:.3f}" for s in results.hop)
            + "; of which A's scan of the file done at "
            + " ".join(_optional(s.scanned) for s in results.hop)
            + "; B's pull finished at "
            + " ".join(_optional(s.pulled[0]) for s in results.hop)
        )
    if results.syncthing:
        lines.append(
            "Syncthing single hop, seconds: " + " ".join(f"{v:.3f}" for v in results.syncthing)
        )
    if results.line:
        lines.append("line, seconds: " + " ".join(f"{s.seconds:.3f}" for s in results.line))
        for hop in range(len(results.line[0].pulled)):
            lines.append(
                f"line, node {hop + 1}'s pull finished at: "
                + " ".join(_optional(s.pulled[hop]) for s in results.line)
            )
    for name, traffic in (("backer", results.idle), ("Syncthing", results.idle_syncthing)):
        if traffic is not None:
            lines.append(
                f"idle {name}: {traffic.seconds:.1f} s, {traffic.sent:,} B from the dialler, "
                f"{traffic.received:,} B back, {traffic.packets} packets "
                f"({traffic.data_packets} with data)"
                + (
                    f"; the nodes' links counted {traffic.link_bytes:,} B"
                    if traffic.link_bytes >= 0
                    else ""
                )
            )
    lines.append(
        f"keepalive {KEEPALIVE:g} s, gossip every "
        f"{report.plan.gossip_every or GOSSIP_EVERY:g} s during the idle window"
    )
    lines += [
        f"block {name}: other processes {others:.2f} cores" for name, others in results.blocks
    ]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
