"""Noise_XXpsk3_25519_{ChaChaPoly,AESGCM}_BLAKE2b, sans-IO, from pynacl primitives.

Owns the Noise Protocol Framework (revision 34) as backer uses it: `CipherState`, the symmetric
state, `HandshakeState` for the one pattern we speak (XXpsk3: `-> e`, `<- e, ee, s, es`,
`-> s, se, psk`), and `DeviceHandshake`, which carries each device's Ed25519 identity in the
handshake payloads. Bytes in, bytes out: no clock, no sockets, no asyncio. Imports errors, ids and
protocol (the version bound into the prologue); never anything of sync, discovery or above.

    DH      X25519 (`crypto_scalarmult`); device keys are Ed25519, converted to X25519
    cipher  ChaCha20-Poly1305 IETF (nonce: 4 zero bytes + n little-endian) or
            AES-256-GCM (nonce: 4 zero bytes + n big-endian), 16-byte tags
    hash    BLAKE2b-512; HKDF over HMAC-BLAKE2b (128-byte blocks); cipher keys are the first 32
            bytes of each 64-byte HKDF output
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from typing import Final, Literal, get_args

import nacl.bindings as sodium
import nacl.exceptions
import nacl.signing

from backer.errors import LocalProtocolError, RemoteProtocolError
from backer.ids import DeviceId
from backer.protocol.messages import PROTOCOL_VERSION

__all__ = [
    "DH_SIZE",
    "HASH_SIZE",
    "IDENTITY_SIZE",
    "MAX_MESSAGE",
    "MAX_NONCE",
    "TAG_SIZE",
    "CipherName",
    "CipherState",
    "DecryptError",
    "DeviceHandshake",
    "Failure",
    "HandshakeError",
    "HandshakeState",
    "NonceExhaustedError",
    "available_ciphers",
    "make_prologue",
    "protocol_name",
    "static_key_for",
    "verify_identity",
]

CipherName = Literal["ChaChaPoly", "AESGCM"]
CIPHERS: Final[tuple[CipherName, ...]] = get_args(CipherName)

DH_SIZE: Final = 32
HASH_SIZE: Final = 64  # BLAKE2b-512
KEY_SIZE: Final = 32
TAG_SIZE: Final = 16
PSK_SIZE: Final = 32
MAX_MESSAGE: Final = 65535  # the spec's limit on any Noise message
MAX_NONCE: Final = 2**64 - 1  # reserved: only rekey() uses it
IDENTITY_SIZE: Final = 32 + 64  # Ed25519 public key + signature

# The pattern, as data: one tuple of tokens per message; the initiator writes the even ones.
XXPSK3: Final[tuple[tuple[str, ...], ...]] = (
    ("e",),
    ("e", "ee", "s", "es"),
    ("s", "se", "psk"),
)

PROLOGUE_TAG: Final = b"backer/1"
# What a device signs in its handshake payload: this context, then the handshake hash at the
# point where the payload is encrypted. The context keeps these signatures apart from every other
# signature the device key makes (DHT records, for instance).
IDENTITY_CONTEXT: Final = b"backer/1 noise device identity\x00"


class HandshakeError(RemoteProtocolError):
    """The handshake failed: a message did not authenticate, was malformed, or came out of turn.
    `failure` says which, so the channel can name the likely cause."""

    def __init__(self, message: str, *, failure: Failure) -> None:
        super().__init__(message)
        self.failure = failure


class Failure(enum.Enum):
    """Why a handshake message was refused (`HandshakeError.failure`)."""

    MALFORMED = "malformed"  # wrong size, or out of turn
    DECRYPT = "decrypt"  # an encrypted field did not authenticate: the two sides' keys differ
    IDENTITY = "identity"  # the device identity in a payload does not check out


class DecryptError(RemoteProtocolError):
    """A transport message failed authentication (tampered, truncated, or out of order)."""


class NonceExhaustedError(LocalProtocolError):
    """A cipher state used its last nonce: the connection must end (never in practice)."""


def protocol_name(cipher: CipherName) -> bytes:
    return b"Noise_XXpsk3_25519_" + cipher.encode("ascii") + b"_BLAKE2b"


@functools.cache
def available_ciphers() -> tuple[CipherName, ...]:
    """The ciphers this machine's libsodium can run: ChaChaPoly always; AESGCM only with
    hardware AES (AES-NI with PCLMUL, or the ARMv8 crypto extensions)."""
    try:
        sodium.crypto_aead_aes256gcm_encrypt(b"", None, bytes(12), bytes(KEY_SIZE))
    except nacl.exceptions.UnavailableError:
        return ("ChaChaPoly",)
    return ("ChaChaPoly", "AESGCM")


def make_prologue(
    discovery_id: bytes, *, version: int = PROTOCOL_VERSION, extra: bytes = b""
) -> bytes:
    """`b"backer/1"`, the protocol version (uint32, big-endian), the folder's 32-byte discovery
    ID, then `extra` (the channel's cipher offer). Both sides must build the same bytes."""
    if len(discovery_id) != 32:
        raise LocalProtocolError("a discovery ID is 32 bytes")
    return PROLOGUE_TAG + struct.pack(">I", version) + discovery_id + extra


def static_key_for(device_key: nacl.signing.SigningKey) -> bytes:
    """The X25519 private key that goes with an Ed25519 device key (the birational map)."""
    return bytes(device_key.to_curve25519_private_key())


# -- CipherState ---------------------------------------------------------------------------------

_Aead = Callable[[bytes, bytes | None, bytes, bytes], bytes]
_AEADS: Final[dict[CipherName, tuple[_Aead, _Aead, struct.Struct]]] = {
    "ChaChaPoly": (
        sodium.crypto_aead_chacha20poly1305_ietf_encrypt,
        sodium.crypto_aead_chacha20poly1305_ietf_decrypt,
        struct.Struct("<4xQ"),
    ),
    "AESGCM": (
        sodium.crypto_aead_aes256gcm_encrypt,
        sodium.crypto_aead_aes256gcm_decrypt,
        struct.Struct(">4xQ"),
    ),
}


class CipherState:
    """A key and a nonce counter (spec section 5.1). Without a key, encrypt and decrypt pass the
    data through, as the spec says for the start of a handshake. Every successful call uses the
    next nonce; a failed decryption uses none; nonce 2^64-1 is never used for a message."""

    __slots__ = ("_decrypt", "_encrypt", "_key", "_nonce", "_pack", "cipher")

    def __init__(self, cipher: CipherName, key: bytes | None = None) -> None:
        if cipher not in _AEADS:
            raise LocalProtocolError(f"unknown cipher {cipher!r}: one of {', '.join(CIPHERS)}")
        if cipher not in available_ciphers():
            raise LocalProtocolError(f"{cipher} needs hardware AES, which this machine lacks")
        if key is not None and len(key) != KEY_SIZE:
            raise LocalProtocolError(f"a cipher key is {KEY_SIZE} bytes")
        self.cipher: CipherName = cipher
        self._encrypt, self._decrypt, self._pack = _AEADS[cipher]
        self._key = key
        self._nonce = 0

    @property
    def has_key(self) -> bool:
        return self._key is not None

    @property
    def nonce(self) -> int:
        """The nonce the next message will use."""
        return self._nonce

    def set_nonce(self, nonce: int) -> None:
        """SetNonce from the spec: for out-of-band nonces. Never move it backwards on a live key."""
        if not 0 <= nonce <= MAX_NONCE:
            raise LocalProtocolError("a nonce is 0 ..= 2^64-1")
        self._nonce = nonce

    def encrypt(self, ad: bytes, plaintext: bytes) -> bytes:
        key = self._key
        if key is None:
            return plaintext
        nonce = self._next_nonce()
        ciphertext = self._encrypt(plaintext, ad, self._pack.pack(nonce), key)
        self._nonce = nonce + 1
        return ciphertext

    def decrypt(self, ad: bytes, ciphertext: bytes) -> bytes:
        key = self._key
        if key is None:
            return ciphertext
        nonce = self._next_nonce()
        if len(ciphertext) < TAG_SIZE:
            raise DecryptError("a message shorter than its authentication tag")
        try:
            plaintext = self._decrypt(ciphertext, ad, self._pack.pack(nonce), key)
        except nacl.exceptions.CryptoError as exc:
            raise DecryptError("a message failed authentication") from exc
        self._nonce = nonce + 1
        return plaintext

    def rekey(self) -> None:
        """REKEY(k) from the spec: the first 32 bytes of ENCRYPT(k, 2^64-1, "", 32 zero bytes).
        The nonce counter carries on."""
        if self._key is None:
            raise LocalProtocolError("rekey without a key")
        self._key = self._encrypt(bytes(KEY_SIZE), b"", self._pack.pack(MAX_NONCE), self._key)[
            :KEY_SIZE
        ]

    def _next_nonce(self) -> int:
        if self._nonce >= MAX_NONCE:
            raise NonceExhaustedError("this cipher state has used every nonce: reconnect")
        return self._nonce

    def __repr__(self) -> str:  # never the key
        return f"CipherState({self.cipher}, keyed={self.has_key}, nonce={self._nonce})"


# -- SymmetricState ------------------------------------------------------------------------------


def _hash(data: bytes) -> bytes:
    return hashlib.blake2b(data).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, hashlib.blake2b)


