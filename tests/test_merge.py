"""Merge rules: every rule with concrete entries, conflict names, and the properties that make
replicas converge (the same outcome whichever side decides, nothing dropped)."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import replace

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from backer.errors import InvalidPathError
from backer.ids import DeviceId
from backer.index.entry import Entry, Kind, Ordering, VersionVector, pack_chunks
from backer.paths import MAX_NAME_BYTES, check_path
from backer.sync.merge import (
    Action,
    Decision,
    conflict_path,
    decide,
    is_conflict_copy,
    keep_directory,
)

A, B, C = 1, 2, 3
PATH = "docs/report.txt"
SEC = 1_000_000_000
T0 = 1_700_000_000 * SEC + 123_456_789  # 2023-11-14 22:13:20.123456789 UTC
DEV = 0x0123456789ABCDEF  # base32 of its 8 big-endian bytes: AERUKZ4JVPG66===
STAMP = "20231114-221320-AERUKZ4"


def vv(**counts: int) -> VersionVector:
    ids = {"a": A, "b": B, "c": C}
    return VersionVector(tuple(sorted((ids[k], v) for k, v in counts.items())))


def make(
    kind: Kind = Kind.FILE,
    *,
    version: VersionVector,
    modifier: int = A,
    deleted: bool = False,
    body: bytes = b"one",
    mtime_ns: int = T0,
    mode: int = 0o644,
    path: str = PATH,
) -> Entry:
    """An entry; `body` is a file's content or a symlink's target (ignored for the others)."""
    live_file = kind is Kind.FILE and not deleted
    chunks = [(hashlib.sha256(body).digest(), len(body))] if live_file and body else []
    return Entry(
        path=path,
        kind=kind,
        version=version,
        modifier=modifier,
        deleted=deleted,
        size=sum(length for _, length in chunks),
        mtime_ns=mtime_ns,
        mode=mode,
        target=body.decode() if kind is Kind.SYMLINK and not deleted else "",
        chunks=pack_chunks(chunks),
    )


def both_ways(local: Entry, remote: Entry) -> tuple[Decision, Decision]:
    """The decision here and the one the peer makes when it pulls from us."""
    return decide(local, remote), decide(remote, local)


def outcome(local: Entry, decision: Decision) -> tuple[Entry, Entry | None]:
    """The entries a replica holds afterwards at the path and at the conflict copy's path."""
    return decision.result or local, decision.conflict_copy


# Rule 1: no local entry.


def test_no_local_entry_takes_remote() -> None:
    live = make(version=vv(b=1), modifier=B)
    assert decide(None, live) == Decision(action=Action.WRITE_REMOTE, result=live)
    tombstone = make(version=vv(b=2), modifier=B, deleted=True)
    assert decide(None, tombstone) == Decision(action=Action.NOTHING, result=tombstone)


# Rule 2: ordered vectors.


@pytest.mark.parametrize(
    ("old", "new", "action"),
    [
        (make(version=vv(a=1)), make(version=vv(a=1, b=1), modifier=B, body=b"two"), "write"),
        (make(version=vv(a=1)), make(version=vv(a=2), deleted=True), "write"),  # delete it
        (make(version=vv(a=1), deleted=True), make(version=vv(a=2), body=b"back"), "write"),
        (make(Kind.DIR, version=vv(a=1)), make(version=vv(a=1, c=4), modifier=C), "write"),
        # Only the vector or the modifier changed: nothing to write.
        (make(version=vv(a=1)), make(version=vv(a=1, b=1), modifier=B), "record"),
        (
            make(Kind.DIR, version=vv(a=1), deleted=True),
            make(version=vv(a=2), deleted=True),
            "record",
        ),
    ],
)
def test_dominating_version_wins_both_ways(old: Entry, new: Entry, action: str) -> None:
    assert new.version.compare(old.version) is Ordering.GREATER
    pulled, pushed = both_ways(old, new)
    expected = Action.WRITE_REMOTE if action == "write" else Action.NOTHING
    assert pulled == Decision(action=expected, result=new)
    assert pushed == Decision(action=Action.NOTHING, result=None)  # local dominates: keep it


def test_equal_is_nothing() -> None:
    entry = make(version=vv(a=3, b=1))
    assert decide(entry, make(version=vv(a=3, b=1))) == Decision(action=Action.NOTHING, result=None)


