"""Folder keys: their tiers, their string form and the one-way derivations made from them.

Owns the folder-key format (bech32m, BIP-350 checksum, one human-readable part per tier) and the
BLAKE3 derive-key contexts for every folder secret: signing seed, read secret, handshake PSK,
discovery ID and the public folder ID. Pure: no I/O, no clock; imports only `backer.errors`
(never `backer.config` or anything above it).

    read-write secret --+--> folder signing key (Ed25519) --> verify key --+--> discovery ID
                        |                                               +--> folder ID
                        +--> read secret --> handshake PSK

A read-only key carries the read secret and the verify key, so it derives the same PSK,
discovery ID and folder ID as its read-write parent, but never the signing key. Only the folder
ID is public; the discovery ID is a members' secret (see `FolderKey.discovery_id`).
"""

from __future__ import annotations

import base64
import enum
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import blake3
import nacl.bindings
import nacl.signing

from backer.errors import InvalidKeyError

__all__ = [
    "FORMAT_VERSION",
    "FolderKey",
    "Tier",
]

FORMAT_VERSION = 0
"""The format-version symbol that opens the data part of every key string we write."""


class Tier(enum.Enum):
    """What a folder key admits its holder to do."""

    READ_WRITE = "read-write"
    READ_ONLY = "read-only"
    ENCRYPTED = "encrypted"
    """Reserved: stores and relays ciphertext it cannot read. The format names it; this version
    of backer neither makes nor accepts such keys."""


_SECRET_SIZE = 32
_VERIFY_KEY_SIZE = 32
_FOLDER_ID_CHARS = 10

# One fixed context per purpose: changing any of these changes every key's derived values.
_CTX_SIGNING_SEED = "backer 2026-11 folder signing seed v1"
_CTX_READ_SECRET = "backer 2026-11 folder read secret v1"
_CTX_HANDSHAKE_PSK = "backer 2026-11 folder handshake psk v1"
_CTX_DISCOVERY_ID = "backer 2026-11 folder discovery id v1"
_CTX_FOLDER_ID = "backer 2026-11 folder display id v1"

_HRP = {Tier.READ_WRITE: "bkw", Tier.READ_ONLY: "bkr", Tier.ENCRYPTED: "bke"}
_TIER_BY_HRP = {hrp: tier for tier, hrp in _HRP.items()}
_PAYLOAD_SIZE = {Tier.READ_WRITE: _SECRET_SIZE, Tier.READ_ONLY: _SECRET_SIZE + _VERIFY_KEY_SIZE}

