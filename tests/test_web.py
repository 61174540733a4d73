"""The web dashboard: its request decisions as pure functions, then the server over real
loopback HTTP in front of two in-process nodes (token, Host, limits, status, the event stream)."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import h11
import pytest
from nodes import Member, cluster, eventually

from backer.errors import BackerError
from backer.node.node import Node
from backer.web import WebServer, routes, start_web
from backer.web.routes import Endpoint, Refuse, Request, Serve, decide, sse_comment, sse_message

TOKEN = "s3cret-token-of-enough-length-xyz"
PORT = 8384
HOST = f"127.0.0.1:{PORT}"


def _get(target: str, *headers: tuple[str, str], host: str | None = HOST) -> Request:
    all_headers = ((("host", host),) if host is not None else ()) + headers
    return Request(method="GET", target=target, headers=all_headers)


def _decide(request: Request) -> Serve | Refuse:
    return decide(request, token=TOKEN, port=PORT)


def _status(request: Request) -> int:
    decision = _decide(request)
    return decision.status if isinstance(decision, Refuse) else 200


# -- the decisions, without sockets ------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "status"),
    [
        # The page shell and its files hold no data: no token needed.
        (_get("/"), 200),
        (_get("/index.html"), 200),
        (_get("/app.js"), 200),
        (_get("/app.css"), 200),
        # Every API endpoint needs the token, as a bearer header or a query parameter.
        (_get("/api/status"), 401),
        (_get("/api/status", ("authorization", "Bearer wrong")), 401),
        (_get("/api/status", ("authorization", "Basic " + TOKEN)), 401),
        (_get("/api/status", ("authorization", "Bearer " + TOKEN)), 200),
        (_get("/api/status", ("authorization", "bearer " + TOKEN)), 200),
        (_get(f"/api/events?token={TOKEN}"), 200),
        (_get("/api/events?token=wrong"), 401),
        (_get(f"/api/events?token={TOKEN}&token={TOKEN}"), 401),  # ambiguous
        (_get("/api/peers?" + "&".join(f"x{i}=1" for i in range(20)) + f"&token={TOKEN}"), 401),
        (_get("/api/recent", ("authorization", "Bearer t\u00e9st")), 401),  # non-ASCII
        (_get(f"/api/conflicts?token={TOKEN}"), 200),
        # DNS rebinding: only our own loopback names and port.
        (_get(f"/api/status?token={TOKEN}", host="evil.example:8384"), 421),
        (_get(f"/api/status?token={TOKEN}", host="127.0.0.1:9999"), 421),
        (_get(f"/api/status?token={TOKEN}", host="127.0.0.1"), 421),
        (_get("/", host="evil.example"), 421),
        (_get("/", host=None), 421),
        (_get("/", ("host", HOST)), 421),  # two Host headers
        (_get(f"/api/status?token={TOKEN}", host="LOCALHOST:8384"), 200),
        # Cross-origin requests are refused even with the token.
        (_get(f"/api/status?token={TOKEN}", ("origin", "http://evil.example")), 403),
        (_get(f"/api/status?token={TOKEN}", ("origin", f"http://{HOST}")), 200),
        (_get(f"/api/status?token={TOKEN}", ("sec-fetch-site", "cross-site")), 403),
        (_get(f"/api/status?token={TOKEN}", ("sec-fetch-site", "same-origin")), 200),
        # Everything else.
        (_get("/nothing-here"), 404),
        (_get("/api/status/../status"), 404),
        (_get("*"), 400),
        (_get("/" + "a" * 3000), 414),
        (Request(method="POST", target="/api/status", headers=(("host", HOST),)), 405),
        (Request(method="GET", target="/", headers=(("host", HOST),), has_body=True), 413),
    ],
)
def test_decide(request_: Request, status: int) -> None:
    assert _status(request_) == status


def test_refusals_say_why_and_never_echo_the_token() -> None:
    for request in (
        _get("/api/status", ("authorization", "Bearer " + TOKEN), host="evil.example"),
        _get("/api/status?token=" + TOKEN[:-1]),
    ):
        refusal = _decide(request)
        assert isinstance(refusal, Refuse)
        assert refusal.reason and TOKEN not in refusal.reason
    unauthorised = _decide(_get("/api/status"))
    assert isinstance(unauthorised, Refuse)
    assert ("www-authenticate", 'Bearer realm="backer"') in unauthorised.headers
    assert _decide(_get("/api/events?token=" + TOKEN)) == Serve(endpoint=Endpoint.EVENTS)
    body = _decide(Request(method="GET", target="/", headers=(("host", HOST),), has_body=True))
    assert isinstance(body, Refuse) and body.close


def test_refuse_is_an_error_status() -> None:
    with pytest.raises(ValueError, match="4xx or 5xx"):
        Refuse(status=200, reason="fine")


def test_server_sent_event_framing() -> None:
    assert sse_message({"type": "x", "path": "a\nb"}) == b'data: {"type":"x","path":"a\\nb"}\n\n'
    assert sse_comment("keep\nalive") == b": keep alive\n\n"


def test_the_routes_module_is_pure() -> None:
    tree = ast.parse(Path(routes.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & {"asyncio", "socket", "threading", "selectors", "h11", "backer"}


def test_only_loopback_can_be_served() -> None:
    for host in ("0.0.0.0", "::", "192.168.1.2", "localhost"):
        with pytest.raises(BackerError, match=r"127\.0\.0\.1 only"):
            WebServer(cast(Node, None), host=host)


# -- a small HTTP client over h11 ----------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def fetch(
    port: int,
    target: str,
    *,
    token: str | None = None,
    host: str | None = None,
    headers: tuple[tuple[str, str], ...] = (),
) -> Reply:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        conn = h11.Connection(h11.CLIENT)
        sent = [("host", host or f"127.0.0.1:{port}"), *headers]
        if token is not None:
            sent.append(("authorization", f"Bearer {token}"))
        writer.write(conn.send(h11.Request(method="GET", target=target, headers=sent)))
        writer.write(conn.send(h11.EndOfMessage()))
        response = await _next(conn, reader)
        assert isinstance(response, h11.Response), response
        body = b""
        while isinstance(event := await _next(conn, reader), h11.Data):
            body += event.data
        return Reply(
            response.status_code,
            {k.decode(): v.decode() for k, v in response.headers},
            body,
        )
    finally:
        writer.close()


async def raw(port: int, data: bytes) -> bytes:
    """Send bytes as they are; everything the server answers before it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def _next(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(await asyncio.wait_for(reader.read(65536), 20))
    return event


@contextlib.asynccontextmanager
async def event_stream(port: int, token: str) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
    """The server-sent events of `/api/events`, decoded: comments skipped, JSON parsed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET",
        target=f"/api/events?token={token}",
        headers=[("host", f"127.0.0.1:{port}"), ("accept", "text/event-stream")],
    )
    writer.write(conn.send(request) + conn.send(h11.EndOfMessage()))
    response = await _next(conn, reader)
    assert isinstance(response, h11.Response) and response.status_code == 200
    assert dict(response.headers)[b"content-type"].startswith(b"text/event-stream")

    async def messages() -> AsyncIterator[dict[str, Any]]:
        buffer = b""
        while True:
            while b"\n\n" not in buffer:
                event = await _next(conn, reader)
                if not isinstance(event, h11.Data):
                    return
                buffer += event.data
            block, buffer = buffer.split(b"\n\n", 1)
            for line in block.split(b"\n"):
                if line.startswith(b"data: "):
                    yield json.loads(line[6:])
                elif line.startswith(b":"):
                    yield {"type": "comment", "text": line[1:].strip().decode()}

    try:
        yield messages()
    finally:
        writer.close()


async def _first(
    messages: AsyncIterator[dict[str, Any]], matches: Any, deadline: float = 20
) -> dict[str, Any]:
    async def find() -> dict[str, Any]:
        async for message in messages:
            if matches(message):
                return message
        raise AssertionError("the stream ended")

    return await asyncio.wait_for(find(), deadline)


def _status_of(member: Member) -> dict[str, Any]:
    return member.node.status()


def _in_sync(member: Member) -> bool:
    peers = _status_of(member)["folders"][0]["peers"]
    return bool(peers) and all(peer["in_sync"] for peer in peers)


# -- the server, over loopback -------------------------------------------------------------------


async def test_the_api_needs_the_token_and_the_right_host(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2) as (a, _b):
        server = await start_web(a.node)
        try:
            port, token = server.port, server.token
            assert server.url == f"http://127.0.0.1:{port}/#token={token}"
            assert len(token) >= 32
            assert (await fetch(port, "/api/status")).status == 401
            assert (await fetch(port, "/api/status", token="wrong")).status == 401
            assert (await fetch(port, "/api/status", token=token + "x")).status == 401
            wrong_host = await fetch(port, "/api/status", token=token, host=f"evil.example:{port}")
            assert wrong_host.status == 421 and b"127.0.0.1" in wrong_host.body
            assert (await fetch(port, "/", host="evil.example")).status == 421
            ok = await fetch(port, "/api/status", token=token)
            assert ok.status == 200 and ok.headers["content-type"] == "application/json"
            assert ok.json()["device"] == str(a.node.device)
            assert (await fetch(port, f"/api/status?token={token}")).status == 200
            assert (
                await fetch(port, "/api/status", token=token, host=f"localhost:{port}")
            ).status == 200
            # The page shell needs no token and holds no data.
            page = await fetch(port, "/")
            assert page.status == 200 and page.headers["content-type"].startswith("text/html")
            assert str(a.node.device)[:7].encode() not in page.body
            assert str(a.folder).encode() not in page.body
            assert b'<script src="/app.js"' in page.body
            policy = page.headers["content-security-policy"]
            assert "default-src 'none'" in policy and "script-src 'self'" in policy
            for reply in (page, ok, wrong_host):
                assert reply.headers["cache-control"] == "no-store"
                assert reply.headers["x-content-type-options"] == "nosniff"
                assert not [h for h in reply.headers if h.startswith("access-control-")]
            script = await fetch(port, "/app.js")
            assert script.status == 200 and b"EventSource" in script.body
        finally:
            await server.close()


async def test_status_shows_the_folder_and_the_peer_in_sync(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2) as (a, b), WebServer(a.node) as server:
        (b.folder / "first.txt").write_bytes(b"hello")
        await eventually((a.folder / "first.txt").exists, what="the file reaches a")
        await eventually(lambda: _in_sync(a), what="a sees its peer in sync")
        reply = await fetch(server.port, "/api/status", token=server.token)
        assert reply.status == 200
        latest = reply.json()
        [folder] = latest["folders"]
        assert folder["path"] == str(a.folder)
        assert folder["state"] == "ok" and folder["root"] == a.root.hex()
        [peer] = folder["peers"]
        assert peer["device"] == str(b.node.device) and peer["in_sync"] is True
        assert peer["found_by"] == "dialled us"
        peers = (await fetch(server.port, "/api/peers", token=server.token)).json()
        assert [(p["folder"], p["device"]) for p in peers] == [(str(a.folder), str(b.node.device))]


async def test_the_event_stream_delivers_a_change_made_on_the_other_node(tmp_path: Path) -> None:
    async with (
        cluster(tmp_path, 2) as (a, b),
        WebServer(a.node) as server,
        event_stream(server.port, server.token) as messages,
    ):
        # The stream starts with the recent events: the node's start is among them.
        started = await _first(messages, lambda m: m["type"] == "node_started")
        assert started["device"] == str(a.node.device) and isinstance(started["time"], float)
        await eventually(lambda: bool(_status_of(a)["folders"][0]["peers"]), what="connected")
        (b.folder / "live.txt").write_bytes(b"from b, live")
        updated = await _first(
            messages, lambda m: m["type"] == "file_updated" and m["path"] == "live.txt"
        )
        assert updated == {**updated, "folder": str(a.folder), "action": "file"}
        recent = (await fetch(server.port, "/api/recent", token=server.token)).json()
        assert recent[0]["type"] == "file_updated" and recent[0]["path"] == "live.txt"


async def test_a_quiet_stream_sends_keepalives_and_ends_when_the_server_closes(
    tmp_path: Path,
) -> None:
    async with cluster(tmp_path, 1) as (a,):
        server = WebServer(a.node, keepalive=0.05)
        await server.start()
        async with event_stream(server.port, server.token) as messages:
            await _first(messages, lambda m: m["type"] == "comment" and m["text"] == "keepalive")
            assert server.connections == 1
            await server.close()
            assert [m async for m in messages if m["type"] != "comment"] == []  # then the end
        assert server.connections == 0


async def test_conflict_copies_are_listed_per_folder(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2) as (a, _b), WebServer(a.node) as server:
        copy = "notes.sync-conflict-20240101-120000-ABCDEFG.txt"
        (a.folder / "notes.txt").write_bytes(b"mine")
        (a.folder / copy).write_bytes(b"theirs")
        store = next(iter(a.node.folders.values())).replica.store
        await eventually(lambda: store.get(copy) is not None, what="the copy is indexed")
        found = (await fetch(server.port, "/api/conflicts", token=server.token)).json()
        assert found == [{"folder": str(a.folder), "count": 1, "paths": [copy]}]
        assert (await fetch(server.port, "/api/conflicts")).status == 401


async def test_bad_requests_get_4xx_and_the_server_keeps_serving(tmp_path: Path) -> None:
    async with cluster(tmp_path, 1) as (a,), WebServer(a.node) as server:
        port = server.port
        host = f"Host: 127.0.0.1:{port}\r\n".encode()
        close = b"Connection: close\r\n\r\n"
        cases = [
            (b"GARBAGE\r\n\r\n", b"400"),
            (b"GET / HTTP/1.1\r\n" + host + b"X: " + b"a" * 20_000 + b"\r\n\r\n", b"431"),
            (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n" + host + b"\r\n", b"431"),
            (b"POST /api/status HTTP/1.1\r\n" + host + b"Content-Length: 99999999\r\n\r\n", b"413"),
            (b"GET / HTTP/1.1\r\n" + host + b"Transfer-Encoding: chunked\r\n\r\n", b"413"),
            (b"GET / HTTP/1.1\r\n" + host + b"Content-Length: x\r\n\r\n", b"400"),
            (b"DELETE /api/status HTTP/1.1\r\n" + host + close, b"405"),
            (b"HEAD / HTTP/1.1\r\n" + host + close, b"405"),
            (b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n" + host + close, b"405"),
            (b"GET /secret HTTP/1.1\r\n" + host + close, b"404"),
            (b"GET /\xff\xfe HTTP/1.1\r\n" + host + close, b"400"),
            (b"GET / HTTP/1.1\r\nHost: evil.example\r\n" + close, b"421"),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"400"),  # h11 refuses two
            (b"GET / HTTP/1.1\r\n\r\n", b"400"),  # HTTP/1.1 without a Host
            (b"GET / HTTP/1.1\r\n" + host + b"Upgrade: websocket\r\n" + close, b"200"),
        ]
        for request, status in cases:
            answer = await raw(port, request)
            assert answer.startswith(b"HTTP/1.1 " + status), (request[:60], answer[:200])
        # Clients that hang up at every stage: mid-request, right after it, mid-stream.
        for cut in (b"GET /api/sta", b"GET / HTTP/1.1\r\n" + host, b""):
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(cut)
            writer.close()
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /api/events?token={server.token} HTTP/1.1\r\n".encode() + host + b"\r\n")
        await _reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()
        await eventually(lambda: server.connections == 0, what="every connection closed")
        assert (await fetch(port, "/api/status", token=server.token)).status == 200


async def test_one_connection_serves_requests_one_after_another(tmp_path: Path) -> None:
    async with cluster(tmp_path, 1) as (a,), WebServer(a.node) as server:
        host = f"Host: 127.0.0.1:{server.port}\r\n".encode()
        auth = f"Authorization: Bearer {server.token}\r\n".encode()
        one = b"GET /api/status HTTP/1.1\r\n" + host + auth + b"\r\n"
        last = b"GET /api/recent HTTP/1.1\r\n" + host + auth + b"Connection: close\r\n\r\n"
        answer = await raw(server.port, one + one + last)
        assert answer.count(b"HTTP/1.1 200 ") == 3


async def test_a_stalled_client_is_dropped(tmp_path: Path) -> None:
    async with cluster(tmp_path, 1) as (a,), WebServer(a.node, request_timeout=0.2) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1")  # ...and nothing more
        assert await asyncio.wait_for(reader.read(), 10) == b""  # the server hung up
        writer.close()
        assert (await fetch(server.port, "/")).status == 200


async def test_connections_beyond_the_limit_are_turned_away(tmp_path: Path) -> None:
    async with cluster(tmp_path, 1) as (a,), WebServer(a.node, max_connections=2) as server:
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        await eventually(lambda: server.connections == 2, what="two connections")
        assert (await raw(server.port, b"")).startswith(b"HTTP/1.1 503 ")
        for _reader, writer in held:
            writer.close()
        await eventually(lambda: server.connections == 0, what="the held connections closed")
        assert (await fetch(server.port, "/api/status", token=server.token)).status == 200


async def test_a_port_in_use_is_a_plain_error(tmp_path: Path) -> None:
    async with cluster(tmp_path, 1) as (a,), WebServer(a.node) as first:
        with pytest.raises(BackerError, match="cannot serve the dashboard"):
            await start_web(a.node, port=first.port)


async def test_the_stream_ends_when_the_node_stops(tmp_path: Path) -> None:
    async with (
        cluster(tmp_path, 1) as (a,),
        WebServer(a.node) as server,
        event_stream(server.port, server.token) as messages,
    ):
        await _first(messages, lambda m: m["type"] == "node_started")
        a.node.stop("test over")
        rest = [m["type"] async for m in messages]  # ...to the end of the stream
        assert "node_stopping" in rest