def _hkdf(chaining_key: bytes, material: bytes, outputs: int) -> list[bytes]:
    temp = _hmac(chaining_key, material)
    result = [_hmac(temp, b"\x01")]
    for i in range(2, outputs + 1):
        result.append(_hmac(temp, result[-1] + bytes([i])))
    return result


class _SymmetricState:
    """Chaining key, handshake hash and the handshake's cipher state (spec section 5.2)."""

    __slots__ = ("cipher", "cipher_state", "ck", "h")

    def __init__(self, name: bytes, cipher: CipherName) -> None:
        self.h = name.ljust(HASH_SIZE, b"\0") if len(name) <= HASH_SIZE else _hash(name)
        self.ck = self.h
        self.cipher: CipherName = cipher
        self.cipher_state = CipherState(cipher)

    def mix_key(self, material: bytes) -> None:
        self.ck, temp_k = _hkdf(self.ck, material, 2)
        self.cipher_state = CipherState(self.cipher, temp_k[:KEY_SIZE])

    def mix_hash(self, data: bytes) -> None:
        self.h = _hash(self.h + data)

    def mix_key_and_hash(self, material: bytes) -> None:
        self.ck, temp_h, temp_k = _hkdf(self.ck, material, 3)
        self.mix_hash(temp_h)
        self.cipher_state = CipherState(self.cipher, temp_k[:KEY_SIZE])

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher_state.encrypt(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher_state.decrypt(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        temp_k1, temp_k2 = _hkdf(self.ck, b"", 2)
        return (
            CipherState(self.cipher, temp_k1[:KEY_SIZE]),
            CipherState(self.cipher, temp_k2[:KEY_SIZE]),
        )


# -- HandshakeState ------------------------------------------------------------------------------

Payload = bytes | Callable[[bytes], bytes]
"""A handshake payload, or a function of the handshake hash at the point the payload is
encrypted that returns it (so the payload can sign that hash)."""


class HandshakeState:
    """One side of a Noise_XXpsk3_25519_<cipher>_BLAKE2b handshake (spec section 5.3).

    The initiator writes messages 1 and 3 and reads 2; the responder the other way round. Any
    message that does not authenticate, is malformed, or arrives out of turn raises
    `HandshakeError` and ends this handshake for good (every later call raises too). After the
    last message `complete` is true and `split()` hands out the two transport cipher states,
    once. `ephemeral_key` exists for test vectors only: a real handshake makes a fresh one.
    """

    def __init__(
        self,
        *,
        initiator: bool,
        static_key: bytes,
        psk: bytes,
        prologue: bytes,
        cipher: CipherName = "ChaChaPoly",
        ephemeral_key: bytes | None = None,
    ) -> None:
        if len(static_key) != DH_SIZE:
            raise LocalProtocolError(f"a static key is a {DH_SIZE}-byte X25519 private key")
        if len(psk) != PSK_SIZE:
            raise LocalProtocolError(f"a Noise PSK is {PSK_SIZE} bytes")
        if ephemeral_key is not None and len(ephemeral_key) != DH_SIZE:
            raise LocalProtocolError(f"an ephemeral key is {DH_SIZE} bytes")
        self.initiator = initiator
        self.cipher: CipherName = cipher
        self._symmetric = _SymmetricState(protocol_name(cipher), cipher)
        self._symmetric.mix_hash(prologue)
        self._s = static_key
        self._s_public = sodium.crypto_scalarmult_base(static_key)
        self._e: bytes | None = ephemeral_key
        self._e_public = b""
        self._re = b""
        self._rs: bytes | None = None
        self._psk = psk
        self._step = 0
        self._failed = False
        self._split: tuple[CipherState, CipherState] | None = None
        self._split_taken = False
        self.payload_hash = b""
        """The handshake hash under which the last message's payload was encrypted (its AD):
        what a signature inside that payload covers. Equal on both sides."""

    @property
    def complete(self) -> bool:
        return self._step == len(XXPSK3)

    @property
    def remote_static(self) -> bytes | None:
        """The peer's X25519 static public key, once its `s` token has been read."""
        return self._rs

    @property
    def handshake_hash(self) -> bytes:
        """h: after the last message, the value both sides share for channel binding."""
        return self._symmetric.h

    @property
    def our_turn(self) -> bool:
        return not self.complete and (self._step % 2 == 0) == self.initiator

    @property
    def step(self) -> int:
        """How many messages have been written or read (0 to 3)."""
        return self._step

    def write_message(self, payload: Payload = b"") -> bytes:
        if self._failed:
            raise HandshakeError("the handshake has already failed", failure=Failure.MALFORMED)
        if not self.our_turn:
            raise LocalProtocolError("write_message out of turn (or after the handshake)")
        sym = self._symmetric
        out = bytearray()
        for token in XXPSK3[self._step]:
            if token == "e":
                if self._e is None:
                    self._e = os.urandom(DH_SIZE)
                self._e_public = sodium.crypto_scalarmult_base(self._e)
                out += self._e_public
                sym.mix_hash(self._e_public)
                sym.mix_key(self._e_public)  # psk modifier: "e" also calls MixKey
            elif token == "s":
                out += sym.encrypt_and_hash(self._s_public)
            elif token == "psk":
                sym.mix_key_and_hash(self._psk)
            else:
                sym.mix_key(self._dh(token))
        self.payload_hash = sym.h
        body = payload(sym.h) if callable(payload) else payload
        out += sym.encrypt_and_hash(body)
        if len(out) > MAX_MESSAGE:
            raise LocalProtocolError(f"a handshake message is at most {MAX_MESSAGE} bytes")
        self._advance()
        return bytes(out)

    def read_message(self, data: bytes) -> bytes:
        if self._failed:
            raise HandshakeError("the handshake has already failed", failure=Failure.MALFORMED)
        if self.complete or self.our_turn:
            self._failed = True
            raise HandshakeError(
                "a handshake message arrived out of turn (replayed or reordered)",
                failure=Failure.MALFORMED,
            )
        try:
            payload = self._read(bytes(data))
        except HandshakeError:
            self._failed = True
            raise
        except (DecryptError, nacl.exceptions.CryptoError) as exc:
            self._failed = True
            raise HandshakeError(
                f"handshake message {self._step + 1} did not authenticate", failure=Failure.DECRYPT
            ) from exc
        self._advance()
        return payload

    def split(self) -> tuple[CipherState, CipherState]:
        """(send, receive) for this side. Handed out once, so no two owners share a nonce."""
        if self._split is None:
            raise LocalProtocolError("split before the handshake is complete")
        if self._split_taken:
            raise LocalProtocolError("split() was already called: the cipher states have an owner")
        self._split_taken = True
        first, second = self._split
        return (first, second) if self.initiator else (second, first)

    def _read(self, data: bytes) -> bytes:
        if len(data) > MAX_MESSAGE:
            raise HandshakeError(
                f"a handshake message of {len(data)} bytes (at most {MAX_MESSAGE})",
                failure=Failure.MALFORMED,
            )
        sym = self._symmetric
        at = 0
        for token in XXPSK3[self._step]:
            if token == "e":
                self._re = self._take(data, at, DH_SIZE)
                at += DH_SIZE
                sym.mix_hash(self._re)
                sym.mix_key(self._re)
            elif token == "s":
                size = DH_SIZE + (TAG_SIZE if sym.cipher_state.has_key else 0)
                self._rs = sym.decrypt_and_hash(self._take(data, at, size))
                at += size
            elif token == "psk":
                sym.mix_key_and_hash(self._psk)
            else:
                sym.mix_key(self._dh(token))
        rest = data[at:]
        if sym.cipher_state.has_key and len(rest) < TAG_SIZE:
            raise HandshakeError(
                f"handshake message {self._step + 1} is truncated", failure=Failure.MALFORMED
            )
        self.payload_hash = sym.h
        return sym.decrypt_and_hash(rest)

    def _take(self, data: bytes, at: int, size: int) -> bytes:
        if len(data) < at + size:
            raise HandshakeError(
                f"handshake message {self._step + 1} is truncated", failure=Failure.MALFORMED
            )
        return data[at : at + size]

    def _dh(self, token: str) -> bytes:
        """DH for ee, es, se (ss is not in this pattern). libsodium refuses an all-zero result
        (a low-order point), which the spec allows an implementation to do."""
        assert self._e is not None
        public: bytes | None
        if token == "ee":
            private, public = self._e, self._re
        elif (token == "es") == self.initiator:
            private, public = self._e, self._rs
        else:
            private, public = self._s, self._re
        if public is None:
            raise LocalProtocolError(f"{token} before the key it needs")
        return sodium.crypto_scalarmult(private, public)

    def _advance(self) -> None:
        self._step += 1
        if self.complete:
            self._split = self._symmetric.split()
            self._e = None  # forget the ephemeral private key as soon as it is of no more use

    def __repr__(self) -> str:  # never a key
        role = "initiator" if self.initiator else "responder"
        return f"HandshakeState({self.cipher}, {role}, message {self._step + 1} of {len(XXPSK3)})"


# -- the device identity ---------------------------------------------------------------------


class DeviceHandshake:
    """XXpsk3 between two devices. Message 1 has an empty payload; messages 2 and 3 carry the
    sender's Ed25519 device public key (32 bytes) and its signature (64 bytes) over
    `IDENTITY_CONTEXT + h`, h being the handshake hash under which that payload is encrypted
    (so it covers both ephemerals and the sender's encrypted static). The reader checks that the
    Ed25519 key converts to the X25519 static the sender just proved it holds, then the
    signature; so `peer_device` is the identity that holds both keys, in this very handshake."""

    def __init__(
        self,
        *,
        initiator: bool,
        device_key: nacl.signing.SigningKey,
        psk: bytes,
        prologue: bytes,
        cipher: CipherName = "ChaChaPoly",
    ) -> None:
        self._device_key = device_key
        self._state = HandshakeState(
            initiator=initiator,
            static_key=static_key_for(device_key),
            psk=psk,
            prologue=prologue,
            cipher=cipher,
        )
        self.peer_key: bytes | None = None
        """The peer's Ed25519 device public key, once verified."""
        self._failed = False

    @property
    def initiator(self) -> bool:
        return self._state.initiator

    @property
    def cipher(self) -> CipherName:
        return self._state.cipher

    @property
    def complete(self) -> bool:
        return self._state.complete

    @property
    def our_turn(self) -> bool:
        return self._state.our_turn

    @property
    def handshake_hash(self) -> bytes:
        return self._state.handshake_hash

    @property
    def step(self) -> int:
        """How many handshake messages have been written or read (0 to 3)."""
        return self._state.step

    @property
    def peer_device(self) -> DeviceId | None:
        return None if self.peer_key is None else DeviceId.from_public_key(self.peer_key)

    def write_message(self) -> bytes:
        self._check()
        if self._state.step == 0:
            return self._state.write_message(b"")
        return self._state.write_message(self._identity)

    def read_message(self, data: bytes) -> None:
        self._check()
        try:
            payload = self._state.read_message(data)
            if self._state.step == 1:
                if payload:
                    raise HandshakeError(
                        "the first handshake message must have an empty payload",
                        failure=Failure.MALFORMED,
                    )
                return
            rs = self._state.remote_static
            assert rs is not None  # the s token of messages 2 and 3 came before the payload
            self.peer_key = verify_identity(
                payload, remote_static=rs, handshake_hash=self._state.payload_hash
            )
        except HandshakeError:
            self._failed = True
            raise

    def split(self) -> tuple[CipherState, CipherState]:
        self._check()
        return self._state.split()

    def _check(self) -> None:
        if self._failed:
            raise HandshakeError("the handshake has already failed", failure=Failure.MALFORMED)

    def _identity(self, handshake_hash: bytes) -> bytes:
        signed = self._device_key.sign(IDENTITY_CONTEXT + handshake_hash)
        return bytes(self._device_key.verify_key) + signed.signature

    def __repr__(self) -> str:
        return f"DeviceHandshake({self._state!r})"


def verify_identity(payload: bytes, *, remote_static: bytes, handshake_hash: bytes) -> bytes:
    """The Ed25519 public key in an identity payload, after checking that it maps to
    `remote_static` and signed `IDENTITY_CONTEXT + handshake_hash`; HandshakeError otherwise."""
    if len(payload) != IDENTITY_SIZE:
        raise HandshakeError(
            f"an identity payload is {IDENTITY_SIZE} bytes, got {len(payload)}",
            failure=Failure.IDENTITY,
        )
    public, signature = payload[:32], payload[32:]
    try:
        converted = sodium.crypto_sign_ed25519_pk_to_curve25519(public)
    except nacl.exceptions.CryptoError as exc:
        raise HandshakeError(
            "the peer's device key is not a valid Ed25519 public key", failure=Failure.IDENTITY
        ) from exc
    if not hmac.compare_digest(converted, remote_static):
        raise HandshakeError(
            "the peer's device key does not match its Noise static key", failure=Failure.IDENTITY
        )
    try:
        nacl.signing.VerifyKey(public).verify(IDENTITY_CONTEXT + handshake_hash, signature)
    except nacl.exceptions.BadSignatureError as exc:
        raise HandshakeError(
            "the peer's identity signature is bad", failure=Failure.IDENTITY
        ) from exc
    return public
