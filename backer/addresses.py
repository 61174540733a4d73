"""Network addresses as users and peers write them: `host:port`, `[v6addr]:port` for IPv6.

Owns the one parser of that form, used by the config, the wire messages and the mesh. Pure;
imports only errors.
"""

from __future__ import annotations

from backer.errors import InvalidAddressError

__all__ = ["MAX_ADDRESS_BYTES", "format_address", "parse_address"]

MAX_ADDRESS_BYTES = 261  # a 253-byte host name, the brackets, a colon and five digits


def parse_address(text: str, *, allow_any_host: bool = False) -> tuple[str, int]:
    """`(host, port)` of `text`; InvalidAddressError if it is not `host:port`.

    With `allow_any_host`, an empty host (`:port`) is accepted: on the wire it means "the host
    you see this connection come from"."""
    if not isinstance(text, str) or len(text.encode("utf-8", "replace")) > MAX_ADDRESS_BYTES:
        raise InvalidAddressError(f"not an address: {text!r}")
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host:
            raise InvalidAddressError(f"an empty IPv6 address in {text!r}")
    elif ":" in host:
        raise InvalidAddressError(f"an IPv6 address needs brackets ('[v6addr]:port'): {text!r}")
    if (
        not colon
        or not (host or allow_any_host)
        or not port.isascii()
        or not port.isdigit()
        or int(port) > 65535
        or any(c.isspace() or c in "/@" or not c.isprintable() for c in host)
    ):
        raise InvalidAddressError(f"an address looks like 'host:port', not {text!r}")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    """The `host:port` text of an address (brackets around an IPv6 host)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
