"""Three real `backer run` processes on loopback, configured with static peers only: they sync
a tree, then a later edit made on another of them, byte for byte; SIGTERM stops each cleanly."""

from __future__ import annotations

import functools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from procs import backer, free_port

DEADLINE = 60.0


def dashboard_status(url: str) -> dict[str, Any]:
    """GET /api/status of the dashboard whose printed URL (with its token) is `url`."""
    base, token = url.split("/#token=")
    request = urllib.request.Request(
        f"{base}/api/status", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        status: dict[str, Any] = json.loads(answer.read())
    return status


def connected(home: Path) -> int:
    status = json.loads(backer(home, "peers", "--json"))
    return sum(len(folder["peers"]) for folder in status["folders"])


def tree(root: Path, seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {}
    for i in range(60):
        rel = f"d{i % 7}/sub{i % 3}/file-{i}.bin"
        files[rel] = rng.randbytes(rng.randrange(1, 200_000))
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def holds(folder: Path, files: dict[str, bytes]) -> bool:
    try:
        return all((folder / rel).read_bytes() == data for rel, data in files.items())
    except OSError:
        return False


def wait_until(check: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"not within {DEADLINE:g} s: {what}")
        time.sleep(0.05)


def test_three_backer_run_processes_sync_a_tree_and_a_later_edit(tmp_path: Path) -> None:
    homes = [tmp_path / f"home{i}" for i in range(3)]
    folders = [tmp_path / f"folder{i}" for i in range(3)]
    folders[0].mkdir()
    files = tree(folders[0], seed=5)
    backer(homes[0], "init", str(folders[0]))
    key = re.search(r"bkw1\w+", backer(homes[0], "keys", str(folders[0])))
    assert key is not None
    for home, folder in zip(homes[1:], folders[1:], strict=True):
        backer(home, "join", key.group(0), str(folder))
    ports = [free_port() for _ in homes]
    processes = []
    try:
        for i, home in enumerate(homes):
            peers = [arg for j in range(i) for arg in ("--peer", f"127.0.0.1:{ports[j]}")]
            command = [sys.executable, "-m", "backer", "--home", str(home), "run"]
            command += ["--web-port", "0"] if i == 0 else []
            processes.append(
                subprocess.Popen(
                    [*command, "--listen", f"127.0.0.1:{ports[i]}", "--events", "json", *peers],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            )
        for folder in folders[1:]:
            wait_until(functools.partial(holds, folder, files), f"the tree in {folder}")
        edit = {"d3/sub0/file-3.bin": b"edited on the third machine" * 1000, "new.txt": b"new"}
        for rel, data in edit.items():
            (folders[2] / rel).write_bytes(data)
        for folder in folders[:2]:
            wait_until(functools.partial(holds, folder, edit), f"the edit in {folder}")
        wait_until(lambda: connected(homes[0]) == 2, "backer peers shows both peers")
        assert processes[0].stderr is not None
        url = processes[0].stderr.readline().split("dashboard: ", 1)[1].strip()
        status = dashboard_status(url)
        assert [len(f["peers"]) for f in status["folders"]] == [2]
        assert "2 of 2 peers in sync" in backer(homes[0], "status", str(folders[0]))

        # The edit replaced file-3 on the first machine: its old bytes were kept, and a user
        # brings them back while the daemon runs; the restore spreads like any edit.
        replaced = folders[0] / "d3/sub0/file-3.bin"
        assert "no kept versions" not in backer(homes[0], "versions", str(replaced))
        backer(homes[0], "restore", str(replaced))
        original = {"d3/sub0/file-3.bin": files["d3/sub0/file-3.bin"]}
        for folder in folders:
            wait_until(functools.partial(holds, folder, original), f"the restore in {folder}")

        # Two machines write one new file at once: both versions are kept everywhere.
        (folders[0] / "plan.txt").write_bytes(b"first machine's plan")
        (folders[1] / "plan.txt").write_bytes(b"second machine's plan")
        wait_until(
            lambda: "plan.sync-conflict-" in backer(homes[2], "conflicts", str(folders[2])),
            "a conflict copy",
        )
    finally:
        outputs = []
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            out, err = process.communicate(timeout=30)
            outputs.append((process.returncode, out, err))
    stopped = subprocess.run(
        [sys.executable, "-m", "backer", "--home", str(homes[0]), "peers"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert stopped.returncode == 1 and "not running" in stopped.stdout
    for returncode, out, err in outputs:
        assert returncode == 0, err
        kinds = [json.loads(line)["type"] for line in out.splitlines()]
        assert kinds[0] == "node_started" and "node_stopping" in kinds, kinds
        assert "peer_connected" in kinds
