"""Finding peers on the LAN by mDNS / DNS-SD, with zeroconf's asyncio API.

An `MdnsFinder` registers the service `<device ID>._backer._tcp.local.` whose TXT record is our
announcement (`base.to_txt`), re-announces it with a fresh nonce every `reannounce` seconds,
browses the same service type, and reports each peer that names one of our folders as
`Found(..., via="mdns")`, again whenever its nonce or addresses change (a restart on a new port,
a re-announcement). It says goodbye on `stop()`. Imports discovery.base, discovery.beacon (for
the interface list), ids, addresses and errors; never mesh or node. Zeroconf's errors become
`DiscoveryError` here.

Zeroconf habits worked around (LIBRARIES.md): register/update/unregister return a task that must
itself be awaited, or nothing (no goodbye) is sent; a `ServiceInfo` cannot be changed, so an
update is a new info under the same name; queries are QM, because on one host the unicast reply
to a QU question reaches a random one of the processes; tests pin the interfaces.

The name is not probed for conflicts (RFC 6762 section 8.1): it is the device ID, a hash of our
public key, unique by construction, and probing costs about a second before peers see us.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from collections.abc import Coroutine
from typing import Any

from zeroconf import DNSQuestionType, InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf import Error as ZeroconfError
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from backer.addresses import format_address
from backer.discovery.base import (
    NONCE_SIZE,
    Announcement,
    Context,
    DiscoveryError,
    Found,
    from_txt,
    to_txt,
)
from backer.discovery.beacon import ipv4_interfaces
from backer.errors import DecodeError
from backer.ids import DeviceId

__all__ = ["REANNOUNCE", "SERVICE_TYPE", "MdnsFinder"]

SERVICE_TYPE = "_backer._tcp.local."
REANNOUNCE = 120.0  # seconds between two announcements (each with a fresh nonce)
RESOLVE_TIMEOUT_MS = 3000
MAX_RESOLVING = 32  # services resolved at once; more (a flood of names) wait for a later update
MAX_PEERS_REMEMBERED = 4096

log = logging.getLogger(__name__)

Interfaces = list[str] | InterfaceChoice


class MdnsFinder:
    """Announces our folders over mDNS and reports the peers whose announcements name them."""

    def __init__(
        self,
        context: Context,
        *,
        interfaces: list[str] | None = None,
        ip_version: IPVersion = IPVersion.V4Only,
        reannounce: float = REANNOUNCE,
    ) -> None:
        self.context = context
        self.interfaces = interfaces  # None: follow the listen host (at start)
        self.ip_version = ip_version
        self.reannounce = reannounce
        self._device = context.device
        self.name = f"{DeviceId(self._device)}.{SERVICE_TYPE}"
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._resolving: set[str] = set()
        self._reported: dict[str, tuple[bytes, tuple[str, ...]]] = {}  # name -> (nonce, addrs)

    async def start(self) -> None:
        """Register our service and start browsing; returns once the registration is accepted
        (its announcements go on in the background). DiscoveryError if zeroconf cannot start
        on the interfaces or refuses the registration."""
        if self._zc is not None:
            return
        if not 1 <= self.context.port <= 65535:
            raise DiscoveryError(f"mDNS needs the real listen port, not {self.context.port}")
        interfaces = (
            self.interfaces if self.interfaces is not None else _interfaces_for(self.context.host)
        )
        try:
            zc = AsyncZeroconf(interfaces=interfaces, ip_version=self.ip_version)
        except (OSError, ZeroconfError, ValueError, RuntimeError) as exc:
            raise DiscoveryError(f"mDNS cannot start on {interfaces}: {exc}") from exc
        self._zc = zc
        try:
            self._browser = AsyncServiceBrowser(
                zc.zeroconf,
                SERVICE_TYPE,
                handlers=[self._on_change],
                question_type=DNSQuestionType.QM,
            )
            self._info = self._make_info()
            announcing = await zc.async_register_service(self._info, cooperating_responders=True)
        except (OSError, ZeroconfError) as exc:
            await self._close()
            raise DiscoveryError(f"mDNS registration of {self.name} failed: {exc}") from exc
        except BaseException:
            await self._close()
            raise
        self._spawn(self._announce(announcing))

    async def stop(self) -> None:
        """Say goodbye (awaited until sent), stop browsing and close zeroconf."""
        await self._close()

    # -- announcing ---------------------------------------------------------------------------

    def _make_info(self) -> AsyncServiceInfo:
        announcement = Announcement.make(
            self._device, self.context.port, self.context.discovery_ids, os.urandom(NONCE_SIZE)
        )
        return AsyncServiceInfo(
            SERVICE_TYPE,
            self.name,
            port=self.context.port,
            properties=to_txt(announcement),
            server=f"{DeviceId(self._device)}.local.",
            parsed_addresses=_addresses_for(self.context.host),
        )

    async def _announce(self, first: Any) -> None:
        """Await the first announcement, then re-announce with a fresh nonce forever."""
        await first
        while True:
            await asyncio.sleep(self.reannounce)
            zc = self._zc
            if zc is None:
                return
            info = self._make_info()
            try:
                announcing = await zc.async_update_service(info)
                self._info = info
                await announcing
            except (OSError, ZeroconfError) as exc:
                log.warning("mDNS re-announcement failed: %s", exc)

    # -- browsing -----------------------------------------------------------------------------

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        """Zeroconf's callback, in the event loop: must never raise."""
        if self._zc is None or name == self.name:
            return
        if state_change is ServiceStateChange.Removed:
            self._reported.pop(name, None)
            return
        try:
            info = AsyncServiceInfo(service_type, name)
            if info.load_from_cache(zeroconf):
                self._consider(name, info)
                return
        except (ZeroconfError, ValueError) as exc:
            log.debug("mDNS: ignoring %r: %s", name, exc)
            return
        if name not in self._resolving and len(self._resolving) < MAX_RESOLVING:
            self._resolving.add(name)
            self._spawn(self._resolve(name, info))

    async def _resolve(self, name: str, info: AsyncServiceInfo) -> None:
        try:
            zc = self._zc
            if zc is not None and await info.async_request(
                zc.zeroconf, RESOLVE_TIMEOUT_MS, question_type=DNSQuestionType.QM
            ):
                self._consider(name, info)
        except (ZeroconfError, ValueError) as exc:
            log.debug("mDNS: cannot resolve %r: %s", name, exc)
        finally:
            self._resolving.discard(name)

    def _consider(self, name: str, info: AsyncServiceInfo) -> None:
        """Report a resolved service if it is a peer of one of our folders, and new or changed."""
        if info.port is None:
            return
        try:
            announcement = from_txt(info.properties, info.port)
        except DecodeError:
            return  # a foreign service under our type, or a hostile record
        if announcement.device == self._device:
            return
        addresses = tuple(
            sorted(format_address(a, announcement.port) for a in self._addresses_of(info))
        )
        if not addresses:
            return
        if self._reported.get(name) == (announcement.nonce, addresses):
            return
        folders = announcement.folders_shared(self.context.discovery_ids)
        if not folders:
            return
        if name not in self._reported and len(self._reported) >= MAX_PEERS_REMEMBERED:
            self._reported.clear()
        self._reported[name] = (announcement.nonce, addresses)
        for folder in folders:
            self.context.on_found(
                Found(folder=folder, device=announcement.device, addresses=addresses, via="mdns")
            )

    def _addresses_of(self, info: AsyncServiceInfo) -> list[str]:
        found = info.parsed_addresses(IPVersion.V4Only)
        if self.ip_version is not IPVersion.V4Only:
            found += [
                address
                for address in info.parsed_addresses(IPVersion.V6Only)
                if not ipaddress.IPv6Address(address).is_link_local
            ]
        return found

    # -- plumbing -----------------------------------------------------------------------------

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("mDNS task failed", exc_info=task.exception())

    async def _close(self) -> None:
        zc, self._zc = self._zc, None
        if zc is None:
            return
        tasks, self._tasks = list(self._tasks), set()
        for task in tasks:
            task.cancel()  # an announcement cut short must not follow the goodbye
        try:
            if tasks:
                await asyncio.wait(tasks)
            browser, self._browser = self._browser, None
            if browser is not None:
                await browser.async_cancel()
            info, self._info = self._info, None
            if info is not None:
                with contextlib.suppress(OSError, ZeroconfError, KeyError):
                    goodbye = await zc.async_unregister_service(info)
                    await goodbye
        finally:
            self._resolving.clear()
            self._reported.clear()
            await zc.async_close()


def _interfaces_for(host: str) -> Interfaces:
    """The interfaces to run mDNS on for a node listening on `host`: that address only, or all
    of them for 0.0.0.0 / ::."""
    if host in ("", "0.0.0.0", "::"):
        return InterfaceChoice.All
    if host == "localhost":
        return ["127.0.0.1"]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise DiscoveryError(f"mDNS needs an IP listen address, not {host!r}") from None
    return [host]


def _addresses_for(host: str) -> list[str]:
    """The addresses we publish: the listen address, or for 0.0.0.0 every IPv4 address of an
    interface that is up (loopback only when there is nothing else)."""
    if host == "localhost":
        return ["127.0.0.1"]
    if host not in ("", "0.0.0.0", "::"):
        return [host]
    interfaces = [i for i in ipv4_interfaces() if i.up]
    outside = [i.address for i in interfaces if not i.loopback]
    return outside or [i.address for i in interfaces] or ["127.0.0.1"]
