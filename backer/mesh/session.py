"""An encrypted session with one peer of one folder: the Noise handshake, then the replication
session over the encrypted link.

    result = await secure_session(replica, StreamLink(reader, writer), initiator=True,
                                  device_key=home.device_key(), key=folder_key)

Owns nothing but that composition; the node (and, until it exists, the CLI) calls it. Imports
sync and mesh; never discovery.
"""

from __future__ import annotations

import contextlib

import nacl.signing

from backer.ids import DeviceId
from backer.keys import FolderKey
from backer.mesh.channel import ChannelError
from backer.mesh.secure import secure
from backer.sync.link import Link
from backer.sync.peer import STUCK_AFTER, SessionResult, run_session
from backer.sync.replica import Replica

__all__ = ["secure_session"]


async def secure_session(
    replica: Replica,
    link: Link,
    *,
    initiator: bool,
    device_key: nacl.signing.SigningKey,
    key: FolderKey,
    until_in_sync: bool = False,
    stuck_after: float = STUCK_AFTER,
    handshake_timeout: float = 10.0,
) -> SessionResult:
    """Handshake on `link` with the folder key, then replicate over the encrypted link. A peer
    without the key (or any handshake failure) ends it before a single folder byte is sent."""
    try:
        secured = await secure(
            link,
            initiator=initiator,
            device_key=device_key,
            folder=key,
            timeout=handshake_timeout,
        )
    except ChannelError as exc:
        with contextlib.suppress(OSError, ConnectionError):
            await link.close()
        return SessionResult(reason=f"handshake failed ({exc.reason.value}): {exc}", clean=False)
    device = DeviceId.from_public_key(bytes(device_key.verify_key)).raw
    result = await run_session(
        replica,
        secured,
        device=device,
        folder=key.discovery_id,
        until_in_sync=until_in_sync,
        stuck_after=stuck_after,
    )
    result.peer_device = secured.peer_device
    return result
