"""The dashboard's HTTP server: an asyncio pump around one `h11.Connection` per client.

The pump only moves bytes and enforces limits (a request head within `MAX_HEAD` bytes and
`request_timeout` seconds, writes within `WRITE_TIMEOUT`, at most `max_connections` clients);
every decision about a request is `routes.decide`'s. A client that hangs up, stalls or sends
garbage ends its own connection and nothing else. Binds 127.0.0.1 only. Imports node, events
and the web package's routes and views.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Callable
from http import HTTPStatus
from importlib import resources
from types import TracebackType
from typing import Any, Self

import h11

from backer.errors import BackerError
from backer.node.bus import Subscription, stamped_json
from backer.node.node import Node
from backer.web.routes import (
    API_HEADERS,
    PAGE_HEADERS,
    Endpoint,
    Refuse,
    Request,
    decide,
    sse_comment,
    sse_message,
)
from backer.web.views import ConflictLister, peers_view, recent_changes

__all__ = ["LOOPBACK", "Token", "WebServer", "start_web"]

_log = logging.getLogger(__name__)

Token = str | Callable[[], str]  # the access token, or where to read it (the node home's file)

LOOPBACK = "127.0.0.1"
MAX_HEAD = 8 * 1024  # bytes of request line and headers; larger is refused with 431
MAX_CONNECTIONS = 32  # clients served at once (a browser tab uses about 2); more get 503
REQUEST_TIMEOUT = 15.0  # seconds for a request head to arrive, and for an idle keep-alive
WRITE_TIMEOUT = 20.0  # seconds a client may take to accept what we send
KEEPALIVE = 15.0  # seconds between comments on a quiet event stream
READ_SIZE = 16 * 1024
CLOSE_GRACE = 1.0  # seconds `close()` lets event streams send their last chunk

_STATIC = {
    Endpoint.PAGE: ("index.html", "text/html; charset=utf-8"),
    Endpoint.SCRIPT: ("app.js", "text/javascript; charset=utf-8"),
    Endpoint.STYLE: ("app.css", "text/css; charset=utf-8"),
}
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 31\r\nconnection: close\r\n\r\ntoo many connections; try again"
)


async def start_web(
    node: Node, *, host: str = LOOPBACK, port: int = 0, token: Token | None = None
) -> WebServer:
    """Serve `node`'s dashboard on 127.0.0.1 (port 0: a free one); `server.url` holds the
    address with the access token (`token`: fixed, or read anew for each request, so that a
    token rotated on disk takes effect at once). `await server.close()` stops it."""
    server = WebServer(node, host=host, port=port, token=token)
    await server.start()
    return server


class WebServer:
    def __init__(
        self,
        node: Node,
        *,
        host: str = LOOPBACK,
        port: int = 0,
        token: Token | None = None,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
        keepalive: float = KEEPALIVE,
    ) -> None:
        if host != LOOPBACK:
            raise BackerError(
                f"the dashboard serves on {LOOPBACK} only, not {host}: from another machine, "
                f"tunnel to it (ssh -L PORT:{LOOPBACK}:PORT this-host)"
            )
        if not 0 <= port <= 65535:
            raise BackerError(f"no such port: {port}")
        self.node = node
        self._token: Token = token or secrets.token_urlsafe(24)
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.keepalive = keepalive
        self._wanted_port = port
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._streams: set[Subscription] = set()
        self._tasks: asyncio.TaskGroup | None = None
        self._owner: asyncio.Task[None] | None = None
        self._accepting = asyncio.Event()
        self._stopping = asyncio.Event()
        self._conflicts = ConflictLister()
        self._static = {
            endpoint: (resources.files("backer.web").joinpath("static", name).read_bytes(), kind)
            for endpoint, (name, kind) in _STATIC.items()
        }

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the server first"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def token(self) -> str:
        return self._token if isinstance(self._token, str) else self._token()

    @property
    def base_url(self) -> str:
        """The address alone, safe to show (in `backer status`): no token in it."""
        return f"http://{LOOPBACK}:{self.port}/"

    @property
    def url(self) -> str:
        """The dashboard's address with the token in the fragment (never sent to the server,
        never in a Referer); the page hands it over in an Authorization header."""
        return f"{self.base_url}#token={self.token}"

    @property
    def connections(self) -> int:
        return len(self._handlers)

    async def start(self) -> None:
        self._owner = asyncio.create_task(self._own_connections())
        await self._accepting.wait()  # the connections' task group is ready before any arrives
        try:
            self._server = await asyncio.start_server(
                self._on_connection, LOOPBACK, self._wanted_port
            )
        except OSError as exc:
            await self.close()
            raise BackerError(
                f"cannot serve the dashboard on {LOOPBACK}:{self._wanted_port}: "
                f"{exc.strerror or exc}; pick another port or 0 for any"
            ) from exc

    async def close(self) -> None:
        """Stop accepting, end every open connection (event streams included), and return
        when they are gone."""
        if self._server is not None:
            self._server.close()
        self._stopping.set()
        if self._owner is not None:
            await self._owner
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # -- one connection ----------------------------------------------------------------------

    async def _own_connections(self) -> None:
        """Every connection's task belongs to this group; `close()` ends them all."""
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                self._accepting.set()
                await self._stopping.wait()
                for subscription in list(self._streams):
                    subscription.close()  # event streams end with their last chunk
                if self._handlers:
                    await asyncio.wait(self._handlers, timeout=CLOSE_GRACE)
                for task in list(self._handlers):
                    task.cancel()
        finally:
            self._tasks = None
            self._accepting.set()

    def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tasks is None or len(self._handlers) >= self.max_connections:
            writer.write(_BUSY)  # the transport sends it before it closes
            writer.close()
            return
        task = self._tasks.create_task(self._serve(reader, writer))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._converse(reader, writer)
        except (ConnectionError, TimeoutError, OSError):
            pass  # the client left or stalled: its connection ends, nothing else does
        except h11.LocalProtocolError:  # our bug, in this connection only: say so, serve on
            _log.exception("dashboard connection ended by an HTTP error of ours")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError, OSError):
                await asyncio.wait_for(writer.wait_closed(), WRITE_TIMEOUT)

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Requests one after another on a kept-alive connection, until either side closes."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        while True:
            try:
                async with asyncio.timeout(self.request_timeout):
                    event = await _next_event(conn, reader)
                    if not isinstance(event, h11.Request):
                        return  # closed (or an idle connection timed out)
                    request = _request(event)
                    if not request.has_body:
                        await _next_event(conn, reader)  # its EndOfMessage, already read
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    status = exc.error_status_hint
                    refusal = Refuse(status=status, reason="malformed request", close=True)
                    await self._refuse(conn, writer, refusal, head=False)
                return
            except TimeoutError:
                return
            keep = await self._respond(conn, reader, writer, request)
            if not keep or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _respond(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: Request,
    ) -> bool:
        """Answer one request; False when the connection must close after it."""
        token = (
            self._token if isinstance(self._token, str) else await asyncio.to_thread(self._token)
        )
        decision = decide(request, token=token, port=self.port)
        if isinstance(decision, Refuse):
            await self._refuse(conn, writer, decision, head=request.method == "HEAD")
            return not decision.close
        endpoint = decision.endpoint
        if endpoint in self._static:
            body, kind = self._static[endpoint]
            await _send(conn, writer, 200, kind, body, headers=PAGE_HEADERS)
        elif endpoint is Endpoint.EVENTS:
            await self._stream_events(conn, reader, writer)
            return False
        else:
            await _send(conn, writer, 200, "application/json", await self._json(endpoint))
        return True

    async def _json(self, endpoint: Endpoint) -> bytes:
        data: Any
        if endpoint is Endpoint.STATUS:
            data = self.node.status()
        elif endpoint is Endpoint.PEERS:
            data = peers_view(self.node.status())
        elif endpoint is Endpoint.RECENT:
            data = recent_changes(self.node.bus.recent)
        elif endpoint is Endpoint.CONFLICTS:
            data = await self._conflicts.list(self.node)
        else:
            raise AssertionError(f"no JSON view for {endpoint}")
        return json.dumps(data, separators=(",", ":")).encode()

    async def _refuse(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, r: Refuse, *, head: bool
    ) -> None:
        """Send a refusal (its headers only when it answers a HEAD request)."""
        headers = (*API_HEADERS, *r.headers, *((("connection", "close"),) if r.close else ()))
        body = b"" if head else (r.reason + "\n").encode()
        await _send(conn, writer, r.status, "text/plain; charset=utf-8", body, headers=headers)

    # -- the event stream ----------------------------------------------------------------------

    async def _stream_events(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """The recent events, then live ones as they happen, until the node stops, the client
        leaves or the server closes. The subscription and the snapshot of `recent` are taken
        together, so nothing is missed or repeated between them."""
        subscription = self.node.bus.subscribe(limit=2048)
        backlog = list(self.node.bus.recent)
        self._streams.add(subscription)
        try:
            headers = [
                ("content-type", "text/event-stream; charset=utf-8"),
                *API_HEADERS,
                ("connection", "close"),
            ]
            response = h11.Response(status_code=200, headers=headers, reason=b"OK")
            await _write(writer, conn.send(response))
            first = b"retry: 2000\n\n" + b"".join(sse_message(stamped_json(s)) for s in backlog)
            await _write(writer, conn.send(h11.Data(data=first)))
            async with asyncio.TaskGroup() as tasks:
                gone = tasks.create_task(_until_closed(reader))
                pump = tasks.create_task(self._pump_events(conn, writer, subscription))
                await asyncio.wait([gone, pump], return_when=asyncio.FIRST_COMPLETED)
                gone.cancel()
                pump.cancel()
        finally:
            self._streams.discard(subscription)
            subscription.close()

    async def _pump_events(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, subscription: Subscription
    ) -> None:
        dropped = 0
        try:
            while True:
                try:
                    stamped = await asyncio.wait_for(subscription.next_stamped(), self.keepalive)
                except TimeoutError:
                    chunk = sse_comment("keepalive")
                except StopAsyncIteration:  # the node stopped: end the stream cleanly
                    await _write(writer, conn.send(h11.EndOfMessage()))
                    return
                else:
                    chunk = sse_message(stamped_json(stamped))
                    if subscription.dropped != dropped:  # we fell behind: say so
                        lost = subscription.dropped - dropped
                        chunk = sse_message({"type": "dropped", "count": lost}) + chunk
                        dropped = subscription.dropped
                await _write(writer, conn.send(h11.Data(data=chunk)))
        except (ConnectionError, TimeoutError, OSError):
            return


# Helpers.


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(READ_SIZE))  # b"" at the end: ConnectionClosed