_ENCRYPTED_UNSUPPORTED = "encrypted keys are not supported by this version of backer yet"
_TYPO = "this folder key has a typo: check it was copied whole"
_NEWER = "this key is for a newer version of backer: upgrade backer to use it"
_NOT_A_KEY = (
    "this is not a backer folder key: those start with bkw1 (read-write) or bkr1 (read-only)"
)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class FolderKey:
    """A folder key of one tier.

    `material` is the payload of the key string: the 32-byte folder secret for a read-write
    key; the read secret followed by the folder verify key (32 + 32 bytes) for a read-only key.
    Build one with `generate()` or `parse()`; the constructor validates what it is given.
    `str(key)` is the secret key string; `repr(key)` never shows a secret.
    """

    tier: Tier
    material: bytes
    _seed: bytes | None = field(init=False, compare=False)
    _read_secret: bytes = field(init=False, compare=False)
    _verify_key: bytes = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if self.tier is Tier.ENCRYPTED:
            raise InvalidKeyError(_ENCRYPTED_UNSUPPORTED)
        expected = _PAYLOAD_SIZE[self.tier]
        if not isinstance(self.material, bytes) or len(self.material) != expected:
            raise InvalidKeyError(f"a {self.tier.value} folder key holds {expected} bytes")
        seed: bytes | None
        if self.tier is Tier.READ_WRITE:
            seed = _derive(_CTX_SIGNING_SEED, self.material)
            read_secret = _derive(_CTX_READ_SECRET, self.material)
            verify_key = bytes(nacl.signing.SigningKey(seed).verify_key)
        else:
            seed = None
            read_secret = self.material[:_SECRET_SIZE]
            verify_key = self.material[_SECRET_SIZE:]
            # Refuses small-order and off-curve points, so a crafted key cannot carry a verify
            # key that every forged signature would satisfy.
            if not nacl.bindings.crypto_core_ed25519_is_valid_point(verify_key):
                raise InvalidKeyError(
                    "this read-only key is damaged (its verify key is not a valid public key)"
                )
        object.__setattr__(self, "_seed", seed)
        object.__setattr__(self, "_read_secret", read_secret)
        object.__setattr__(self, "_verify_key", verify_key)

    @classmethod
    def generate(cls) -> FolderKey:
        """A new read-write key for a new folder, from the operating system's random source."""
        return cls(tier=Tier.READ_WRITE, material=os.urandom(_SECRET_SIZE))

    @classmethod
    def parse(cls, text: str) -> FolderKey:
        """Read a key string as printed by `str()`. Whitespace around (or inside, from a line
        wrapped by a mail client) is ignored; all-uppercase is accepted, mixed case is not."""
        compact = "".join(text.split())
        if not compact:
            raise InvalidKeyError("the folder key is empty")
        lowered = compact.lower()
        if compact not in (lowered, compact.upper()):
            raise InvalidKeyError(
                "this folder key mixes upper- and lowercase letters: a key is all one case, "
                "so check it was not retyped or changed"
            )
        hrp, separator, data_part = lowered.rpartition("1")
        if not separator or not hrp.startswith("bk"):
            raise InvalidKeyError(_NOT_A_KEY)
        for char in data_part:
            if char not in _CHARSET_INDEX:
                raise InvalidKeyError(
                    f"this folder key has a typo ({char!r} never appears in a key): "
                    "check it was copied whole"
                )
        if len(data_part) < 1 + _CHECKSUM_LEN:
            raise InvalidKeyError("this folder key is too short: check it was copied whole")
        symbols = [_CHARSET_INDEX[char] for char in data_part]
        if not _checksum_ok(hrp, symbols):
            raise InvalidKeyError(_TYPO)
        tier = _TIER_BY_HRP.get(hrp)
        if tier is None:
            raise InvalidKeyError(f"{_NEWER} (it is of an unknown kind, {hrp!r})")
        if tier is Tier.ENCRYPTED:
            raise InvalidKeyError(_ENCRYPTED_UNSUPPORTED)
        version, payload = symbols[0], symbols[1:-_CHECKSUM_LEN]
        if version != FORMAT_VERSION:
            raise InvalidKeyError(_NEWER)
        material = _from_5bit(payload, _PAYLOAD_SIZE[tier])
        if material is None:
            raise InvalidKeyError(
                f"this {tier.value} folder key has the wrong length: check it was copied whole"
            )
        return cls(tier=tier, material=material)

    def __str__(self) -> str:
        hrp = _HRP[self.tier]
        data = [FORMAT_VERSION, *_to_5bit(self.material)]
        data += _checksum(hrp, data)
        return hrp + "1" + "".join(_CHARSET[symbol] for symbol in data)

    def __repr__(self) -> str:
        return f"FolderKey({self.tier.value}, folder_id={self.folder_id})"

    @property
    def can_write(self) -> bool:
        return self.tier is Tier.READ_WRITE

    def read_only(self) -> FolderKey:
        """The read-only key of the same folder (itself, for a read-only key)."""
        if self.tier is Tier.READ_ONLY:
            return self
        return FolderKey(tier=Tier.READ_ONLY, material=self._read_secret + self._verify_key)

    def keys_to_give_out(self) -> list[FolderKey]:
        """Every key this holder can share, most powerful first."""
        if self.tier is Tier.READ_WRITE:
            return [self, self.read_only()]
        return [self]

    @property
    def signing_key(self) -> nacl.signing.SigningKey:
        """The folder's Ed25519 signing key: only a read-write key has it."""
        if self._seed is None:
            raise InvalidKeyError("a read-only key cannot sign")
        return nacl.signing.SigningKey(self._seed)

    @property
    def verify_key(self) -> bytes:
        """The folder's Ed25519 public key (32 bytes): checks every signed version."""
        return self._verify_key

    @property
    def read_secret(self) -> bytes:
        """The secret every member shares, read-only ones included (32 bytes)."""
        return self._read_secret

    @property
    def psk(self) -> bytes:
        """The Noise handshake pre-shared key (32 bytes): proves membership without showing it."""
        return _derive(_CTX_HANDSHAKE_PSK, self._read_secret)

    @property
    def discovery_id(self) -> bytes:
        """The members' name for the folder (32 bytes), kept secret like the key itself: it
        reveals no key, but whoever holds it can start a handshake far enough to learn a
        responder's device key (Noise XXpsk3 proves the PSK only in message 3). It is never sent
        or shown: the DHT, the LAN and connection prefaces carry one-way tags of it."""
        return _derive(_CTX_DISCOVERY_ID, self._verify_key)

    @property
    def folder_id(self) -> str:
        """A short public name of the folder for display (10 base32 characters, 50 bits)."""
        digest = _derive(_CTX_FOLDER_ID, self._verify_key)
        return base64.b32encode(digest).decode("ascii")[:_FOLDER_ID_CHARS]


