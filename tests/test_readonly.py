"""Folder keys in replication: versions are signed by read-write devices, read-only devices
receive them but cannot push their own, revert undoes a read-only device's changes, and a wrong
key shares nothing."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from nacl.signing import VerifyKey

from backer.cli import main
from backer.config import FolderConfig, Home
from backer.index.entry import signed_message
from backer.index.store import IndexStore
from backer.keys import FolderKey
from backer.node.statusfile import STATUS_FILE
from backer.sync.replica import Replica
from backer.sync.replicate import replicate

OLD = 1_600_000_000


def write(folder: Path, rel: str, data: bytes, mtime: int = OLD) -> None:
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))


async def revert(folder: Path, key: FolderKey) -> list[str]:
    """`backer revert` of a read-only replica of the folder of `key`."""
    replica = await Replica.open(folder, device=0, key=key.read_only())
    try:
        replica.device = replica.store.local_device()
        return await replica.revert()
    finally:
        await replica.close()


@pytest.fixture
def key() -> FolderKey:
    return FolderKey.generate()


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    made = tuple(tmp_path / name for name in ("rw1", "rw2", "ro"))
    for folder in made:
        folder.mkdir()
    return made  # type: ignore[return-value]


def signatures_valid(folder: Path, key: FolderKey) -> bool:
    verify = VerifyKey(key.verify_key)
    with IndexStore.open(folder) as store:
        for entry in store.entries():
            verify.verify(signed_message(entry.leaf_hash()), entry.signature)
    return True


async def test_read_write_devices_sign_and_converge(
    folders: tuple[Path, Path, Path], key: FolderKey
) -> None:
    rw1, rw2, _ = folders
    write(rw1, "a/doc.txt", b"from one")
    write(rw2, "b.txt", b"from two")
    result = await replicate(rw1, rw2, key_a=key, key_b=key)
    assert result.in_sync
    assert (rw2 / "a/doc.txt").read_bytes() == b"from one"
    assert signatures_valid(rw1, key) and signatures_valid(rw2, key)


async def test_signed_changes_reach_a_read_only_device(
    folders: tuple[Path, Path, Path], key: FolderKey
) -> None:
    rw1, _, ro = folders
    write(rw1, "shared.txt", b"v1")
    assert (await replicate(rw1, ro, key_a=key, key_b=key.read_only())).in_sync
    write(rw1, "shared.txt", b"v2", mtime=OLD + 1)
    assert (await replicate(ro, rw1, key_a=key.read_only(), key_b=key)).in_sync
    assert (ro / "shared.txt").read_bytes() == b"v2"


async def test_read_only_changes_are_refused_and_revert_brings_the_mesh_back(
    folders: tuple[Path, Path, Path], key: FolderKey
) -> None:
    rw1, _, ro = folders
    write(rw1, "shared.txt", b"the real one")
    await replicate(rw1, ro, key_a=key, key_b=key.read_only())
    write(ro, "shared.txt", b"tampered on the read-only device", mtime=OLD + 5)
    write(ro, "added.txt", b"new on the read-only device")
    result = await replicate(ro, rw1, key_a=key.read_only(), key_b=key, stuck_after=0.5)
    assert not result.in_sync
    refused = sum(p.refused for p in result.b.pulls)
    assert refused == 2
    assert (rw1 / "shared.txt").read_bytes() == b"the real one"
    assert not (rw1 / "added.txt").exists()

    reverted = await revert(ro, key)
    assert sorted(reverted) == ["added.txt", "shared.txt"]
    assert (await replicate(ro, rw1, key_a=key.read_only(), key_b=key)).in_sync
    assert (ro / "shared.txt").read_bytes() == b"the real one"
    assert not (ro / "added.txt").exists()
    kept = {p.read_bytes() for p in (ro / ".backer/versions").rglob("*") if p.is_file()}
    assert kept == {b"tampered on the read-only device", b"new on the read-only device"}


async def test_a_wrong_key_shares_nothing(folders: tuple[Path, Path, Path]) -> None:
    rw1, rw2, _ = folders
    write(rw1, "secret.txt", b"only for key one")
    result = await replicate(rw1, rw2, key_a=FolderKey.generate(), key_b=FolderKey.generate())
    assert not result.in_sync
    assert not result.a.clean and not result.b.clean
    assert not (rw2 / "secret.txt").exists()
    assert result.a.pulls == [] and result.b.pulls == []


async def test_revert_after_a_deleted_file_settles_on_the_mesh_root(
    folders: tuple[Path, Path, Path], key: FolderKey
) -> None:
    """A revert of deleted paths (tombstones, no file to move away) brings them back and the
    roots meet: the flow of issue 14.7, whose failure came from a revert beside a running node
    (test_store and the next test)."""
    rw1, _, ro = folders
    write(rw1, "other.txt", b"keep me")
    write(rw1, "dir/inner.txt", b"inner")
    await replicate(rw1, ro, key_a=key, key_b=key.read_only())
    (ro / "other.txt").unlink()
    (ro / "dir/inner.txt").unlink()
    (ro / "dir").rmdir()
    result = await replicate(ro, rw1, key_a=key.read_only(), key_b=key, stuck_after=0.5)
    assert not result.in_sync
    reverted = await revert(ro, key)
    assert sorted(reverted) == ["dir", "dir/inner.txt", "other.txt"]
    result = await replicate(ro, rw1, key_a=key.read_only(), key_b=key)
    assert result.in_sync and result.root_a == result.root_b
    assert sum(p.refused for p in result.b.pulls) == 0
    assert (ro / "other.txt").read_bytes() == b"keep me"
    assert (ro / "dir/inner.txt").read_bytes() == b"inner"


def test_revert_refuses_while_a_running_node_keeps_the_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`backer revert` beside `backer run` committed to the index behind the node's back (see
    test_store's test of a commit after another process's): the read-only side never settled.
    Like `backer scan`, it asks for the node to be stopped first."""
    home, folder = Home(tmp_path / "home"), tmp_path / "ro"
    folder.mkdir()
    key = FolderKey.generate().read_only()
    home.save_config(home.load_config().with_folder(FolderConfig(path=str(folder), key=str(key))))
    IndexStore.open(folder, create=True).close()
    write(folder, "added.txt", b"local")
    status = {"written": time.time(), "pid": os.getpid(), "folders": [{"path": str(folder)}]}
    (home.path / STATUS_FILE).write_text(json.dumps(status))
    assert main(["--home", str(home.path), "revert", str(folder)]) == 1
    assert "stop it first" in capsys.readouterr().err
    assert (folder / "added.txt").exists()
    (home.path / STATUS_FILE).unlink()
    assert main(["--home", str(home.path), "revert", str(folder)]) == 0
    assert "reverted added.txt" in capsys.readouterr().out
