"""The node's home directory: its device key and its configuration file.

Owns the on-disk layout of the home (`device.key`, `config.toml`), the TOML schema of the node
configuration, and the atomic, owner-only writes of both. `NodeConfig` and `FolderConfig` are
pure values that validate themselves; only `Home` touches the filesystem, and it translates every
OSError and TOML error into `ConfigError`. Imports only `backer.errors`, `backer.ids` and
`backer.keys`; never anything above them (index, protocol, mesh, node, cli).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import nacl.signing
import platformdirs
import tomli_w

from backer.addresses import parse_address
from backer.errors import ConfigError, InvalidAddressError, InvalidKeyError
from backer.ids import DeviceId
from backer.keys import FolderKey

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_LISTEN",
    "DEFAULT_MAX_PEERS",
    "DEFAULT_WEB_PORT",
    "DEVICE_KEY_FILE",
    "WEB_TOKEN_FILE",
    "FolderConfig",
    "Home",
    "NodeConfig",
]

DEVICE_KEY_FILE = "device.key"
CONFIG_FILE = "config.toml"
DEFAULT_LISTEN = "127.0.0.1:22100"
DEFAULT_MAX_PEERS = 16
DEFAULT_WEB_PORT = 22180  # the dashboard's, on 127.0.0.1: one address to bookmark
WEB_TOKEN_FILE = "web.token"
MIN_LIMIT_KIB = 100  # KiB a second: below it an 8 MiB frame takes longer than its 120 s deadline
DISCOVERY_METHODS = ("mdns", "beacon", "dht")

_SEED_SIZE = 32
_MAX_KEY_FILE_BYTES = 4096


@dataclass(frozen=True, slots=True)
class FolderConfig:
    """One hosted folder: its absolute local path and its folder key string.

    The path is normalised (`/a/b/` and `/a//b` become `/a/b`, symlinks are not resolved) and the
    key is checked and stored in its canonical lowercase form.
    """

    path: str
    key: str

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not PurePath(self.path).is_absolute():
            raise ConfigError(f"folder path must be an absolute path, got {self.path!r}")
        if not isinstance(self.key, str):
            raise ConfigError(f"folder key must be a string, got {_type_name(self.key)}")
        try:
            key = FolderKey.parse(self.key)
        except InvalidKeyError as exc:
            raise ConfigError(f"the key of folder {self.path}: {exc}") from exc
        object.__setattr__(self, "path", os.path.normpath(self.path))
        object.__setattr__(self, "key", str(key))

    @property
    def folder_key(self) -> FolderKey:
        return FolderKey.parse(self.key)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """The node-wide settings: hosted folders, listen address, static peers, peer limit.

    Addresses are `host:port` (`[v6addr]:port` for IPv6). No two folders share a path, and no
    folder is hosted twice under different paths (one device must hold one replica of a folder:
    two would share the device's version-vector counter).
    """

    folders: tuple[FolderConfig, ...] = ()
    listen: str = DEFAULT_LISTEN
    peers: tuple[str, ...] = ()
    max_peers: int = DEFAULT_MAX_PEERS
    # How peers are found besides `peers`. LAN methods announce on the interface of `listen`
    # only (all interfaces for 0.0.0.0), so a node listening on 127.0.0.1 stays on this host.
    discovery: tuple[str, ...] = DISCOVERY_METHODS
    dht_bootstrap: tuple[str, ...] = ()  # DHT nodes to join through (`backer dht` runs one)
    lan_interfaces: tuple[str, ...] = ()  # IPs mDNS announces on; () = the listen address's
    web: bool = False  # serve the dashboard without `run --web` (as the service does)
    web_port: int = DEFAULT_WEB_PORT  # on 127.0.0.1; 0: a free one
    # The node's bandwidth, all folders and peers together, in KiB a second on the wire; 0: none.
    send_limit_kib: int = 0
    receive_limit_kib: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.folders, tuple) or not all(
            isinstance(folder, FolderConfig) for folder in self.folders
        ):
            raise ConfigError("folders must be a tuple of FolderConfig")
        _check_address("listen", self.listen)
        if not isinstance(self.peers, tuple):
            raise ConfigError(f"peers must be a list of addresses, got {_type_name(self.peers)}")
        for i, peer in enumerate(self.peers):
            _check_address(f"peers[{i}]", peer)
        if not isinstance(self.max_peers, int) or isinstance(self.max_peers, bool):
            raise ConfigError(f"max_peers must be an integer, got {_type_name(self.max_peers)}")
        if self.max_peers < 1:
            raise ConfigError(f"max_peers must be at least 1, got {self.max_peers}")
        if not isinstance(self.discovery, tuple) or any(
            method not in DISCOVERY_METHODS for method in self.discovery
        ):
            raise ConfigError(
                f"discovery must list some of {', '.join(DISCOVERY_METHODS)}, "
                f"got {self.discovery!r}"
            )
        if not isinstance(self.web, bool):
            raise ConfigError(f"web must be true or false, got {_type_name(self.web)}")
        if (
            not isinstance(self.web_port, int)
            or isinstance(self.web_port, bool)
            or not 0 <= self.web_port <= 65535
        ):
            raise ConfigError(f"web_port must be a port number (0-65535), got {self.web_port!r}")
        for name in ("send_limit_kib", "receive_limit_kib"):
            limit = getattr(self, name)
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                raise ConfigError(f"{name} must be KiB a second (0 for no limit), got {limit!r}")
            if 0 < limit < MIN_LIMIT_KIB:
                raise ConfigError(
                    f"{name} must be 0 (no limit) or at least {MIN_LIMIT_KIB}, got {limit}: "
                    "slower, a transfer frame (up to 8 MiB) misses its two-minute deadline"
                )
        if not isinstance(self.lan_interfaces, tuple) or not all(
            isinstance(ip, str) and ip for ip in self.lan_interfaces
        ):
            raise ConfigError("lan_interfaces must be a list of IP addresses")
        if not isinstance(self.dht_bootstrap, tuple):
            raise ConfigError("dht_bootstrap must be a list of addresses")
        for i, node in enumerate(self.dht_bootstrap):
            _check_address(f"dht_bootstrap[{i}]", node)
        paths: set[str] = set()
        folder_ids: dict[bytes, str] = {}
        for folder in self.folders:
            if folder.path in paths:
                raise ConfigError(f"folder {folder.path} is already configured")
            paths.add(folder.path)
            verify_key = folder.folder_key.verify_key
            if verify_key in folder_ids:
                raise ConfigError(
                    f"folder {folder.path} is the same folder as {folder_ids[verify_key]} "
                    "(same folder key): one device can host a folder only once"
                )
            folder_ids[verify_key] = folder.path

    def with_folder(self, folder: FolderConfig) -> NodeConfig:
        """This config with one more folder; ConfigError if its path or key is already here."""
        return dataclasses.replace(self, folders=(*self.folders, folder))

    def folder_for(self, path: str | os.PathLike[str]) -> FolderConfig | None:
        """The folder configured at exactly `path` (after normalisation), if any."""
        wanted = os.path.normpath(os.fspath(path))
        return next((folder for folder in self.folders if folder.path == wanted), None)

    @classmethod
    def from_toml(cls, text: str, *, source: str = CONFIG_FILE) -> NodeConfig:
        """Parse and check a config file's text; errors name `source` and the field."""
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source} is not valid TOML: {exc}") from exc
        return cls._from_document(document, source)

    def to_toml(self) -> str:
        document: dict[str, Any] = {
            "listen": self.listen,
            "peers": list(self.peers),
            "max_peers": self.max_peers,
            "discovery": list(self.discovery),
            "dht_bootstrap": list(self.dht_bootstrap),
            "lan_interfaces": list(self.lan_interfaces),
            "web": self.web,
            "web_port": self.web_port,
            "send_limit_kib": self.send_limit_kib,
            "receive_limit_kib": self.receive_limit_kib,
            "folders": [{"path": f.path, "key": f.key} for f in self.folders],
        }
        return tomli_w.dumps(document)

    @classmethod
    def _from_document(cls, document: Mapping[str, Any], source: str) -> NodeConfig:
        known = (
            "folders",
            "listen",
            "peers",
            "max_peers",
            "discovery",
            "dht_bootstrap",
            "lan_interfaces",
            "web",
            "web_port",
            "send_limit_kib",
            "receive_limit_kib",
        )
        _refuse_unknown(document, known, source, "")
        folders: list[FolderConfig] = []
        raw_folders = document.get("folders", [])
        if not isinstance(raw_folders, list):
            raise ConfigError(
                f"{source}: 'folders' must be a list of [[folders]] tables, "
                f"got {_type_name(raw_folders)}"
            )
        for i, raw in enumerate(raw_folders):
            where = f"folders[{i}]"
            if not isinstance(raw, dict):
                raise ConfigError(f"{source}: '{where}' must be a table, got {_type_name(raw)}")
            _refuse_unknown(raw, ("path", "key"), source, f"{where}.")
            for name in ("path", "key"):
                if name not in raw:
                    raise ConfigError(f"{source}: '{where}.{name}' is missing")
                if not isinstance(raw[name], str):
                    raise ConfigError(
                        f"{source}: '{where}.{name}' must be a string, got {_type_name(raw[name])}"
                    )
            try:
                folders.append(FolderConfig(path=raw["path"], key=raw["key"]))
            except ConfigError as exc:
                raise ConfigError(f"{source}: '{where}': {exc}") from exc
        defaults = NodeConfig()
        listen = document.get("listen", defaults.listen)
        if not isinstance(listen, str):
            raise ConfigError(f"{source}: 'listen' must be a string, got {_type_name(listen)}")
        peers = document.get("peers", list(defaults.peers))
        if not isinstance(peers, list) or not all(isinstance(p, str) for p in peers):
            raise ConfigError(f"{source}: 'peers' must be a list of strings ('host:port')")
        max_peers = document.get("max_peers", defaults.max_peers)
        if not isinstance(max_peers, int) or isinstance(max_peers, bool):
            raise ConfigError(
                f"{source}: 'max_peers' must be an integer, got {_type_name(max_peers)}"
            )
        lists = {}
        for name in ("discovery", "dht_bootstrap", "lan_interfaces"):
            value = document.get(name, list(getattr(defaults, name)))
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{source}: '{name}' must be a list of strings")
            lists[name] = tuple(value)
        try:
            return cls(
                folders=tuple(folders),
                listen=listen,
                peers=tuple(peers),
                max_peers=max_peers,
                discovery=lists["discovery"],
                dht_bootstrap=lists["dht_bootstrap"],
                lan_interfaces=lists["lan_interfaces"],
                web=document.get("web", defaults.web),
                web_port=document.get("web_port", defaults.web_port),
                send_limit_kib=document.get("send_limit_kib", defaults.send_limit_kib),
                receive_limit_kib=document.get("receive_limit_kib", defaults.receive_limit_kib),
            )
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Home:
    """The node's home directory. `Home.default()` is the user's config directory; the CLI's
    `--home DIR` makes `Home(Path(DIR))`."""

    path: Path

    @classmethod
    def default(cls) -> Home:
        return cls(platformdirs.user_config_path("backer"))

    @property
    def device_key_path(self) -> Path:
        return self.path / DEVICE_KEY_FILE

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    def device_key(self) -> nacl.signing.SigningKey:
        """This device's long-term Ed25519 key, created (owner-only, atomically) on first use."""
        seed = self._read_device_seed()
        if seed is None:
            candidate = nacl.signing.SigningKey.generate().encode()
            try:
                _write_private(
                    self.device_key_path, candidate.hex().encode() + b"\n", create_only=True
                )
                seed = candidate
            except FileExistsError:
                # Another process made the key between our read and our write: use theirs.
                seed = self._read_device_seed()
            except OSError as exc:
                raise ConfigError(
                    f"cannot create the device key {self.device_key_path}: {_reason(exc)}"
                ) from exc
            if seed is None:
                raise ConfigError(f"the device key {self.device_key_path} vanished while read")
        return nacl.signing.SigningKey(seed)

    def device_id(self) -> DeviceId:
        return DeviceId.from_public_key(bytes(self.device_key().verify_key))

    def load_config(self) -> NodeConfig:
        """The node config; the defaults if there is no config file yet."""
        path = self.config_path
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return NodeConfig()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {_reason(exc)}") from exc
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} is not UTF-8 text: {exc}") from exc
        return NodeConfig.from_toml(text, source=str(path))

    def save_config(self, config: NodeConfig) -> None:
        """Replace the config file atomically; owner-only, since it holds folder keys."""
        try:
            _write_private(self.config_path, config.to_toml().encode("utf-8"), create_only=False)
        except OSError as exc:
            raise ConfigError(f"cannot write {self.config_path}: {_reason(exc)}") from exc

    def web_token(self) -> str:
        """The dashboard's access token, kept (owner-only) so its URL survives restarts;
        made on first use."""
        try:
            token = (self.path / WEB_TOKEN_FILE).read_text("ascii").strip()
        except FileNotFoundError:
            token = ""
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {self.path / WEB_TOKEN_FILE}: {exc}") from exc
        if token:
            return token
        try:
            return self._write_web_token(replace=False)
        except FileExistsError:  # another process made it between our read and our write
            return self.web_token()

    def new_web_token(self) -> str:
        """Replace the dashboard's token: every URL given out before stops working (a running
        dashboard reads the new one at its next request)."""
        return self._write_web_token(replace=True)

    def _write_web_token(self, *, replace: bool) -> str:
        token = secrets.token_urlsafe(24)
        path = self.path / WEB_TOKEN_FILE
        try:
            _write_private(path, token.encode() + b"\n", create_only=not replace)
        except FileExistsError:
            raise
        except OSError as exc:
            raise ConfigError(f"cannot write {path}: {_reason(exc)}") from exc
        return token

    def _read_device_seed(self) -> bytes | None:
        path = self.device_key_path
        try:
            with path.open("rb") as file:
                mode = os.fstat(file.fileno()).st_mode
                content = file.read(_MAX_KEY_FILE_BYTES)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read the device key {path}: {_reason(exc)}") from exc
        if os.name == "posix" and mode & 0o077:
            raise ConfigError(
                f"the device key {path} can be read by other users "
                f"(mode {stat.S_IMODE(mode):04o}); make it private with: chmod 600 {path}"
            )
        try:
            seed = bytes.fromhex(content.decode("ascii").strip())
        except ValueError:
            seed = b""
        if len(seed) != _SEED_SIZE:
            raise ConfigError(
                f"the device key {path} is damaged (it should hold {2 * _SEED_SIZE} hex digits). "
                "Restore it from a backup, or move it away to give this device a new identity "
                "(its peers will then have to accept the new device ID)"
            )
        return seed


