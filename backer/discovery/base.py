"""What every way of finding peers shares: the announcement a device makes on a LAN, the
tokens that name its folders to members only, and what a finder reports.

An announcement carries the device ID, the port it listens on, a fresh nonce, and for each
folder it hosts a short token: a MAC keyed by the folder's discovery ID over the nonce. A member
of a folder recomputes the token and finds its folder; anyone else sees random bytes that change
with every announcement, so it can neither tell nor link the folders. A discovered address is
only a hint: whoever answers there must still prove the folder key in the handshake.

Pure: imports errors, ids and keys only.
"""

from __future__ import annotations

import base64
import hmac
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import nacl.signing

from backer.errors import BackerError, DecodeError
from backer.ids import HASH_SIZE, DeviceId, secret_tag
from backer.keys import FolderKey

__all__ = [
    "ANNOUNCE_VERSION",
    "MAX_FOLDERS_ANNOUNCED",
    "NONCE_SIZE",
    "TOKEN_SIZE",
    "Announcement",
    "Context",
    "DiscoveryError",
    "Finder",
    "Found",
    "OnFound",
    "decode_beacon",
    "encode_beacon",
    "from_txt",
    "to_txt",
]

ANNOUNCE_VERSION = 1
NONCE_SIZE = 8
TOKEN_SIZE = 8
MAX_FOLDERS_ANNOUNCED = 12  # keeps an mDNS TXT record under ~200 bytes (LIBRARIES.md)
_BEACON_MAGIC = b"BKRB"
_BEACON_HEAD = struct.Struct(">4sBH32s8sB")  # magic, version, port, device, nonce, token count


@dataclass(frozen=True, slots=True, kw_only=True)
class Announcement:
    device: bytes  # the 32-byte device ID
    port: int  # where it accepts connections, on the address the announcement came from
    nonce: bytes
    tokens: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if len(self.device) != HASH_SIZE:
            raise DecodeError("a device ID is 32 bytes")
        if not 1 <= self.port <= 65535:
            raise DecodeError(f"port {self.port} out of range")
        if len(self.nonce) != NONCE_SIZE:
            raise DecodeError(f"the nonce is {NONCE_SIZE} bytes")
        if len(self.tokens) > MAX_FOLDERS_ANNOUNCED or any(
            len(t) != TOKEN_SIZE for t in self.tokens
        ):
            raise DecodeError(f"at most {MAX_FOLDERS_ANNOUNCED} tokens of {TOKEN_SIZE} bytes")

    @classmethod
    def make(
        cls, device: bytes, port: int, discovery_ids: Iterable[bytes], nonce: bytes
    ) -> Announcement:
        """Our announcement for the folders `discovery_ids` (at most MAX_FOLDERS_ANNOUNCED)."""
        folders = list(discovery_ids)[:MAX_FOLDERS_ANNOUNCED]
        return cls(
            device=device,
            port=port,
            nonce=nonce,
            tokens=tuple(_token(folder, nonce) for folder in folders),
        )

    def folders_shared(self, discovery_ids: Iterable[bytes]) -> list[bytes]:
        """Which of `discovery_ids` this announcement names."""
        return [
            folder
            for folder in discovery_ids
            if any(hmac.compare_digest(_token(folder, self.nonce), t) for t in self.tokens)
        ]


OnFound = Callable[["Found"], None]


class DiscoveryError(BackerError):
    """A finder cannot start: its sockets cannot be opened, or the discovery library refused.
    Raised by `Finder.start()`, translated from OSError and the library's own errors; the node
    can go on without that finder."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Context:
    """What a finder needs from the node: who we are, where we listen, which folders."""

    device_key: nacl.signing.SigningKey
    host: str  # the listen host; "0.0.0.0" or "::" means every interface
    port: int  # the listen port (TCP)
    folders: tuple[FolderKey, ...]
    on_found: OnFound

    @property
    def device(self) -> bytes:
        return DeviceId.from_public_key(bytes(self.device_key.verify_key)).raw

    @property
    def discovery_ids(self) -> list[bytes]:
        return [folder.discovery_id for folder in self.folders]


@dataclass(frozen=True, slots=True, kw_only=True)
class Found:
    """A peer of one of our folders, found at `addresses`, by `via`."""

    folder: bytes  # the folder's discovery ID
    device: bytes
    addresses: tuple[str, ...]
    via: str  # "mdns", "beacon", "dht"


class Finder(Protocol):
    """One way of finding peers. `start()` begins announcing our folders and reporting peers
    through the `OnFound` callback it was made with; `stop()` says goodbye where the method has
    one (mDNS) and releases everything."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


# -- the two encodings ------------------------------------------------------------------------


def to_txt(announcement: Announcement) -> dict[str, str]:
    """mDNS TXT properties (the port travels in the SRV record)."""
    return {
        "v": str(ANNOUNCE_VERSION),
        "id": _b64(announcement.device),
        "n": _b64(announcement.nonce),
        "t": _b64(b"".join(announcement.tokens)),
    }


def from_txt(
    properties: Mapping[bytes, bytes | None] | Mapping[str, str | None], port: int
) -> Announcement:
    """The announcement in a TXT record; DecodeError for anything else (a foreign service, an
    unknown version, bad lengths)."""
    values = {_text(k): _text(v) if v is not None else "" for k, v in properties.items()}
    if values.get("v") != str(ANNOUNCE_VERSION):
        raise DecodeError(f"announcement version {values.get('v')!r}")
    tokens = _unb64(values.get("t", ""))
    if len(tokens) % TOKEN_SIZE:
        raise DecodeError("tokens are not whole")
    return Announcement(
        device=_unb64(values.get("id", "")),
        port=port,
        nonce=_unb64(values.get("n", "")),
        tokens=tuple(tokens[i : i + TOKEN_SIZE] for i in range(0, len(tokens), TOKEN_SIZE)),
    )


def encode_beacon(announcement: Announcement) -> bytes:
    return _BEACON_HEAD.pack(
        _BEACON_MAGIC,
        ANNOUNCE_VERSION,
        announcement.port,
        announcement.device,
        announcement.nonce,
        len(announcement.tokens),
    ) + b"".join(announcement.tokens)


def decode_beacon(data: bytes) -> Announcement:
    if len(data) < _BEACON_HEAD.size:
        raise DecodeError("a beacon too short")
    magic, version, port, device, nonce, count = _BEACON_HEAD.unpack_from(data)
    if magic != _BEACON_MAGIC or version != ANNOUNCE_VERSION:
        raise DecodeError("not a backer beacon of this version")
    body = data[_BEACON_HEAD.size :]
    if count > MAX_FOLDERS_ANNOUNCED or len(body) != count * TOKEN_SIZE:
        raise DecodeError("a beacon's tokens do not match its count")
    tokens = tuple(body[i : i + TOKEN_SIZE] for i in range(0, len(body), TOKEN_SIZE))
    return Announcement(device=device, port=port, nonce=nonce, tokens=tokens)


def _token(discovery_id: bytes, nonce: bytes) -> bytes:
    return secret_tag("lan announcement", discovery_id, nonce, TOKEN_SIZE)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError as exc:
        raise DecodeError(f"bad base64: {exc}") from None


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
