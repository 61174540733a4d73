"""The dashboard in a real browser: Debian's headless Chromium, driven by selenium through
Debian's chromedriver, shows the folder and the peer, then a file written on the other node
appears under "Recent changes" without a reload; a screenshot proves the page painted.

Chromium and its driver are installed with apt-get where missing (as root, like CI). This test
never skips: a browser that cannot start fails it with the reason."""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from nodes import Member, cluster, eventually
from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from backer.web import WebServer

PACKAGES = ("chromium", "chromium-driver")  # Debian's: /usr/bin/chromium, /usr/bin/chromedriver
WAIT = 15.0  # seconds for the page to show something
WIDE, NARROW = (1100, 800), (380, 800)
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def ensure_chromium() -> tuple[str, str]:
    """The paths of chromium and chromedriver, installing Debian's packages where missing."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
            try:
                done = subprocess.run(
                    argv, env=env, capture_output=True, text=True, check=False, timeout=600
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                pytest.fail(f"cannot install {' '.join(PACKAGES)}: {exc}")
            if done.returncode != 0:
                tail = (done.stdout + done.stderr)[-2000:]
                pytest.fail(f"{' '.join(argv)} exited {done.returncode}:\n{tail}")
        found = shutil.which("chromium"), shutil.which("chromedriver")
    chromium, driver = found
    if chromium is None or driver is None:
        pytest.fail(f"chromium or chromedriver still missing after installing {PACKAGES}")
    return chromium, driver


def start_browser(chromium: str, driver: str) -> webdriver.Chrome:
    options = Options()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # Chromium runs as root here
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--force-device-scale-factor=1",
        f"--window-size={WIDE[0]},{WIDE[1]}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # to read the console
    try:
        return webdriver.Chrome(service=Service(executable_path=driver), options=options)
    except WebDriverException as exc:
        pytest.fail(f"headless Chromium could not start ({chromium}, {driver}): {exc.msg}")


def wait_until(browser: webdriver.Chrome, what: str, check: Callable[[], bool]) -> None:
    try:
        WebDriverWait(browser, WAIT, poll_frequency=0.05).until(lambda _: check())
    except TimeoutException:
        body = browser.find_element(By.TAG_NAME, "body").text
        raise AssertionError(f"not within {WAIT:g} s: {what}; the page shows:\n{body}") from None


def text_of(browser: webdriver.Chrome, element_id: str) -> str:
    return str(browser.find_element(By.ID, element_id).text)


def _in_sync(member: Member) -> bool:
    peers = member.node.status()["folders"][0]["peers"]
    return bool(peers) and all(peer["in_sync"] for peer in peers)


async def test_the_dashboard_shows_folders_peers_and_live_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in _PROXY_VARS:  # the browser and its driver talk to 127.0.0.1 directly
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    chromium, driver = await asyncio.to_thread(ensure_chromium)
    async with cluster(tmp_path, 2) as (a, b), WebServer(a.node) as server:
        await eventually(lambda: _in_sync(a), what="a and b connected and in sync")
        browser = await asyncio.to_thread(start_browser, chromium, driver)
        try:
            await asyncio.to_thread(
                _see_folder_peer_and_live_change, browser, server, a, b, tmp_path
            )
        finally:
            await asyncio.to_thread(browser.quit)


def _see_folder_peer_and_live_change(
    browser: webdriver.Chrome, server: WebServer, a: Member, b: Member, tmp_path: Path
) -> None:
    """Runs in a worker thread: the nodes and the server go on in the test's event loop."""
    browser.get(server.url)
    wait_until(browser, "the live stream opens", lambda: text_of(browser, "live") == "live")
    wait_until(browser, "the folder is shown", lambda: str(a.folder) in text_of(browser, "folders"))
    peer_short = str(b.node.device)[:7]
    wait_until(browser, "the peer is shown", lambda: peer_short in text_of(browser, "peers"))
    wait_until(browser, "the peer in sync", lambda: "1/1" in text_of(browser, "folders"))
    assert "in sync" in text_of(browser, "peers")
    assert "token" not in browser.current_url  # the page took it out of the address bar

    # A change on the other node shows up live: same document, no reload.
    browser.execute_script("window.backerProbe = 'still the same page'")
    (b.folder / "from-b.txt").write_bytes(b"written on b")
    selector = '#recent li[data-path="from-b.txt"]'
    wait_until(
        browser,
        "the change from b appears under Recent changes",
        lambda: bool(browser.find_elements(By.CSS_SELECTOR, selector)),
    )
    assert browser.execute_script("return window.backerProbe") == "still the same page"
    assert "updated" in browser.find_element(By.CSS_SELECTOR, selector).text

    png = browser.get_screenshot_as_png()
    (tmp_path / "dashboard.png").write_bytes(png)
    check_painted(png, WIDE)

    # A narrow window: one column, nothing wider than the window.
    browser.set_window_size(*NARROW)
    wait_until(
        browser,
        "the page fits a narrow window",
        lambda: bool(
            browser.execute_script(
                "return document.documentElement.scrollWidth <= window.innerWidth"
            )
        ),
    )
    assert str(a.folder) in text_of(browser, "folders")

    # No script error and no blocked load (a Content-Security-Policy violation) on the way.
    console = browser.get_log("browser")  # type: ignore[no-untyped-call]
    severe = [entry for entry in console if entry.get("level") == "SEVERE"]
    assert not severe, severe


