"""The node's finders: which discovery methods run, and where what they find goes.

Every address a finder reports becomes a dial candidate in that folder's mesh (a hint: the
handshake decides), and every address learned any way is a DHT node worth asking (a peer met
on the LAN is a bootstrap node for the internet-wide DHT). A method that cannot start is
reported and skipped; the others and static peers go on. Imports config, discovery, events.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import nacl.signing

from backer.addresses import parse_address
from backer.config import NodeConfig
from backer.discovery.base import Context, DiscoveryError, Finder, Found
from backer.events import Emit, ErrorOccurred
from backer.keys import FolderKey

if TYPE_CHECKING:
    from backer.discovery.dht import DhtFinder

__all__ = ["Finders"]


class Finders:
    """Start with `await start()`, stop with `await stop()` (mDNS says goodbye)."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        device_key: nacl.signing.SigningKey,
        listen: str,
        folders: tuple[FolderKey, ...],
        learn: Callable[[Found], None],
        emit: Emit,
    ) -> None:
        host, port = parse_address(listen)
        self._loop = asyncio.get_running_loop()
        self._learn = learn
        self.context = Context(
            device_key=device_key,
            host=host,
            port=port,
            folders=folders,
            on_found=self._found,
        )
        self.config = config
        self.emit = emit
        self.running: dict[str, Finder] = {}
        self.dht: DhtFinder | None = None

    async def start(self) -> None:
        for method in self.config.discovery:
            finder = self._make(method)
            try:
                await finder.start()
            except DiscoveryError as exc:
                if finder is self.dht:
                    self.dht = None  # hints go to a running DHT only
                self.emit(
                    ErrorOccurred(
                        folder="",
                        message=f"{method} discovery is off: {exc}; other methods and static "
                        "peers still work",
                    )
                )
                continue
            self.running[method] = finder

    async def stop(self) -> None:
        for finder in self.running.values():
            with contextlib.suppress(DiscoveryError, OSError):
                await finder.stop()
        self.running.clear()

    def hint(self, address: str) -> None:
        """An address met any way: maybe a DHT node too."""
        if self.dht is not None:
            self.dht.hint(address)

    def _make(self, method: str) -> Finder:
        # Each method's library is imported only when it is used: zeroconf and kademlia are a
        # fifth of a node's start-up, and `--discovery none` (or static peers) needs neither.
        if method == "mdns":
            from backer.discovery.mdns import MdnsFinder  # noqa: PLC0415 - see above

            return MdnsFinder(self.context, interfaces=list(self.config.lan_interfaces) or None)
        if method == "beacon":
            from backer.discovery.beacon import BeaconFinder  # noqa: PLC0415 - see above

            return BeaconFinder(self.context)
        from backer.discovery.dht import DhtFinder  # noqa: PLC0415 - see above

        self.dht = DhtFinder(self.context, bootstrap=list(self.config.dht_bootstrap))
        return self.dht

    def _found(self, found: Found) -> None:
        # Finders may call back from a library's thread: hand it to the loop.
        self._loop.call_soon_threadsafe(self._deliver, found)

    def _deliver(self, found: Found) -> None:
        self._learn(found)
        if found.via != "dht":
            for address in found.addresses:
                self.hint(address)
