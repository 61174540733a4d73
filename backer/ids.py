"""Value types for identities and hashes: content hashes and device IDs.

Owns the BLAKE3 hashing conventions (one domain-separating key per purpose) and the
human-checkable device ID string. Pure: imports nothing above `backer.errors`, no I/O.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import NewType

import blake3

from backer.errors import InvalidKeyError

__all__ = [
    "HASH_SIZE",
    "DeviceId",
    "Hash",
    "hash_bytes",
    "keyed_hasher",
    "secret_tag",
]

HASH_SIZE = 32

Hash = NewType("Hash", bytes)
"""A 32-byte BLAKE3 digest."""


def keyed_hasher(purpose: str) -> blake3.blake3:
    """A fresh BLAKE3 hasher in derive-key mode for one purpose, so that a chunk hash can never
    collide with a tree-node hash or a leaf hash of the same bytes."""
    template = _TEMPLATES.get(purpose)
    if template is None:  # deriving the context key costs more than hashing a small input
        template = _TEMPLATES[purpose] = blake3.blake3(
            derive_key_context=f"backer 2026-11 {purpose} v1"
        )
    return template.copy()


_TEMPLATES: dict[str, blake3.blake3] = {}


def hash_bytes(purpose: str, data: bytes | memoryview) -> Hash:
    hasher = keyed_hasher(purpose)
    hasher.update(data)
    return Hash(hasher.digest())


def secret_tag(purpose: str, secret: bytes, message: bytes, size: int = 16) -> bytes:
    """A short tag over `message` that only holders of `secret` can make or check (a MAC under
    a key derived from `secret` for this purpose): how a folder is named to its members only."""
    key = hash_bytes(f"{purpose} key", secret)
    hasher = keyed_hasher(purpose)
    hasher.update(key)
    hasher.update(message)
    return hasher.digest(length=size)


_B32_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_B32_INDEX = {c: i for i, c in enumerate(_B32_ALPHABET)}
# Characters people misread or mistype when they read an ID aloud: accept them as meant.
_B32_CONFUSIONS = str.maketrans({"0": "O", "1": "I", "8": "B"})
_GROUP = 13  # base32 characters covered by one check character
_DEVICE_ID_CHARS = 56  # 52 base32 characters of a 32-byte digest + 4 check characters


def _luhn32(chars: str) -> str:
    """Luhn mod 32 check character: catches every single-character error and most swaps."""
    factor = 2
    total = 0
    for c in reversed(chars):
        addend = factor * _B32_INDEX[c]
        factor = 1 if factor == 2 else 2
        total += addend // 32 + addend % 32
    return _B32_ALPHABET[(32 - total % 32) % 32]


@dataclass(frozen=True, slots=True)
class DeviceId:
    """A device's identity: BLAKE3 of its Ed25519 public key.

    Written as 56 base32 characters in 8 dash-separated groups, with a check character after
    every 13, so a person can read it aloud and a typo is caught.
    """

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != HASH_SIZE:
            raise InvalidKeyError(f"a device ID is {HASH_SIZE} bytes, got {len(self.raw)}")

    @classmethod
    def from_public_key(cls, public_key: bytes) -> DeviceId:
        return cls(hash_bytes("device id", public_key))

    @classmethod
    def parse(cls, text: str) -> DeviceId:
        cleaned = "".join(text.split()).replace("-", "").upper().translate(_B32_CONFUSIONS)
        if len(cleaned) != _DEVICE_ID_CHARS or any(c not in _B32_INDEX for c in cleaned):
            raise InvalidKeyError(
                f"a device ID has {_DEVICE_ID_CHARS} letters A-Z and digits 2-7; got {text!r}"
            )
        body = []
        for start in range(0, _DEVICE_ID_CHARS, _GROUP + 1):
            group, check = cleaned[start : start + _GROUP], cleaned[start + _GROUP]
            if _luhn32(group) != check:
                raise InvalidKeyError(f"device ID {text!r} has a typo (check character mismatch)")
            body.append(group)
        return cls(base64.b32decode("".join(body) + "====")[:HASH_SIZE])

    @property
    def short(self) -> int:
        """The first 64 bits: the device's key in version vectors."""
        return int.from_bytes(self.raw[:8], "big")

    @property
    def short_str(self) -> str:
        """The first group, as Syncthing shows it in conflict file names."""
        return str(self)[:7]

    def __str__(self) -> str:
        body = base64.b32encode(self.raw).decode("ascii").rstrip("=")
        checked = "".join(
            body[i : i + _GROUP] + _luhn32(body[i : i + _GROUP])
            for i in range(0, len(body), _GROUP)
        )
        return "-".join(checked[i : i + 7] for i in range(0, len(checked), 7))

    def __repr__(self) -> str:
        return f"DeviceId({self.short_str})"
