"""Chaos across hosts: five `backer run` processes, each in its own network namespace on a
bridge, while a user edits, deletes, renames and edits the same files on several machines,
links are cut and healed, the transport delays, stalls, resets and corrupts, and nodes are
killed with SIGKILL and restarted, and the user saves or appends to a file at the very step a
pull swaps it in or removes it (the disk's `before_swap` seam, in tests/chaos_node.py). After
healing, every folder must hold the same tree and every content backer owes (tests/chaos.py
says which) must still exist on some node.

The kernel here has no netem, so loss and delay are injected in each node's byte streams
(tests/chaos_node.py); partitions are real: a host's switch port goes down, or a group of hosts
moves to a second switch. CI runs a short session; a soak is:

    BACKER_CHAOS_ROUNDS=300 BACKER_CHAOS_SEED=7 python -m pytest -q -s tests/test_chaos.py
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chaos import Chaos
from netns import Lan
from procs import Running, backer
from test_apply_races import tmpfs

NODES = 5
PORT = 22400
ROUNDS = int(os.environ.get("BACKER_CHAOS_ROUNDS", "14"))
SEED = int(os.environ.get("BACKER_CHAOS_SEED", "2026"))  # the soak picks others
HEAL_DEADLINE = 150.0
# Network faults per read or write; and the chance of a user's edit at each swap of a pull.
NETWORK_FAULTS = {
    "delay": 0.05,
    "stall": 0.003,
    "reset": 0.002,
    "corrupt": 0.001,
    "edit_at_swap": float(os.environ.get("BACKER_CHAOS_SWAP_EDITS", "0.05")),
}
CHAOS_NODE = Path(__file__).with_name("chaos_node.py")


class Cluster:
    """The five nodes: start, kill, restart, and what their status files say."""

    def __init__(self, lan: Lan, homes: list[Path], settings: Path) -> None:
        self.lan, self.homes, self.settings = lan, homes, settings
        self.nodes: list[Running | None] = [None] * len(homes)
        self.lives = [0] * len(homes)
        self.kills = 0
        self.read_to: dict[Path, int] = {}  # how far each journal of edits at a swap was read

    def address(self, i: int) -> str:
        return f"{self.lan.address(i + 1)}:{PORT}"

    def start(self, i: int) -> None:
        self.lives[i] += 1
        peers = [
            arg for j in range(len(self.homes)) if j != i for arg in ("--peer", self.address(j))
        ]
        self.nodes[i] = Running(
            self.homes[i],
            ["--listen", self.address(i), "--discovery", "none", *peers],
            prefix=self.lan.exec_args(i + 1, []),
            program=[sys.executable, str(CHAOS_NODE)],
            stderr=self.homes[i] / "stderr.log",
            env={
                "BACKER_CHAOS": str(self.settings),
                "BACKER_CHAOS_SEED": str(SEED * 100 + i * 10 + self.lives[i]),
                "BACKER_CHAOS_COUNTS": str(self.homes[i] / f"chaos-{self.lives[i]}.json"),
                "BACKER_CHAOS_EDITS": str(self.homes[i] / f"edits-{self.lives[i]}.jsonl"),
            },
        )

    def kill(self, i: int) -> None:
        node = self.nodes[i]
        if node is not None:
            node.kill()
            self.nodes[i] = None
            self.kills += 1

    def alive(self) -> list[int]:
        return [i for i, node in enumerate(self.nodes) if node is not None]

    def dead(self) -> list[int]:
        return [i for i, node in enumerate(self.nodes) if node is None]

    def roots(self) -> list[str]:
        found = []
        for home in self.homes:
            try:
                status = json.loads((home / "status.json").read_text())
                found.append(status["folders"][0]["root"])
            except (OSError, ValueError, KeyError, IndexError):
                found.append("")
        return found

    def edits_at_swap(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """The nodes' edits at a swap journaled since the last call: (node, edit)."""
        for i, home in enumerate(self.homes):
            for journal in sorted(home.glob("edits-*.jsonl")):
                with journal.open() as file:
                    file.seek(self.read_to.get(journal, 0))
                    while (line := file.readline()).endswith("\n"):
                        self.read_to[journal] = file.tell()
                        yield i, json.loads(line)

    def injected(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for home in self.homes:
            for tally in home.glob("chaos-*.json"):
                total.update(json.loads(tally.read_text()))
        return total

    def stop(self) -> None:
        for node in self.nodes:
            if node is not None:
                node.stop()


@pytest.fixture
def share(tmp_path: Path) -> Iterator[tuple[list[Path], list[Path]]]:
    homes = [tmp_path / f"home{i}" for i in range(NODES)]
    folders = [tmp_path / f"folder{i}" for i in range(NODES)]
    folders[0].mkdir()
    backer(homes[0], "init", str(folders[0]))
    found = re.search(r"bkw1\w+", backer(homes[0], "keys", str(folders[0])))
    assert found is not None
    for home, folder in zip(homes[1:], folders[1:], strict=True):
        backer(home, "join", found.group(0), str(folder))
    # One node's d0 is a disk of its own (a tmpfs), as a subdirectory on a second disk is.
    with tmpfs(folders[1] / "d0", "size=256m,mode=0755"):
        yield homes, folders


@pytest.fixture
def lan() -> Iterator[Lan]:
    with Lan(NODES) as network:
        yield network


def test_five_nodes_survive_partitions_kills_and_a_bad_network_and_lose_nothing(
    tmp_path: Path, share: tuple[list[Path], list[Path]], lan: Lan
) -> None:
    homes, folders = share
    rng = random.Random(SEED)
    print(f"chaos seed {SEED}, {ROUNDS} rounds")
    chaos = Chaos(folders, rng)
    for _ in range(30):
        chaos.create(0)
    settings = tmp_path / "faults.json"
    settings.write_text(json.dumps(NETWORK_FAULTS))
    cluster = Cluster(lan, homes, settings)
    faults: Counter[str] = Counter()
    try:
        for i in range(NODES):
            cluster.start(i)
        for i in range(NODES):
            node = cluster.nodes[i]
            assert node is not None
            node.wait_for("peer_connected")
        for chaos.round in range(1, ROUNDS + 1):
            _disturb_network(lan, rng, faults)
            _kill_or_restart(cluster, rng, faults)
            for _ in range(rng.randint(2, 6)):
                chaos.step(rng.randrange(NODES))  # a dead node's folder is edited too
            time.sleep(rng.uniform(0.2, 1.2))  # the chaos's pace, not a wait for a result
            for at, edit in cluster.edits_at_swap():
                chaos.edited_at_swap(at, edit)
        lan.heal()
        settings.write_text("{}")
        for i in cluster.dead():
            cluster.start(i)
        started = time.monotonic()
        _wait_converged(cluster, chaos, folders)
        healed_in = time.monotonic() - started
        for at, edit in cluster.edits_at_swap():  # before the calm, and none after it
            chaos.edited_at_swap(at, edit)
        assert all(n is not None and n.process.poll() is None for n in cluster.nodes), (
            "a node died by itself: " + _stderr_tails(homes)
        )
        live = [chaos.hashes.live(f) for f in folders]
        written = set(chaos.ledger.written)
        strays = {p for tree in live for p, h in tree.items() if h not in written}
        assert not strays, f"files whose content the user never wrote: {sorted(strays)[:5]}"
        held: set[str] = set().union(*(chaos.hashes.kept(f) for f in folders))
        lost = chaos.ledger.lost(held)
        _report(chaos, cluster, faults, healed_in=healed_in, lost=lost, tree=live[0])
        assert not lost, (
            f"{len(lost)} contents lost, {sum(lost.values())} bytes (seed {SEED})\n"
            + _explain(chaos, folders, lost)
        )
        tails = _stderr_tails(homes)
        assert "Traceback" not in tails, tails
    finally:
        cluster.stop()


def _disturb_network(lan: Lan, rng: random.Random, faults: Counter[str]) -> None:
    roll = rng.random()
    if roll < 0.25:
        lan.heal()
        faults["heal"] += 1
    elif roll < 0.45:
        lan.heal()
        lan.split(rng.sample(range(1, NODES + 1), rng.choice([1, 2])))
        faults["partition into two islands"] += 1
    elif roll < 0.6:
        lan.isolate(rng.randint(1, NODES))
        faults["cable pulled (link silently down)"] += 1


def _kill_or_restart(cluster: Cluster, rng: random.Random, faults: Counter[str]) -> None:
    dead = cluster.dead()
    if dead and rng.random() < 0.6:
        cluster.start(rng.choice(dead))
        faults["restart"] += 1
    elif len(dead) < 2 and rng.random() < 0.25:
        cluster.kill(rng.choice(cluster.alive()))
        faults["SIGKILL"] += 1


def _wait_converged(cluster: Cluster, chaos: Chaos, folders: list[Path]) -> None:
    end = time.monotonic() + HEAL_DEADLINE
    while True:
        roots = cluster.roots()
        if roots[0] and len(set(roots)) == 1:
            trees = [chaos.hashes.live(f) for f in folders]
            if all(tree == trees[0] for tree in trees[1:]):
                return
        if time.monotonic() > end:
            trees = [chaos.hashes.live(f) for f in folders]
            differing = [
                sorted(p for p in set(tree) | set(trees[0]) if tree.get(p) != trees[0].get(p))[:5]
                for tree in trees
            ]
            raise AssertionError(
                f"no convergence {HEAL_DEADLINE:g} s after healing (seed {SEED}): roots "
                f"{[r[:12] for r in roots]}, paths unlike node 0's: {differing}\n"
                + _stderr_tails(cluster.homes)
                + _last_events(cluster)
            )
        time.sleep(0.2)


def _explain(chaos: Chaos, folders: list[Path], lost: dict[str, int]) -> str:
    """What befell each lost content, and what each node holds at its paths now."""
    told = []
    for h in lost:
        told.append(f"content {h[:12]}:")
        told += [f"  {line}" for line in chaos.ledger.history.get(h, [])]
        for rel in sorted(chaos.ledger.paths.get(h, ())):
            name = Path(rel).name
            for i, folder in enumerate(folders):
                here = chaos.hashes.of(folder / rel) if not rel.startswith("/") else None
                versions = sorted(
                    f"{p.relative_to(folder)}={chaos.hashes.of(p) or '?'!s:.12}"
                    for p in (folder / ".backer" / "versions").rglob(f"{Path(name).stem}*")
                )
                told.append(f"  node {i} {rel}: {here and here[:12]}; versions {versions}")
    return "\n".join(told)


def _last_events(cluster: Cluster) -> str:
    told = []
    for i, node in enumerate(cluster.nodes):
        if node is not None:
            wanted = [e for e in node.drain() if e["type"] not in ("file_updated", "file_progress")]
            told.append(f"--- node {i}, last events:")
            told += [json.dumps({k: v for k, v in e.items() if k != "seen"}) for e in wanted[-12:]]
    return "\n".join(told)


def _stderr_tails(homes: list[Path]) -> str:
    tails = []
    for home in homes:
        log = home / "stderr.log"
        text = log.read_text() if log.exists() else ""
        if text.strip():
            tails.append(f"--- {home.name}:\n{text[-1500:]}")
    return "\n".join(tails)


def _report(
    chaos: Chaos,
    cluster: Cluster,
    faults: Counter[str],
    *,
    healed_in: float,
    lost: dict[str, int],
    tree: dict[str, str],
) -> None:
    injected = cluster.injected()
    ledger = chaos.ledger
    print(f"operations: {sum(ledger.operations.values())} {dict(ledger.operations)}")
    print(f"network and process faults: {dict(faults)}; SIGKILLs {cluster.kills}")
    print(f"transport faults injected: {dict(injected)}")
    print(
        f"contents written {len(ledger.written)} ({sum(ledger.written.values())} bytes); "
        f"excused (overwritten by the user before they left their node) {len(ledger.excused)}; "
        f"lost {len(lost)} ({sum(lost.values())} bytes)"
    )
    print(f"converged {healed_in:.1f} s after healing; {len(tree)} files in the final tree")
