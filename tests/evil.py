"""An evil peer: it holds the folder key, passes the handshake like any member, and then serves a
tree of the attacker's making over the real protocol, answering each request as the test
chooses (hostile paths, lying chunks, absurd sizes, floods, or no answer at all)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any

import nacl.signing

from backer.ids import DeviceId, Hash
from backer.index import merkle
from backer.index.chunker import chunk_bytes
from backer.index.entry import Entry, Kind, VersionVector, iter_chunks
from backer.keys import FolderKey
from backer.mesh.channel import ChannelError
from backer.mesh.secure import SecureLink, secure
from backer.mesh.transport import dial
from backer.protocol import events as ev
from backer.protocol.codec import frame
from backer.protocol.messages import Chunks, Entries, GetChunks, Groups, Nodes, RemoteEntry
from backer.protocol.session import Session
from backer.sync.replica import signer_for

EVIL = 0xE7
STALL = object()  # an answer never given


def file_entry(path: str, data: bytes) -> Entry:
    """A file version by the attacker's device, newer than anything a test writes."""
    return Entry(
        path=path,
        kind=Kind.FILE,
        version=VersionVector(((EVIL, 2_000_000_000),)),
        modifier=EVIL,
        size=len(data),
        mtime_ns=1,
        mode=0o644,
        chunks=chunk_bytes(data),
    )


def chunks_of(data: bytes) -> dict[Hash, bytes]:
    found: dict[Hash, bytes] = {}
    offset = 0
    for digest, size in iter_chunks(chunk_bytes(data)):
        found[digest] = data[offset : offset + size]
        offset += size
    return found


def forged(entry: RemoteEntry, **fields: Any) -> RemoteEntry:
    """`entry` with fields no honest encoder would send (its checks are skipped)."""
    copy = dataclasses.replace(entry)
    for name, value in fields.items():
        object.__setattr__(copy, name, value)
    return copy


