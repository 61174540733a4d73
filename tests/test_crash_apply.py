"""SIGKILL a node again and again while it receives a large tree: never a partial file at its
real path, the index always opens, a rescan agrees with the disk, and the sync resumes and
completes. KILLS sets how many (8 here; `BACKER_KILLS=200` for a soak)."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from procs import backer, free_port

from backer.index.store import IndexStore

KILLS = int(os.environ.get("BACKER_KILLS", "8"))
MIB = 1024 * 1024


def run(home: Path, port: int, *peers: int) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "backer", "--home", str(home), "run"]
    args += ["--listen", f"127.0.0.1:{port}", "--discovery", "none"]
    for peer in peers:
        args += ["--peer", f"127.0.0.1:{peer}"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def tree(folder: Path) -> dict[str, bytes]:
    rng = random.Random(8)
    files = {
        f"d{i % 9}/f{i:03}.bin": rng.randbytes(rng.randrange(1, 256 * 1024)) for i in range(240)
    }
    files["big/one.bin"] = rng.randbytes(16 * MIB)
    files["big/two.bin"] = rng.randbytes(12 * MIB)
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return files


def check_after_kill(folder: Path, files: dict[str, bytes], ever: dict[str, set[bytes]]) -> int:
    """Every file at its real path is one whole version that existed; returns how many are
    at their latest version."""
    present = 0
    for rel, data in files.items():
        path = folder / rel
        if path.exists():
            held = path.read_bytes()
            assert held in ever[rel], f"{rel}: a partial or wrong file at its real path"
            present += held == data
    with IndexStore.open(folder) as store:  # the index always opens
        indexed = {e.path for e in store.entries() if not e.deleted and e.path in files}
    on_disk = {rel for rel in files if (folder / rel).exists()}
    assert indexed <= on_disk, f"indexed but not on disk: {sorted(indexed - on_disk)[:5]}"
    return present


def _holds(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except OSError:
        return False


def test_sigkill_during_a_large_apply_loses_nothing_and_resumes(tmp_path: Path) -> None:
    source, victim = tmp_path / "source", tmp_path / "victim"
    source.mkdir()
    files = tree(source)
    backer(tmp_path / "home-a", "init", str(source))
    key = re.search(r"bkw1\w+", backer(tmp_path / "home-a", "keys", str(source)))
    assert key is not None
    backer(tmp_path / "home-b", "join", key.group(0), str(victim))
    a_port, b_port = free_port(), free_port()
    serving = run(tmp_path / "home-a", a_port)
    rng = random.Random(26)
    ever = {rel: {data} for rel, data in files.items()}
    progress = []
    try:
        for _ in range(KILLS):
            node = run(tmp_path / "home-b", b_port, a_port)
            time.sleep(rng.uniform(0.3, 1.0))  # the kill point: deliberately a random moment
            node.send_signal(signal.SIGKILL)
            node.wait()
            progress.append(check_after_kill(victim, files, ever))
            # A rescan agrees with the disk: every file it indexes is there, whole.
            backer(tmp_path / "home-b", "scan", str(victim))
            check_after_kill(victim, files, ever)
            if progress[-1] == len(files):  # all done: give the next life new work
                for rel in [*rng.sample(sorted(files), 60), "big/one.bin"]:
                    files[rel] = rng.randbytes(len(files[rel]) or 1)
                    ever[rel].add(files[rel])
                    (source / rel).write_bytes(files[rel])
        node = run(tmp_path / "home-b", b_port, a_port)  # and now let it finish
        try:
            end = time.monotonic() + 120
            while not all(_holds(victim / rel, data) for rel, data in files.items()):
                assert time.monotonic() < end, "the sync did not complete after the kills"
                time.sleep(0.1)
        finally:
            node.terminate()
            node.wait(timeout=30)
    finally:
        serving.terminate()
        serving.wait(timeout=30)
    assert check_after_kill(victim, files, ever) == len(files)
    print(f"files in place after each of {KILLS} kills: {progress}")
