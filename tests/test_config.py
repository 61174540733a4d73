"""The node's home: device key creation and checks, config file schema and round trip."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import platformdirs
import pytest

from backer.config import (
    CONFIG_FILE,
    DEVICE_KEY_FILE,
    FolderConfig,
    Home,
    NodeConfig,
)
from backer.errors import ConfigError
from backer.ids import DeviceId
from backer.keys import FolderKey, Tier

KEY_A = FolderKey(tier=Tier.READ_WRITE, material=bytes(range(32)))
KEY_B = FolderKey(tier=Tier.READ_WRITE, material=bytes(range(50, 82)))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "home")


# --- device key --------------------------------------------------------------------------------


def test_device_key_is_created_private_and_stable(home: Home) -> None:
    key = home.device_key()
    key_file = home.path / DEVICE_KEY_FILE
    assert _mode(key_file) == 0o600
    assert _mode(home.path) == 0o700
    content = key_file.read_text("ascii")
    assert content == key.encode().hex() + "\n"
    assert sorted(p.name for p in home.path.iterdir()) == [DEVICE_KEY_FILE]

    again = Home(home.path)
    assert again.device_key().encode() == key.encode()
    assert again.device_id() == home.device_id()
    assert home.device_id() == DeviceId.from_public_key(bytes(key.verify_key))


def test_device_ids_differ_between_homes(tmp_path: Path) -> None:
    assert Home(tmp_path / "a").device_id() != Home(tmp_path / "b").device_id()


def test_existing_home_dir_is_used_as_is(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    Home(tmp_path).device_key()
    assert _mode(tmp_path) == 0o755
    assert _mode(tmp_path / DEVICE_KEY_FILE) == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_readable_key_file_is_refused(home: Home, mode: int) -> None:
    home.device_key()
    key_file = home.path / DEVICE_KEY_FILE
    key_file.chmod(mode)
    with pytest.raises(ConfigError, match="chmod 600") as caught:
        home.device_key()
    assert str(key_file) in str(caught.value)
    assert f"{mode:04o}" in str(caught.value)


@pytest.mark.parametrize(
    "content",
    [b"", b"not hex\n", b"00" * 31 + b"\n", b"00" * 33 + b"\n", b"\xff" * 64],
)
def test_malformed_key_file_is_refused(home: Home, content: bytes) -> None:
    home.path.mkdir(mode=0o700)
    key_file = home.path / DEVICE_KEY_FILE
    key_file.write_bytes(content)
    key_file.chmod(0o600)
    with pytest.raises(ConfigError, match="damaged"):
        home.device_key()
    assert key_file.read_bytes() == content  # never overwritten


def test_key_file_without_trailing_newline_is_accepted(home: Home) -> None:
    home.path.mkdir(mode=0o700)
    key_file = home.path / DEVICE_KEY_FILE
    key_file.write_text("ab" * 32)
    key_file.chmod(0o600)
    assert home.device_key().encode() == bytes([0xAB] * 32)


def test_unusable_home_gives_config_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(ConfigError, match="device key") as caught:
        Home(not_a_dir).device_key()
    assert isinstance(caught.value.__cause__, OSError)


def test_default_home() -> None:
    assert Home.default().path == platformdirs.user_config_path("backer")


# --- config values -----------------------------------------------------------------------------


def test_defaults() -> None:
    config = NodeConfig()
    assert config.folders == ()
    assert config.listen == "127.0.0.1:22100"
    assert config.peers == ()
    assert config.max_peers == 16


def test_missing_config_file_gives_defaults(home: Home) -> None:
    assert home.load_config() == NodeConfig()
    assert not home.path.exists()


def test_folder_config_normalises_and_checks() -> None:
    folder = FolderConfig("/srv/docs/", str(KEY_A).upper())
    assert folder.path == "/srv/docs"
    assert folder.key == str(KEY_A)
    assert folder.folder_key == KEY_A
    with pytest.raises(ConfigError, match="absolute"):
        FolderConfig("docs", str(KEY_A))
    with pytest.raises(ConfigError, match="typo"):
        FolderConfig("/srv/docs", str(KEY_A)[:-1] + "q")


def test_with_folder_and_folder_for() -> None:
    docs = FolderConfig("/srv/docs", str(KEY_A))
    photos = FolderConfig(path="/srv/photos", key=str(KEY_B.read_only()))
    config = NodeConfig().with_folder(docs).with_folder(photos)
    assert config.folders == (docs, photos)
    assert config.folder_for("/srv/docs") == docs
    assert config.folder_for(Path("/srv/photos/")) == photos
    assert config.folder_for("/srv") is None
    assert NodeConfig().folder_for("/srv/docs") is None


def test_duplicate_folder_path_refused() -> None:
    config = NodeConfig().with_folder(FolderConfig("/srv/docs", str(KEY_A)))
    with pytest.raises(ConfigError, match="already configured"):
        config.with_folder(FolderConfig("/srv/docs", str(KEY_B)))
    with pytest.raises(ConfigError, match="already configured"):
        config.with_folder(FolderConfig("/srv//docs/", str(KEY_B)))


def test_same_folder_at_two_paths_refused() -> None:
    config = NodeConfig().with_folder(FolderConfig("/srv/docs", str(KEY_A)))
    with pytest.raises(ConfigError, match="same folder"):
        config.with_folder(FolderConfig("/srv/copy", str(KEY_A.read_only())))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"listen": "localhost"}, "listen"),
        ({"listen": "host:99999"}, "listen"),
        ({"listen": "::1:22100"}, "listen"),
        ({"peers": ("nas.local:22100", "nas")}, "peers[1]"),
        ({"max_peers": 0}, "max_peers"),
        ({"max_peers": True}, "max_peers"),
    ],
)
def test_node_config_validates(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(field) + " "):
        NodeConfig(**kwargs)  # type: ignore[arg-type]


def test_addresses_accepted() -> None:
    config = NodeConfig(listen="[::1]:0", peers=("192.0.2.7:22100", "nas.local:1", "[fe80::1]:9"))
    assert config.listen == "[::1]:0"


# --- config file -------------------------------------------------------------------------------


def test_config_round_trip(home: Home) -> None:
    config = NodeConfig(
        folders=(
            FolderConfig("/srv/docs", str(KEY_A)),
            FolderConfig('/home/me/Photos and "quotes"', str(KEY_B.read_only())),
        ),
        listen="0.0.0.0:22200",
        peers=("192.0.2.7:22100", "[2001:db8::1]:22100"),
        max_peers=4,
    )
    home.save_config(config)
    config_file = home.path / CONFIG_FILE
    assert _mode(config_file) == 0o600
    assert _mode(home.path) == 0o700
    assert Home(home.path).load_config() == config
    assert sorted(p.name for p in home.path.iterdir()) == [CONFIG_FILE]

    smaller = NodeConfig(folders=config.folders[:1])
    home.save_config(smaller)
    assert home.load_config() == smaller
    assert _mode(config_file) == 0o600
    assert sorted(p.name for p in home.path.iterdir()) == [CONFIG_FILE]


def test_default_config_round_trip(home: Home) -> None:
    home.save_config(NodeConfig())
    assert home.load_config() == NodeConfig()


def test_hand_written_config_is_read(home: Home) -> None:
    home.path.mkdir()
    (home.path / CONFIG_FILE).write_text(
        f'max_peers = 3\n\n[[folders]]\npath = "/srv/docs"\nkey = "{str(KEY_A).upper()}"\n'
    )
    config = home.load_config()
    assert config == NodeConfig(folders=(FolderConfig("/srv/docs", str(KEY_A)),), max_peers=3)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('max_peers = "16"', "max_peers"),
        ("max_peers = 1.5", "max_peers"),
        ("max_peers = 0", "max_peers"),
        ("listen = 22100", "listen"),
        ('listen = "nowhere"', "listen"),
        ('peers = "192.0.2.7:22100"', "peers"),
        ("peers = [1, 2]", "peers"),
        ('peers = ["192.0.2.7"]', "peers[0]"),
        ('folders = "x"', "folders"),
        ("folders = [1]", "folders[0]"),
        ('[[folders]]\npath = "/srv/docs"', "folders[0].key"),
        ('[[folders]]\npath = 5\nkey = "k"', "folders[0].path"),
        ('[[folders]]\npath = "/a"\nkey = "k"\ncolour = "red"', "folders[0].colour"),
        ('[[folders]]\npath = "docs"\nkey = "k"', "folders[0]"),
        ('[[folders]]\npath = "/srv/docs"\nkey = "bkw1notakey"', "folders[0]"),
        ('listne = "127.0.0.1:1"', "listne"),
    ],
)
def test_bad_config_names_the_field_and_the_file(home: Home, text: str, field: str) -> None:
    home.path.mkdir()
    config_file = home.path / CONFIG_FILE
    config_file.write_text(text + "\n")
    with pytest.raises(ConfigError) as caught:
        home.load_config()
    message = str(caught.value)
    assert str(config_file) in message
    assert field in message


def test_duplicate_folder_in_file_refused(home: Home) -> None:
    home.path.mkdir()
    entry = f'[[folders]]\npath = "/srv/docs"\nkey = "{KEY_A}"\n'
    (home.path / CONFIG_FILE).write_text(entry + "\n" + entry.replace(str(KEY_A), str(KEY_B)))
    with pytest.raises(ConfigError, match="already configured"):
        home.load_config()


def test_invalid_toml_and_encoding_give_config_error(home: Home) -> None:
    home.path.mkdir()
    config_file = home.path / CONFIG_FILE
    config_file.write_text("listen = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        home.load_config()
    assert caught.value.__cause__ is not None
    config_file.write_bytes(b'listen = "\xff"\n')
    with pytest.raises(ConfigError, match=str(config_file)):
        home.load_config()


def test_unreadable_config_gives_config_error(home: Home) -> None:
    (home.path / CONFIG_FILE).mkdir(parents=True)  # a directory where the file should be
    with pytest.raises(ConfigError, match="cannot read") as caught:
        home.load_config()
    assert isinstance(caught.value.__cause__, OSError)
    with pytest.raises(ConfigError, match="cannot write"):
        home.save_config(NodeConfig())
    assert [p.name for p in home.path.iterdir()] == [CONFIG_FILE]  # no temporary file left


def test_save_does_not_loosen_an_existing_file(home: Home) -> None:
    home.save_config(NodeConfig())
    os.chmod(home.path / CONFIG_FILE, 0o644)
    home.save_config(NodeConfig(max_peers=2))
    assert _mode(home.path / CONFIG_FILE) == 0o600