async def _until_closed(reader: asyncio.StreamReader) -> None:
    """Return when the client hangs up (anything it sends meanwhile is dropped)."""
    with contextlib.suppress(ConnectionError, OSError):
        while await reader.read(READ_SIZE):
            pass


def _request(event: h11.Request) -> Request:
    headers = tuple(
        (name.decode("ascii", "replace"), value.decode("latin-1")) for name, value in event.headers
    )
    declared = {name for name, _ in headers}
    lengths = [value for name, value in headers if name == "content-length"]
    has_body = "transfer-encoding" in declared or any(v.strip() != "0" for v in lengths)
    return Request(
        method=event.method.decode("ascii", "replace"),
        target=event.target.decode("latin-1"),
        headers=headers,
        has_body=has_body,
    )


async def _send(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    status: int,
    kind: str,
    body: bytes,
    *,
    headers: tuple[tuple[str, str], ...] = API_HEADERS,
) -> None:
    head = [("content-type", kind), ("content-length", str(len(body))), *headers]
    data = conn.send(h11.Response(status_code=status, headers=head, reason=_phrase(status)))
    data += conn.send(h11.Data(data=body)) if body else b""
    data += conn.send(h11.EndOfMessage())
    await _write(writer, data)


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


async def _write(writer: asyncio.StreamWriter, data: bytes | None) -> None:
    if data:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
