"""Real `backer` processes for tests: run one (anywhere: inside a namespace too), follow its
`--events json` stream, and wait for the events that matter."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PYTHON = [sys.executable, "-m", "backer"]


def backer(home: Path, *args: str, prefix: Sequence[str] = (), timeout: float = 120) -> str:
    """Run one `backer` command as a user would; its stdout. Fails with its stderr."""
    done = subprocess.run(
        [*prefix, *PYTHON, "--home", str(home), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"backer {' '.join(args)}: {done.stderr}"
    return done.stdout


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Running:
    """A `backer run --events json` process whose events are collected as they come."""

    def __init__(
        self,
        home: Path,
        args: Sequence[str],
        *,
        prefix: Sequence[str] = (),
        program: Sequence[str] = PYTHON,
        stderr: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """`stderr`: a file for the process's stderr (appended), for long runs whose stderr
        could fill a pipe nobody reads; by default a pipe read when the process has ended."""
        self.started = time.monotonic()
        self.stderr_file = None if stderr is None else stderr.open("a")
        self.process = subprocess.Popen(
            [*prefix, *program, "--home", str(home), "run", "--events", "json", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if self.stderr_file is None else self.stderr_file,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.events: list[dict[str, Any]] = []
        self._new: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            event["seen"] = time.monotonic()
            self._new.put(event)

    def wait_for(
        self,
        kind: str,
        matches: Callable[[dict[str, Any]], bool] = lambda _: True,
        *,
        deadline: float = 30.0,
    ) -> dict[str, Any]:
        """The first event of type `kind` that `matches` (already seen, or arriving in time)."""
        for event in self.events:
            if event["type"] == kind and matches(event):
                return event
        end = time.monotonic() + deadline
        while True:
            try:
                event = self._new.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no {kind} event within {deadline:g} s; stderr: {self.stderr_so_far()}"
                ) from None
            self.events.append(event)
            if event["type"] == kind and matches(event):
                return event

    def drain(self) -> list[dict[str, Any]]:
        """Every event so far (those not yet looked at are collected first)."""
        while True:
            try:
                self.events.append(self._new.get_nowait())
            except queue.Empty:
                return self.events

    def stderr_so_far(self) -> str:
        if self.stderr_file is not None:
            return Path(self.stderr_file.name).read_text()[-2000:]
        if self.process.poll() is None:
            return "(still running)"
        assert self.process.stderr is not None
        return self.process.stderr.read()[-2000:]

    def kill(self) -> None:
        """SIGKILL, as a power cut would: no goodbye, no cleanup."""
        self.process.kill()
        self.process.wait()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.stderr_file is not None:
            self.stderr_file.close()
        return self.process.returncode