def test_equal_vectors_on_different_entries_still_converge() -> None:
    # Only a device that lost its index and reused a counter makes this; keep the roots equal.
    left = make(version=vv(a=5), body=b"one", mtime_ns=T0)
    right = make(version=vv(a=5), body=b"two", mtime_ns=T0 + SEC)
    pulled, pushed = both_ways(left, right)
    assert outcome(left, pulled) == outcome(right, pushed)
    assert pulled.result == right
    assert pulled.conflict_copy is not None
    assert pulled.conflict_copy.same_content(left)


# Rule 3a: concurrent, same content or both deleted.


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (make(version=vv(a=2, b=1)), make(version=vv(a=1, b=2), modifier=B)),
        (make(Kind.DIR, version=vv(a=2)), make(Kind.DIR, version=vv(c=2), modifier=C)),
        (
            make(Kind.SYMLINK, version=vv(a=2), body=b"t"),
            make(Kind.SYMLINK, version=vv(b=9), modifier=B, body=b"t"),
        ),
        # Both deleted, whatever their kinds and mtimes.
        (
            make(version=vv(a=2), deleted=True),
            make(Kind.DIR, version=vv(b=3), modifier=B, deleted=True, mtime_ns=0),
        ),
    ],
)
def test_concurrent_alike_merges_vectors_without_conflict(left: Entry, right: Entry) -> None:
    assert left.version.compare(right.version) is Ordering.CONCURRENT
    pulled, pushed = both_ways(left, right)
    merged = left.version.merge(right.version)
    expected = right.with_version(merged, right.modifier)  # the larger modifier
    assert pulled == Decision(action=Action.NOTHING, result=expected)
    assert pushed == Decision(action=Action.NOTHING, result=expected)


# Rule 3b: the edit beats the delete.


@pytest.mark.parametrize("kind", list(Kind))
def test_edit_beats_delete_both_ways(kind: Kind) -> None:
    edit = make(kind, version=vv(a=3, b=1), modifier=A, body=b"edited")
    delete = make(version=vv(a=2, b=2), modifier=B, deleted=True)
    expected = edit.with_version(vv(a=3, b=2), A)
    assert decide(edit, delete) == Decision(action=Action.KEEP_LOCAL_DISK, result=expected)
    assert decide(delete, edit) == Decision(action=Action.WRITE_REMOTE, result=expected)


# Rule 3c: conflicts.


@pytest.mark.parametrize(
    ("local_mtime", "local_modifier", "remote_mtime", "remote_modifier", "winner"),
    [
        (T0 + SEC, A, T0, B, "local"),  # newer mtime wins
        (T0, B, T0 + 1, A, "remote"),  # by a nanosecond, even against a larger modifier
        (T0, A, T0, B, "remote"),  # same mtime: the larger modifier wins
        (T0, C, T0, B, "local"),
    ],
)
def test_file_conflict_newer_mtime_wins(
    local_mtime: int, local_modifier: int, remote_mtime: int, remote_modifier: int, winner: str
) -> None:
    local = make(version=vv(a=2, b=1), modifier=local_modifier, body=b"L", mtime_ns=local_mtime)
    remote = make(version=vv(a=1, b=2), modifier=remote_modifier, body=b"R", mtime_ns=remote_mtime)
    merged = vv(a=2, b=2)
    won, lost = (local, remote) if winner == "local" else (remote, local)
    pulled, pushed = both_ways(local, remote)
    copy = make(version=lost.version, modifier=lost.modifier, body=b"L" if lost is local else b"R",
                mtime_ns=lost.mtime_ns, path=conflict_path(lost))  # fmt: skip
    assert pulled.result == won.with_version(merged, won.modifier)
    assert pulled.conflict_copy == copy
    if winner == "local":
        assert (pulled.action, pulled.copy_from) == (Action.KEEP_LOCAL_DISK, "remote")
        assert (pushed.action, pushed.copy_from) == (Action.WRITE_REMOTE, "local")
    else:
        assert (pulled.action, pulled.copy_from) == (Action.WRITE_REMOTE, "local")
        assert (pushed.action, pushed.copy_from) == (Action.KEEP_LOCAL_DISK, "remote")
    assert outcome(local, pulled) == outcome(remote, pushed)


