"""`backer run`'s event printer: a reader of its output that stalls never stalls the node."""

from __future__ import annotations

import asyncio
import io
import json
import sys
import threading
import time

import pytest

from backer.cli import run as run_module
from backer.events import NodeStopping
from backer.node.bus import EventBus

DEADLINE = 5.0


class StalledPipe(io.StringIO):
    """stdout whose reader has stopped reading: every write waits until `release`."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.written: list[str] = []

    def write(self, text: str) -> int:
        self.entered.set()
        self.release.wait(3 * DEADLINE)
        self.written.append(text)
        return len(text)

    def isatty(self) -> bool:
        return False


async def test_a_stalled_reader_of_the_events_never_blocks_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by the hostile benchmark: with `--events json` piped to a reader that stopped
    reading, the pipe filled, the next print blocked the event loop, and the node stopped
    answering its dashboard."""
    pipe = StalledPipe()
    monkeypatch.setattr(sys, "stdout", pipe)
    bus = EventBus()
    events = bus.subscribe()
    printer = asyncio.create_task(run_module._print(events, as_json=True))
    try:
        bus.emit(NodeStopping(reason="first"))
        start = time.monotonic()
        while not pipe.entered.is_set():  # the write is stuck from here on
            assert time.monotonic() - start < DEADLINE, "the printer never wrote"
            await asyncio.sleep(0.01)
        bus.emit(NodeStopping(reason="second"))  # the loop still runs meanwhile
        loop_ran_at = time.monotonic()
        assert loop_ran_at - start < DEADLINE, "the event loop was blocked by the write"
        pipe.release.set()
        while len(pipe.written) < 2:
            assert time.monotonic() - start < 2 * DEADLINE, pipe.written
            await asyncio.sleep(0.01)
        reasons = [
            json.loads(line)["reason"] for text in pipe.written for line in text.splitlines()
        ]
        assert reasons == ["first", "second"]
    finally:
        pipe.release.set()
        printer.cancel()
