"""The dashboard at a stable address (issue 20, part 2): a fixed default port, the token kept in
the node home and rotatable, `backer open` and `backer status` showing it; through the real
`backer` command."""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from procs import Running, backer, free_port
from test_cli_messages import NO_DISCOVERY, attempt, listening, poll, shared

from backer.config import DEFAULT_WEB_PORT, WEB_TOKEN_FILE, Home, NodeConfig
from backer.errors import ConfigError

URL = re.compile(r"^(http://127\.0\.0\.1:(\d+)/)#token=([\w-]+)$", re.MULTILINE)


def has_url(text: str) -> bool:
    return URL.search(text) is not None


def api_status(base: str, token: str) -> int:
    """The HTTP status of GET /api/status with `token`."""
    request = urllib.request.Request(
        base + "api/status", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def with_dashboard(home: Path, port: int) -> None:
    """Turn the dashboard on in the config (as the service's node has it), on `port`."""
    config = Home(home).load_config()
    Home(home).save_config(dataclasses.replace(config, web=True, web_port=port))


def test_the_dashboard_keeps_its_address_and_token_and_the_token_rotates(
    tmp_path: Path,
) -> None:
    home, folder, _ = shared(tmp_path, "docs")
    port = free_port()
    with_dashboard(home, port)
    args = ["--listen", f"127.0.0.1:{free_port()}", *NO_DISCOVERY]
    node = Running(home, args)  # no --web: the config asks for it
    try:
        node.wait_for("node_started")
        printed = poll(lambda: attempt(home, "open", "--print").stdout, has_url)
        match = URL.search(printed)
        assert match is not None
        base, token = match.group(1), match.group(3)
        assert int(match.group(2)) == port
        assert token == (home / WEB_TOKEN_FILE).read_text().strip()
        assert (home / WEB_TOKEN_FILE).stat().st_mode & 0o077 == 0  # owner-only
        assert api_status(base, token) == 200

        status = backer(home, "status", str(folder))
        assert f"web      {base}" in status and "backer open" in status
        assert token not in status  # the secret stays out of what people paste

        rotated = backer(home, "open", "--new-token", "--print")
        assert "no longer work" in rotated
        new = URL.search(rotated)
        assert new is not None and new.group(1) == base and new.group(3) != token
        assert api_status(base, token) == 401  # the running node took the new one at once
        assert api_status(base, new.group(3)) == 200
    finally:
        assert node.stop() == 0
    again = Running(home, args)  # a restart keeps the address: a bookmark still works
    try:
        again.wait_for("node_started")
        poll(lambda: attempt(home, "open", "--print").stdout, lambda out: new.group(0) in out)
        assert api_status(base, new.group(3)) == 200
    finally:
        assert again.stop() == 0


def test_open_on_a_headless_machine_prints_the_url_and_an_ssh_tunnel(tmp_path: Path) -> None:
    home, _, _ = shared(tmp_path, "docs")
    port = free_port()
    node = Running(home, ["--listen", f"127.0.0.1:{free_port()}", "--web-port", str(port)])
    try:
        node.wait_for("node_started")
        poll(lambda: attempt(home, "open", "--print").stdout, has_url)
        env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
        done = attempt(home, "open", env=env)
    finally:
        node.stop()
    assert done.returncode == 0, done.stderr
    assert URL.search(done.stdout)
    assert f"ssh -L {port}:127.0.0.1:{port} THIS-HOST" in done.stdout


def test_open_says_how_to_start_the_dashboard(tmp_path: Path) -> None:
    home, _, _ = shared(tmp_path, "docs")
    done = attempt(home, "open", "--print")
    assert done.returncode == 1 and "backer run --web" in done.stderr, done.stderr
    node = Running(home, ["--listen", f"127.0.0.1:{free_port()}", *NO_DISCOVERY])
    try:
        node.wait_for("node_started")
        refusal = poll(
            lambda: attempt(home, "open", "--print").stderr,
            lambda err: "serves no dashboard" in err,
        )
        assert "web = true" in refusal
    finally:
        node.stop()


def test_the_dashboard_port_is_fixed_by_default_and_configurable(tmp_path: Path) -> None:
    assert NodeConfig().web_port == DEFAULT_WEB_PORT == 22180 and not NodeConfig().web
    home = Home(tmp_path / "home")
    home.save_config(NodeConfig(web=True, web_port=8385))
    assert (home.load_config().web, home.load_config().web_port) == (True, 8385)
    for bad in (-1, 65536, True, "8385"):
        with pytest.raises(ConfigError, match="web_port"):
            NodeConfig(web_port=bad)  # type: ignore[arg-type]
    assert home.web_token() == home.web_token()  # made once, then kept


def test_a_dashboard_port_in_use_falls_back_to_a_free_one_and_says_so(tmp_path: Path) -> None:
    home, _, _ = shared(tmp_path, "docs")
    with listening() as taken:
        port = int(taken.rpartition(":")[2])
        node = Running(home, ["--listen", f"127.0.0.1:{free_port()}", "--web-port", str(port)])
        try:
            node.wait_for("node_started")
            printed = poll(lambda: attempt(home, "open", "--print").stdout, has_url)
            match = URL.search(printed)
            assert match is not None and int(match.group(2)) != port
            assert api_status(match.group(1), match.group(3)) == 200
        finally:
            node.stop()
    assert f"the dashboard is on port {match.group(2)} this time" in node.stderr_so_far()