@pytest.mark.parametrize("other_kind", [Kind.FILE, Kind.SYMLINK])
def test_directory_beats_file_or_symlink(other_kind: Kind) -> None:
    directory = make(Kind.DIR, version=vv(a=2), modifier=A, mtime_ns=T0)
    other = make(other_kind, version=vv(b=2), modifier=B, body=b"x", mtime_ns=T0 + 9 * SEC)
    for local, remote in ((directory, other), (other, directory)):
        decision = decide(local, remote)
        assert decision.result == directory.with_version(vv(a=2, b=2), A)
        assert decision.conflict_copy == replace(other, path=conflict_path(other))
        assert conflict_path(other) == f"docs/report.sync-conflict-20231114-221329-{_dev(B)}.txt"
        local_is_dir = local is directory
        assert decision.action is (Action.KEEP_LOCAL_DISK if local_is_dir else Action.WRITE_REMOTE)
        assert decision.copy_from == ("remote" if local_is_dir else "local")


def test_symlink_against_file_is_a_conflict_by_mtime() -> None:
    link = make(Kind.SYMLINK, version=vv(a=2), modifier=A, body=b"../elsewhere", mtime_ns=T0)
    file = make(version=vv(b=2), modifier=B, body=b"data", mtime_ns=T0 + SEC)
    pulled, pushed = both_ways(link, file)
    assert pulled.result == file.with_version(vv(a=2, b=2), B)
    assert pulled.action is Action.WRITE_REMOTE
    assert pulled.copy_from == "local"
    assert pulled.conflict_copy is not None
    assert pulled.conflict_copy.kind is Kind.SYMLINK
    assert pulled.conflict_copy.target == "../elsewhere"
    assert outcome(link, pulled) == outcome(file, pushed)


def test_directories_that_differ_take_the_winner_without_copy() -> None:
    left = make(Kind.DIR, version=vv(a=2), modifier=A, mode=0o700, mtime_ns=T0)
    right = make(Kind.DIR, version=vv(b=2), modifier=B, mode=0o755, mtime_ns=T0)
    pulled, pushed = both_ways(left, right)
    expected = right.with_version(vv(a=2, b=2), B)  # same mtime: the larger modifier
    assert pulled == Decision(action=Action.WRITE_REMOTE, result=expected)
    assert pushed == Decision(action=Action.KEEP_LOCAL_DISK, result=expected)


def test_decide_refuses_entries_of_different_paths() -> None:
    with pytest.raises(ValueError, match="cannot merge"):
        decide(make(version=vv(a=1)), make(version=vv(b=1), path="other"))


def test_decision_validates_itself() -> None:
    entry = make(version=vv(a=1))
    copy = make(version=vv(a=1), path=conflict_path(entry))
    with pytest.raises(ValueError, match="needs a resulting entry"):
        Decision(action=Action.WRITE_REMOTE, result=None)
    with pytest.raises(ValueError, match="side"):
        Decision(action=Action.WRITE_REMOTE, result=entry, conflict_copy=copy)
    with pytest.raises(ValueError, match="beside"):
        Decision(action=Action.NOTHING, result=entry, conflict_copy=entry, copy_from="local")
    with pytest.raises(ValueError, match="unknown side"):
        Decision(action=Action.NOTHING, result=entry, conflict_copy=copy, copy_from="peer")  # type: ignore[arg-type]


# Rule 5 and 6: conflict copy names.


def _dev(modifier: int) -> str:
    return base64.b32encode(modifier.to_bytes(8, "big")).decode()[:7]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("a.tar.gz", f"a.tar.sync-conflict-{STAMP}.gz"),
        (".bashrc", f".bashrc.sync-conflict-{STAMP}"),
        ("Makefile", f"Makefile.sync-conflict-{STAMP}"),
        ("src/dir/x.txt", f"src/dir/x.sync-conflict-{STAMP}.txt"),
        ("a.b/noext", f"a.b/noext.sync-conflict-{STAMP}"),
        ("trailing.", f"trailing.sync-conflict-{STAMP}."),
        ("Ünïcödé/résumé 日本.pdf", f"Ünïcödé/résumé 日本.sync-conflict-{STAMP}.pdf"),
    ],
)
def test_conflict_names(path: str, expected: str) -> None:
    entry = make(version=vv(a=1), modifier=DEV, path=path)
    assert conflict_path(entry) == expected
    assert is_conflict_copy(expected)
    assert conflict_path(entry.with_version(vv(b=7), DEV)) == expected  # only the loser counts


