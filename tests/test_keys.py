"""Folder keys: string format (bech32m), typo detection, tiers and one-way derivations."""

from __future__ import annotations

import nacl.exceptions
import nacl.signing
import pytest

from backer import keys
from backer.errors import InvalidKeyError
from backer.keys import FolderKey, Tier

RW = FolderKey(tier=Tier.READ_WRITE, material=bytes(range(32)))
RO = RW.read_only()
OTHER = FolderKey(tier=Tier.READ_WRITE, material=bytes(range(100, 132)))

# Pinned so that the format and the derivation contexts never change by accident: every key ever
# handed out depends on them.
RW_STRING = "bkw1qqqqsyqcyq5rqwzqfpg9scrgwpugpzysnzs23v9ccrydpk8qarc0sk59m6f"
RO_STRING = (
    "bkr1qakafz3j2e4550v8xqg629ew3vtt4ne3vj434f63puq0exn99l3vq55da758hjdhr2l2aentjsgn38e66yswwy5"
    "gnna542vlvme4m42qcl476k"
)


def _encode(hrp: str, data: list[int]) -> str:
    """A well-checksummed string with any hrp and data symbols, to craft keys we never write."""
    symbols = data + keys._checksum(hrp, data)
    return hrp + "1" + "".join(keys._CHARSET[s] for s in symbols)


def _substitutes(char: str) -> list[str]:
    return [c for c in keys._CHARSET if c != char]


# --- bech32m itself ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        # BIP-350's valid bech32m test strings.
        "A1LQFN3A",
        "a1lqfn3a",
        "an83characterlonghumanreadablepartthatcontainsthetheexcludedcharactersbioandnumber11sg7hg6",
        "abcdef1l7aum6echk45nj3s0wdvt2fg8x9yrzpqzd3ryx",
        "11llllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllludsr8",
        "split1checkupstagehandshakeupstreamerranterredcaperredlc445v",
        "?1v759aa",
    ],
)
def test_bip350_valid_strings_pass_the_checksum(text: str) -> None:
    hrp, _, data = text.lower().rpartition("1")
    assert keys._checksum_ok(hrp, [keys._CHARSET_INDEX[c] for c in data])
    assert _encode(hrp, [keys._CHARSET_INDEX[c] for c in data[:-6]]) == text.lower()


@pytest.mark.parametrize(
    "text",
    [
        "a12uel5l",  # valid bech32 (BIP-173), so not bech32m
        "m1vuxwez",  # BIP-350: checksum computed over the uppercase hrp
    ],
)
def test_bech32_and_wrong_case_checksums_fail(text: str) -> None:
    hrp, _, data = text.rpartition("1")
    assert not keys._checksum_ok(hrp, [keys._CHARSET_INDEX[c] for c in data])


def test_5bit_conversion_round_trips_and_rejects_bad_padding() -> None:
    for size in (0, 1, 5, 31, 32, 64):
        data = bytes((7 * i + 3) % 256 for i in range(size))
        assert keys._from_5bit(keys._to_5bit(data), size) == data
    symbols = keys._to_5bit(bytes(32))  # 52 symbols, 4 padding bits
    assert keys._from_5bit([*symbols[:-1], 1], 32) is None
    assert keys._from_5bit(symbols[:-1], 32) is None


# --- the key format ----------------------------------------------------------------------------


def test_pinned_strings() -> None:
    assert str(RW) == RW_STRING
    assert str(RO) == RO_STRING
    assert RW.folder_id == "6XUNCIDGLH"


@pytest.mark.parametrize("key", [RW, RO, OTHER, FolderKey.generate()], ids=repr)
def test_round_trip(key: FolderKey) -> None:
    text = str(key)
    assert text == text.lower()
    assert text.startswith({Tier.READ_WRITE: "bkw1", Tier.READ_ONLY: "bkr1"}[key.tier])
    parsed = FolderKey.parse(text)
    assert parsed == key
    assert parsed.tier is key.tier
    assert parsed.psk == key.psk


def test_lengths() -> None:
    assert len(RW_STRING) == 63
    assert len(RO_STRING) == 114  # longer than bech32's 90: deliberately not enforced


