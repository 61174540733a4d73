"""A running node under attack by a peer that holds the folder key (tests/evil.py): hostile
paths and names, a path through the victim's symlink, lying chunks, absurd sizes and counts,
request floods and stalls. Each is refused with an event, nothing is written outside the
folder, and the node goes on syncing with its honest peer throughout."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import stat
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import msgpack
import pytest
from evil import EVIL, STALL, EvilPeer, file_entry, forged
from nodes import FAST, Member, cluster, eventually, file_is

from backer.events import ErrorOccurred, Event, PeerDisconnected, PullFinished
from backer.ids import Hash
from backer.index import merkle
from backer.index.entry import GROUP_MAX, Entry, Kind, VersionVector, group_hash, pack_chunks
from backer.keys import FolderKey
from backer.mesh.transport import PENDING_PER_SOURCE
from backer.protocol.messages import MAX_CHUNK, RemoteEntry
from backer.sync.replica import signer_for

DEADLINE = 20.0


@pytest.fixture
def key() -> FolderKey:
    return FolderKey.generate()


@pytest.fixture
async def pair(tmp_path: Path, key: FolderKey) -> AsyncIterator[tuple[Member, Member]]:
    """The victim (with a symlink to a directory outside its folder) and its honest peer."""
    outside = tmp_path / "outside"
    outside.mkdir()
    async with cluster(tmp_path / "nodes", 2, key=key) as (victim, honest):
        os.symlink(outside, victim.folder / "link")
        (victim.folder / "own.txt").write_bytes(b"the victim's own file")
        await eventually(file_is(honest.folder / "own.txt", b"the victim's own file"))
        yield victim, honest


def events_of(member: Member) -> list[Event]:
    return [event for _, event in member.node.bus.recent]


def disconnect_reasons(member: Member) -> list[str]:
    return [e.reason for e in events_of(member) if isinstance(e, PeerDisconnected)]


def pull_failures(member: Member) -> list[str]:
    found = []
    for event in events_of(member):
        if isinstance(event, PullFinished):
            found += [event.reason, *event.errors]
    return [text for text in found if text]


async def still_serving(victim: Member, honest: Member, name: str) -> None:
    """Both ways: the victim's new file reaches the honest peer, and the honest peer's reaches
    the victim."""
    (victim.folder / f"{name}-from-victim").write_bytes(name.encode())
    (honest.folder / f"{name}-from-honest").write_bytes(name.encode())
    await eventually(
        file_is(honest.folder / f"{name}-from-victim", name.encode()), deadline=DEADLINE
    )
    await eventually(
        file_is(victim.folder / f"{name}-from-honest", name.encode()), deadline=DEADLINE
    )


def nothing_outside(tmp_path: Path, victim: Member) -> None:
    assert list((tmp_path / "outside").iterdir()) == []
    assert sorted(p.name for p in victim.folder.parent.iterdir()) == ["folder", "home"]
    assert not Path("/etc/x").exists()
    assert os.path.islink(victim.folder / "link")


@pytest.mark.parametrize(
    "path",
    [
        "../x",
        "/etc/x",
        "a/../../x",
        "x\x00y",
        "x\\y",
        "",
        "a//x",
        ".Backer/x",
        "sub/.backer/index.db",
    ],
)
async def test_hostile_paths_in_entries_are_refused(
    pair: tuple[Member, Member], key: FolderKey, tmp_path: Path, path: str
) -> None:
    victim, honest = pair

    class Liar(EvilPeer):
        def answer_entries(self, wanted: Sequence[tuple[str, Hash]]) -> list[RemoteEntry]:
            return [forged(RemoteEntry.from_entry(self.entries["x"]), path=path)]

    evil = Liar(key, {"x": b"planted"})
    ended = await evil.attack(victim.node.listen_address)
    assert evil.asked["entries"] >= 1 and "victim" in ended, ended
    await eventually(lambda: any("path" in r for r in disconnect_reasons(victim)))
    nothing_outside(tmp_path, victim)
    await still_serving(victim, honest, "after-paths")


@pytest.mark.parametrize("name", ["..", ".", "a\\b", "nul\x00", "a/b", ".backer", ".BACKER"])
async def test_hostile_names_in_tree_nodes_are_refused(
    pair: tuple[Member, Member], key: FolderKey, tmp_path: Path, name: str
) -> None:
    victim, honest = pair
    evil = EvilPeer(key, {"x": b"planted"})
    leaf = evil.entries["x"].leaf_hash()
    listing = bytes(msgpack.packb([0, [[name, 0, leaf]]], use_bin_type=True))
    evil.root = merkle.node_hash(listing)
    evil.nodes = {evil.root: listing}
    async with evil.serving(victim.node.listen_address, deadline=DEADLINE):
        await eventually(lambda: any("tree" in f for f in pull_failures(victim)), deadline=DEADLINE)
    assert evil.asked["entries"] == 0
    nothing_outside(tmp_path, victim)
    await still_serving(victim, honest, "after-names")


async def test_a_path_through_the_victims_symlink_is_refused_and_the_rest_applies(
    pair: tuple[Member, Member], key: FolderKey, tmp_path: Path
) -> None:
    victim, honest = pair
    evil = EvilPeer(key, {"link/planted.sh": b"rm -rf ~\n", "fine.txt": b"fine"})
    async with evil.serving(victim.node.listen_address, deadline=DEADLINE):
        await eventually(file_is(victim.folder / "fine.txt", b"fine"), deadline=DEADLINE)
        await eventually(
            lambda: any("link/planted.sh" in f for f in pull_failures(victim)), deadline=DEADLINE
        )
    nothing_outside(tmp_path, victim)
    await still_serving(victim, honest, "after-symlink")


async def test_chunks_that_do_not_match_their_hash_end_the_session_and_write_nothing(
    pair: tuple[Member, Member], key: FolderKey, tmp_path: Path
) -> None:
    victim, honest = pair

    class Liar(EvilPeer):
        def answer_chunk(self, digest: Hash, size: int) -> bytes:
            return os.urandom(size)

    evil = Liar(key, {"big.bin": os.urandom(300_000)})
    ended = await evil.attack(victim.node.listen_address)
    assert evil.asked["chunks"] >= 1 and "victim" in ended, ended
    await eventually(lambda: any("hash" in r for r in disconnect_reasons(victim)))
    assert not (victim.folder / "big.bin").exists()
    nothing_outside(tmp_path, victim)
    await still_serving(victim, honest, "after-chunks")


def _huge_vector(entry: RemoteEntry) -> RemoteEntry:
    return forged(entry, version=VersionVector(tuple((i + 1, 1) for i in range(5000))))


@pytest.mark.parametrize(
    "lie",
    [
        pytest.param(lambda e: forged(e, size=2**62), id="size-2^62"),
        pytest.param(lambda e: forged(e, size=-1), id="negative-size"),
        pytest.param(lambda e: forged(e, mode=2**40), id="mode-2^40"),
        pytest.param(lambda e: forged(e, groups=(Hash(bytes(32)),) * 70_000), id="70k-groups"),
        pytest.param(_huge_vector, id="5000-device-vector"),
        pytest.param(lambda e: forged(e, chunks=os.urandom(4100)), id="garbage-chunk-list"),
    ],
)
async def test_absurd_sizes_and_counts_are_refused(
    pair: tuple[Member, Member], key: FolderKey, tmp_path: Path, lie: object
) -> None:
    victim, honest = pair

    class Liar(EvilPeer):
        def answer_entries(self, wanted: Sequence[tuple[str, Hash]]) -> list[RemoteEntry]:
            return [lie(RemoteEntry.from_entry(self.entries["x"]))]  # type: ignore[operator]

    evil = Liar(key, {"x": b"planted"})
    ended = await evil.attack(victim.node.listen_address)
    assert "victim" in ended, ended
    assert not (victim.folder / "x").exists()
    nothing_outside(tmp_path, victim)
    await still_serving(victim, honest, "after-absurd")


async def test_a_frame_claiming_two_gigabytes_ends_the_session(
    pair: tuple[Member, Member], key: FolderKey
) -> None:
    victim, honest = pair
    evil = EvilPeer(key, {})
    await asyncio.wait_for(evil.connect(victim.node.listen_address), DEADLINE)
    await evil.send_raw(struct.pack(">I", 2**31 - 1) + b"\x00" * 64)
    ended = await asyncio.wait_for(evil.serve(), DEADLINE)
    assert "victim" in ended or "failed" in ended, ended
    await eventually(lambda: any("frame" in r for r in disconnect_reasons(victim)))
    await still_serving(victim, honest, "after-frame")


async def test_a_request_flood_is_held_back_while_the_honest_peer_syncs(
    pair: tuple[Member, Member], key: FolderKey
) -> None:
    """A peer that sends requests and never reads an answer: the victim either stops reading
    it (its answers back up: TCP backpressure) or, once 512 requests are open, ends the session
    as a protocol violation. Either way nothing queues without bound, and its other sessions
    do not notice."""
    victim, honest = pair
    evil = EvilPeer(key, {})
    await asyncio.wait_for(evil.connect(victim.node.listen_address), DEADLINE)
    flooding = asyncio.create_task(evil.flood(200_000))
    try:
        await still_serving(victim, honest, "during-flood")
        mesh = next(iter(victim.node.folders.values())).mesh
        sessions = [c.session.session for c in mesh.connections.values()]
        assert all(s.peer_requests <= 512 for s in sessions)
        if flooding.done():  # cut off, and told why
            await eventually(lambda: any("unanswered" in r for r in disconnect_reasons(victim)))
        else:  # held back
            assert len(sessions) == 2
    finally:
        flooding.cancel()
        await evil.close()


async def test_a_peer_that_stalls_does_not_stop_the_victim_syncing_with_others(
    pair: tuple[Member, Member], key: FolderKey
) -> None:
    """The evil peer announces a new tree, answers the walk, then never sends a chunk."""
    victim, honest = pair

    class Staller(EvilPeer):
        def answer_chunk(self, digest: Hash, size: int) -> object:
            return STALL

    evil = Staller(key, {"stalled.bin": os.urandom(200_000)})
    async with evil.serving(victim.node.listen_address, deadline=DEADLINE):
        await eventually(lambda: evil.asked["chunks"] > 0, deadline=DEADLINE)
        await still_serving(victim, honest, "during-stall")
    assert not (victim.folder / "stalled.bin").exists()


# -- a chunk-list bomb: one 256-record group named 65,536 times (2 MiB on the wire) ----------


def _chunk_list_bomb(key: FolderKey, size: int) -> tuple[RemoteEntry, bytes]:
    """A wire entry whose chunk list would expand to 604 MB, signed if `key` can sign, and
    the one group it names (no record's hash ends a group early: 256 records a group)."""
    group = pack_chunks([(os.urandom(31) + b"\xc0", MAX_CHUNK)] * GROUP_MAX)
    honest = RemoteEntry.from_entry(file_entry("bomb.bin", b"x"))
    lie = {"groups": (group_hash(group),) * 65536, "chunks": None, "size": size}
    sign = signer_for(key)
    signature = sign(forged(honest, **lie).leaf_hash()) if sign is not None else b""
    return forged(honest, **lie, signature=signature), group


def _peak_rss_reset() -> int:
    """Reset this process's peak RSS (VmHWM) and return its RSS now, in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


@pytest.mark.parametrize(
    ("tier", "size", "refusal"),
    [
        # Read-only: sizes that add up (1 TiB), but no signature: refused before any group.
        pytest.param("read-only", 2**40, "not signed", id="read-only-key"),
        # Read-write: 65,536 groups for 1 MiB, refused where the entry is decoded.
        pytest.param("read-write", 2**20, "groups are more than", id="more-groups-than-size"),
        # Read-write: 65,536 groups fit 512 MiB, but they hold 16.7 M chunks: counted, refused.
        pytest.param("read-write", 2**29, "chunks are more than", id="more-chunks-than-size"),
    ],
)
async def test_a_chunk_list_bomb_is_refused_before_it_is_expanded(
    pair: tuple[Member, Member], key: FolderKey, tier: str, size: int, refusal: str
) -> None:
    victim, honest = pair
    evil_key = key if tier == "read-write" else key.read_only()
    evil = EvilPeer(evil_key, {})
    bomb, group = _chunk_list_bomb(evil_key, size)
    evil.plant([bomb])
    evil.groups = {group_hash(group): group}
    baseline = _peak_rss_reset()
    async with evil.serving(victim.node.listen_address, deadline=DEADLINE):
        await eventually(
            lambda: any(refusal in r for r in pull_failures(victim) + disconnect_reasons(victim)),
            deadline=DEADLINE,
        )
        await still_serving(victim, honest, f"after-bomb-{size}")
    grown = _status_bytes("VmHWM") - baseline
    assert grown < 200 * 1024 * 1024, f"peak RSS grew by {grown / 2**20:.0f} MiB"
    if tier == "read-only":
        assert evil.asked["groups"] == 0  # authorization came first
    assert not (victim.folder / "bomb.bin").exists()


async def test_modes_from_a_peer_lose_special_bits_and_directories_stay_open_to_the_owner(
    pair: tuple[Member, Member], key: FolderKey
) -> None:
    victim, _honest = pair
    evil = EvilPeer(key, {"suid.sh": b"#!/bin/sh\nid\n", "locked/inside.txt": b"inside"})
    sign = signer_for(key)
    assert sign is not None
    locked = Entry(path="locked", kind=Kind.DIR, version=VersionVector(((EVIL, 1),)), modifier=EVIL)
    suid = dataclasses.replace(evil.entries["suid.sh"], mode=0o6755)
    planted = [locked, suid, evil.entries["locked/inside.txt"]]
    evil.plant([RemoteEntry.from_entry(replace_signed(e, sign)) for e in planted])
    async with evil.serving(victim.node.listen_address, deadline=DEADLINE):
        await eventually(file_is(victim.folder / "suid.sh", b"#!/bin/sh\nid\n"), deadline=DEADLINE)
        await eventually(file_is(victim.folder / "locked/inside.txt", b"inside"), deadline=DEADLINE)
    assert stat.S_IMODE((victim.folder / "suid.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((victim.folder / "locked").stat().st_mode) == 0o700


def replace_signed(entry: Entry, sign: Callable[[bytes], bytes]) -> Entry:
    return dataclasses.replace(entry, signature=sign(entry.leaf_hash()))


async def test_a_frame_dripped_a_byte_at_a_time_ends_the_session_at_its_time_bound(
    tmp_path: Path, key: FolderKey
) -> None:
    """An authorized peer that starts an 8 MiB frame and sends it a byte at a time: the frame
    must be whole within `frame_within` (2 s here, 120 s by default), or the session ends."""
    options = dataclasses.replace(FAST, frame_within=2.0)
    async with cluster(tmp_path / "nodes", 2, key=key, options=options) as (victim, honest):
        evil = EvilPeer(key, {})
        await asyncio.wait_for(evil.connect(victim.node.listen_address), DEADLINE)

        async def drip() -> None:
            await evil.send_raw(struct.pack(">I", 8 * 1024 * 1024))
            while True:
                await evil.send_raw(b"\x00")
                await asyncio.sleep(0.1)  # the attacker's pace, not a wait for the victim

        dripping = asyncio.create_task(drip())
        try:
            await eventually(
                lambda: any("frame took over 2 s" in r for r in disconnect_reasons(victim)),
                deadline=DEADLINE,
            )
            await still_serving(victim, honest, "after-drip")
        finally:
            dripping.cancel()
            await evil.close()


async def test_connections_that_never_send_a_preface_are_capped_with_an_event(
    pair: tuple[Member, Member],
) -> None:
    victim, honest = pair
    host, port = victim.node.listen_address.rsplit(":", 1)
    crowd = [
        await asyncio.open_connection(host, int(port), local_addr=("127.0.0.2", 0))
        for _ in range(PENDING_PER_SOURCE + 8)
    ]
    try:
        await eventually(
            lambda: any(
                isinstance(e, ErrorOccurred) and "refusing connections" in e.message
                for e in events_of(victim)
            ),
            deadline=DEADLINE,
        )
        await still_serving(victim, honest, "during-crowd")
    finally:
        for _, writer in crowd:
            writer.close()