class EvilPeer:
    """Serves `files` (path -> content), signed with the folder key (unsigned, with a read-only
    key). Override the `answer_*` methods to lie; return STALL to never answer."""

    def __init__(self, key: FolderKey, files: dict[str, bytes]) -> None:
        self.key = key
        sign = signer_for(key)
        self.entries: dict[str, Entry] = {}
        self.data: dict[Hash, bytes] = {}
        self.groups: dict[Hash, bytes] = {}
        for path, content in files.items():
            entry = file_entry(path, content)
            if sign is not None:
                entry = dataclasses.replace(entry, signature=sign(entry.leaf_hash()))
            self.entries[path] = entry
            self.data |= chunks_of(content)
        self.forged: dict[str, RemoteEntry] = {}
        built = merkle.build((p, e.leaf_hash()) for p, e in self.entries.items())
        self.root, self.nodes = built.root, dict(built.added)
        self.device_key = nacl.signing.SigningKey.generate()
        self.asked: Counter[str] = Counter()
        self.link: SecureLink | None = None
        self.session: Session | None = None

    def plant(self, entries: Sequence[RemoteEntry]) -> None:
        """Serve a tree of exactly these wire entries (forged ones too) instead of `files`."""
        self.entries, self.forged = {}, {e.path: e for e in entries}
        built = merkle.build((e.path, e.leaf_hash()) for e in entries)
        self.root, self.nodes = built.root, dict(built.added)

    # -- what to answer (override to lie) ----------------------------------------------------

    def answer_nodes(self, hashes: Sequence[Hash]) -> Any:  # the nodes, or STALL
        return [self.nodes.get(h) for h in hashes]

    def answer_entries(self, wanted: Sequence[tuple[str, Hash]]) -> Any:  # entries, or STALL
        return [self.entries.get(path) or self.forged.get(path) for path, _ in wanted]

    def answer_groups(self, hashes: Sequence[Hash]) -> Any:  # the groups, or STALL
        return [self.groups.get(h) for h in hashes]

    def answer_chunk(self, digest: Hash, size: int) -> Any:  # bytes, None, or STALL
        return self.data.get(digest)

    # -- the connection ----------------------------------------------------------------------

    async def connect(self, address: str) -> None:
        link = await dial(address, self.key.discovery_id)
        self.link = await secure(link, initiator=True, device_key=self.device_key, folder=self.key)
        self.session = Session(
            device=DeviceId.from_public_key(bytes(self.device_key.verify_key)).raw,
            folder=self.key.discovery_id,
            root=self.root,
        )
        await self.link.write(self.session.start())

    async def send_raw(self, data: bytes) -> None:
        """Bytes straight into the encrypted channel, past the session's encoder."""
        assert self.link is not None
        await self.link.write(data)

    async def flood(self, count: int) -> None:
        """Requests for chunks, as fast as the link takes them, never reading an answer."""
        assert self.link is not None
        for rid in range(1, count + 1):
            await self.link.write(frame(GetChunks(id=rid, wanted=((Hash(os.urandom(32)), 1024),))))

    async def serve(self) -> str:
        """Answer the victim until the connection ends; why it ended."""
        assert self.link is not None and self.session is not None
        link, session = self.link, self.session
        try:
            while True:
                data = await link.read()
                if not data:
                    session.receive_eof()
                else:
                    session.receive_data(data)
                while (event := session.next_event()) is not None:
                    ended = await self._handle(event)
                    if ended:
                        return ended
                out = session.data_to_send()
                if out:
                    await link.write(out)
                if not data:
                    return "the victim closed the connection"
        except (ChannelError, ConnectionError, OSError) as exc:
            return f"the connection failed: {exc}"

    async def _handle(self, event: object) -> str:
        """Answer one request, framed by hand: the session's own encoder would refuse to
        send the lies."""
        assert self.link is not None
        answer: Nodes | Entries | Groups | Chunks | None = None
        match event:
            case ev.NodesRequested(id=rid, hashes=hashes):
                self.asked["nodes"] += 1
                nodes = self.answer_nodes(hashes)
                if nodes is not STALL:
                    answer = Nodes(id=rid, nodes=tuple(nodes))
            case ev.EntriesRequested(id=rid, wanted=wanted):
                self.asked["entries"] += 1
                entries = self.answer_entries(wanted)
                if entries is not STALL:
                    answer = Entries(
                        id=rid,
                        entries=tuple(
                            RemoteEntry.from_entry(e) if isinstance(e, Entry) else e
                            for e in entries
                        ),
                    )
            case ev.GroupsRequested(id=rid, hashes=hashes):
                self.asked["groups"] += 1
                groups = self.answer_groups(hashes)
                if groups is not STALL:
                    answer = Groups(id=rid, groups=tuple(groups))
            case ev.ChunksRequested(id=rid, wanted=wanted):
                self.asked["chunks"] += len(wanted)
                chunks = [self.answer_chunk(digest, size) for digest, size in wanted]
                if STALL not in chunks:
                    answer = Chunks(id=rid, chunks=tuple(chunks))
            case ev.PeerClosed(reason=reason) | ev.PeerError(text=reason):
                return f"the victim ended the session: {reason}"
            case ev.ProtocolViolation(reason=reason):
                return f"we broke the protocol: {reason}"
            case ev.ConnectionLost():
                return "the victim closed the connection"
        if answer is not None:
            await self.link.write(frame(answer))
        return ""

    async def close(self) -> None:
        if self.link is not None:
            with contextlib.suppress(ChannelError, ConnectionError, OSError):
                await self.link.close()

    @contextlib.asynccontextmanager
    async def serving(self, address: str, *, deadline: float = 30.0) -> AsyncIterator[None]:
        """Connected to `address` and answering in the background while the block runs."""
        await asyncio.wait_for(self.connect(address), deadline)
        answering = asyncio.create_task(self.serve())
        try:
            yield
        finally:
            answering.cancel()
            await self.close()

    async def attack(self, address: str, *, deadline: float = 30.0) -> str:
        """Connect, serve until the victim hangs up (or `deadline` passes), close."""
        await self.connect(address)
        try:
            async with asyncio.timeout(deadline):
                return await self.serve()
        except TimeoutError:
            return "still connected at the deadline"
        finally:
            await self.close()
