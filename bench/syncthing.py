"""Syncthing on loopback: a harness that runs two (or more) Syncthing instances on 127.0.0.1
sharing one folder, and measures single-hop propagation latency: the time from a new file being
written in instance A's folder until the same bytes are at the same path in instance B's.

`SyncthingCluster(count)` (`SyncthingPair` for two) is a synchronous context manager. Entering
it, for each instance: a home directory under one temporary directory, `syncthing generate`,
and the generated config.xml rewritten so that nothing leaves 127.0.0.1 (REST/GUI and the sync
listener on free loopback ports; global and local discovery, relays, NAT traversal, usage and
crash reporting, automatic upgrades all off), with one shared `sendreceive` folder watched for
changes (`fsWatcherDelayS=1`, rescans once a day); then `syncthing serve`, one instance at a
time, and a wait until every pair of instances is connected and every folder is idle and in
sync. It then checks, from /proc, that every TCP socket the processes hold is on 127.0.0.1 and
that they hold no UDP socket (no discovery, QUIC or STUN). Leaving it, on success or failure,
kills the processes and removes the temporary directory.

Of each pair of instances only the later one dials, to the earlier one's static address
`tcp://127.0.0.1:PORT`; the earlier one knows the later one as `dynamic`, which without
discovery means "wait to be dialled". Syncthing 1.19 dials from its own listening port
(SO_REUSEPORT, for NAT traversal), so two instances dialling each other at the same moment make
one TCP connection by simultaneous open on which both sides play TLS client: the handshake
hangs for 20 s, and again at every retry.

    python bench/syncthing.py                 # 10 samples: median, min, max
    python bench/syncthing.py --samples 3 --json

`ensure_syncthing()` installs Debian's `syncthing` package (as root, with apt-get) where the
command is missing. Written against Debian bookworm's Syncthing 1.19.2 (`syncthing serve` and
`syncthing generate` subcommands, config version 36).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from common import (
    BenchError,
    ensure_command,
    free_port,
    median,
    tool_version,
)
from measure import (
    descendants,
)

__all__ = [
    "SyncthingCluster",
    "SyncthingInstance",
    "SyncthingPair",
    "ensure_syncthing",
    "main",
]

FOLDER_ID = "bench"
WATCH_DELAY_S = 1  # fsWatcherDelayS: Syncthing's documented best case is about 1.06 s with 1
RESCAN_INTERVAL_S = 86_400  # a full rescan must never land inside a sample
START_LIMIT = 60.0  # seconds for the instances to start, connect and settle
SAMPLE_LIMIT = 30.0  # seconds for one file to arrive
IDLE_LIMIT = 30.0  # seconds for the instances to settle between samples
POLL = 0.005  # seconds between two looks at the target file
SAMPLE_SIZE = 1024
SETTLE_MARGIN = 0.25  # seconds beyond fsWatcherDelayS to wait before each sample
# Environment variables that would send Syncthing's dials (ALL_PROXY) or our REST calls
# (urllib honours http_proxy) elsewhere than to 127.0.0.1 directly.
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
# Loopback as /proc/net/{tcp,udp} write it (IPv4 in host byte order) and as IPv4-mapped IPv6.
_LOOPBACK4 = "0100007F"
_LOOPBACK6 = "0000000000000000FFFF00000100007F"
_ANY = {"00000000", "00000000000000000000000000000000"}


def ensure_syncthing(binary: str = "syncthing") -> str:
    """The path of the `syncthing` command, installing Debian's package first where it is
    missing (needs root and apt). Raises BenchError if it is still not there."""
    return ensure_command(binary, package="syncthing")


@dataclass(slots=True)
class SyncthingInstance:
    """One Syncthing process of a cluster: its home (config, keys, database, log), its shared
    folder, and how to reach its REST API."""

    name: str
    home: Path
    folder: Path
    gui_port: int
    listen_port: int
    api_key: str
    device_id: str = ""
    process: subprocess.Popen[bytes] | None = None
    _opener: urllib.request.OpenerDirector = field(
        default_factory=lambda: urllib.request.build_opener(urllib.request.ProxyHandler({}))
    )

    @property
    def log(self) -> Path:
        return self.home / "syncthing.log"

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.listen_port}"

    def rest(self, path: str, **query: str) -> Any:
        """GET `path` of the REST API, as decoded JSON. Raises OSError (URLError included)
        when the instance does not answer."""
        url = f"http://127.0.0.1:{self.gui_port}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        request = urllib.request.Request(url, headers={"X-API-Key": self.api_key})
        with self._opener.open(request, timeout=5) as response:
            return json.load(response)

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-size:]
        except OSError:
            return "(no log)"

    def check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise BenchError(
                f"syncthing {self.name} is not running (exit {code}):\n" + self.log_tail()
            )

    def connected_to(self) -> set[str]:
        """The device IDs this instance has a live connection to."""
        connections = self.rest("/rest/system/connections")["connections"]
        return {device for device, state in connections.items() if state.get("connected")}

    def folder_settled(self) -> bool:
        """Whether the shared folder is idle with nothing left to pull."""
        status = self.rest("/rest/db/status", folder=FOLDER_ID)
        return bool(status["state"] == "idle" and status["needTotalItems"] == 0)

    def pids(self) -> list[int]:
        """The monitor process we started and its descendants (Syncthing 1.19 always runs as a
        monitor plus the real process, even with --no-restart; the latter holds the sockets)."""
        if self.process is None:
            return []
        return descendants(self.process.pid)

    def stop(self) -> None:
        """SIGKILL to the process group we started (the monitor and its child); returns once
        all of it has exited. Nothing of an instance is kept, so there is nothing to shut down
        cleanly, and Syncthing's own clean exit on SIGTERM takes up to a second or two."""
        if self.process is None:
            return
        pids = self.pids()
        # The monitor's descendants first, so that the monitor reaps them (killed together,
        # they would be left to init as zombies), then the whole group (start_new_session: the
        # monitor leads its own).
        for pid in pids[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _exited(pids[1:], self.process, limit=1.0, reaped=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        if not _exited(pids, self.process, limit=10.0):
            raise BenchError(f"syncthing {self.name} survives SIGKILL: {pids}")
        self.process.wait()
        self.process = None


class SyncthingCluster:
    """`count` Syncthing instances on 127.0.0.1 sharing one folder, each knowing all others;
    a synchronous context manager (see the module's docstring for what entering and leaving
    do). Instance 0 is "A", instance 1 "B", and so on."""

    def __init__(
        self,
        count: int = 2,
        *,
        binary: str = "syncthing",
        watch_delay_s: int = WATCH_DELAY_S,
        parent: Path | None = None,
        start_limit: float = START_LIMIT,
        seed: Callable[[SyncthingInstance], None] | None = None,
        settle: bool = True,
    ) -> None:
        """`seed`, if given, is called with each instance once its (empty) folder exists and
        before any instance starts: to put files there that the instances find at their start.
        With `settle=False`, entering returns as soon as every instance answers its REST API
        (not connected or in sync yet); `started` is then the perf_counter time at which the
        first instance was spawned, for timing what follows from there."""
        if count < 2:
            raise ValueError("a cluster needs at least two instances")
        self.count = count
        self.binary = binary
        self.watch_delay_s = watch_delay_s
        self.parent = parent
        self.start_limit = start_limit
        self.seed = seed
        self.settle = settle
        self.started = 0.0
        self.base: Path | None = None
        self.instances: list[SyncthingInstance] = []

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- starting and stopping -------------------------------------------------------------------

    def start(self) -> None:
        self.binary = ensure_syncthing(self.binary)
        self.base = Path(tempfile.mkdtemp(prefix="syncthing-bench-", dir=self.parent))
        taken: set[int] = set()
        for index in range(self.count):
            name = chr(ord("A") + index) if index < 26 else f"N{index}"
            home = self.base / name / "home"
            folder = self.base / name / "folder"
            instance = SyncthingInstance(
                name=name,
                home=home,
                folder=folder,
                gui_port=_distinct_port(taken),
                listen_port=_distinct_port(taken),
                api_key=secrets.token_urlsafe(24),
            )
            self._generate(instance)
            self.instances.append(instance)
        for instance in self.instances:
            self._configure(instance)
            if self.seed is not None:
                self.seed(instance)
        deadline = time.monotonic() + self.start_limit
        self.started = time.perf_counter()
        for instance in self.instances:
            # One at a time, each once the earlier ones listen: the first dial then succeeds
            # (a failed one is retried only after several seconds).
            self._spawn(instance)
            self._wait_answering(instance, deadline)
        if self.settle:
            self.wait_ready(max(deadline - time.monotonic(), 0.0))
            self.check_loopback_only()

    def close(self) -> None:
        """Kill every process and remove the temporary directory; safe to call twice."""
        try:
            for instance in self.instances:
                instance.stop()
        finally:
            if self.base is not None:
                shutil.rmtree(self.base, ignore_errors=True)
                self.base = None

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
        env.update(STNOUPGRADE="1", STNORESTART="1", STNODEFAULTFOLDER="1", STHASHING="minio")
        return env

    def _generate(self, instance: SyncthingInstance) -> None:
        """`syncthing generate`: key, certificate and a default config.xml in the home."""
        instance.home.mkdir(parents=True)
        done = subprocess.run(
            [
                self.binary,
                "generate",
                f"--home={instance.home}",
                "--no-default-folder",
                "--skip-port-probing",
            ],
            env=self._env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"syncthing generate exited {done.returncode}: {done.stderr}")
        own = ET.parse(instance.home / "config.xml").getroot().find("device")
        if own is None or not own.get("id"):
            raise BenchError(f"no device ID in the config generated in {instance.home}")
        instance.device_id = str(own.get("id"))

    def _configure(self, instance: SyncthingInstance) -> None:
        """Rewrite the generated config.xml: loopback only, the other instances, the shared
        folder."""
        path = instance.home / "config.xml"
        tree = ET.parse(path)
        root = tree.getroot()
        gui = _child(root, "gui")
        gui.set("enabled", "true")
        gui.set("tls", "false")
        _child(gui, "address").text = f"127.0.0.1:{instance.gui_port}"
        _child(gui, "apikey").text = instance.api_key
        options = _child(root, "options")
        for old in options.findall("listenAddress"):
            options.remove(old)
        ET.SubElement(options, "listenAddress").text = instance.address
        for key, value in {
            "globalAnnounceEnabled": "false",
            "localAnnounceEnabled": "false",  # LAN broadcast/multicast beacons
            "relaysEnabled": "false",
            "natEnabled": "false",  # UPnP / NAT-PMP
            "urAccepted": "-1",  # usage reporting declined for good
            "crashReportingEnabled": "false",
            "autoUpgradeIntervalH": "0",
            "startBrowser": "false",
            "announceLANAddresses": "false",
            "restartOnWakeup": "false",
            "setLowPriority": "false",  # it would renice itself, unlike what it is compared with
        }.items():
            _child(options, key).text = value
        defaults = _child(root, "defaults")
        device_template = _child(defaults, "device")
        me = self.instances.index(instance)
        for index, other in enumerate(self.instances):
            if other is instance:
                continue
            device = copy.deepcopy(device_template)
            device.set("id", other.device_id)
            device.set("name", other.name)
            # Only the later instance of each pair dials (see the module's docstring).
            _child(device, "address").text = other.address if index < me else "dynamic"
            root.append(device)
        folder = copy.deepcopy(_child(defaults, "folder"))
        folder.set("id", FOLDER_ID)
        folder.set("label", FOLDER_ID)
        folder.set("path", str(instance.folder))
        folder.set("type", "sendreceive")
        folder.set("rescanIntervalS", str(RESCAN_INTERVAL_S))
        folder.set("fsWatcherEnabled", "true")
        folder.set("fsWatcherDelayS", str(self.watch_delay_s))
        for old in folder.findall("device"):
            folder.remove(old)
        for member in self.instances:
            device = ET.SubElement(folder, "device", id=member.device_id, introducedBy="")
            ET.SubElement(device, "encryptionPassword").text = ""
        root.append(folder)
        # The folder and its marker exist before the start, as for a folder a user shares.
        (instance.folder / ".stfolder").mkdir(parents=True)
        tree.write(path, encoding="unicode")

    def _command(self, instance: SyncthingInstance) -> list[str]:
        """The command line that runs `instance` (a subclass may wrap it: in a network
        namespace, say)."""
        return [
            self.binary,
            "serve",
            "--no-browser",
            "--no-restart",
            "--no-upgrade",
            f"--home={instance.home}",
            "--logflags=3",
        ]

    def _spawn(self, instance: SyncthingInstance) -> None:
        with instance.log.open("wb") as log:
            instance.process = subprocess.Popen(
                self._command(instance),
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group, for stop(); a Ctrl-C at the terminal then reaches
                # only us, and our teardown kills it.
                start_new_session=True,
            )

    # -- waiting ---------------------------------------------------------------------------------

    def _wait_answering(self, instance: SyncthingInstance, deadline: float) -> None:
        """Wait until the REST API answers (Syncthing starts it after the sync listener)."""
        while True:
            instance.check_alive()
            try:
                instance.rest("/rest/system/ping")
            except (OSError, ValueError) as exc:
                if time.monotonic() >= deadline:
                    raise BenchError(
                        f"syncthing {instance.name} does not answer: {exc}\n" + instance.log_tail()
                    ) from exc
                time.sleep(0.02)
            else:
                return

    def wait_ready(self, limit: float) -> None:
        """Wait until every instance is connected to every other and every folder is idle with
        nothing to pull; BenchError after `limit` seconds or if a process died."""
        deadline = time.monotonic() + limit
        everyone = {instance.device_id for instance in self.instances}
        while True:
            pending = []
            for instance in self.instances:
                instance.check_alive()
                try:
                    missing = everyone - {instance.device_id} - instance.connected_to()
                    if missing:
                        pending.append(f"{instance.name} not connected to {len(missing)}")
                    elif not instance.folder_settled():
                        pending.append(f"{instance.name} folder not idle")
                except (OSError, ValueError, KeyError) as exc:
                    pending.append(f"{instance.name} REST: {exc}")
            if not pending:
                return
            if time.monotonic() >= deadline:
                raise BenchError(
                    f"Syncthing not ready after {limit:g} s: {'; '.join(pending)}\n"
                    + "\n".join(f"-- {i.name} log:\n{i.log_tail()}" for i in self.instances)
                )
            time.sleep(0.05)

    def wait_idle(self, limit: float = IDLE_LIMIT) -> None:
        """Wait until every instance's folder is idle with nothing left to pull."""
        deadline = time.monotonic() + limit
        while True:
            busy = []
            for instance in self.instances:
                instance.check_alive()
                try:
                    if not instance.folder_settled():
                        busy.append(instance.name)
                except (OSError, ValueError, KeyError) as exc:
                    busy.append(f"{instance.name} ({exc})")
            if not busy:
                return
            if time.monotonic() >= deadline:
                raise BenchError(f"folders still busy after {limit:g} s: {', '.join(busy)}")
            time.sleep(0.02)

    # -- measuring -------------------------------------------------------------------------------

    def measure_latency(self, samples: int, *, source: int = 0, target: int = 1) -> list[float]:
        """Seconds from a new file of `SAMPLE_SIZE` random bytes being written (and closed) in
        the source instance's folder until the same bytes are at the same path in the target's;
        one figure per sample. The target file is read every `POLL` seconds; between samples
        every folder settles, so samples never overlap."""
        src, dst = self.instances[source], self.instances[target]
        latencies = []
        for index in range(samples):
            self.wait_idle()
            # Let the source's watch timer run out: Syncthing checks for changes every
            # fsWatcherDelayS after a scan and arms a fresh full delay only at the first change
            # after a quiet tick. A change made right after the previous sample would ride that
            # earlier tick and arrive early (0.5-1.5 delays after it is made, by phase).
            time.sleep(self.watch_delay_s + SETTLE_MARGIN)
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
                now = time.perf_counter()
                if now >= deadline:
                    dst.check_alive()
                    raise BenchError(
                        f"{name} did not reach {dst.name} within {SAMPLE_LIMIT:g} s:\n"
                        + dst.log_tail()
                    )
                time.sleep(POLL)
            latencies.append(time.perf_counter() - started)
        self.wait_idle()
        self.check_loopback_only()
        return latencies

    # -- checking --------------------------------------------------------------------------------

    def check_loopback_only(self) -> None:
        """BenchError unless every TCP socket of every instance is bound (and, if connected,
        connected) to 127.0.0.1, and no instance holds a UDP socket (no discovery beacons, no
        QUIC, no STUN). Read from /proc: the socket inodes in /proc/PID/fd matched against
        /proc/net/{tcp,tcp6,udp,udp6}."""
        problems = []
        for instance in self.instances:
            listening = set()
            for kind, local, remote in _sockets(instance.pids()):
                if kind.startswith("udp"):
                    problems.append(f"{instance.name}: UDP socket {local} -> {remote}")
                elif not (_is_loopback(local) and (_is_loopback(remote) or _is_any(remote))):
                    problems.append(f"{instance.name}: {kind} socket {local} -> {remote}")
                elif _is_any(remote):
                    listening.add(int(local.split(":")[1], 16))
            # The check must see the sockets it checks: at least the two listeners.
            for port in (instance.gui_port, instance.listen_port):
                if port not in listening:
                    problems.append(f"{instance.name}: no listener found on 127.0.0.1:{port}")
        if problems:
            raise BenchError("Syncthing uses more than 127.0.0.1: " + "; ".join(problems))

    def connections(self) -> list[str]:
        """`ss`-like lines for the sockets of every instance (for reports)."""
        return [
            f"{instance.name} {kind} {_readable(local)} -> {_readable(remote)}"
            for instance in self.instances
            for kind, local, remote in _sockets(instance.pids())
        ]


# The name the issue uses for the two-instance case.
SyncthingPair = SyncthingCluster


def _distinct_port(taken: set[int]) -> int:
    while True:
        port = free_port()
        if port not in taken:
            taken.add(port)
            return port


def _child(parent: ET.Element, tag: str) -> ET.Element:
    """The first `tag` child of `parent`, created if missing."""
    found = parent.find(tag)
    return found if found is not None else ET.SubElement(parent, tag)


def _exited(
    pids: list[int], leader: subprocess.Popen[bytes], *, limit: float, reaped: bool = False
) -> bool:
    """Wait up to `limit` seconds until every process of `pids` is a zombie or, with `reaped`,
    gone, reaping `leader` (our child) meanwhile."""
    deadline = time.monotonic() + limit
    while True:
        leader.poll()
        if not any(_running(pid, zombie=reaped) for pid in pids):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def _running(pid: int, *, zombie: bool = False) -> bool:
    """Whether `pid` exists and runs (or, with `zombie`, exists at all)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return zombie or text[text.rindex(")") + 2] not in "ZX"


def _sockets(pids: list[int]) -> list[tuple[str, str, str]]:
    """(kind, local, remote) of every TCP and UDP socket the processes hold, kind one of tcp,
    tcp6, udp, udp6 and addresses as /proc/net writes them (hex address:hex port)."""
    tables = {kind: _socket_table(kind) for kind in ("tcp", "tcp6", "udp", "udp6")}
    inodes: set[str] = set()
    for pid in pids:
        inodes |= _socket_inodes(pid)
    return [
        (kind, *table[inode])
        for inode in sorted(inodes)
        for kind, table in tables.items()
        if inode in table
    ]


def _readable(address: str) -> str:
    host, port = address.split(":")
    if host in (_LOOPBACK4, _LOOPBACK6):
        name = "127.0.0.1"
    elif host in _ANY:
        name = "*"
    else:
        name = host
    return f"{name}:{int(port, 16)}"


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError:
        return inodes
    for entry in entries:
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _socket_table(kind: str) -> dict[str, tuple[str, str]]:
    """inode -> (local, remote) of /proc/net/KIND, addresses as 'HEXADDR:HEXPORT'."""
    table: dict[str, tuple[str, str]] = {}
    try:
        lines = Path(f"/proc/net/{kind}").read_text().splitlines()[1:]
    except OSError:
        return table
    for line in lines:
        fields = line.split()
        table[fields[9]] = (fields[1], fields[2])
    return table


def _is_loopback(address: str) -> bool:
    return address.split(":", maxsplit=1)[0] in (_LOOPBACK4, _LOOPBACK6)


def _is_any(address: str) -> bool:
    host, port = address.split(":")
    return host in _ANY and port == "0000"


# -- the command -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10, help="files to send (default 10)")
    parser.add_argument("--instances", type=int, default=2, help="Syncthing instances")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    binary = ensure_syncthing()
    version = tool_version([binary, "--version"])
    started = time.perf_counter()
    with SyncthingCluster(args.instances) as cluster:
        ready = time.perf_counter() - started
        sockets = cluster.connections()
        latencies = cluster.measure_latency(args.samples)
    if args.json:
        print(json.dumps({"version": version, "startup": ready, "latencies": latencies}))
        return 0
    print(f"Syncthing: {version}")
    print(f"{args.instances} instances on 127.0.0.1 ready in {ready:.1f} s; their sockets:")
    for line in sockets:
        print(f"  {line}")
    print(
        f"single-hop latency (new file closed in A -> same bytes in B), "
        f"{args.samples} files of {SAMPLE_SIZE} B, "
        f"fsWatcherDelayS={WATCH_DELAY_S}: median {median(latencies):.3f} s, "
        f"min {min(latencies):.3f} s, max {max(latencies):.3f} s"
    )
    print("samples: " + " ".join(f"{value:.3f}" for value in latencies))
    return 0


if __name__ == "__main__":
    sys.exit(main())
