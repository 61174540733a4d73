"""One hosted folder at run time: its replica, its watcher and scans, its puller and its mesh.

Local changes come from the filesystem watcher (debounced, only the changed paths are scanned)
and from a periodic full rescan that catches what the watcher missed (often, when the watcher
covers only part of the tree). A folder whose disk vanished, or most of whose files vanished at
once, pauses: nothing is pulled or deleted until a scan finds it whole again. A folder whose disk
went away is looked for often, and its watcher is armed anew when it is back (its watches went
with the old mount). Imports sync, mesh, watch and events.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import nacl.signing

from backer.errors import BackerError, FolderMissingError, MassDeletionError, MountGoneError
from backer.events import (
    Emit,
    ErrorOccurred,
    FolderPaused,
    FolderScanned,
    LocalChangesKept,
    WatchIncomplete,
)
from backer.ids import DeviceId
from backer.keys import FolderKey
from backer.mesh.peers import Dial, FolderMesh
from backer.mesh.transport import dial
from backer.node.throttle import Limits
from backer.sync.link import Link
from backer.sync.replica import Replica
from backer.sync.swarm import FolderPuller
from backer.watch import Watcher, WatchError

__all__ = ["FolderOptions", "FolderRunner"]

TEMP_KEPT_FOR = 24 * 3600.0  # an abandoned transfer's temp file serves a restart this long


@dataclass(frozen=True, slots=True, kw_only=True)
class FolderOptions:
    watch: bool = True
    debounce: float = 0.05  # seconds of quiet before changed paths are scanned
    max_delay: float = 1.0  # ...but no later than this after the first change
    rescan_every: float = 3600.0  # full rescans with a complete watcher
    rescan_unwatched: float = 60.0  # full rescans without one (or with a partial one)
    recheck_gone: float = 10.0  # a folder whose disk is gone is looked for this often
    max_peers: int = 16  # sessions this node dials (the node sets it from the config)
    share_addresses: bool = True
    gossip_every: float | None = 30.0
    answer_within: float | None = 30.0  # a peer silent on our requests this long is dropped
    frame_within: float | None = 120.0  # a frame must arrive within this long of its first byte
    backoff_first: float = 0.5
    backoff_max: float = 60.0
    hedge_after: float = 2.0
    prune_versions_every: float = 3600.0  # thin the versions area on its schedule this often


class FolderRunner:
    """`await FolderRunner.open(...)`, then `await run()` for the folder's lifetime."""

    def __init__(
        self,
        replica: Replica,
        key: FolderKey,
        *,
        device_key: nacl.signing.SigningKey,
        emit: Emit,
        options: FolderOptions,
        advertise: tuple[str, ...],
        limits: Limits | None = None,
    ) -> None:
        self.replica = replica
        self.key = key
        self.emit = emit
        self.options = options
        self.label = str(replica.folder)
        self.puller = FolderPuller(replica, emit=emit, hedge_after=options.hedge_after)
        self.mesh = FolderMesh(
            replica,
            key,
            device_key=device_key,
            puller=self.puller,
            emit=emit,
            max_peers=options.max_peers,
            advertise=advertise,
            share_addresses=options.share_addresses,
            gossip_every=options.gossip_every,
            answer_within=options.answer_within,
            frame_within=options.frame_within,
            backoff_first=options.backoff_first,
            backoff_max=options.backoff_max,
            dialer=_limited_dial(limits) if limits is not None else dial,
        )
        self.watcher: Watcher | None = None
        self.watch_complete = False
        self._coverage_checked = False
        self._rescan_now = asyncio.Event()
        self._gone = False  # paused because the folder, or a part of it, went with its disk
        self._walks_gone = 0  # whole walks in a row that found a part still gone
        self._rearm = False  # back from gone: the watcher must be armed anew
        self._armed = asyncio.Event()  # a new watcher is in place
        self.ready = asyncio.Event()  # watching, and the first scan is done
        self.local_only = 0  # on a read-only device: paths it changed, which stay here

    @classmethod
    async def open(
        cls,
        path: Path,
        key: FolderKey,
        *,
        device_key: nacl.signing.SigningKey,
        emit: Emit,
        options: FolderOptions,
        advertise: tuple[str, ...] = (),
        limits: Limits | None = None,
    ) -> FolderRunner:
        device = DeviceId.from_public_key(bytes(device_key.verify_key))
        replica = await Replica.open(path, device=device.short, key=key)
        await asyncio.to_thread(replica.disk.prune_temp, TEMP_KEPT_FOR, time.time())
        return cls(
            replica,
            key,
            device_key=device_key,
            emit=emit,
            options=options,
            advertise=advertise,
            limits=limits,
        )

    async def close(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()
        await self.replica.close()

    async def run(self) -> None:
        # The watcher starts first, so that nothing changed during the first scan is missed.
        if self.options.watch:
            await self._start_watcher()
        await self._scan(None)
        self.ready.set()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.mesh.run())
            tasks.create_task(self.puller.run())
            tasks.create_task(self._rescans())
            tasks.create_task(self._prune_versions())
            if self.options.watch:
                tasks.create_task(self._watch())

    # -- local changes -----------------------------------------------------------------------

    async def _start_watcher(self) -> None:
        watcher = Watcher(
            self.replica.folder, debounce=self.options.debounce, max_delay=self.options.max_delay
        )
        try:
            await watcher.start()
        except WatchError as exc:
            self.emit(ErrorOccurred(folder=self.label, message=f"{exc}; scanning periodically"))
            return
        self.watcher = watcher
        await self._check_coverage()

    async def _check_coverage(self) -> None:
        if self.watcher is None:
            return
        coverage = await asyncio.to_thread(self.watcher.coverage)
        complete = coverage.complete
        if not complete and (self.watch_complete or not self._coverage_checked):
            self.emit(
                WatchIncomplete(
                    folder=self.label,
                    watched_dirs=coverage.watched_dirs,
                    total_dirs=coverage.total_dirs,
                    fix=(
                        "raise the limit, e.g. `sysctl fs.inotify.max_user_watches=524288`; "
                        f"until then the folder is rescanned every "
                        f"{self.options.rescan_unwatched:g} s"
                    ),
                )
            )
        self.watch_complete = complete
        self._coverage_checked = True

    async def _watch(self) -> None:
        while True:
            watcher = self.watcher
            if watcher is None:  # none could be started: wait for one armed anew
                await self._armed.wait()
                self._armed.clear()
                continue
            try:
                paths = await watcher.changes()
            except WatchError:
                if watcher is self.watcher:
                    raise  # stopped by close()
                continue  # replaced by `_rearm_watcher`
            if watcher.overflowed or "" in paths:
                await self._scan(None)
            elif unseen := await asyncio.to_thread(self.replica.recent.unseen, sorted(paths)):
                await self._scan(unseen)  # not just what our own pulls wrote

    async def _rearm_watcher(self) -> None:
        """Watch the folder anew: a disk unmounted and mounted again took its watches along,
        and the new mount's directories are other inodes, so the old watcher hears nothing."""
        old, self.watcher = self.watcher, None
        if old is not None:
            await old.stop()
        await self._start_watcher()
        self._armed.set()

    async def _rescans(self) -> None:
        while True:
            every = (
                self.options.rescan_every
                if self.watcher is not None and self.watch_complete
                else self.options.rescan_unwatched
            )
            if self._gone:
                # A missing root costs one look; a sub-mount gone, a whole walk: back off.
                backoff = 2 ** min(self._walks_gone, 6)
                every = min(every, self.options.recheck_gone * backoff)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await self._rescan_now.wait()
            self._rescan_now.clear()
            if self._rearm and self.options.watch:
                self._rearm = False
                await self._rearm_watcher()  # first, so nothing after the scan is missed
            await self._scan(None)
            await self._check_coverage()

    async def _prune_versions(self) -> None:
        """Thin the versions area by its staggered schedule (Syncthing's: one version per 30 s
        for the first hour, per hour for a day, per day for a month, per week for a year),
        first one interval after start, then every interval."""
        while True:
            await asyncio.sleep(self.options.prune_versions_every)
            try:
                await asyncio.to_thread(self.replica.versions.prune, time.time())
            except (BackerError, OSError) as exc:
                self.emit(ErrorOccurred(folder=self.label, message=f"pruning versions: {exc}"))

    async def _count_local_changes(self) -> None:
        """A read-only device's own changes are refused by every peer: say so when they first
        appear (not at each scan), and keep the count for the status, or the folder would
        look as if it were syncing for ever."""
        async with self.replica.lock:
            count = len(await asyncio.to_thread(self.replica.store.unsigned))
        if count and not self.local_only:
            self.emit(LocalChangesKept(folder=self.label, count=count))
        self.local_only = count

    def rescan(self) -> None:
        """Ask for a full rescan now."""
        self._rescan_now.set()

    async def _scan(self, paths: list[str] | None) -> None:
        try:
            report = await self.replica.scan(paths)
        except (FolderMissingError, MassDeletionError) as exc:
            if isinstance(exc, FolderMissingError):
                self._gone = True
                self._walks_gone = self._walks_gone + 1 if isinstance(exc, MountGoneError) else 0
            if not self.puller.paused:
                self.puller.paused = str(exc)
                self.emit(FolderPaused(folder=self.label, reason=str(exc)))
            return
        except (BackerError, OSError) as exc:
            self.emit(ErrorOccurred(folder=self.label, message=f"scan failed: {exc}"))
            return
        if self.puller.paused and paths is None:
            self.puller.resume()  # a full scan found the folder whole again
            if self._gone:
                self._gone, self._walks_gone = False, 0
                self._rearm = True
                self._rescan_now.set()
        if not self.key.can_write and (report.updated or not self.ready.is_set()):
            await self._count_local_changes()
        if report.updated:
            self.emit(
                FolderScanned(
                    folder=self.label,
                    changed=report.updated,
                    deleted=report.deleted,
                    root=report.root.hex(),
                )
            )


def _limited_dial(limits: Limits) -> Dial:
    async def dial_within(address: str, discovery_id: bytes) -> Link:
        return limits.wrap(await dial(address, discovery_id))

    return dial_within