def test_encrypted_tier_is_refused() -> None:
    crafted = _encode("bke", [0, *keys._to_5bit(bytes(64))])
    with pytest.raises(InvalidKeyError, match="encrypted keys are not supported"):
        FolderKey.parse(crafted)
    with pytest.raises(InvalidKeyError, match="encrypted keys are not supported"):
        FolderKey(tier=Tier.ENCRYPTED, material=bytes(64))


@pytest.mark.parametrize("key", [RW_STRING, RO_STRING], ids=["rw", "ro"])
def test_every_single_substitution_is_detected(key: str) -> None:
    for i, char in enumerate(key):
        for substitute in _substitutes(char):
            mutated = key[:i] + substitute + key[i + 1 :]
            with pytest.raises(InvalidKeyError):
                FolderKey.parse(mutated)


@pytest.mark.parametrize("key", [RW_STRING, RO_STRING], ids=["rw", "ro"])
def test_adjacent_swaps_are_detected(key: str) -> None:
    swaps = 0
    for i in range(len(key) - 1):
        if key[i] == key[i + 1]:
            continue
        swapped = key[:i] + key[i + 1] + key[i] + key[i + 2 :]
        with pytest.raises(InvalidKeyError):
            FolderKey.parse(swapped)
        swaps += 1
    assert swaps > len(key) // 2


@pytest.mark.parametrize("key", [RW_STRING, RO_STRING], ids=["rw", "ro"])
def test_truncation_deletion_and_insertion_are_detected(key: str) -> None:
    for end in range(len(key)):
        with pytest.raises(InvalidKeyError):
            FolderKey.parse(key[:end])
    for i in range(len(key)):
        with pytest.raises(InvalidKeyError):
            FolderKey.parse(key[:i] + key[i + 1 :])
        with pytest.raises(InvalidKeyError):
            FolderKey.parse(key[:i] + "q" + key[i:])


def test_typo_message_is_plain() -> None:
    i = len(RW_STRING) // 2
    mutated = RW_STRING[:i] + _substitutes(RW_STRING[i])[0] + RW_STRING[i + 1 :]
    with pytest.raises(InvalidKeyError, match="has a typo: check it was copied whole"):
        FolderKey.parse(mutated)
    with pytest.raises(InvalidKeyError, match="never appears in a key"):
        FolderKey.parse(RW_STRING[:-1] + "b")


def test_uppercase_and_surrounding_whitespace_accepted() -> None:
    assert FolderKey.parse(RW_STRING.upper()) == RW
    assert FolderKey.parse(f"  \t{RO_STRING.upper()}\n") == RO
    assert FolderKey.parse(RO_STRING[:60] + "\n  " + RO_STRING[60:]) == RO


def test_mixed_case_refused() -> None:
    mixed = RW_STRING[:10] + RW_STRING[10:].upper()
    with pytest.raises(InvalidKeyError, match="mixes upper- and lowercase"):
        FolderKey.parse(mixed)
    with pytest.raises(InvalidKeyError, match="mixes"):
        FolderKey.parse("B" + RW_STRING[1:])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("hello", "not a backer folder key"),
        ("bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4", "not a backer folder key"),
        ("bkw1", "too short"),
        ("bkw1qqqqq", "too short"),
    ],
)
def test_not_a_key(text: str, message: str) -> None:
    with pytest.raises(InvalidKeyError, match=message):
        FolderKey.parse(text)


def test_unknown_kind_and_newer_version() -> None:
    payload = keys._to_5bit(bytes(range(32)))
    with pytest.raises(InvalidKeyError, match="newer version of backer"):
        FolderKey.parse(_encode("bkz", [0, *payload]))
    with pytest.raises(InvalidKeyError, match="newer version of backer"):
        FolderKey.parse(_encode("bkw", [1, *payload]))


def test_wrong_payload_length() -> None:
    with pytest.raises(InvalidKeyError, match="wrong length"):
        FolderKey.parse(_encode("bkw", [0, *keys._to_5bit(bytes(31))]))
    with pytest.raises(InvalidKeyError, match="wrong length"):
        FolderKey.parse(_encode("bkr", [0, *keys._to_5bit(bytes(range(32)))]))
    with pytest.raises(InvalidKeyError, match="wrong length"):  # nonzero padding bits
        FolderKey.parse(_encode("bkw", [0, *keys._to_5bit(bytes(32))[:-1], 1]))


