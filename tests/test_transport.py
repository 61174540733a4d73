"""The TCP listener: the address it is bound to stays readable once it has stopped."""

from __future__ import annotations

import pytest

from backer.mesh.transport import Listener
from backer.sync.link import Link


async def test_the_bound_address_outlives_the_listener() -> None:
    """Found at scale: a node's status, written once more while it shut down, read the bound
    address from the closed server's sockets; IndexError, and the node exited 1 on SIGTERM."""

    async def accept(discovery_id: bytes, link: Link, remote: str) -> None:
        await link.close()

    listener = Listener("127.0.0.1:0", lambda: [], accept)
    with pytest.raises(RuntimeError, match="not started"):
        _ = listener.bound
    await listener.start()
    bound = listener.bound
    assert bound.startswith("127.0.0.1:") and not bound.endswith(":0")
    await listener.stop()
    assert listener.bound == bound
