"""The first bytes of a connection: which folder it is for, told only to those who know it.

One node hosts several folders on one port, and the Noise handshake must know the folder (its
key is the PSK, its discovery ID is in the prologue) before it starts. So the dialler opens with
a preface: a magic, a fresh random nonce, and a tag keyed by the folder's discovery ID over that
nonce. The listener recomputes the tag for each folder it hosts and picks the one that matches.
An observer learns nothing about the folder, and two connections for one folder cannot be linked
by their prefaces; a replayed preface gets the replayer only a handshake it cannot finish.

Pure: imports ids only.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from backer.ids import secret_tag

__all__ = ["MAGIC", "NONCE_SIZE", "PREFACE_SIZE", "make_preface", "match_preface"]

MAGIC = b"BKR\x01"
NONCE_SIZE = 16
TAG_SIZE = 16
PREFACE_SIZE = len(MAGIC) + NONCE_SIZE + TAG_SIZE


def make_preface(discovery_id: bytes, nonce: bytes) -> bytes:
    """The preface of a connection for the folder `discovery_id`; `nonce` is fresh randomness."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"the nonce is {NONCE_SIZE} bytes")
    return MAGIC + nonce + _tag(discovery_id, nonce)


def match_preface(preface: bytes, discovery_ids: Iterable[bytes]) -> bytes | None:
    """The discovery ID (among ours) this preface names; None if none (or not a preface)."""
    if len(preface) != PREFACE_SIZE or not preface.startswith(MAGIC):
        return None
    nonce = preface[len(MAGIC) : len(MAGIC) + NONCE_SIZE]
    tag = preface[len(MAGIC) + NONCE_SIZE :]
    for discovery_id in discovery_ids:
        if hmac.compare_digest(_tag(discovery_id, nonce), tag):
            return discovery_id
    return None


def _tag(discovery_id: bytes, nonce: bytes) -> bytes:
    return secret_tag("connection preface", discovery_id, nonce, TAG_SIZE)
