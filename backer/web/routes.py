"""The dashboard's HTTP decisions, without sockets: which request is served, which is refused
and why (wrong Host, foreign Origin, no token, a body, an unknown path), the headers every answer
carries, and the bytes of a server-sent event.

    decide(Request(method="GET", target="/api/status", headers=...), token=t, port=p)
        -> Serve(endpoint=Endpoint.STATUS) | Refuse(status=401, ...)

Pure (STYLE.md 1): no event loop, no sockets, no clock; the pump in `backer.web.server` asks and
acts. Imports nothing from backer.
"""

from __future__ import annotations

import enum
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "API_HEADERS",
    "MAX_TARGET",
    "PAGE_HEADERS",
    "Endpoint",
    "Refuse",
    "Request",
    "Serve",
    "allowed_hosts",
    "decide",
    "sse_comment",
    "sse_message",
    "token_matches",
]

MAX_TARGET = 2048  # bytes of path and query; the API's are a few dozen

# What the page may load: only itself (script and style are separate files, so no inline code
# runs), and talk only to its own origin.
_PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_COMMON: tuple[tuple[str, str], ...] = (
    ("cache-control", "no-store"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
)
PAGE_HEADERS: tuple[tuple[str, str], ...] = (*_COMMON, ("content-security-policy", _PAGE_POLICY))
API_HEADERS: tuple[tuple[str, str], ...] = (
    *_COMMON,
    ("content-security-policy", "default-src 'none'; frame-ancestors 'none'"),
)


class Endpoint(enum.Enum):
    PAGE = "/"
    SCRIPT = "/app.js"
    STYLE = "/app.css"
    STATUS = "/api/status"
    PEERS = "/api/peers"
    EVENTS = "/api/events"
    CONFLICTS = "/api/conflicts"
    RECENT = "/api/recent"

    @property
    def needs_token(self) -> bool:
        """The page shell and its script and style hold no data; everything else does."""
        return self.value.startswith("/api/")


_BY_PATH = {endpoint.value: endpoint for endpoint in Endpoint}
_BY_PATH["/index.html"] = Endpoint.PAGE


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """What the pump read: the request line and headers (names lower-case), and whether a
    body was announced (this server takes none)."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()
    has_body: bool = False

    def header_values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]


@dataclass(frozen=True, slots=True, kw_only=True)
class Serve:
    endpoint: Endpoint


@dataclass(frozen=True, slots=True, kw_only=True)
class Refuse:
    """An error answer: the status, a plain-text reason (never data, never the token), extra
    headers, and whether the connection must close after it."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False

    def __post_init__(self) -> None:
        if not 400 <= self.status <= 599:
            raise ValueError(f"a refusal is a 4xx or 5xx status, not {self.status}")


def allowed_hosts(port: int) -> frozenset[str]:
    """The Host values a request may carry: only the loopback names of our own port, so a
    DNS-rebound name (evil.example resolving to 127.0.0.1) is refused."""
    return frozenset({f"127.0.0.1:{port}", f"localhost:{port}"})


def token_matches(given: str | None, token: str) -> bool:
    """Constant-time comparison of a presented token with ours."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8"))


def decide(request: Request, *, token: str, port: int) -> Serve | Refuse:
    """Serve or refuse one request. Checks run cheapest-first and every refusal says why."""
    if request.has_body:
        return Refuse(status=413, reason="this server takes no request bodies", close=True)
    hosts = request.header_values("host")
    if len(hosts) != 1 or hosts[0].lower() not in allowed_hosts(port):
        return Refuse(
            status=421,
            reason=f"wrong Host header: open the dashboard as http://127.0.0.1:{port}/",
        )
    origins = request.header_values("origin")
    if origins and any(o.lower() not in _origins(port) for o in origins):
        return Refuse(status=403, reason="cross-origin requests are refused")
    if any(site.lower() == "cross-site" for site in request.header_values("sec-fetch-site")):
        return Refuse(status=403, reason="cross-site requests are refused")
    if request.method != "GET":
        return Refuse(status=405, reason="only GET is served", headers=(("allow", "GET"),))
    if len(request.target) > MAX_TARGET or not request.target.startswith("/"):
        return Refuse(status=414 if len(request.target) > MAX_TARGET else 400, reason="bad target")
    parts = urlsplit(request.target)
    endpoint = _BY_PATH.get(parts.path)
    if endpoint is None:
        return Refuse(status=404, reason="not found")
    if endpoint.needs_token and not token_matches(_presented(request, parts.query), token):
        return Refuse(
            status=401,
            reason="a token is needed: open the URL `backer open` prints",
            headers=(("www-authenticate", 'Bearer realm="backer"'),),
        )
    return Serve(endpoint=endpoint)


def sse_message(data: Mapping[str, Any]) -> bytes:
    """One server-sent event carrying `data` as a line of JSON."""
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def sse_comment(text: str) -> bytes:
    """A comment line: ignored by EventSource, keeps proxies and idle timers from closing."""
    return b": " + text.replace("\n", " ").replace("\r", " ").encode() + b"\n\n"


# Helpers.


def _origins(port: int) -> frozenset[str]:
    return frozenset(f"http://{host}" for host in allowed_hosts(port))


def _presented(request: Request, query: str) -> str | None:
    """The token from `Authorization: Bearer ...`, else from `?token=` (EventSource cannot
    send headers). A request presenting several is refused."""
    found: list[str] = []
    for value in request.header_values("authorization"):
        scheme, _, credentials = value.partition(" ")
        if scheme.lower() == "bearer":
            found.append(credentials.strip())
    try:
        fields = parse_qs(query, keep_blank_values=True, max_num_fields=8)
    except ValueError:  # more fields than any page of ours sends
        return None
    found.extend(fields.get("token", []))
    return found[0] if len(found) == 1 else None
