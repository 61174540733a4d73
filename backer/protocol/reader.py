"""The strict reader of msgpack payloads: each value's type is checked from its first byte
before it is unpacked, so a hostile frame can neither smuggle in types nor make the decoder build
large nested containers. Every failure is a RemoteProtocolError with a short reason.

`codec` builds the messages' schema from these readers. Pure: imports only errors, ids, paths
and `protocol.messages` (for its limits).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

from backer.errors import RemoteProtocolError
from backer.ids import HASH_SIZE, Hash
from backer.paths import MAX_PATH_BYTES
from backer.protocol.messages import MAX_GROUPS_PER_ENTRY, MAX_VECTOR

__all__ = [
    "ARRAY",
    "BIN",
    "BOOL",
    "INT",
    "MAP",
    "MAX_FRAME",
    "NIL",
    "STR",
    "Reader",
    "read_bin",
    "read_bool",
    "read_hash",
    "read_int",
    "read_list",
    "read_optional_bin",
    "read_text",
]

MAX_FRAME = 8 * 1024 * 1024  # bytes of one frame's payload
MAX_KEYS = 16  # no message or entry map has more keys
MSGPACK_ERRORS = (ValueError, msgpack.UnpackException)  # limits, bad UTF-8, truncation, format

NIL, BOOL, INT, STR, BIN, ARRAY, MAP, OTHER = range(8)


def _type_table() -> bytes:
    table = bytearray([OTHER]) * 256
    for first, last, kind in [
        (0x00, 0x7F, INT),
        (0xE0, 0xFF, INT),
        (0xCC, 0xD3, INT),
        (0xA0, 0xBF, STR),
        (0xD9, 0xDB, STR),
        (0xC4, 0xC6, BIN),
        (0x90, 0x9F, ARRAY),
        (0xDC, 0xDD, ARRAY),
        (0x80, 0x8F, MAP),
        (0xDE, 0xDF, MAP),
        (0xC0, 0xC0, NIL),
        (0xC2, 0xC3, BOOL),
    ]:
        table[first : last + 1] = bytes([kind]) * (last - first + 1)
    return bytes(table)


_TYPE_OF = _type_table()  # first byte of a msgpack value -> its family (floats, ext: OTHER)
_TYPE_NAMES = ["nil", "bool", "int", "str", "bin", "array", "map", "float or ext"]


class Reader:
    """Reads one payload value by value, checking each value's type before unpacking it."""

    __slots__ = ("_data", "_unpacker")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._unpacker = msgpack.Unpacker(
            raw=False,
            strict_map_key=True,
            max_buffer_size=MAX_FRAME,
            max_bin_len=HASH_SIZE * MAX_GROUPS_PER_ENTRY,
            max_str_len=MAX_PATH_BYTES,
            max_array_len=MAX_VECTOR,
            max_map_len=MAX_KEYS,
            max_ext_len=0,
        )
        self._unpacker.feed(data)

    def peek(self) -> int:
        position: int = self._unpacker.tell()
        if position >= len(self._data):
            raise RemoteProtocolError("message truncated")
        return _TYPE_OF[self._data[position]]

    def expect(self, what: str, *kinds: int) -> int:
        kind = self.peek()
        if kind not in kinds:
            raise RemoteProtocolError(
                f"{what}: expected {_TYPE_NAMES[kinds[0]]}, got {_TYPE_NAMES[kind]}"
            )
        return kind

    def scalar(self, what: str, kind: int) -> Any:
        self.expect(what, kind)
        return self._unpack(what)

    def optional(self, what: str, kind: int) -> Any:
        self.expect(what, kind, NIL)
        return self._unpack(what)

    def array(self, what: str, low: int, high: int) -> int:
        self.expect(what, ARRAY)
        try:
            count: int = self._unpacker.read_array_header()
        except MSGPACK_ERRORS as exc:
            raise RemoteProtocolError(f"{what}: {str(exc) or 'truncated'}") from exc
        if not low <= count <= high:
            raise RemoteProtocolError(f"{what}: {count} items, not {low} to {high}")
        return count

    def map(self, fields: dict[str, Callable[[Reader], Any]]) -> dict[str, Any]:
        """A map whose keys are all in `fields`, each read by its own reader."""
        self.expect("map", MAP)
        try:
            count: int = self._unpacker.read_map_header()
        except MSGPACK_ERRORS as exc:
            raise RemoteProtocolError(f"map: {str(exc) or 'truncated'}") from exc
        if count > MAX_KEYS:
            raise RemoteProtocolError(f"map of {count} keys")
        values: dict[str, Any] = {}
        for _ in range(count):
            key = self.scalar("key", STR)
            read = fields.get(key)
            if read is None:
                raise RemoteProtocolError(f"unknown key {key[:16]!r}")
            if key in values:
                raise RemoteProtocolError(f"key {key!r} given twice")
            values[key] = read(self)
        return values

    def end(self) -> None:
        if self._unpacker.tell() != len(self._data):
            raise RemoteProtocolError("trailing bytes after the message")

    def _unpack(self, what: str) -> Any:
        try:
            return self._unpacker.unpack()
        except MSGPACK_ERRORS as exc:
            raise RemoteProtocolError(f"{what}: {str(exc) or 'truncated'}") from exc


def read_int(what: str) -> Callable[[Reader], int]:
    return lambda r: int(r.scalar(what, INT))


def read_bool(what: str) -> Callable[[Reader], bool]:
    return lambda r: bool(r.scalar(what, BOOL))


def read_text(what: str, max_bytes: int) -> Callable[[Reader], str]:
    def read(r: Reader) -> str:
        value: str = r.scalar(what, STR)
        if len(value) > max_bytes // 4 and len(value.encode()) > max_bytes:
            raise RemoteProtocolError(f"{what} longer than {max_bytes} bytes")
        return value

    return read


def read_bin(what: str, max_bytes: int) -> Callable[[Reader], bytes]:
    def read(r: Reader) -> bytes:
        value: bytes = r.scalar(what, BIN)
        if len(value) > max_bytes:
            raise RemoteProtocolError(f"{what} of {len(value)} bytes, over {max_bytes}")
        return value

    return read


def read_optional_bin(what: str, max_bytes: int) -> Callable[[Reader], bytes | None]:
    def read(r: Reader) -> bytes | None:
        value: bytes | None = r.optional(what, BIN)
        if value is not None and len(value) > max_bytes:
            raise RemoteProtocolError(f"{what} of {len(value)} bytes, over {max_bytes}")
        return value

    return read


def read_hash(what: str) -> Callable[[Reader], Hash]:
    def read(r: Reader) -> Hash:
        value: bytes = r.scalar(what, BIN)
        if len(value) != HASH_SIZE:
            raise RemoteProtocolError(f"{what} of {len(value)} bytes, not {HASH_SIZE}")
        return Hash(value)

    return read


def read_list(what: str, limit: int, item: Callable[[Reader], Any]) -> Callable[[Reader], Any]:
    def read(r: Reader) -> tuple[Any, ...]:
        return tuple(item(r) for _ in range(r.array(what, 0, limit)))

    return read