def test_conflict_name_uses_utc_mtime_and_device_short_id() -> None:
    device = DeviceId(bytes(range(32)))
    entry = make(version=vv(a=1), modifier=device.short, mtime_ns=-1, path="x.txt")
    assert conflict_path(entry) == f"x.sync-conflict-19691231-235959-{device.short_str}.txt"
    far = make(version=vv(a=1), modifier=A, mtime_ns=10**30, path="x")  # clamped, never raises
    assert conflict_path(far).startswith("x.sync-conflict-99991231-235959-")


@pytest.mark.parametrize(
    ("name", "ext"),
    [
        ("é" * 125 + ".txt", ".txt"),  # two-byte characters
        ("日本語" * 27 + ".markdown", ".markdown"),  # three-byte characters
        ("😀" * 63 + ".x", ".x"),  # four-byte characters
        ("a" * 255, ""),
        ("a." + "x" * 240, ""),  # an extension too long to keep is part of the stem
    ],
)
def test_long_names_are_shortened_on_characters(name: str, ext: str) -> None:
    check_path(name)
    copy = conflict_path(make(version=vv(a=1), modifier=DEV, path=f"dir/{name}"))
    copy_name = copy.removeprefix("dir/")
    assert len(copy_name.encode()) <= MAX_NAME_BYTES
    assert copy_name.endswith(f".sync-conflict-{STAMP}{ext}")
    stem = copy_name.partition(".sync-conflict-")[0]
    assert name.startswith(stem)
    assert len(stem.encode()) > MAX_NAME_BYTES - 60 - len(ext.encode())  # cut no more than needed
    assert is_conflict_copy(copy)


def test_deep_paths_stay_under_the_path_limit() -> None:
    parent = "/".join(["d" * 250] * 16)  # 4015 bytes
    copy = conflict_path(make(version=vv(a=1), modifier=DEV, path=f"{parent}/{'f' * 80}"))
    assert copy == f"{parent}/{'f' * 42}.sync-conflict-{STAMP}"  # exactly 4096 bytes
    assert check_path(copy) == copy
    # A parent that leaves less room than the marker needs: no valid name exists.
    deeper = f"{parent}/{'d' * 42}/{'f' * 37}"
    with pytest.raises(InvalidPathError, match="no room"):
        conflict_path(make(version=vv(a=1), path=deeper))


names = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"),
    min_size=1,
    max_size=140,
).filter(lambda n: n not in (".", "..") and _valid(n))


def _valid(name: str) -> bool:
    try:
        check_path(name)
    except InvalidPathError:
        return False
    return True


@given(names, st.integers(-(2**63), 2**63), st.integers(0, 2**64 - 1))
@example("q\u0301" * 80 + ".txt", T0, DEV)  # cut between a letter and its accent
@example("a" * 200 + ".tar.gz", T0, 0)
def test_conflict_names_are_valid_and_recognised(name: str, mtime_ns: int, modifier: int) -> None:
    entry = make(version=vv(a=1), modifier=modifier, mtime_ns=mtime_ns, path=f"dir/{name}")
    copy = conflict_path(entry)
    assert check_path(copy) == copy
    assert copy.startswith("dir/")
    assert is_conflict_copy(copy)
    assert not is_conflict_copy(entry.path) or ".sync-conflict-" in name
    assert copy == conflict_path(entry)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (f"a/b.sync-conflict-{STAMP}.txt", True),
        (f"b.sync-conflict-{STAMP}", True),
        ("b.sync-conflict-20231114-221320-ABCDEFG.bashrc", True),  # Syncthing's dotfile form
        ("notes/sync-conflict.txt", False),
        ("b.sync-conflict-2023-221320-ABCDEFG.txt", False),
        (f"b.sync-conflict-{STAMP}/inside.txt", False),  # a file in a copied directory name
        ("b.sync-conflict-20231114-221320-abcdefg.txt", False),
    ],
)
def test_is_conflict_copy(path: str, expected: bool) -> None:
    assert is_conflict_copy(path) is expected


# Rule 7: a directory a peer deleted under a live local child.


def test_keep_directory_makes_a_change_that_wins_on_the_peer() -> None:
    local_dir = make(Kind.DIR, path="photos", version=vv(a=3, b=1), modifier=A, mode=0o755)
    tombstone = make(Kind.DIR, path="photos", version=vv(a=2, b=4), modifier=B, deleted=True)
    kept = keep_directory(local_dir, tombstone, device=A, now=1_700_000_000)
    assert kept == local_dir.with_version(vv(a=1_700_000_000, b=4), A)
    assert not kept.deleted
    assert kept.kind is Kind.DIR
    assert kept.version.compare(tombstone.version) is Ordering.GREATER
    assert decide(tombstone, kept) == Decision(action=Action.WRITE_REMOTE, result=kept)
    assert decide(kept, tombstone) == Decision(action=Action.NOTHING, result=None)
    # The clock going back still makes a newer version.
    again = keep_directory(kept, tombstone, device=A, now=5)
    assert again.version == vv(a=1_700_000_001, b=4)