def _check_address(name: str, value: object) -> None:
    """`host:port` or `[v6addr]:port`, port 0-65535."""
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a 'host:port' string, got {_type_name(value)}")
    try:
        parse_address(value)
    except InvalidAddressError:
        raise ConfigError(
            f"{name} must look like 'host:port' or '[v6addr]:port', got {value!r}"
        ) from None


def _refuse_unknown(
    table: Mapping[str, Any], known: tuple[str, ...], source: str, prefix: str
) -> None:
    for name in table:
        if name not in known:
            raise ConfigError(
                f"{source}: unknown field '{prefix}{name}' (known: {', '.join(known)})"
            )


def _type_name(value: object) -> str:
    names = {str: "a string", int: "an integer", bool: "a boolean", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _write_private(path: Path, data: bytes, *, create_only: bool) -> None:
    """Write `data` to `path` atomically, owner-only (0600), its directory made 0700 if absent.

    The bytes go to a fresh temporary file (O_CREAT|O_EXCL, 0600) that is fsynced, then published
    under `path` and the directory fsynced. With `create_only` an existing `path` is never
    replaced (FileExistsError): the temporary file is hard-linked into place, falling back to a
    rename on filesystems without hard links.
    """
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(temporary, flags, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if not create_only:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)
            except FileExistsError:
                raise
            except OSError:
                if path.exists():
                    raise FileExistsError(path) from None
                os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
