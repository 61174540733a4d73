"""The LAN finders between real network namespaces (root; `tests/netns.py`): three hosts on a
bridge find each other by mDNS; with multicast dropped by the switch, mDNS finds nothing and
the beacon finds everyone. Each host runs a small Python process (PROBE) that starts finders
on the host's address (h1 on 0.0.0.0, the every-interface case) and prints a JSON line per
event. A test that cannot make namespaces fails; it never skips.

Time to first found is printed (run with -s to see it), not asserted.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netns import Lan

from backer.keys import FolderKey

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 8.0
TCP_PORT = 22100
# After the last host is up, how long mDNS gets to prove it finds nothing: its announcements
# go out within 0.5 s of a start and its first queries within about 1.1 s.
MDNS_WINDOW = 1.5

PROBE = r"""
import asyncio, json, sys, time
import nacl.signing
from backer.discovery.base import Context
from backer.discovery.beacon import BeaconFinder
from backer.discovery.mdns import MdnsFinder
from backer.keys import FolderKey

def say(event, **fields):
    print(json.dumps({"event": event, "at": time.time(), **fields}), flush=True)

async def main(methods, host, port, key):
    def on_found(found):
        say("found", via=found.via, device=found.device.hex(), folder=found.folder.hex(),
            addresses=list(found.addresses))
    context = Context(device_key=nacl.signing.SigningKey.generate(), host=host, port=port,
                      folders=(FolderKey.parse(key),), on_found=on_found)
    finders = [MdnsFinder(context) if m == "mdns" else BeaconFinder(context) for m in methods]
    for finder in finders:
        await finder.start()
    say("ready", device=context.device.hex())
    loop = asyncio.get_running_loop()
    stdin_closed = loop.create_future()
    closed = lambda: stdin_closed.done() or stdin_closed.set_result(None)
    loop.add_reader(sys.stdin.fileno(), closed)
    await stdin_closed  # the test closes our stdin to stop us
    for finder in finders:
        await finder.stop()
    say("stopped")

asyncio.run(main(sys.argv[1].split(","), sys.argv[2], int(sys.argv[3]), sys.argv[4]))
"""


@dataclass
class Probe:
    index: int
    host: str  # the listen host it was given
    address: str  # where others must find it
    process: subprocess.Popen[str]
    spawned: float
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ready(self) -> dict[str, Any] | None:
        return next((e for e in self.events if e["event"] == "ready"), None)

    @property
    def ready_at(self) -> float:
        assert self.ready is not None
        return float(self.ready["at"])

    @property
    def device(self) -> str:
        assert self.ready is not None
        return str(self.ready["device"])

    def found(self, via: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == "found" and e["via"] == via]

    def found_device(self, other: Probe, via: str) -> dict[str, Any] | None:
        if other.ready is None:
            return None
        return next((e for e in self.found(via) if e["device"] == other.device), None)


class Probes:
    """Starts PROBE in the hosts of a Lan and collects what they print."""

    def __init__(self, lan: Lan, key: FolderKey) -> None:
        self.lan = lan
        self.key = key
        self.probes: list[Probe] = []
        self._lines: queue.Queue[tuple[Probe, str | None]] = queue.Queue()
        self._readers: list[threading.Thread] = []

    def start(self, index: int, methods: str, *, any_address: bool = False) -> Probe:
        address = self.lan.address(index)
        host = "0.0.0.0" if any_address else address
        argv = [sys.executable, "-c", PROBE, methods, host, str(TCP_PORT), str(self.key)]
        spawned = time.time()
        process = self.lan.popen(
            index, argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        probe = Probe(index, host, address, process, spawned)
        self.probes.append(probe)
        reader = threading.Thread(target=self._read, args=(probe,), daemon=True)
        reader.start()
        self._readers.append(reader)
        return probe

    def wait(self, condition: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
        end = time.monotonic() + deadline
        while not condition():
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"not within {deadline} s: {what}\n{self.describe()}")
            try:
                probe, line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                code = probe.process.wait()
                raise AssertionError(f"h{probe.index} exited ({code})\n{self.describe()}")
            probe.events.append(json.loads(line))

    def stop(self) -> None:
        """Close every probe's stdin, wait for it to exit, and take the rest of its output."""
        for probe in self.probes:
            if probe.process.stdin is not None and not probe.process.stdin.closed:
                probe.process.stdin.close()
        for probe in self.probes:
            try:
                probe.process.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                probe.process.kill()
                probe.process.wait()
        for reader in self._readers:
            reader.join(timeout=DEADLINE)
        while not self._lines.empty():
            probe, line = self._lines.get_nowait()
            if line is not None:
                probe.events.append(json.loads(line))

    def describe(self) -> str:
        return "\n".join(f"h{p.index} ({p.host}): {p.events}" for p in self.probes)

    def _read(self, probe: Probe) -> None:
        assert probe.process.stdout is not None
        for line in probe.process.stdout:
            self._lines.put((probe, line))
        self._lines.put((probe, None))


