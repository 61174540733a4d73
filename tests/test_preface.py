"""The connection preface names a folder only to those who know it."""

from __future__ import annotations

import os

from backer.mesh.preface import PREFACE_SIZE, make_preface, match_preface

ONE, TWO, THREE = os.urandom(32), os.urandom(32), os.urandom(32)


def test_the_listener_finds_the_folder_among_its_own() -> None:
    preface = make_preface(TWO, os.urandom(16))
    assert len(preface) == PREFACE_SIZE
    assert match_preface(preface, [ONE, TWO]) == TWO
    assert match_preface(preface, [ONE, THREE]) is None


def test_two_prefaces_for_one_folder_look_unrelated() -> None:
    first, second = make_preface(ONE, os.urandom(16)), make_preface(ONE, os.urandom(16))
    assert first[4:] != second[4:] and first[-16:] != second[-16:]


def test_garbage_and_tampering_match_nothing() -> None:
    good = make_preface(ONE, os.urandom(16))
    last_byte_changed = good[:-1] + bytes([good[-1] ^ 0xFF])  # always differs from good
    for bad in [b"", good[:-1], good + b"x", b"GET / HTTP/1.1\r\n" * 3, last_byte_changed]:
        assert match_preface(bad, [ONE]) is None
    flipped = bytearray(good)
    flipped[10] ^= 1  # the nonce
    assert match_preface(bytes(flipped), [ONE]) is None
