"""Real network namespaces for LAN tests (root): hosts on a bridge, or two subnets joined by a
router with no multicast path between them. Every name carries a per-run prefix, and everything
is deleted at the end, even on failure. Nothing touches the machine's own interfaces.

    with Lan(3) as lan:                       # h1..h3 on 10.<n>.0.0/24, bridged
        lan.popen(1, ["python", "-m", "backer", ...])
        lan.block_multicast()                 # the switch drops multicast

    with Routed(2) as net:                    # h1 on 10.<n>.1.0/24, h2 on 10.<n>.2.0/24, router r
        net.address(1), net.address(2)
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def require_netns() -> None:
    """Fail (not skip) with the reason when namespaces cannot be made here."""
    if shutil.which("ip") is None:
        raise AssertionError("`ip` (iproute2) is missing: .ci/run must install it")
    if os.geteuid() != 0:
        raise AssertionError("network-namespace tests need root")


class _Namespaces:
    def __init__(self) -> None:
        require_netns()
        self.prefix = f"bk{os.getpid() % 100000}x{id(self) % 1000}"
        self.names: list[str] = []
        self.subnet = os.getpid() % 200 + 20  # 10.<subnet>.x.y, per run

    def ns(self, name: str) -> str:
        full = f"{self.prefix}{name}"
        ip("netns", "add", full)
        self.names.append(full)
        ip("-n", full, "link", "set", "lo", "up")
        return full

    def host(self, i: int) -> str:
        return f"{self.prefix}h{i}"

    def exec_args(self, i: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.host(i), *argv]

    def popen(self, i: int, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(self.exec_args(i, argv), text=True, **kwargs)

    def run(self, i: int, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.exec_args(i, argv), text=True, check=False, **kwargs)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for name in reversed(self.names):
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


class Lan(_Namespaces):
    """`count` hosts h1..hN bridged on one /24 (the bridge in its own namespace)."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count
        self._second_switch = False
        try:
            switch = self.ns("sw")
            ip("-n", switch, "link", "add", "br0", "type", "bridge")
            ip("-n", switch, "link", "set", "br0", "up")
            for i in range(1, count + 1):
                host = self.ns(f"h{i}")
                veth = f"{self.prefix}v{i}"
                ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}b")
                ip("link", "set", veth, "netns", host)
                ip("link", "set", f"{veth}b", "netns", switch)
                ip("-n", switch, "link", "set", f"{veth}b", "master", "br0")
                ip("-n", switch, "link", "set", f"{veth}b", "up")
                ip("-n", host, "addr", "add", f"{self.address(i)}/24", "dev", veth)
                ip("-n", host, "link", "set", veth, "up")
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def address(self, i: int) -> str:
        return f"10.{self.subnet}.0.{i}"

    def block_multicast(self) -> None:
        """Make the switch drop multicast (broadcast still passes), like a network that
        filters it: no port floods multicast, and snooping cannot learn a group. The kernel
        here has no tc classifiers or netem, and no iptables; bridge port flags work."""
        switch = f"{self.prefix}sw"
        ip("-n", switch, "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
        for i in range(1, self.count + 1):
            port = f"{self.prefix}v{i}b"
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    switch,
                    "bridge",
                    "link",
                    "set",
                    "dev",
                    port,
                    "mcast_flood",
                    "off",
                ],
                check=True,
                capture_output=True,
                timeout=30,
            )

    def interface(self, i: int) -> str:
        return f"{self.prefix}v{i}"

    # -- partitions: the switch's ports, as a cable pulled or a second switch --------------

    def _port(self, i: int) -> str:
        return f"{self.prefix}v{i}b"

    def isolate(self, i: int) -> None:
        """Pull host i's cable: its port goes down, packets to and from it vanish silently
        (no reset reaches anyone, as when a laptop leaves the network)."""
        ip("-n", f"{self.prefix}sw", "link", "set", self._port(i), "down")

    def split(self, group: Sequence[int]) -> None:
        """Move the hosts of `group` to a second switch: two islands that cannot reach each
        other, each whole within itself."""
        switch = f"{self.prefix}sw"
        if not self._second_switch:
            ip("-n", switch, "link", "add", "br1", "type", "bridge")
            ip("-n", switch, "link", "set", "br1", "up")
            self._second_switch = True
        for i in group:
            ip("-n", switch, "link", "set", self._port(i), "master", "br1")

    def heal(self) -> None:
        """Every host back on the first switch, every cable in."""
        switch = f"{self.prefix}sw"
        for i in range(1, self.count + 1):
            ip("-n", switch, "link", "set", self._port(i), "master", "br0")
            ip("-n", switch, "link", "set", self._port(i), "up")


class Routed(_Namespaces):
    """`count` hosts, each alone on its own /24, joined by a router namespace that forwards
    unicast; no multicast crosses it (DHT-only discovery)."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count
        try:
            router = self.ns("r")
            subprocess.run(
                ["ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
                check=True,
                capture_output=True,
            )
            for i in range(1, count + 1):
                host = self.ns(f"h{i}")
                veth = f"{self.prefix}v{i}"
                ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}r")
                ip("link", "set", veth, "netns", host)
                ip("link", "set", f"{veth}r", "netns", router)
                ip("-n", router, "addr", "add", f"10.{self.subnet}.{i}.254/24", "dev", f"{veth}r")
                ip("-n", router, "link", "set", f"{veth}r", "up")
                ip("-n", host, "addr", "add", f"{self.address(i)}/24", "dev", veth)
                ip("-n", host, "link", "set", veth, "up")
                ip("-n", host, "route", "add", "default", "via", f"10.{self.subnet}.{i}.254")
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def address(self, i: int) -> str:
        return f"10.{self.subnet}.{i}.1"

    def interface(self, i: int) -> str:
        return f"{self.prefix}v{i}"
