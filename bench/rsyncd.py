"""rsync, the reference of the sync benchmarks: a daemon on 127.0.0.1 with one writable module
per destination, the client that pushes to it, and what `--stats` says the client moved.

The daemon runs under `common`'s launcher, so once it is stopped `usage` holds its wall time,
peak RSS and CPU time with those of every per-connection child it forked and reaped (the
receiving side of every push). Imports common only.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common import (
    BenchError,
    free_port,
)
from measure import (
    Measured,
    MeasuredProcess,
    run_measured,
)

__all__ = ["RsyncDaemon", "RsyncStats"]


@dataclass(frozen=True, slots=True)
class RsyncStats:
    """rsync's `--stats`: what the client says it sent and received."""

    sent: int
    received: int
    literal: int  # file data sent as is (not matched against the destination)

    @property
    def total(self) -> int:
        return self.sent + self.received

    @classmethod
    def parse(cls, measured: Measured) -> RsyncStats:
        text = measured.stdout.decode(errors="replace")

        def number(label: str) -> int:
            found = re.search(rf"^{label}: ([\d,.]+)", text, re.MULTILINE)
            if found is None:
                raise BenchError(f"rsync --stats printed no {label!r}:\n{text[-2000:]}")
            return int(found.group(1).replace(",", "").replace(".", ""))

        return cls(
            sent=number("Total bytes sent"),
            received=number("Total bytes received"),
            literal=number("Literal data"),
        )


class RsyncDaemon:
    """`rsync --daemon --no-detach` on 127.0.0.1 with one writable module per destination; a
    context manager. After leaving it, `usage` is what the launcher measured."""

    def __init__(self, base: Path, modules: dict[str, Path]) -> None:
        self.base = base
        self.modules = modules
        self.port = 0
        self.process: MeasuredProcess | None = None
        self.usage: Measured | None = None

    def __enter__(self) -> RsyncDaemon:
        config = self.base / "rsyncd.conf"
        lines = [
            "use chroot = no",
            "read only = no",
            f"uid = {os.getuid()}",
            f"gid = {os.getgid()}",
            "numeric ids = yes",
            f"log file = {self.base / 'rsyncd.log'}",
            "",
        ]
        for name, path in self.modules.items():
            path.mkdir(parents=True, exist_ok=True)
            lines += [f"[{name}]", f"    path = {path}", ""]
        self.base.mkdir(parents=True, exist_ok=True)
        config.write_text("\n".join(lines))
        for _ in range(5):  # a free port found now may be taken before the daemon binds it
            self.port = free_port()
            self.process = MeasuredProcess(
                [
                    "rsync",
                    "--daemon",
                    "--no-detach",
                    f"--config={config}",
                    f"--port={self.port}",
                    "--address=127.0.0.1",
                ],
                stdout="discard",
            )
            if _wait_listening(self.port, self.process, limit=10.0):
                return self
            self._stop()
        raise BenchError(f"the rsync daemon did not start; see {self.base / 'rsyncd.log'}")

    def __exit__(self, *_: object) -> None:
        self._stop()

    def _stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        with process:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            self.usage = process.wait(check=False)

    def push(
        self, source: Path, module: str, port: int, *, options: Sequence[str] = ()
    ) -> tuple[Measured, RsyncStats]:
        """`rsync -a --stats OPTIONS SOURCE/ rsync://127.0.0.1:PORT/MODULE/` (backer's index
        excluded)."""
        measured = run_measured(
            [
                "rsync",
                "-a",
                "--stats",
                "--exclude=/.backer",
                *options,
                f"{source}/",
                f"rsync://127.0.0.1:{port}/{module}/",
            ]
        )
        return measured, RsyncStats.parse(measured)


def _wait_listening(port: int, process: MeasuredProcess, *, limit: float) -> bool:
    """Whether the daemon accepts connections within `limit` seconds (False if it died)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and process.running():
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.02)  # the daemon gives no other sign that it listens
    return False
