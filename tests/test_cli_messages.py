"""What a person reads when something is off (issue 20, part 5): each message through the real
`backer` command, in temporary homes, on loopback."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from procs import PYTHON, Running, backer, free_port

from backer.cli.run import describe
from backer.events import LocalChangesKept
from backer.keys import FolderKey
from backer.sync.versions import Versions

NO_DISCOVERY = ("--discovery", "none")


def attempt(
    home: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one `backer` command that may fail; its exit code and both outputs."""
    return subprocess.run(
        [*PYTHON, "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


def shared(tmp_path: Path, name: str) -> tuple[Path, Path, str]:
    """A folder shared by `backer init` in its own home: (home, folder, read-write key)."""
    home, folder = tmp_path / f"home-{name}", tmp_path / name
    folder.mkdir()
    backer(home, "init", str(folder))
    keys = backer(home, "keys", str(folder)).split()
    return home, folder, next(k for k in keys if k.startswith("bkw1"))


def poll(what: Callable[[], str], wanted: Callable[[str], bool], deadline: float = 30) -> str:
    """`what()` once `wanted` of it holds; fails with the last value after `deadline` s."""
    end = time.monotonic() + deadline
    while True:
        value = what()
        if wanted(value):
            return value
        assert time.monotonic() < end, f"still not as wanted after {deadline:g} s:\n{value}"
        time.sleep(0.1)


def test_run_with_the_wrong_folder_key_says_so_on_both_sides(tmp_path: Path) -> None:
    home_a, _, _ = shared(tmp_path, "a")
    home_c, _, _ = shared(tmp_path, "c")  # another folder: its key is the wrong one for a
    listen_a = f"127.0.0.1:{free_port()}"
    a = Running(home_a, ["--listen", listen_a, *NO_DISCOVERY])
    c = Running(home_c, ["--listen", f"127.0.0.1:{free_port()}", "--peer", listen_a])
    try:
        a.wait_for("node_started")
        refused = c.wait_for("peer_disconnected", lambda e: e["address"] == listen_a)
        assert "wrong folder key" in refused["reason"], refused
        told = a.wait_for("error_occurred", lambda e: "wrong folder key" in e["message"])
        assert "127.0.0.1" in told["message"]
        c.wait_for("peer_disconnected", lambda e: e is not refused)  # it dials again...
    finally:
        c.stop()
        a.stop()
    said = [e for e in a.drain() if "wrong folder key" in e.get("message", "")]
    assert len(said) == 1  # ...and the listener says so once, not at every retry


def test_sync_of_an_unkeyed_folder_with_a_keyed_server_says_to_join_first(
    tmp_path: Path,
) -> None:
    home_s, served, _ = shared(tmp_path, "served")
    (served / "doc.txt").write_text("for key holders")
    (tmp_path / "plain").mkdir()
    with _serving(home_s, served) as address:
        done = attempt(tmp_path / "home-plain", "sync", str(tmp_path / "plain"), address)
    assert done.returncode == 1, done.stderr
    assert "`backer join KEY DIR` here first" in done.stdout
    assert "stream ended" not in done.stdout + done.stderr
    assert not (tmp_path / "plain" / "doc.txt").exists()


def test_sync_says_received_1_file_not_1_files(tmp_path: Path) -> None:
    home_s, served, key = shared(tmp_path, "served")
    (served / "doc.txt").write_text("one file")
    backer(tmp_path / "home-j", "join", key, str(tmp_path / "joined"))
    with _serving(home_s, served) as address:
        out = backer(tmp_path / "home-j", "sync", str(tmp_path / "joined"), address)
    assert "received 1 file (" in out and "0 conflicts" in out


def test_a_read_only_device_says_once_that_its_edits_stay_local(tmp_path: Path) -> None:
    home_rw, folder_rw, key = shared(tmp_path, "laptop")
    home_ro, folder_ro = tmp_path / "home-server", tmp_path / "server"
    backer(home_ro, "join", str(FolderKey.parse(key).read_only()), str(folder_ro))
    (folder_rw / "report.txt").write_text("the real one")
    listen_ro = f"127.0.0.1:{free_port()}"
    ro = Running(home_ro, ["--listen", listen_ro, *NO_DISCOVERY])
    rw = Running(home_rw, ["--listen", f"127.0.0.1:{free_port()}", "--peer", listen_ro])
    try:
        ro.wait_for("file_updated", lambda e: e["path"] == "report.txt")
        (folder_ro / "report.txt").write_text("edited on the read-only device")
        told = ro.wait_for("local_changes_kept")
        assert told["count"] == 1
        (folder_ro / "added.txt").write_text("new here")
        ro.wait_for("folder_scanned", lambda e: e["seen"] > told["seen"])
        status = poll(
            lambda: backer(home_ro, "status", str(folder_ro)),
            lambda out: "2 changes made here stay here" in out,
        )
        assert "`backer revert`" in status
        assert "syncing" not in status, status  # the difference is no transfer under way
        assert (folder_rw / "report.txt").read_text() == "the real one"
        busy = attempt(home_ro, "revert", str(folder_ro))  # two writers of one index: refused
        assert busy.returncode == 1 and "stop it first, then revert" in busy.stderr, busy.stderr
    finally:
        rw.stop()
        ro.stop()
    reverted = backer(home_ro, "revert", str(folder_ro))
    assert "reverted added.txt" in reverted and "reverted report.txt" in reverted
    assert [e["type"] for e in ro.drain()].count("local_changes_kept") == 1
    # And the plain text of `backer run` says what to do.
    text = describe(LocalChangesKept(folder=str(folder_ro), count=2))
    assert text is not None and "stay on this device" in text and "`backer revert`" in text


def test_init_join_scan_on_a_read_only_filesystem_is_one_line_and_exit_1(
    tmp_path: Path,
) -> None:
    mount = tmp_path / "ro"
    mount.mkdir()
    with _read_only_mount(mount):
        key = str(FolderKey.generate())
        for args in (
            ("init", str(mount / "docs")),
            ("join", key, str(mount / "joined")),
            ("scan", str(mount / "docs")),
        ):
            done = attempt(tmp_path / "home", *args)
            assert done.returncode == 1, (args, done.stderr)
            assert "read-only filesystem" in done.stderr, (args, done.stderr)
            assert "Traceback" not in done.stderr
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_usage_errors_exit_2_and_name_the_option(tmp_path: Path) -> None:
    home, _, _ = shared(tmp_path, "docs")
    done = attempt(home, "run", "--listen", "127.0.0.1:notaport")
    assert done.returncode == 2 and "--listen" in done.stderr, done.stderr
    done = attempt(home, "run", "--peer", "nohost", *NO_DISCOVERY)
    assert done.returncode == 2 and "--peer" in done.stderr, done.stderr
    assert "peers[0]" not in done.stderr
    done = attempt(home, "run", "--discovery", "carrier-pigeon")
    assert done.returncode == 2 and "discovery" in done.stderr, done.stderr
    done = attempt(home, "sync", str(tmp_path / "docs"), "somewhere")
    assert done.returncode == 2 and "HOST:PORT" in done.stderr, done.stderr


def test_an_address_not_on_this_machine_does_not_blame_another_backer(tmp_path: Path) -> None:
    home, _, _ = shared(tmp_path, "docs")
    done = attempt(home, "run", "--listen", "192.0.2.7:22100", *NO_DISCOVERY)  # TEST-NET-1
    assert done.returncode == 1
    assert "cannot assign requested address" in done.stderr, done.stderr
    assert "no interface of this machine has that address" in done.stderr
    assert "another backer" not in done.stderr
    with listening() as taken:  # a port in use is the case where another backer is likely
        done = attempt(home, "run", "--listen", taken, *NO_DISCOVERY)
    assert done.returncode == 1 and "another backer?" in done.stderr, done.stderr


def test_status_and_conflicts_outside_a_folder_do_not_advise_a_scan(tmp_path: Path) -> None:
    home, folder, _ = shared(tmp_path, "docs")
    (tmp_path / "elsewhere").mkdir()
    for command in ("status", "conflicts"):
        done = attempt(home, command, str(tmp_path / "elsewhere"))
        assert done.returncode == 1, done.stderr
        assert "not a backer folder" in done.stderr and "backer scan" not in done.stderr
    # From inside a folder, its nearest enclosing folder is meant, as git finds its repository.
    (folder / "sub").mkdir()
    out = backer(home, "status", str(folder / "sub"))
    assert f"folder   {folder}" in out
    assert backer(home, "conflicts", str(folder / "sub")).strip() == "no conflicts"


def test_restoring_a_deleted_file_does_not_claim_to_keep_a_replaced_one(tmp_path: Path) -> None:
    home, folder, _ = shared(tmp_path, "docs")
    (folder / "a.txt").write_text("kept")
    backer(home, "scan", str(folder))
    Versions(folder).archive("a.txt", time.time())  # as a peer's deletion would: kept, gone
    backer(home, "scan", str(folder))
    out = backer(home, "restore", str(folder / "a.txt"))
    assert out.startswith("restored a.txt from ") and "replaced" not in out, out
    assert (folder / "a.txt").read_text() == "kept"
    out = backer(home, "restore", str(folder / "a.txt"))
    assert "the replaced file was kept" in out


def test_peers_says_who_dialled_whom_once(tmp_path: Path) -> None:
    home_a, _, key = shared(tmp_path, "a")
    home_b, folder_b = tmp_path / "home-b", tmp_path / "b"
    backer(home_b, "join", key, str(folder_b))
    listen_a = f"127.0.0.1:{free_port()}"
    a = Running(home_a, ["--listen", listen_a, *NO_DISCOVERY])
    b = Running(home_b, ["--listen", f"127.0.0.1:{free_port()}", "--peer", listen_a])
    try:
        a.wait_for("peer_connected")
        b.wait_for("peer_connected")
        listener = poll(lambda: backer(home_a, "peers"), lambda out: "dialled us" in out)
        dialler = poll(lambda: backer(home_b, "peers"), lambda out: "dialled;" in out)
    finally:
        b.stop()
        a.stop()
    assert "it dialled us" in listener and "(dialled us)" not in listener, listener
    assert "found by static" in dialler, dialler


@contextlib.contextmanager
def _serving(home: Path, folder: Path) -> Iterator[str]:
    server = subprocess.Popen(
        [*PYTHON, "--home", str(home), "serve", str(folder), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        yield server.stdout.readline().split(" on ")[1].strip()
    finally:
        server.terminate()
        server.wait(timeout=30)


@contextlib.contextmanager
def _read_only_mount(where: Path) -> Iterator[None]:
    """A small tmpfs mounted read-only at `where` (the tests run as root), unmounted after."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], check=True)
    try:
        (where / "docs").mkdir()  # a folder to `init` and `scan` there
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(where)], check=True)


@contextlib.contextmanager
def listening() -> Iterator[str]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield f"127.0.0.1:{holder.getsockname()[1]}"
