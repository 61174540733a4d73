"""Two hosts on different subnets, routed to each other with no multicast path between them,
find each other through the DHT by one bootstrap node (`backer dht`, on the router). Real
network namespaces (root); a run that cannot make them fails.

Run as a script, this file is the finder each host runs: it prints one JSON line when ready
and one for every peer found."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import nacl.signing
from netns import Routed

from backer.discovery.base import Context, Found
from backer.discovery.dht import DhtFinder
from backer.keys import FolderKey

DEADLINE = 20.0
BOOTSTRAP_PORT = 4000


async def test_two_subnets_find_each_other_through_one_bootstrap_node(tmp_path: Path) -> None:
    key = str(FolderKey.generate())
    with Routed(2) as net:
        seed = f"10.{net.subnet}.1.254:{BOOTSTRAP_PORT}"
        logs = [(tmp_path / f"{name}.log").open("w") for name in ("boot", "h1", "h2")]
        procs: list[asyncio.subprocess.Process] = []
        try:
            boot = await asyncio.create_subprocess_exec(
                *["ip", "netns", "exec", f"{net.prefix}r"],
                *[sys.executable, "-m", "backer.cli.dht", "--listen", seed],
                stdout=asyncio.subprocess.PIPE,
                stderr=logs[0],
            )
            procs.append(boot)
            assert "listening on " + seed in await _line(boot, _logs(tmp_path))
            started = time.monotonic()
            hosts = {
                1: ("0.0.0.0", 22001),  # a wildcard listener: announces its route's address
                2: (net.address(2), 22002),
            }
            for i, (host, port) in hosts.items():
                argv = [sys.executable, __file__, "--host", host, "--port", str(port)]
                procs.append(
                    await asyncio.create_subprocess_exec(
                        *net.exec_args(i, [*argv, "--bootstrap", seed, "--key", key]),
                        stdout=asyncio.subprocess.PIPE,
                        stderr=logs[i],
                    )
                )
            ready = [json.loads(await _line(p, _logs(tmp_path))) for p in procs[1:]]
            devices = [r["ready"] for r in ready]
            found: list[dict[str, Any]] = []
            for me, proc in enumerate(procs[1:]):
                line = json.loads(await _line(proc, _logs(tmp_path)))
                line["wall"] = time.monotonic() - started
                line["me"] = me
                found.append(line)
            assert found[0]["found"] == devices[1]
            assert found[0]["addresses"] == [f"{net.address(2)}:22002"]
            assert found[1]["found"] == devices[0]
            assert found[1]["addresses"] == [f"{net.address(1)}:22001"]  # the routed interface
            print(
                "\nDHT across two routed subnets, time to first found: "
                + ", ".join(
                    f"h{f['me'] + 1} {f['after']:.2f} s after finder start "
                    f"({f['wall']:.2f} s after process start)"
                    for f in found
                )
            )
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(DEADLINE):
                codes = [await proc.wait() for proc in procs]
            assert codes == [0, 0, 0], _logs(tmp_path)
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            for log in logs:
                log.close()


async def _line(proc: asyncio.subprocess.Process, logs: Any) -> str:
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(DEADLINE):
            line = await proc.stdout.readline()
    except TimeoutError:
        raise AssertionError(f"no line within {DEADLINE} s; logs: {logs()}") from None
    assert line, f"the process ended; logs: {logs()}"
    return line.decode()


def _logs(tmp_path: Path) -> Any:
    def read() -> dict[str, str]:
        return {p.name: p.read_text()[-2000:] for p in tmp_path.glob("*.log")}

    return read


# -- the finder each host runs -----------------------------------------------------------------


async def _finder(host: str, port: int, bootstrap: str, key: str) -> None:
    start = time.monotonic()

    def on_found(found: Found) -> None:
        print(
            json.dumps(
                {
                    "found": found.device.hex(),
                    "addresses": list(found.addresses),
                    "after": time.monotonic() - start,
                }
            ),
            flush=True,
        )

    context = Context(
        device_key=nacl.signing.SigningKey.generate(),
        host=host,
        port=port,
        folders=(FolderKey.parse(key),),
        on_found=on_found,
    )
    finder = DhtFinder(context, bootstrap=[bootstrap])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await finder.start()
    try:
        print(json.dumps({"ready": context.device.hex()}), flush=True)
        await stop.wait()
    finally:
        await finder.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    asyncio.run(_finder(args.host, args.port, args.bootstrap, args.key))
