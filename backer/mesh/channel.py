"""The encrypted channel's sans-IO machine (its asyncio pump is `backer.mesh.secure`).

Owns the wire format below the session frames (docs/protocol.md section 1): records (a 2-byte
big-endian length, then one Noise message), the cipher offer and its one retry, the one-byte
handshake alerts, the key confirmation, rekeying by byte count, keepalives and the idle timeout.

Two parts, as h11 and httpcore are two: `Channel` here is the sans-IO machine (bytes in, plaintext
and bytes to send out; it chains the handshake machine into the transport machine, as wsproto
does); `backer.mesh.secure` is the asyncio pump, which only moves bytes and keeps time. Pure:
imports errors, ids, keys, protocol and mesh.noise; no asyncio, never discovery.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, NoReturn

import nacl.signing

from backer.errors import BackerError, RemoteProtocolError
from backer.ids import DeviceId
from backer.mesh.noise import (
    TAG_SIZE,
    CipherName,
    CipherState,
    DecryptError,
    DeviceHandshake,
    Failure,
    HandshakeError,
    available_ciphers,
    make_prologue,
)
from backer.protocol.messages import PROTOCOL_VERSION

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "IDLE_TIMEOUT",
    "KEEPALIVE",
    "MAX_PLAINTEXT",
    "MAX_RECORD",
    "REKEY_AFTER",
    "Alert",
    "Channel",
    "ChannelError",
    "ChannelStats",
    "Reason",
]

MAX_RECORD: Final = 65535  # the Noise message in a record (its 2-byte length allows no more)
MAX_PLAINTEXT: Final = MAX_RECORD - TAG_SIZE  # 65,519 bytes of data per record
MAX_HANDSHAKE_RECORD: Final = 1024  # our largest handshake record is 192 bytes
REKEY_AFTER: Final = 1 << 30  # 1 GiB of data per direction, then both ends rekey that direction
HANDSHAKE_TIMEOUT: Final = 10.0
KEEPALIVE: Final = 15.0  # seconds of our silence before we send an empty record
IDLE_TIMEOUT: Final = 60.0  # seconds of the peer's silence before we give up on it

_HEADER: Final = struct.Struct(">H")
_HEADER_SIZE: Final = _HEADER.size
_OFFER_BIT: Final[dict[CipherName, int]] = {"ChaChaPoly": 0x01, "AESGCM": 0x02}
_RETRY_FLAG: Final = 0x80
_RETRY: Final = 0x01  # the one-byte record a responder sends instead of message 2


class Reason(enum.Enum):
    """Why a channel failed: for events and decisions (back off, warn the user...)."""

    WRONG_FOLDER = "wrong folder"  # the peer does not host this folder (or not this version)
    WRONG_KEY = "wrong folder key"  # same folder, but the PSKs differ
    BAD_IDENTITY = "bad identity"  # a device key or its signature did not check out
    NO_CIPHER = "no common cipher"
    DOWNGRADE = "downgrade"  # a cipher retry nobody asked for
    TIMEOUT = "handshake timeout"
    IDLE = "idle timeout"
    TAMPERED = "tampered"  # a message failed authentication
    TRUNCATED = "truncated"  # the stream ended inside a record
    OVERSIZED = "oversized"  # a record longer than allowed where it came
    MALFORMED = "malformed"  # a record of the wrong size or out of place
    CLOSED = "closed"  # the peer closed before the channel was up
    LOCAL = "local"  # our side cannot go on (the link failed, a nonce ran out)


class ChannelError(RemoteProtocolError):
    """The encrypted channel failed or refused the peer; `reason` says why in one word.
    The link under it is closed by the time a `secure()` or `SecureLink` call raises this."""

    def __init__(self, message: str, *, reason: Reason) -> None:
        super().__init__(message)
        self.reason = reason


class Alert(enum.IntEnum):
    """One-byte records a side sends, during the handshake only, just before it closes: they
    tell the peer why. They are not authenticated, so they only ever choose an error message;
    the connection is failing either way."""

    NOT_THIS_FOLDER = 0x10  # your first message did not authenticate against our prologue
    WRONG_KEY = 0x11  # your proof of the folder key (message 3) did not authenticate
    BAD_IDENTITY = 0x12  # your device key or its signature did not check out
    NO_CIPHER = 0x13  # we share no cipher
    MALFORMED = 0x14  # your handshake record had the wrong size or came out of place


_ALERT_TEXT: Final[dict[int, tuple[Reason, str]]] = {
    Alert.NOT_THIS_FOLDER: (
        Reason.WRONG_FOLDER,
        "the peer refused the handshake: it does not host this folder "
        "(a different folder key, or another backer protocol version)",
    ),
    Alert.WRONG_KEY: (
        Reason.WRONG_KEY,
        "wrong folder key: the peer could not verify our proof of the folder key "
        "(the two devices hold different keys for this folder)",
    ),
    Alert.BAD_IDENTITY: (Reason.BAD_IDENTITY, "the peer refused our device identity"),
    Alert.NO_CIPHER: (Reason.NO_CIPHER, "the peer shares no cipher with us"),
    Alert.MALFORMED: (Reason.MALFORMED, "the peer found our handshake malformed"),
}


@dataclass(slots=True)
class ChannelStats:
    """Counters of one channel, both directions (transport records only)."""

    records_sent: int = 0
    records_received: int = 0
    bytes_sent: int = 0  # plaintext
    bytes_received: int = 0
    keepalives_received: int = 0  # empty records, the key confirmation included
    rekeys_sent: int = 0
    rekeys_received: int = 0


class _State(enum.Enum):
    START = "start"  # nothing sent or received yet
    AWAIT_MSG1 = "await message 1"  # responder
    AWAIT_MSG2 = "await message 2"  # initiator
    AWAIT_MSG3 = "await message 3"  # responder
    AWAIT_CONFIRM = "await confirmation"  # initiator: the responder's first transport record
    OPEN = "open"
    CLOSED = "closed"  # the peer's stream ended cleanly
    FAILED = "failed"


_HANDSHAKE_STATES: Final = frozenset(
    {_State.START, _State.AWAIT_MSG1, _State.AWAIT_MSG2, _State.AWAIT_MSG3, _State.AWAIT_CONFIRM}
)


# -- the machine ---------------------------------------------------------------------------------


class Channel:
    """One side of an encrypted channel, sans-IO.

    Call `start()`, send `data_to_send()`, feed what arrives to `receive_data()` (it returns the
    decrypted application bytes) and the end of the stream to `receive_eof()`, sending
    `data_to_send()` after each. `established` turns true once the handshake is complete and,
    for the initiator, confirmed by the responder's first record. `seal()` turns application
    bytes into records (an empty `data` makes one empty record: a keepalive). Every peer fault
    raises `ChannelError`, after queueing an alert for the peer while the handshake runs.
    """

    def __init__(
        self,
        *,
        initiator: bool,
        device_key: nacl.signing.SigningKey,
        psk: bytes,
        discovery_id: bytes,
        ciphers: Sequence[CipherName] | None = None,
        rekey_after: int = REKEY_AFTER,
        version: int = PROTOCOL_VERSION,
    ) -> None:
        usable = available_ciphers()
        chosen = tuple(usable if ciphers is None else ciphers)
        if not chosen or any(cipher not in usable for cipher in chosen):
            raise BackerError(f"the ciphers must be some of {', '.join(usable)}; got {chosen}")
        if rekey_after < 1:
            raise BackerError("rekey_after must be at least 1 byte")
        self.initiator = initiator
        self._device_key = device_key
        self._psk = psk
        self._discovery_id = discovery_id
        self._version = version
        self._ciphers = chosen
        self._rekey_after = rekey_after
        self._state = _State.START
        self._handshake: DeviceHandshake | None = None
        self._offer = 0
        self._retried = False  # initiator: we restarted with ChaChaPoly; responder: we asked to
        self._send: CipherState | None = None
        self._recv: CipherState | None = None
        self._since_rekey_sent = 0
        self._since_rekey_received = 0
        self._inbox = b""  # the start of a record that has not arrived whole
        self._outbox = bytearray()
        self._error: ChannelError | None = None
        self.stats = ChannelStats()
        self.peer_key: bytes | None = None
        """The peer's Ed25519 device public key, verified in the handshake."""
        self.handshake_hash = b""
        self._handlers: dict[_State, Callable[[bytes], bytes]] = {
            _State.AWAIT_MSG1: self._on_message1,
            _State.AWAIT_MSG2: self._on_message2,
            _State.AWAIT_MSG3: self._on_message3,
            _State.AWAIT_CONFIRM: self._on_confirmation,
            _State.OPEN: self._open_record,
        }

    # -- public ----------------------------------------------------------------------------------

    @property
    def established(self) -> bool:
        return self._state is _State.OPEN

    @property
    def cipher(self) -> CipherName | None:
        return None if self._handshake is None else self._handshake.cipher

    @property
    def peer_device(self) -> DeviceId | None:
        return None if self.peer_key is None else DeviceId.from_public_key(self.peer_key)

    def start(self) -> None:
        if self._state is not _State.START:
            raise BackerError("start() once, first")
        if not self.initiator:
            self._state = _State.AWAIT_MSG1
            return
        for cipher in self._ciphers:
            self._offer |= _OFFER_BIT[cipher]
        self._state = _State.AWAIT_MSG2
        preferred = _suite(self._offer)
        assert preferred is not None  # we offer at least one cipher
        self._send_message1(preferred)

    def data_to_send(self) -> bytes:
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    def receive_data(self, data: bytes) -> bytes:
        """Take bytes from the peer; return the application bytes they complete."""
        self._check_alive()
        if self._state is _State.START:
            raise BackerError("receive_data() before start()")
        # Work on one bytes object, so that a record is one slice (one copy) away.
        buffer = self._inbox + data if self._inbox else bytes(data)
        size_of_buffer = len(buffer)
        plaintext: list[bytes] = []
        at = 0
        try:
            while size_of_buffer - at >= _HEADER_SIZE:
                size = buffer[at] << 8 | buffer[at + 1]
                self._check_record_size(size)
                end = at + _HEADER_SIZE + size
                if size_of_buffer < end:
                    break
                record = buffer[at + _HEADER_SIZE : end]
                at = end
                plaintext.append(self._handlers[self._state](record))
        finally:
            self._inbox = buffer[at:]
        return plaintext[0] if len(plaintext) == 1 else b"".join(plaintext)

    def receive_eof(self) -> None:
        """The peer's stream ended. Fine once open (between records); a ChannelError otherwise."""
        self._check_alive()
        if self._inbox:
            self._fail(Reason.TRUNCATED, "the connection ended inside a record (truncated)")
        if self._state is _State.OPEN:
            self._state = _State.CLOSED
            return
        if self._state is _State.AWAIT_CONFIRM:
            self._fail(
                Reason.WRONG_KEY,
                "the peer closed the connection instead of confirming the handshake: most "
                "likely it holds a different key for this folder (or it refused our identity)",
            )
        if self._state is _State.AWAIT_MSG2:
            # A listener closes unanswered a connection for a folder it does not host.
            self._fail(
                Reason.CLOSED,
                "wrong folder key: the peer closed the connection without answering the "
                "handshake, so it hosts no folder with this key (or it is not a backer node)",
            )
        self._fail(
            Reason.CLOSED,
            f"the peer closed the connection during the handshake ({self._state.value})",
        )

    def seal(self, data: bytes) -> bytes:
        """Encrypt `data` into records (as many as it needs; one empty record for b"")."""
        return b"".join(self.seal_records(data))

    def seal_records(self, data: bytes) -> list[bytes]:
        """`seal()`, one bytes object per record: writing them one by one spares a large copy
        (and, for megabytes, the allocator's page faults)."""
        if self._error is not None:
            raise self._error
        send = self._send
        if self._state not in (_State.OPEN, _State.CLOSED) or send is None:
            raise BackerError("seal() before the channel is established")
        data = bytes(data)  # pynacl takes bytes only (no copy if it already is)
        if len(data) <= MAX_PLAINTEXT:
            return [self._seal_record(send, data)]
        return [
            self._seal_record(send, data[start : start + MAX_PLAINTEXT])
            for start in range(0, len(data), MAX_PLAINTEXT)
        ]

    # -- the handshake states --------------------------------------------------------------------

    def _send_message1(self, cipher: CipherName) -> None:
        handshake = self._new_handshake(cipher)
        self._queue_record(bytes([self._offer]) + handshake.write_message())

    def _new_handshake(self, cipher: CipherName) -> DeviceHandshake:
        prologue = make_prologue(
            self._discovery_id, version=self._version, extra=bytes([self._offer])
        )
        self._handshake = DeviceHandshake(
            initiator=self.initiator,
            device_key=self._device_key,
            psk=self._psk,
            prologue=prologue,
            cipher=cipher,
        )
        return self._handshake

    def _on_message1(self, record: bytes) -> bytes:
        """Responder: the offer byte and message 1 (`e`)."""
        if len(record) < 2:
            self._fail(Reason.MALFORMED, "a first handshake record too short", Alert.MALFORMED)
        offer = record[0]
        retry = bool(offer & _RETRY_FLAG)
        if retry and not self._retried:
            self._fail(
                Reason.DOWNGRADE,
                "the peer retried a handshake we never asked it to retry (a downgrade attempt?)",
                Alert.MALFORMED,
            )
        if self._retried and not retry:
            self._fail(Reason.MALFORMED, "expected the retried handshake", Alert.MALFORMED)
        self._offer = offer
        cipher = "ChaChaPoly" if retry else _suite(offer)
        if cipher is None or cipher not in self._ciphers:
            can_retry = cipher is not None and not retry and offer & _OFFER_BIT["ChaChaPoly"]
            if can_retry and "ChaChaPoly" in self._ciphers:
                self._retried = True
                self._queue_record(bytes([_RETRY]))
                return b""
            self._fail(Reason.NO_CIPHER, "the peer offers no cipher we can run", Alert.NO_CIPHER)
        handshake = self._new_handshake(cipher)
        try:
            handshake.read_message(record[1:])
        except HandshakeError as exc:
            if exc.failure is Failure.DECRYPT:
                self._fail(
                    Reason.WRONG_FOLDER,
                    "the peer is not in this folder: its first handshake message does not "
                    "authenticate against this folder's discovery ID and protocol version "
                    "(or it was tampered with)",
                    Alert.NOT_THIS_FOLDER,
                    exc,
                )
            self._fail(Reason.MALFORMED, f"a malformed first message: {exc}", Alert.MALFORMED, exc)
        self._queue_record(handshake.write_message())
        self._state = _State.AWAIT_MSG3
        return b""

    def _on_message2(self, record: bytes) -> bytes:
        """Initiator: message 2 (`e, ee, s, es` and the responder's identity), a retry, or an
        alert."""
        handshake = self._handshake
        assert handshake is not None
        if len(record) == 1:
            if record[0] == _RETRY and not self._retried and handshake.cipher != "ChaChaPoly":
                if "ChaChaPoly" not in self._ciphers:  # it cannot happen: we offered it
                    self._fail(Reason.NO_CIPHER, "the peer asked for a cipher we did not offer")
                self._retried = True
                self._offer |= _RETRY_FLAG
                self._send_message1("ChaChaPoly")
                return b""
            self._peer_alert(record[0])
        try:
            handshake.read_message(record)
        except HandshakeError as exc:
            self._handshake_failed(exc, "the responder's handshake message (2)")
        self.peer_key = handshake.peer_key
        self._queue_record(handshake.write_message())
        self._send, self._recv = handshake.split()
        self.handshake_hash = handshake.handshake_hash
        self._state = _State.AWAIT_CONFIRM
        return b""

    def _on_message3(self, record: bytes) -> bytes:
        """Responder: message 3 (`s, se, psk` and the initiator's identity), or an alert."""
        handshake = self._handshake
        assert handshake is not None
        if len(record) == 1:
            self._peer_alert(record[0])
        try:
            handshake.read_message(record)
        except HandshakeError as exc:
            if exc.failure is Failure.DECRYPT:
                self._fail(
                    Reason.WRONG_KEY,
                    "wrong folder key: the peer could not prove it holds this folder's key "
                    "(or its last handshake message was tampered with)",
                    Alert.WRONG_KEY,
                    exc,
                )
            self._handshake_failed(exc, "the initiator's handshake message (3)")
        self.peer_key = handshake.peer_key
        self._send, self._recv = handshake.split()
        self.handshake_hash = handshake.handshake_hash
        self._state = _State.OPEN
        self._outbox += self._seal_record(self._send, b"")  # the key confirmation
        return b""

    def _on_confirmation(self, record: bytes) -> bytes:
        """Initiator: the responder's first transport record proves it derived our keys, so it
        holds the same PSK; or an alert saying why it will not."""
        if len(record) == 1:
            self._peer_alert(record[0])
        plaintext = self._open_record(record)
        self._state = _State.OPEN
        return plaintext

    def _handshake_failed(self, exc: HandshakeError, where: str) -> NoReturn:
        if exc.failure is Failure.IDENTITY:
            self._fail(Reason.BAD_IDENTITY, f"{where}: {exc}", Alert.BAD_IDENTITY, exc)
        if exc.failure is Failure.DECRYPT:
            self._fail(
                Reason.TAMPERED, f"{where} did not authenticate (tampered)", Alert.MALFORMED, exc
            )
        self._fail(Reason.MALFORMED, f"{where}: {exc}", Alert.MALFORMED, exc)

    def _peer_alert(self, code: int) -> NoReturn:
        reason, text = _ALERT_TEXT.get(
            code, (Reason.MALFORMED, f"the peer ended the handshake with unknown alert {code}")
        )
        self._fail(reason, f"{text} (the peer says so)")

    # -- transport -------------------------------------------------------------------------------

    def _open_record(self, record: bytes) -> bytes:
        recv = self._recv
        assert recv is not None
        if len(record) < TAG_SIZE:
            self._fail(Reason.MALFORMED, f"a record of {len(record)} bytes cannot hold its tag")
        try:
            plaintext = recv.decrypt(b"", record)
        except DecryptError as exc:
            self._fail(
                Reason.TAMPERED,
                "a record failed authentication (tampered, replayed, reordered or cut)",
                cause=exc,
            )
        stats = self.stats
        stats.records_received += 1
        if not plaintext:
            stats.keepalives_received += 1
            return plaintext
        stats.bytes_received += len(plaintext)
        self._since_rekey_received += len(plaintext)
        if self._since_rekey_received >= self._rekey_after:
            recv.rekey()
            self._since_rekey_received = 0
            stats.rekeys_received += 1
        return plaintext

    def _seal_record(self, send: CipherState, chunk: bytes) -> bytes:
        try:
            message = send.encrypt(b"", chunk)
        except BackerError as exc:  # nonce exhaustion
            self._fail(Reason.LOCAL, str(exc), cause=exc)
        stats = self.stats
        stats.records_sent += 1
        if chunk:
            stats.bytes_sent += len(chunk)
            self._since_rekey_sent += len(chunk)
            if self._since_rekey_sent >= self._rekey_after:
                send.rekey()
                self._since_rekey_sent = 0
                stats.rekeys_sent += 1
        return _HEADER.pack(len(message)) + message

    # -- helpers ---------------------------------------------------------------------------------

    def _queue_record(self, message: bytes) -> None:
        self._outbox += _HEADER.pack(len(message))
        self._outbox += message

    def _check_record_size(self, size: int) -> None:
        in_handshake = self._state in _HANDSHAKE_STATES and self._state is not _State.AWAIT_CONFIRM
        if in_handshake and size > MAX_HANDSHAKE_RECORD:
            self._fail(
                Reason.OVERSIZED,
                f"a handshake record of {size} bytes (at most {MAX_HANDSHAKE_RECORD})",
                Alert.MALFORMED,
            )
        if size == 0:
            self._fail(Reason.MALFORMED, "an empty record", Alert.MALFORMED)

    def _check_alive(self) -> None:
        if self._error is not None:
            raise self._error
        if self._state is _State.CLOSED:
            raise ChannelError("the peer's stream has ended", reason=Reason.CLOSED)

    def _fail(
        self,
        reason: Reason,
        message: str,
        alert: Alert | None = None,
        cause: BaseException | None = None,
    ) -> NoReturn:
        if alert is not None and self._state in _HANDSHAKE_STATES:
            self._queue_record(bytes([alert]))
        self._state = _State.FAILED
        self._error = ChannelError(message, reason=reason)
        raise self._error from cause


def _suite(offer: int) -> CipherName | None:
    """The cipher an offer byte (without the retry flag) selects: AES-GCM when offered."""
    if offer & _OFFER_BIT["AESGCM"]:
        return "AESGCM"
    if offer & _OFFER_BIT["ChaChaPoly"]:
        return "ChaChaPoly"
    return None
