"""The node: composes the folders of one config, one listener for all of them, the static
peers, and the event stream.

    async with Node(home) as node:          # starts everything; leaves cleanly
        node.listen_address                  # where it accepts connections
        async for event in node.bus.subscribe(): ...

Owns only the composition (STYLE.md: no god object): each folder's work is its FolderRunner's,
each connection's its mesh's. Imports config, events, mesh, sync, watch and node.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from backer.addresses import format_address, parse_address
from backer.config import Home, NodeConfig
from backer.discovery.base import Found
from backer.errors import BackerError
from backer.events import ErrorOccurred, FolderPaused, NodeStarted, NodeStopping, PeerFound
from backer.ids import DeviceId
from backer.mesh.peers import Connection, Known
from backer.mesh.transport import Listener
from backer.node.bus import EventBus
from backer.node.finders import Finders
from backer.node.folder import FolderOptions, FolderRunner
from backer.node.statusfile import STATUS_FILE, write_status_forever
from backer.node.throttle import Limits
from backer.sync.link import Link

__all__ = ["Node", "NodeOptions"]


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeOptions:
    folder: FolderOptions = dataclasses.field(default_factory=FolderOptions)
    listen: bool = True  # False: dial only (tests of one-way meshes)


class Node:
    def __init__(
        self,
        home: Home,
        config: NodeConfig | None = None,
        *,
        options: NodeOptions | None = None,
        bus: EventBus | None = None,
    ) -> None:
        self.home = home
        self.config = config
        self.options = options or NodeOptions()
        self.bus = bus or EventBus()
        self._changed = asyncio.Event()  # something happened: the status file is rewritten
        self.bus.on_emit = self._changed.set
        self.folders: dict[bytes, FolderRunner] = {}  # by discovery ID
        self.unavailable: dict[str, str] = {}  # folders that could not be opened, and why
        self.device: DeviceId | None = None
        self.listener: Listener | None = None
        self.finders: Finders | None = None
        self._sightings: set[tuple[bytes, str, str]] = set()  # (folder, address, via) reported
        self._told_unknown: set[str] = set()  # hosts that asked for a folder not hosted here
        self._noted: dict[str, Any] = {}  # what the layers above add to the status file
        self.limits = Limits()  # the config's bandwidth limits, set by run()
        self._stop = asyncio.Event()
        self._started = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    @property
    def listen_address(self) -> str:
        return self.listener.bound if self.listener is not None else ""

    # -- lifetime ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self.run())
        started = asyncio.ensure_future(self._started.wait())
        await asyncio.wait([started, self._task], return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if self._task.done():
            await self._task  # raises why it could not start
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
        if self._task is not None and not self._task.cancelled():
            await self._task

    def stop(self, reason: str = "stopped") -> None:
        """Ask the node to leave: goodbyes sent, transfers abandoned (their temp data kept)."""
        self._stop_reason = reason
        self._stop.set()

    async def run(self) -> None:
        """Run until `stop()`. Raises BackerError if a folder or the listener cannot start."""
        config = self.config if self.config is not None else self.home.load_config()
        self.limits = Limits.per_second(
            config.send_limit_kib * 1024, config.receive_limit_kib * 1024
        )
        device_key = self.home.device_key()
        self.device = DeviceId.from_public_key(bytes(device_key.verify_key))
        try:
            if self.options.listen:
                self.listener = Listener(
                    config.listen,
                    lambda: list(self.folders),
                    self._accept,
                    refused=lambda why: self.bus.emit(ErrorOccurred(folder="", message=why)),
                    unknown=self._unknown_folder,
                )
                try:
                    await self.listener.start()
                except OSError as exc:
                    raise BackerError(_listen_failure(config.listen, exc)) from exc
            advertise = _advertised(self.listen_address) if self.listener else ()
            options = dataclasses.replace(self.options.folder, max_peers=config.max_peers)
            for folder in config.folders:
                key = folder.folder_key
                try:
                    runner = await FolderRunner.open(
                        Path(folder.path),
                        key,
                        device_key=device_key,
                        emit=self.bus.emit,
                        options=options,
                        advertise=advertise,
                        limits=self.limits,
                    )
                except (BackerError, OSError) as exc:  # one missing disk must not stop the rest
                    self.unavailable[folder.path] = str(exc)
                    self.bus.emit(FolderPaused(folder=folder.path, reason=str(exc)))
                    continue
                self.folders[key.discovery_id] = runner
                for address in config.peers:
                    if address not in advertise:
                        runner.mesh.learn(address, source="static")
            # Announced before discovery starts: a peer found while mDNS registers must not be
            # the node's first event.
            self.bus.emit(
                NodeStarted(
                    device=str(self.device),
                    listen=self.listen_address,
                    folders=tuple(runner.label for runner in self.folders.values()),
                )
            )
            if config.discovery and self.listener is not None:
                self.finders = Finders(
                    config,
                    device_key=device_key,
                    listen=self.listen_address,
                    folders=tuple(r.key for r in self.folders.values()),
                    learn=self._found,
                    emit=self.bus.emit,
                )
                await self.finders.start()
                for address in config.peers:
                    self.finders.hint(address)
            await self._run_folders()
        finally:
            await self._shutdown()

    async def _run_folders(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            runs = [tasks.create_task(runner.run()) for runner in self.folders.values()]
            stop = tasks.create_task(self._stop.wait())
            status = tasks.create_task(
                write_status_forever(self.home.path / STATUS_FILE, self.status, self._changed)
            )
            ready = tasks.create_task(_all_set([r.ready for r in self.folders.values()]))
            await asyncio.wait([stop, ready, *runs], return_when=asyncio.FIRST_COMPLETED)
            self._started.set()
            await asyncio.wait([stop, *runs], return_when=asyncio.FIRST_COMPLETED)
            reason = getattr(self, "_stop_reason", "stopped")
            self.bus.emit(NodeStopping(reason=reason))
            await asyncio.gather(
                *(runner.mesh.close() for runner in self.folders.values()),
                return_exceptions=True,
            )
            if self.listener is not None:
                await self.listener.stop()
            for task in [*runs, stop, ready, status]:
                task.cancel()

    async def _shutdown(self) -> None:
        if self.finders is not None:
            await self.finders.stop()  # goodbyes first: peers stop dialling a leaving node
        if self.listener is not None:
            with contextlib.suppress(Exception):
                await self.listener.stop()
        for runner in self.folders.values():
            try:
                await runner.close()
            except (BackerError, OSError) as exc:
                self.bus.emit(ErrorOccurred(folder=runner.label, message=f"closing: {exc}"))
        self.bus.close()

    # -- connections -------------------------------------------------------------------------

    def _found(self, found: Found) -> None:
        runner = self.folders.get(found.folder)
        if runner is None:
            return
        for address in found.addresses:
            runner.mesh.learn(address, source=found.via, device=found.device)
            sighting = (found.folder, address, found.via)
            if sighting not in self._sightings and len(self._sightings) < 4096:
                self._sightings.add(sighting)
                self.bus.emit(
                    PeerFound(
                        folder=runner.label,
                        device=str(DeviceId(found.device)),
                        address=address,
                        via=found.via,
                    )
                )

    def _unknown_folder(self, host: str) -> None:
        """Said once per host (its dialler retries): a connection named a folder not hosted."""
        if host in self._told_unknown or len(self._told_unknown) >= 4096:
            return
        self._told_unknown.add(host)
        self.bus.emit(
            ErrorOccurred(
                folder="",
                message=f"wrong folder key: a peer at {host} asked for a folder this node does "
                "not host (it holds another folder's key, or that folder is not joined here)",
            )
        )

    async def _accept(self, discovery_id: bytes, link: Link, address: str) -> None:
        runner = self.folders.get(discovery_id)
        if runner is None:
            with contextlib.suppress(ConnectionError, OSError):
                await link.close()
            return
        await runner.mesh.accept(self.limits.wrap(link), address)

    async def accept_link(self, discovery_id: bytes, link: Link, address: str = "") -> None:
        """Run a connection from any transport (an in-memory pipe...) for one folder."""
        await self._accept(discovery_id, link, address)

    # -- status ------------------------------------------------------------------------------

    def note_status(self, name: str, value: Any) -> None:
        """Add `name` to the status file (the dashboard's address: the node does not know of
        the web layer above it)."""
        self._noted[name] = value
        self._changed.set()

    def status(self) -> dict[str, Any]:
        """What `backer status` and `backer peers` show: per folder, its root, state, the
        peers connected and every address known, with how it was found."""
        folders = []
        for runner in self.folders.values():
            root = runner.replica.root
            mesh = runner.mesh
            peers = [
                {
                    "device": str(DeviceId(c.device)),
                    "address": c.address,
                    "outgoing": c.outgoing,
                    "found_by": c.known.source if c.known is not None else "dialled us",
                    "in_sync": c.session.peer_root == root,
                    "since": round(c.since, 3),
                }
                for c in mesh.connections.values()
            ]
            pulling = runner.puller.current
            if runner.local_only and pulling is None:
                # A read-only device's own changes keep its root apart from every peer's:
                # that difference is not a sync under way.
                for peer in peers:
                    if not peer["in_sync"]:
                        peer["differs_by"] = "local changes only"
            now = mesh.clock()
            known = [
                {
                    "address": k.address,
                    "found_by": k.source,
                    "device": str(DeviceId(k.device)) if k.device else "",
                    "state": _address_state(k, mesh.connections, now),
                }
                for k in mesh.known.values()
            ]
            folders.append(
                {
                    "path": runner.label,
                    "left": None
                    if pulling is None
                    else {
                        "files": max(0, pulling.planned_files - pulling.files),
                        "bytes": max(
                            0,
                            pulling.planned_bytes - pulling.bytes_fetched - pulling.bytes_local,
                        ),
                    },
                    "folder_id": runner.key.folder_id,
                    "root": root.hex(),
                    "state": "paused: " + runner.puller.paused if runner.puller.paused else "ok",
                    "local_only": runner.local_only,
                    "watching": runner.watcher is not None,
                    "watch_complete": runner.watch_complete,
                    "peers": peers,
                    "known": known,
                }
            )
        for path, reason in self.unavailable.items():
            folders.append({"path": path, "state": f"unavailable: {reason}", "peers": []})
        return {
            **self._noted,
            "pid": os.getpid(),
            "device": str(self.device) if self.device else "",
            "listen": self.listen_address,
            "folders": folders,
        }


def _listen_failure(address: str, exc: OSError) -> str:
    """Why the node cannot listen, and the fix that fits: only a port in use suggests that
    another program (another backer, often) holds it."""
    # asyncio words it "error while attempting to bind on address (...): <reason>"
    reason = (exc.strerror or str(exc)).rpartition("): ")[2]
    if exc.errno == errno.EADDRINUSE:
        fix = "another program (another backer?) uses that port"
    elif exc.errno == errno.EADDRNOTAVAIL:
        fix = "no interface of this machine has that address"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        fix = "ports below 1024 need root"
    else:
        fix = "check the address"
    return (
        f"cannot listen on {address}: {reason}; {fix}. "
        "Change `listen` in the config or pass --listen"
    )


def _address_state(known: Known, connections: dict[bytes, Connection], now: float) -> str:
    if known.ourselves:
        return "this node"
    if known.device is not None and known.device in connections:
        return "connected"
    if known.dialing:
        return "dialling"
    if known.next_try > now:
        return f"retry in {known.next_try - now:.0f} s ({known.failures} failures)"
    return "idle"


async def _all_set(events: list[asyncio.Event]) -> None:
    for event in events:
        await event.wait()


def _advertised(bound: str) -> tuple[str, ...]:
    """What peers should dial: the bound address, or `:port` (the host they see us from) when
    listening on every interface."""
    host, port = parse_address(bound)
    if host in ("0.0.0.0", "::", ""):
        return (f":{port}",)
    return (format_address(host, port),)