def test_constructor_validates() -> None:
    with pytest.raises(InvalidKeyError):
        FolderKey(tier=Tier.READ_WRITE, material=bytes(31))
    with pytest.raises(InvalidKeyError):
        FolderKey(tier=Tier.READ_ONLY, material=bytes(32))
    with pytest.raises(InvalidKeyError, match="not a valid public key"):  # small-order point
        FolderKey(tier=Tier.READ_ONLY, material=bytes(64))


def test_read_only_key_with_a_bad_verify_key_is_refused_when_parsed() -> None:
    crafted = _encode("bkr", [0, *keys._to_5bit(bytes(range(32)) + bytes(32))])
    with pytest.raises(InvalidKeyError, match="damaged"):
        FolderKey.parse(crafted)


# --- tiers and derivations ---------------------------------------------------------------------


def test_read_only_derives_the_same_public_values_and_psk() -> None:
    assert RO.tier is Tier.READ_ONLY
    assert RO.psk == RW.psk
    assert RO.discovery_id == RW.discovery_id
    assert RO.verify_key == RW.verify_key
    assert RO.folder_id == RW.folder_id
    assert RO.read_secret == RW.read_secret
    assert RW.can_write
    assert not RO.can_write
    with pytest.raises(InvalidKeyError, match="a read-only key cannot sign"):
        _ = RO.signing_key
    assert RO.read_only() is RO
    assert FolderKey.parse(RO_STRING).read_only() == RO


def test_keys_to_give_out() -> None:
    assert RW.keys_to_give_out() == [RW, RO]
    assert RO.keys_to_give_out() == [RO]


def test_distinct_purposes_give_distinct_values() -> None:
    values = [
        RW.material,
        RW.signing_key.encode(),
        RW.read_secret,
        RW.psk,
        RW.discovery_id,
        RW.verify_key,
    ]
    assert all(len(v) == 32 for v in values)
    assert len(set(values)) == len(values)
    assert len(RW.folder_id) == 10
    for name in ("read_secret", "psk", "discovery_id", "verify_key", "folder_id"):
        assert getattr(RW, name) != getattr(OTHER, name), name
    assert RW.signing_key.encode() != OTHER.signing_key.encode()


def test_derivations_are_deterministic() -> None:
    again = FolderKey(tier=Tier.READ_WRITE, material=bytes(range(32)))
    assert again.signing_key.encode() == RW.signing_key.encode()
    assert again.psk == RW.psk
    assert again.discovery_id == RW.discovery_id


def test_the_signing_key_signs_and_the_verify_key_verifies() -> None:
    signed = RW.signing_key.sign(b"version 7 of the folder")
    verifier = nacl.signing.VerifyKey(RO.verify_key)
    assert verifier.verify(signed) == b"version 7 of the folder"
    assert bytes(RW.signing_key.verify_key) == RW.verify_key
    forged = OTHER.signing_key.sign(b"version 7 of the folder")
    with pytest.raises(nacl.exceptions.BadSignatureError):
        verifier.verify(forged)


def test_generate_gives_fresh_read_write_keys() -> None:
    first, second = FolderKey.generate(), FolderKey.generate()
    assert first.tier is Tier.READ_WRITE
    assert first != second
    assert first.discovery_id != second.discovery_id


@pytest.mark.parametrize("key", [RW, RO], ids=["rw", "ro"])
def test_repr_hides_secrets(key: FolderKey) -> None:
    shown = repr(key)
    assert key.folder_id in shown
    assert key.tier.value in shown
    secrets = [str(key), key.material.hex(), key.read_secret.hex(), key.psk.hex()]
    secrets += [str(key)[4:20], repr(key.material), repr(key.read_secret)]
    for secret in secrets:
        assert secret not in shown
    assert repr(key) == repr([key])[1:-1]


def test_equality_and_hash_follow_the_key() -> None:
    assert FolderKey.parse(RW_STRING) == RW
    assert hash(FolderKey.parse(RW_STRING)) == hash(RW)
    assert RW != RO
    assert RW != OTHER
