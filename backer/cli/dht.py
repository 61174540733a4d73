"""`backer dht`: a headless DHT node that others bootstrap from. It holds no folders; it routes,
and stores the signed records of others (checking what a storage node can). Runs until SIGINT
or SIGTERM; prints one line when it listens.

Also runnable alone: `python -m backer.cli.dht --listen HOST:PORT [--bootstrap HOST:PORT ...]`.
Imports discovery.dht, addresses, config and errors.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from backer.addresses import format_address, parse_address
from backer.config import Home
from backer.discovery.dht import DhtNode
from backer.errors import BackerError, InvalidAddressError

__all__ = ["add_dht_command", "cmd_dht", "main"]

_DESCRIPTION = "Run a headless DHT node that devices bootstrap from, until SIGINT or SIGTERM."


def add_dht_command(commands: Any) -> None:
    dht = commands.add_parser(
        "dht", help="run a headless DHT node that devices bootstrap from, until stopped"
    )
    _add_arguments(dht)
    dht.set_defaults(run=cmd_dht)


def cmd_dht(home: Home | None, args: argparse.Namespace) -> int:
    """The node holds no folder and no key: `home` is not used."""
    try:
        host, port = parse_address(args.listen)
        for seed in args.bootstrap:
            parse_address(seed)
    except InvalidAddressError as exc:
        raise BackerError(str(exc)) from exc
    # kademlia logs a warning for every contact that does not answer: not news for a server.
    logging.getLogger("kademlia").setLevel(logging.ERROR)
    return asyncio.run(_serve(host, port, list(args.bootstrap)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="backer dht", description=_DESCRIPTION)
    _add_arguments(parser)
    try:
        return cmd_dht(None, parser.parse_args(argv))
    except BackerError as exc:
        print(f"backer: {exc}", file=sys.stderr)
        return 1


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        required=True,
        metavar="HOST:PORT",
        help="the UDP address to serve on (give an address: there is no default host)",
    )
    parser.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="another DHT node to join through (repeatable)",
    )


async def _serve(host: str, port: int, bootstrap: list[str]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with DhtNode() as node:
        address = await node.listen(host, port)
        print(f"backer dht: listening on {format_address(*address)}", flush=True)
        async with asyncio.TaskGroup() as group:
            joiner = group.create_task(node.stay_joined(lambda: bootstrap), name="dht join")
            await stop.wait()
            joiner.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
