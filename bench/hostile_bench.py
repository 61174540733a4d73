"""A running node under the chunk-list bomb (issue 15, finding 1), beside the same node idle.

A `backer run --web` process holds a folder; an attacker holding only its read-only key
connects again and again (4 connections at once), each time offering one entry whose chunk
list names one 256-record group 65,536 times (about 2 MiB on the wire, 604 MB if expanded).
Measured, idle first as the reference, then under the attack: the dashboard's answer time
(`GET /api/status`, the worst of every request), the node's RSS (its peak, VmHWM, reset before
each phase), and how long it takes to exit on SIGTERM. The bars: the dashboard within 100 ms,
under 2x the idle RSS, stopped within 3 s.

    python bench/hostile_bench.py [--seconds 20]

Imports the evil peer of the tests (tests/evil.py), which speaks the real protocol.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from evil import EvilPeer, file_entry, forged  # noqa: E402

from backer.index.entry import GROUP_MAX, group_hash, pack_chunks  # noqa: E402
from backer.keys import FolderKey  # noqa: E402
from backer.protocol.messages import MAX_CHUNK, RemoteEntry  # noqa: E402
from backer.sync.replica import signer_for  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--attack", nargs=2, metavar=("ADDRESS", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attack:  # the attacker's own process: its work must not slow the prober's
        address, key = args.attack
        offered = asyncio.run(attack_for(FolderKey.parse(key), address, args.seconds))
        print(f"offered {offered}")
        return 0
    return asyncio.run(run(args.seconds))


async def attack_for(key: FolderKey, address: str, seconds: float) -> int:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, stop.set)
    return await bombard_many(key, address, stop)


def attacker(key: FolderKey, address: str, seconds: float) -> subprocess.Popen[str]:
    argv = [sys.executable, __file__, "--attack", address, str(key), "--seconds", str(seconds)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def offered_by(process: subprocess.Popen[str]) -> int:
    out, _ = process.communicate(timeout=120)
    return int(out.rsplit("offered ", 1)[1].split()[0])


async def run(seconds: float) -> int:
    with tempfile.TemporaryDirectory(prefix="backer-hostile-") as scratch:
        base = Path(scratch)
        folder, home = base / "folder", base / "home"
        folder.mkdir()
        for i in range(50):
            (folder / f"f{i}.txt").write_bytes(os.urandom(4096))
        backer(home, "init", str(folder))
        keys = backer(home, "keys", str(folder))
        found = re.search(r"\bbkr1\w+", keys)
        assert found is not None, keys
        read_only = FolderKey.parse(found.group(0))
        node, address, port, token = start(home)
        try:
            idle = await phase(node, port, token, seconds, attack=None)
            attack = await phase(node, port, token, seconds, attack=(read_only, address))
            stopped = await stop_during_attack(node, read_only, address)
        finally:
            if node.poll() is None:
                node.kill()
                node.wait()
        again, _, port_again, token_again = start(home)
        try:
            await phase(again, port_again, token_again, 2.0, attack=None)
            stop_idle = stop_now(again)
        finally:
            if again.poll() is None:
                again.kill()
                again.wait()
    report(idle, attack, stop_idle, stopped)
    return 0


def backer(home: Path, *args: str) -> str:
    argv = [sys.executable, "-m", "backer", "--home", str(home), *args]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def start(home: Path) -> tuple[subprocess.Popen[str], str, int, str]:
    argv = [sys.executable, "-m", "backer", "--home", str(home), "run"]
    argv += ["--listen", "127.0.0.1:0", "--discovery", "none", "--web", "--events", "json"]
    node = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert node.stderr is not None and node.stdout is not None
    line = node.stderr.readline()
    dashboard = re.search(r"127\.0\.0\.1:(\d+)/#token=(\S+)", line)
    assert dashboard is not None, line
    address = ""
    while not address:
        event = node.stdout.readline()
        listening = re.search(r'"listen": "([^"]+)"', event)
        if listening:
            address = listening.group(1)
    for stream in (node.stdout, node.stderr):  # a full pipe would block the node's printing
        threading.Thread(target=stream.read, daemon=True).start()
    return node, address, int(dashboard.group(1)), dashboard.group(2)


async def phase(
    node: subprocess.Popen[str],
    port: int,
    token: str,
    seconds: float,
    *,
    attack: tuple[FolderKey, str] | None,
) -> dict[str, float]:
    Path(f"/proc/{node.pid}/clear_refs").write_text("5")
    attacking = attacker(*attack, seconds) if attack else None
    worst, asked = 0.0, 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        took = await asyncio.to_thread(ask_status, port, token)
        worst, asked = max(worst, took), asked + 1
        await asyncio.sleep(0.05)
    bombs = offered_by(attacking) if attacking else 0
    return {
        "worst_ms": worst * 1000,
        "requests": asked,
        "peak_mb": status_kb(node.pid, "VmHWM") / 1024,
        "bombs": bombs,
    }


ATTACKERS = 4  # connections offering the bomb at once
PER_CONNECTION = 1.0  # seconds an attacker stays before it reconnects with a fresh bomb


async def bombard_many(key: FolderKey, address: str, stop: asyncio.Event) -> int:
    offered = await asyncio.gather(*(bombard(key, address, stop) for _ in range(ATTACKERS)))
    return sum(offered)


async def bombard(key: FolderKey, address: str, stop: asyncio.Event) -> int:
    """Offer the bomb over one connection after another until `stop`; how many were offered
    (the victim refuses the entry and keeps the session, so each leaves after a second)."""
    offered = 0
    while not stop.is_set():
        evil = EvilPeer(key, {})
        bomb, group = chunk_list_bomb(key)
        evil.plant([bomb])
        evil.groups = {group_hash(group): group}
        try:
            await evil.attack(address, deadline=PER_CONNECTION)
        except (OSError, ConnectionError):
            await asyncio.sleep(0.1)
        offered += 1
    return offered


def chunk_list_bomb(key: FolderKey) -> tuple[RemoteEntry, bytes]:
    group = pack_chunks([(os.urandom(31) + b"\xc0", MAX_CHUNK)] * GROUP_MAX)
    honest = RemoteEntry.from_entry(file_entry("bomb.bin", b"x"))
    lie = {"groups": (group_hash(group),) * 65536, "chunks": None, "size": 2**40}
    sign = signer_for(key)
    signature = sign(forged(honest, **lie).leaf_hash()) if sign is not None else b""
    return forged(honest, **lie, signature=signature), group


async def stop_during_attack(node: subprocess.Popen[str], key: FolderKey, address: str) -> float:
    attacking = attacker(key, address, 4.0)
    await asyncio.sleep(2.0)
    took = await asyncio.to_thread(stop_now, node)
    offered_by(attacking)
    return took


def stop_now(node: subprocess.Popen[str]) -> float:
    start = time.monotonic()
    node.send_signal(signal.SIGTERM)
    node.wait(30)
    return time.monotonic() - start


def ask_status(port: int, token: str) -> float:
    start = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/api/status", headers={"Authorization": f"Bearer {token}"})
        answer = connection.getresponse()
        answer.read()
        assert answer.status == 200, answer.status
    finally:
        connection.close()
    return time.monotonic() - start


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def report(
    idle: dict[str, float], attack: dict[str, float], stop_idle: float, stopped: float
) -> None:
    print("| measure | idle (reference) | under the bomb | ratio | bar |")
    print("|---|---|---|---|---|")
    print(
        f"| dashboard, worst answer of {int(idle['requests'])} / {int(attack['requests'])} "
        f"requests | {idle['worst_ms']:.1f} ms | {attack['worst_ms']:.1f} ms | "
        f"{attack['worst_ms'] / idle['worst_ms']:.2f}x | <= 100 ms |"
    )
    print(
        f"| peak RSS of the node | {idle['peak_mb']:.0f} MB | {attack['peak_mb']:.0f} MB | "
        f"{attack['peak_mb'] / idle['peak_mb']:.2f}x | < 2x idle |"
    )
    print(
        f"| exit on SIGTERM | {stop_idle:.2f} s | {stopped:.2f} s | "
        f"{stopped / stop_idle:.2f}x | <= 3 s |"
    )
    print(f"bombs offered under attack: {int(attack['bombs'])}")


if __name__ == "__main__":
    raise SystemExit(main())
