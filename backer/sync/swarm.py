"""Pulling from many peers at once: one folder's puller and the fetcher that spreads a pull's
requests over every peer that can answer them.

`FolderPuller` watches the roots its sessions announce. When some differ from ours it pulls the
root most of them announce, through a `Swarm`: each request goes to the least-loaded session
that announced that root (any other open session is the fallback), so each chunk is fetched
once while the work spreads across the peers. A request whose peer vanishes moves to another at
once; a chunk request that a slow peer has not answered after `hedge_after` seconds is asked of
another as well, and the first verified answer wins.

Knows sessions only as `Source`s (STYLE.md 7); the mesh adds and removes them. Imports sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from backer.errors import BackerError, FolderMissingError, MassDeletionError, RemoteProtocolError
from backer.events import (
    Emit,
    FolderPaused,
    FolderResumed,
    PullFinished,
    PullStarted,
    ignore,
)
from backer.ids import DeviceId, Hash
from backer.protocol.messages import RemoteEntry
from backer.sync.fetcher import PeerMovedOn, PullReport
from backer.sync.peer import PeerGone, wait_either
from backer.sync.pull import pull
from backer.sync.replica import Replica

__all__ = ["HEDGE_AFTER", "FolderPuller", "Source", "Swarm"]

HEDGE_AFTER = 2.0  # seconds before a chunk request is also asked of another peer
RETRY_FIRST = 2.0  # seconds before a pull that moved nothing is tried again...
RETRY_MAX = 300.0  # ...doubling up to this
_K = TypeVar("_K")
_V = TypeVar("_V")


class Source(Protocol):
    """A peer a pull can fetch from: a session (`sync.peer.PeerSession`)."""

    @property
    def peer_root(self) -> Hash | None: ...

    @property
    def peer_device(self) -> bytes | None: ...

    @property
    def open(self) -> bool: ...

    @property
    def load(self) -> int: ...

    async def nodes(self, hashes: Sequence[Hash]) -> dict[Hash, bytes]: ...

    async def entries(
        self, wanted: Sequence[tuple[str, Hash]], *, inline: bool = True
    ) -> list[RemoteEntry]: ...

    async def groups(self, hashes: Sequence[Hash]) -> dict[Hash, bytes]: ...

    async def chunks(self, wanted: Sequence[tuple[Hash, int]]) -> dict[Hash, bytes]: ...


@dataclass(slots=True)
class SwarmStats:
    requests: int = 0
    moved: int = 0  # requests retried elsewhere because their peer vanished or lacked the item
    hedged: int = 0  # chunk requests also asked elsewhere because their peer was slow


class Swarm:
    """A `pull.Fetcher` over many sources, preferring those that announced `root`."""

    def __init__(
        self,
        sources: Callable[[], Iterable[Source]],
        root: Hash,
        *,
        hedge_after: float = HEDGE_AFTER,
    ) -> None:
        self._sources = sources
        self._root = root
        self._hedge_after = hedge_after
        self.stats = SwarmStats()
        self.served: Counter[bytes] = Counter()  # chunks answered, by the serving device
        self._given: Counter[int] = Counter()  # chunk requests in flight, by id(source)

    def _ranked(self, tried: set[int]) -> list[Source]:
        """Open sources not tried yet: those holding our target first, least loaded first."""
        candidates = [s for s in self._sources() if s.open and id(s) not in tried]
        # Our own count of what each was given counts from the moment of asking: its `load`
        # only grows once the request task runs, after many more requests were placed.
        candidates.sort(key=lambda s: (s.peer_root != self._root, self._given[id(s)] + s.load))
        return candidates

    async def nodes(self, hashes: Sequence[Hash]) -> dict[Hash, bytes]:
        return await self._keyed(hashes, lambda s, todo: s.nodes(todo))

    async def groups(self, hashes: Sequence[Hash]) -> dict[Hash, bytes]:
        return await self._keyed(hashes, lambda s, todo: s.groups(todo))

    async def entries(
        self, wanted: Sequence[tuple[str, Hash]], *, inline: bool = True
    ) -> list[RemoteEntry]:
        async def ask(source: Source, todo: list[tuple[str, Hash]]) -> dict[str, RemoteEntry]:
            return {entry.path: entry for entry in await source.entries(todo, inline=inline)}

        pairs = {path: (path, leaf) for path, leaf in wanted}
        found = await self._keyed(list(pairs), ask, pairs)
        return [found[path] for path, _ in wanted if path in found]

    async def chunks(self, wanted: Sequence[tuple[Hash, int]]) -> dict[Hash, bytes]:
        """A run of chunks from whichever peer answers first; what one lacks is asked of the
        next; the chunks no open peer has are left out."""
        found: dict[Hash, bytes] = {}
        todo = list(dict.fromkeys(wanted))
        tried: set[int] = set()
        asking: dict[asyncio.Task[dict[Hash, bytes]], Source] = {}
        self.stats.requests += 1
        try:
            while todo:
                if not asking:
                    ranked = self._ranked(tried)
                    if not ranked:
                        break
                    self._ask_chunks(ranked[0], todo, tried, asking)
                done, _ = await asyncio.wait(
                    asking, timeout=self._hedge_after, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:  # slow: ask someone else too, keep waiting for both
                    ranked = self._ranked(tried)
                    if ranked:
                        self.stats.hedged += 1
                        self._ask_chunks(ranked[0], todo, tried, asking)
                    continue
                for task in done:
                    source = asking.pop(task)
                    got = {} if task.exception() else task.result()
                    self.served[source.peer_device or b""] += len(got)
                    found.update(got)
                todo = [pair for pair in todo if pair[0] not in found]
                if todo and not asking:
                    self.stats.moved += 1
        finally:
            for task in asking:
                task.cancel()
        return found

    def _ask_chunks(
        self,
        source: Source,
        todo: list[tuple[Hash, int]],
        tried: set[int],
        asking: dict[asyncio.Task[dict[Hash, bytes]], Source],
    ) -> None:
        tried.add(id(source))
        key, count = id(source), len(todo)
        self._given[key] += count
        task = asyncio.ensure_future(_quiet(source.chunks(list(todo))))
        task.add_done_callback(lambda _: self._given.subtract({key: count}))
        asking[task] = source

    async def _keyed(
        self,
        keys: Sequence[_K],
        ask: Callable[[Source, list[Any]], Awaitable[dict[_K, _V]]],
        request: dict[_K, Any] | None = None,
    ) -> dict[_K, _V]:
        """Ask for `keys` (as `request[key]`, or the keys themselves) until every one is found
        or every open source has been asked; sources that vanish or lack some are skipped."""
        found: dict[_K, _V] = {}
        todo = list(keys)
        tried: set[int] = set()
        self.stats.requests += 1
        while todo:
            ranked = self._ranked(tried)
            if not ranked:
                break
            source = ranked[0]
            tried.add(id(source))
            items = [request[k] for k in todo] if request is not None else list(todo)
            try:
                answer = await ask(source, items)
            except PeerGone:
                self.stats.moved += 1
                continue
            found.update(answer)
            todo = [k for k in todo if k not in found]
            if todo:
                self.stats.moved += 1
        return found


async def _quiet(request: Awaitable[dict[Hash, bytes]]) -> dict[Hash, bytes]:
    """A chunk request whose peer vanished answers nothing: someone else is asked."""
    try:
        return await request
    except PeerGone:
        return {}


class FolderPuller:
    """Pulls one folder from its sessions whenever one of them announces a root that differs
    from ours. `add`/`discard` sessions as they come and go; call `poke()` when a session's
    root changes (`PeerSession(on_change=...)`); `await run()` for the folder's lifetime."""

    def __init__(
        self,
        replica: Replica,
        *,
        emit: Emit = ignore,
        hedge_after: float = HEDGE_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.replica = replica
        self.emit = emit
        self.hedge_after = hedge_after
        self.clock = clock
        self.sources: list[Source] = []
        self.wake = asyncio.Event()
        self.paused = ""  # why the folder is paused ("" while it is not)
        self.pulls = 0
        self.last_report: PullReport | None = None
        self.current: PullReport | None = None  # the pull under way, live
        self.last_swarm: Swarm | None = None
        self._retry: dict[tuple[Hash, Hash], tuple[float, float]] = {}  # -> (when, backoff)
        self._label = str(replica.folder)

    def add(self, source: Source) -> None:
        self.sources.append(source)
        self.poke()

    def discard(self, source: Source) -> None:
        with contextlib.suppress(ValueError):
            self.sources.remove(source)
        self.poke()

    def poke(self, *_: object) -> None:
        self.wake.set()

    def resume(self) -> None:
        """Try again after a pause (the marker is back, or the user said so)."""
        if self.paused:
            self.paused = ""
            self.emit(FolderResumed(folder=self._label))
        self._retry.clear()
        self.poke()

    def wanted(self) -> Hash | None:
        """The root to pull next: the one most open sessions announce, among those that may
        hold something we lack (not ours, not empty, not one we had before) and are not
        waiting out a failed attempt."""
        local = self.replica.root
        now = self.clock()
        votes = Counter(
            s.peer_root
            for s in self.sources
            if s.open
            and s.peer_root is not None
            and not self.replica.has_all_of(s.peer_root)
            and self._retry.get((s.peer_root, local), (0.0, 0.0))[0] <= now
        )
        return votes.most_common(1)[0][0] if votes else None

    async def run(self) -> None:
        changed = self.replica.watch_root()
        try:
            while True:
                self.wake.clear()
                changed.clear()
                target = None if self.paused else self.wanted()
                if target is not None:
                    await self._pull(target)
                    continue
                await wait_either(self.wake, changed, self._next_retry())
        finally:
            self.replica.unwatch_root(changed)

    def _next_retry(self) -> float | None:
        """Seconds until a failed pull is due again: only one of a root some open session
        still announces and whose wait has not passed (an expired wait for a root nobody
        announces any more would make this 0 for ever: a busy loop)."""
        local, now = self.replica.root, self.clock()
        announced = {s.peer_root for s in self.sources if s.open}
        pending = [
            when
            for (target, at), (when, _) in self._retry.items()
            if at == local and target in announced and when > now
        ]
        return min(pending) - now if pending else None

    async def _pull(self, target: Hash) -> None:
        local = self.replica.root
        swarm = Swarm(lambda: self.sources, target, hedge_after=self.hedge_after)
        peers = tuple(
            _device_text(s.peer_device) for s in self.sources if s.open and s.peer_root == target
        )
        self.emit(PullStarted(folder=self._label, peers=peers, root=target.hex()))
        reason = ""
        report = self.current = PullReport()
        try:
            await pull(self.replica, swarm, target, emit=self.emit, report=report)
        except PeerMovedOn as exc:
            reason = str(exc)
        except RemoteProtocolError as exc:
            reason = f"a peer sent a malformed tree: {exc}"
        except (FolderMissingError, MassDeletionError) as exc:
            self.paused = reason = str(exc)
            self.emit(FolderPaused(folder=self._label, reason=reason))
        except OSError as exc:  # the disk (full, gone read-only...): report, back off, retry
            reason = f"the disk failed: {exc}"
        except BackerError as exc:  # our own bug: report it, back off, keep the node up
            reason = f"the pull failed: {type(exc).__name__}: {exc}"
        self.pulls += 1
        self.current = None
        self.last_report, self.last_swarm = report, swarm
        moved = self.replica.root != local
        if moved and not reason:
            self._retry.pop((target, local), None)
        else:
            _, backoff = self._retry.get((target, local), (0.0, RETRY_FIRST / 2))
            backoff = min(backoff * 2, RETRY_MAX)
            self._retry[(target, local)] = (self.clock() + backoff, backoff)
        if len(self._retry) > 1024:
            self._retry.clear()  # old roots: nobody announces them any more
        self.emit(
            PullFinished(
                folder=self._label,
                peers=peers,
                root=self.replica.root.hex(),
                files=report.files,
                dirs=report.dirs,
                symlinks=report.symlinks,
                deleted=report.deleted,
                conflicts=report.conflicts,
                bytes_fetched=report.bytes_fetched,
                bytes_local=report.bytes_local,
                errors=tuple(report.errors),
                reason=reason,
            )
        )


def _device_text(raw: bytes | None) -> str:
    return "" if raw is None else str(DeviceId(raw))
