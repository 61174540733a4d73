"""The error tree of backer.

Owns every exception type raised across layers; imports nothing from backer.
Foreign errors (OSError, sqlite3.Error, library errors) are translated into these at the
adapter that meets them, with `raise ... from`.
"""

__all__ = [
    "BackerError",
    "ConfigError",
    "DecodeError",
    "FolderMissingError",
    "IndexCorruptError",
    "InvalidAddressError",
    "InvalidKeyError",
    "InvalidPathError",
    "LocalProtocolError",
    "MassDeletionError",
    "MountGoneError",
    "RemoteProtocolError",
]


class BackerError(Exception):
    """Root of every error backer raises on purpose."""


class InvalidPathError(BackerError, ValueError):
    """A path is not a valid folder-relative path (absolute, `..`, NUL, backslash, not NFC...)."""


class InvalidAddressError(BackerError, ValueError):
    """A network address is not `host:port` (`[v6addr]:port` for IPv6) with a port 0-65535."""


class InvalidKeyError(BackerError, ValueError):
    """A folder key or device ID string is malformed, mistyped or of an unknown version."""


class DecodeError(BackerError, ValueError):
    """Bytes that do not decode to a valid value (a tree node, an entry, a key). The layer that
    received them decides whether that is a hostile peer or a corrupt index."""


class ConfigError(BackerError):
    """The node configuration or the device key cannot be read or written."""


class FolderMissingError(BackerError):
    """The folder root or its `.backer` marker is gone: never read that as "delete everything"."""


class MountGoneError(FolderMissingError):
    """A directory of the folder is on another filesystem than when it was scanned (its disk was
    unmounted, or another one mounted over it) and what was below it is gone: unavailable, not
    deleted."""


class MassDeletionError(BackerError):
    """Most of a folder vanished at once: the folder pauses instead of replicating it."""

    def __init__(self, message: str, *, vanished: int, live: int) -> None:
        super().__init__(message)
        self.vanished = vanished
        self.live = live


class IndexCorruptError(BackerError):
    """The index database cannot be opened or holds values that do not decode."""


class RemoteProtocolError(BackerError):
    """A peer sent something the protocol does not allow: drop the peer, back off."""


class LocalProtocolError(BackerError):
    """We tried to do something the protocol does not allow: a bug on our side."""
