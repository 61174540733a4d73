"""Whole `backer run` nodes in real network namespaces, configured with nothing but the folder
key: they find each other (mDNS; the beacon where multicast is filtered; the DHT across routed
subnets) and converge."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import Lan, Routed
from procs import Running, backer

DEADLINE = 30.0


def share(tmp_path: Path, count: int) -> tuple[list[Path], list[Path], str]:
    """`count` homes and folders joined to one folder; the first holds a small tree."""
    homes = [tmp_path / f"home{i}" for i in range(1, count + 1)]
    folders = [tmp_path / f"folder{i}" for i in range(1, count + 1)]
    folders[0].mkdir()
    for i in range(20):
        (folders[0] / f"doc-{i}.txt").write_bytes(os.urandom(2000 + i))
    backer(homes[0], "init", str(folders[0]))
    found = re.search(r"bkw1\w+", backer(homes[0], "keys", str(folders[0])))
    assert found is not None
    for home, folder in zip(homes[1:], folders[1:], strict=True):
        backer(home, "join", found.group(0), str(folder))
    return homes, folders, found.group(0)


def same_files(first: Path, other: Path) -> bool:
    names = [p.name for p in first.glob("doc-*.txt")]
    try:
        return all((other / n).read_bytes() == (first / n).read_bytes() for n in names)
    except OSError:
        return False


def wait_converged(folders: list[Path]) -> None:
    end = time.monotonic() + DEADLINE
    while not all(same_files(folders[0], other) for other in folders[1:]):
        if time.monotonic() > end:
            raise AssertionError("the folders did not converge")
        time.sleep(0.05)


@pytest.fixture
def nodes() -> Iterator[list[Running]]:
    running: list[Running] = []
    yield running
    for node in running:
        node.stop()


def test_three_hosts_find_each_other_by_mdns_and_converge(
    tmp_path: Path, nodes: list[Running]
) -> None:
    homes, folders, _ = share(tmp_path, 3)
    with Lan(3) as lan:
        for i, home in enumerate(homes, start=1):
            listen = f"{lan.address(i)}:22100"
            prefix = lan.exec_args(i, [])
            nodes.append(Running(home, ["--listen", listen, "--discovery", "mdns"], prefix=prefix))
        for node in nodes:
            node.wait_for("peer_connected")
        wait_converged(folders)
        found = [n.wait_for("peer_found", lambda e: e["via"] == "mdns") for n in nodes]
        assert all(e["address"].startswith(f"10.{lan.subnet}.0.") for e in found)
        first = nodes[1].wait_for("peer_connected")
        print(f"mDNS: first peer connected {first['seen'] - nodes[1].started:.2f} s after start")


def test_with_multicast_filtered_the_beacon_finds_them(
    tmp_path: Path, nodes: list[Running]
) -> None:
    homes, folders, _ = share(tmp_path, 3)
    with Lan(3) as lan:
        lan.block_multicast()
        for i, home in enumerate(homes, start=1):
            args = ["--listen", f"{lan.address(i)}:22100", "--discovery", "mdns,beacon"]
            nodes.append(Running(home, args, prefix=lan.exec_args(i, [])))
        wait_converged(folders)
        for node in nodes:
            node.wait_for("peer_found", lambda e: e["via"] == "beacon")
        vias = {e["via"] for n in nodes for e in n.events if e["type"] == "peer_found"}
        assert vias == {"beacon"}, vias  # mDNS heard nothing through the filter


def test_two_subnets_find_each_other_through_one_dht_node(
    tmp_path: Path, nodes: list[Running]
) -> None:
    homes, folders, _ = share(tmp_path, 2)
    with Routed(3) as net:
        bootstrap = f"{net.address(3)}:22200"  # a headless DHT node on a third subnet
        dht = subprocess.Popen(
            net.exec_args(3, [sys.executable, "-m", "backer", "dht", "--listen", bootstrap]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert dht.stdout is not None
            dht.stdout.readline()  # ready
            for i, home in enumerate(homes, start=1):
                args = ["--listen", f"{net.address(i)}:22100", "--discovery", "mdns,beacon,dht"]
                args += ["--dht-bootstrap", bootstrap]
                nodes.append(Running(home, args, prefix=net.exec_args(i, [])))
            wait_converged(folders)
            for node in nodes:
                node.wait_for("peer_found", lambda e: e["via"] == "dht")
            first = nodes[1].wait_for("peer_connected")
            print(f"DHT: first peer connected {first['seen'] - nodes[1].started:.2f} s after start")
        finally:
            dht.terminate()
            dht.wait(timeout=20)
