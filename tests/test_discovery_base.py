"""LAN announcements: members find their folders in them; outsiders see unlinkable noise."""

from __future__ import annotations

import os

import pytest

from backer.discovery.base import (
    MAX_FOLDERS_ANNOUNCED,
    Announcement,
    decode_beacon,
    encode_beacon,
    from_txt,
    to_txt,
)
from backer.errors import DecodeError
from backer.keys import FolderKey

FOLDERS = [FolderKey.generate().discovery_id for _ in range(3)]
DEVICE = os.urandom(32)


def announcement(folders: list[bytes] = FOLDERS[:2]) -> Announcement:
    return Announcement.make(DEVICE, 22100, folders, os.urandom(8))


def test_members_find_their_folders_and_only_those() -> None:
    made = announcement()
    assert made.folders_shared(FOLDERS) == FOLDERS[:2]
    assert made.folders_shared(FOLDERS[2:]) == []


def test_two_announcements_of_one_folder_share_no_bytes_but_the_device() -> None:
    first, second = announcement(), announcement()
    assert set(first.tokens).isdisjoint(second.tokens) and first.nonce != second.nonce


def test_txt_and_beacon_round_trip_and_stay_small() -> None:
    most = Announcement.make(DEVICE, 1, [os.urandom(32) for _ in range(20)], os.urandom(8))
    assert len(most.tokens) == MAX_FOLDERS_ANNOUNCED
    txt = to_txt(most)
    assert sum(len(k) + len(v) + 2 for k, v in txt.items()) < 200  # LIBRARIES.md: TXT < ~200 B
    assert from_txt({k.encode(): v.encode() for k, v in txt.items()}, 1) == most
    assert decode_beacon(encode_beacon(most)) == most


@pytest.mark.parametrize(
    "txt",
    [
        {},
        {"v": "2", "id": "x", "n": "x", "t": ""},
        {"v": "1", "id": "AAAA", "n": "AAAAAAAAAAA", "t": ""},
        {"v": "1", "id": "A" * 43, "n": "AAAAAAAAAAA", "t": "AAAA"},
        {"v": "1", "id": "A" * 43, "n": "!!", "t": ""},
    ],
)
def test_foreign_txt_records_are_refused(txt: dict[str, str]) -> None:
    with pytest.raises(DecodeError):
        from_txt(txt, 22100)


def test_foreign_beacons_are_refused() -> None:
    good = encode_beacon(announcement())
    for bad in [b"", good[:-1], good + b"x", b"BKRB" + bytes(60), b"X" + good[1:]]:
        with pytest.raises(DecodeError):
            decode_beacon(bad)