def _derive(context: str, key_material: bytes) -> bytes:
    return blake3.blake3(key_material, derive_key_context=context).digest()


# --- bech32m (BIP-350) -----------------------------------------------------------------------
# A string is HRP + "1" + data symbols + 6 checksum symbols, each symbol 5 bits written with the
# alphabet below. The checksum is a BCH code over GF(32): the polymod of the expanded HRP, the data
# and the checksum must equal the bech32m constant.
#
# bech32 caps strings at 90 characters, the length up to which any error in at most 4 characters
# is guaranteed to be caught. A read-only key is 114 characters, so we do not enforce the cap.
# Past it a single substitution, or any run of errors within 6 adjacent symbols (an adjacent
# swap), is still always caught; other errors slip through with probability about 2^-30.

_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_CHARSET_INDEX = {char: value for value, char in enumerate(_CHARSET)}
_CHECKSUM_LEN = 6
_BECH32M_CONST = 0x2BC830A3
_POLYMOD_GEN = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


def _polymod(symbols: Sequence[int]) -> int:
    residue = 1
    for symbol in symbols:
        top = residue >> 25
        residue = ((residue & 0x1FFFFFF) << 5) ^ symbol
        for bit, generator in enumerate(_POLYMOD_GEN):
            if top >> bit & 1:
                residue ^= generator
    return residue


def _expand_hrp(hrp: str) -> list[int]:
    """The HRP as checksum input: every character's high bits, a zero, then its low bits."""
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _checksum(hrp: str, data: Sequence[int]) -> list[int]:
    residue = _polymod([*_expand_hrp(hrp), *data, *[0] * _CHECKSUM_LEN]) ^ _BECH32M_CONST
    return [residue >> 5 * (_CHECKSUM_LEN - 1 - i) & 31 for i in range(_CHECKSUM_LEN)]


def _checksum_ok(hrp: str, data_with_checksum: Sequence[int]) -> bool:
    return _polymod([*_expand_hrp(hrp), *data_with_checksum]) == _BECH32M_CONST


def _to_5bit(data: bytes) -> list[int]:
    """Bytes as 5-bit symbols, most significant first, zero-padded at the end."""
    bits = 8 * len(data)
    count = -(-bits // 5)
    number = int.from_bytes(data, "big") << (5 * count - bits)
    return [number >> 5 * (count - 1 - i) & 31 for i in range(count)]


def _from_5bit(symbols: Sequence[int], size: int) -> bytes | None:
    """The `size` bytes that `symbols` encode, or None if the count or the padding is wrong."""
    if len(symbols) != -(-8 * size // 5):
        return None
    number = 0
    for symbol in symbols:
        number = number << 5 | symbol
    padding = 5 * len(symbols) - 8 * size
    if number & ((1 << padding) - 1):
        return None
    return (number >> padding).to_bytes(size, "big")