@contextmanager
def lan_with_probes(count: int) -> Iterator[tuple[Lan, Probes]]:
    with Lan(count) as lan:
        probes = Probes(lan, FolderKey.generate())
        try:
            yield lan, probes
        finally:
            probes.stop()


def everyone_found_everyone(probes: list[Probe], via: str) -> Callable[[], bool]:
    return lambda: all(
        a.found_device(b, via) is not None for a in probes for b in probes if a is not b
    )


def check_found(probes: Probes, via: str) -> None:
    """Each found each other at the right address, for our folder."""
    for a in probes.probes:
        for b in probes.probes:
            if a is not b:
                found = a.found_device(b, via)
                assert found is not None
                assert found["addresses"] == [f"{b.address}:{TCP_PORT}"], found
                assert found["folder"] == probes.key.discovery_id.hex()


def newcomer_timing(newcomer: Probe, running: list[Probe], via: str) -> str:
    """How fast a host that starts last finds the running ones, and they find it."""
    finds: list[float] = []
    seen: list[float] = []
    for peer in running:
        found, found_by = newcomer.found_device(peer, via), peer.found_device(newcomer, via)
        assert found is not None and found_by is not None
        finds.append(found["at"] - newcomer.ready_at)
        seen.append(found_by["at"] - newcomer.ready_at)
    startup = newcomer.ready_at - newcomer.spawned
    return (
        f"{via}: the newcomer finds the running hosts {min(finds) * 1000:.0f} ms (all:"
        f" {max(finds) * 1000:.0f} ms) after its finder started ({startup:.2f} s of process"
        f" start before that); the running hosts see it after {max(seen) * 1000:.0f} ms"
    )


def test_three_hosts_find_each_other_by_mdns() -> None:
    with lan_with_probes(3) as (_lan, probes):
        running = [probes.start(1, "mdns", any_address=True), probes.start(2, "mdns")]
        probes.wait(everyone_found_everyone(running, "mdns"), "h1 and h2 meet")
        newcomer = probes.start(3, "mdns")
        everyone = [*running, newcomer]
        probes.wait(everyone_found_everyone(everyone, "mdns"), "all three meet")
        check_found(probes, "mdns")
        print("\n" + newcomer_timing(newcomer, running, "mdns"))


def test_with_multicast_blocked_only_the_beacon_finds_peers() -> None:
    with lan_with_probes(3) as (lan, probes):
        lan.block_multicast()
        running = [
            probes.start(1, "mdns,beacon", any_address=True),
            probes.start(2, "mdns,beacon"),
        ]
        probes.wait(everyone_found_everyone(running, "beacon"), "h1 and h2 meet by beacon")
        newcomer = probes.start(3, "mdns,beacon")
        everyone = [*running, newcomer]
        probes.wait(everyone_found_everyone(everyone, "beacon"), "all three meet by beacon")
        check_found(probes, "beacon")
        # mDNS gets its chance: the announcements and first queries of the last host to start.
        time.sleep(max(0.0, newcomer.ready_at + MDNS_WINDOW - time.time()))
        probes.stop()
        assert all(p.found("mdns") == [] for p in everyone), probes.describe()
        print("\n" + newcomer_timing(newcomer, running, "beacon"))
