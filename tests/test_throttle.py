"""Bandwidth limits (issue 20, part 4): the token bucket alone, on a fake clock; then two real
nodes on loopback whose transfer keeps within 10 % of the configured send or receive limit."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import pytest
from nodes import FAST, make_member

from backer.config import NodeConfig
from backer.errors import ConfigError
from backer.events import PullFinished, PullStarted
from backer.keys import FolderKey
from backer.node.bus import EventBus
from backer.node.node import Node, NodeOptions
from backer.node.throttle import RateLimit

KIB = 1024
LIMIT_KIB = 1024
FILE_BYTES = 3 * 1024 * KIB  # three seconds at the limit


def test_a_rate_limit_admits_bytes_at_its_rate_and_saves_up_no_more_than_a_burst() -> None:
    limit = RateLimit(1_000_000)
    now = 0.0
    for _ in range(200):  # 10 MB in 50 kB writes at 1 MB/s
        now += limit.admit(50_000, now)
    assert 10.0 * 0.9 <= now <= 10.0 * 1.1
    now += 100.0  # a long quiet spell...
    assert limit.admit(int(limit.burst), now) == 0.0  # ...allows one burst at once
    assert limit.admit(100_000, now) == pytest.approx(0.1)  # then the rate again


def test_limits_are_checked_and_kept_in_the_config() -> None:
    config = NodeConfig(send_limit_kib=512, receive_limit_kib=2048)
    again = NodeConfig.from_toml(config.to_toml())
    assert (again.send_limit_kib, again.receive_limit_kib) == (512, 2048)
    for bad in (-1, 1.5, True, 99):
        with pytest.raises(ConfigError, match="send_limit_kib"):
            NodeConfig(send_limit_kib=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("side", ["send", "receive"])
async def test_a_transfer_between_two_nodes_keeps_within_10_percent_of_the_limit(
    tmp_path: Path, side: str
) -> None:
    key = FolderKey.generate()
    home_a, config_a, folder_a = make_member(tmp_path, "a", key)
    (folder_a / "big.bin").write_bytes(os.urandom(FILE_BYTES))
    if side == "send":
        config_a = dataclasses.replace(config_a, send_limit_kib=LIMIT_KIB)
    async with Node(home_a, config_a, options=NodeOptions(folder=FAST)) as a:
        home_b, config_b, folder_b = make_member(tmp_path, "b", key, [a.listen_address])
        if side == "receive":
            config_b = dataclasses.replace(config_b, receive_limit_kib=LIMIT_KIB)
        bus = EventBus()
        events = bus.subscribe()
        async with Node(home_b, config_b, options=NodeOptions(folder=FAST), bus=bus):
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(60):
                await events.next_of(PullStarted)
                started = loop.time()
                done = await events.next_of(PullFinished, lambda e: e.files >= 1)
                seconds = loop.time() - started
    assert (folder_b / "big.bin").stat().st_size == FILE_BYTES
    rate = done.bytes_fetched / seconds
    limit = LIMIT_KIB * KIB
    assert done.bytes_fetched == FILE_BYTES
    assert 0.9 * limit <= rate <= 1.1 * limit, f"{rate / KIB:.0f} KiB/s against {LIMIT_KIB}"