# -- the screenshot --------------------------------------------------------------------------


def check_painted(png: bytes, size: tuple[int, int]) -> None:
    """A valid PNG about the window's size, showing a page rather than a blank: many colours,
    and a good share of the pixels unlike the background."""
    assert png.startswith(b"\x89PNG\r\n\x1a\n"), "the screenshot is not a PNG"
    assert 5_000 < len(png) < 20_000_000, f"implausible PNG size: {len(png)} bytes"
    width, height, pixels = decode_png(png)
    assert abs(width - size[0]) <= size[0] // 4 and abs(height - size[1]) <= size[1] // 2, (
        width,
        height,
    )
    colours = Counter(pixels)
    _background, most = colours.most_common(1)[0]
    painted = 1 - most / len(pixels)
    assert len(colours) > 50, f"only {len(colours)} colours: a blank page?"
    assert painted > 0.03, f"only {painted:.1%} of the pixels differ from the background"
    # The top (header) and the middle (cards) differ: not one flat fill.
    top = Counter(pixels[: width * 40])
    middle = Counter(pixels[width * (height // 2) : width * (height // 2 + 40)])
    assert top != middle, "the header and the body look the same"


def decode_png(png: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and one `bytes` per pixel of an 8-bit RGB or RGBA, non-interlaced PNG
    (what Chromium writes)."""
    position, idat, header = 8, b"", b""
    while position < len(png):
        (length,) = struct.unpack(">I", png[position : position + 4])
        kind = png[position + 4 : position + 8]
        data = png[position + 8 : position + 8 + length]
        position += 12 + length
        if kind == b"IHDR":
            header = data
        elif kind == b"IDAT":
            idat += data
        elif kind == b"IEND":
            break
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
    channels = 4 if colour == 6 else 3
    stride = width * channels
    raw = zlib.decompress(idat)
    assert len(raw) == height * (stride + 1), "truncated image data"
    previous = bytearray(stride)
    pixels: list[bytes] = []
    for row in range(height):
        start = row * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        _unfilter(kind, line, previous, channels)
        pixels.extend(bytes(line[i : i + channels]) for i in range(0, stride, channels))
        previous = line
    return width, height, pixels


def _unfilter(kind: int, line: bytearray, previous: bytearray, bpp: int) -> None:
    if kind == 0:
        return
    if kind == 2:  # Up
        line[:] = bytes((x + p) & 0xFF for x, p in zip(line, previous, strict=True))
        return
    for i in range(len(line)):
        left = line[i - bpp] if i >= bpp else 0
        up = previous[i]
        if kind == 1:  # Sub
            line[i] = (line[i] + left) & 0xFF
        elif kind == 3:  # Average
            line[i] = (line[i] + (left + up) // 2) & 0xFF
        elif kind == 4:  # Paeth
            corner = previous[i - bpp] if i >= bpp else 0
            estimate = left + up - corner
            pa, pb, pc = abs(estimate - left), abs(estimate - up), abs(estimate - corner)
            best = left if pa <= pb and pa <= pc else up if pb <= pc else corner
            line[i] = (line[i] + best) & 0xFF
        else:
            raise AssertionError(f"unknown PNG filter {kind}")