@pytest.mark.parametrize(
    ("local_dir", "tombstone"),
    [
        (make(version=vv(a=1), path="d"), make(Kind.DIR, version=vv(b=1), path="d", deleted=True)),
        (
            make(Kind.DIR, version=vv(a=1), path="d", deleted=True),
            make(Kind.DIR, version=vv(b=1), path="d", deleted=True),
        ),
        (make(Kind.DIR, version=vv(a=1), path="d"), make(Kind.DIR, version=vv(b=1), path="d")),
        (
            make(Kind.DIR, version=vv(a=1), path="d"),
            make(Kind.DIR, version=vv(b=1), path="e", deleted=True),
        ),
    ],
)
def test_keep_directory_refuses_misuse(local_dir: Entry, tombstone: Entry) -> None:
    with pytest.raises(ValueError, match=r"live directory|tombstone"):
        keep_directory(local_dir, tombstone, device=A, now=1)


# Properties over random pairs of entries on one path.

DEVICES = (A, B, C)
versions = st.dictionaries(st.sampled_from(DEVICES), st.integers(1, 3), min_size=1).map(
    lambda d: VersionVector(tuple(sorted(d.items())))
)


@st.composite
def entries(draw: st.DrawFn) -> Entry:
    version = draw(versions)
    return make(
        draw(st.sampled_from(list(Kind))),
        version=version,
        modifier=draw(st.sampled_from([device for device, _ in version.counters])),
        deleted=draw(st.booleans()),
        body=draw(st.sampled_from([b"", b"one", b"two"])),
        mtime_ns=T0 + draw(st.integers(0, 2)) * SEC,
        mode=draw(st.sampled_from([0o644, 0o755])),
    )


def _on_disk(local: Entry, remote: Entry, decision: Decision) -> Entry:
    """What the path holds after the caller acted: the remote's content only if told to write it."""
    return remote if decision.action is Action.WRITE_REMOTE else local


def _at_least(version: VersionVector, other: VersionVector) -> bool:
    return version.compare(other) in (Ordering.GREATER, Ordering.EQUAL)


@given(entries(), entries())
def test_both_sides_reach_the_same_entries(left: Entry, right: Entry) -> None:
    pulled, pushed = both_ways(left, right)
    assert outcome(left, pulled) == outcome(right, pushed)


@given(entries(), entries())
def test_outcome_is_sound(local: Entry, remote: Entry) -> None:
    decision = decide(local, remote)
    final, copy = outcome(local, decision)
    assert final.path == PATH
    assert _at_least(final.version, local.version)
    assert _at_least(final.version, remote.version)
    # The disk after the action holds what the index records.
    disk = _on_disk(local, remote, decision)
    assert disk.same_content(final) or (disk.deleted and final.deleted)
    if copy is not None:
        source = local if decision.copy_from == "local" else remote
        assert copy.same_content(source)
        assert (copy.version, copy.modifier) == (source.version, source.modifier)
        assert copy.path == conflict_path(source)
        assert is_conflict_copy(copy.path)
    # Nothing is dropped: a live input survives at the path or as the copy, unless the other
    # side's version dominated it. A directory's content is its being there.
    for mine, other in ((local, remote), (remote, local)):
        if mine.deleted or other.version.compare(mine.version) is Ordering.GREATER:
            continue
        if mine.kind is Kind.DIR:
            assert final.kind is Kind.DIR
            assert not final.deleted
        else:
            kept = [e for e in (final, copy) if e is not None and e.same_content(mine)]
            assert kept, f"{mine} was dropped"


@given(entries())
def test_pulling_your_own_outcome_changes_nothing(entry: Entry) -> None:
    assert decide(entry, entry) == Decision(action=Action.NOTHING, result=None)


@given(entries(), entries())
def test_pulling_the_same_entry_again_changes_nothing(local: Entry, remote: Entry) -> None:
    final, copy = outcome(local, decide(local, remote))
    again = decide(final, remote)
    assert outcome(final, again)[0] == final
    assert again.conflict_copy in (None, copy)
