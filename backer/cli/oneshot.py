"""`backer sync` and `backer serve`: one folder, one peer, one session at a time (the daemon,
`backer run`, keeps many). Imports sync, mesh and the CLI's common helpers.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from pathlib import Path

from backer.cli.common import EXIT_ERROR, EXIT_OK, folder_key, folder_path, human, plural
from backer.config import Home
from backer.errors import BackerError
from backer.keys import FolderKey
from backer.mesh.session import secure_session
from backer.sync.link import StreamLink
from backer.sync.peer import SessionResult
from backer.sync.replica import Replica
from backer.sync.replicate import PLAIN_FOLDER, sync_stream

__all__ = ["cmd_serve", "cmd_sync"]


def cmd_sync(home: Home, args: argparse.Namespace) -> int:
    folder = folder_path(home, args.dir, create=True)
    host, port = _address(args.peer)
    device = home.device_id()
    key = folder_key(home, folder)
    _warn_if_plaintext(key, folder)

    async def go() -> SessionResult:
        replica = await Replica.open(folder, device=device.short, key=key)
        try:
            await replica.scan()
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError as exc:
                raise BackerError(
                    f"cannot reach {args.peer}: {exc.strerror or exc}; is `backer serve` "
                    "running there?"
                ) from exc
            return await _session(home, replica, key, reader, writer, initiator=True)
        finally:
            await replica.close()

    result = _explained(asyncio.run(go()), key)
    pulled = result.pulls
    errors = [error for report in pulled for error in report.errors]
    files, conflicts = sum(p.files for p in pulled), sum(p.conflicts for p in pulled)
    summary = {
        "in_sync": result.in_sync,
        "reason": result.reason,
        "root": result.local_root.hex() if result.local_root else None,
        "files": files,
        "deleted": sum(p.deleted for p in pulled),
        "conflicts": conflicts,
        "bytes_fetched": sum(p.bytes_fetched for p in pulled),
        "bytes_local": sum(p.bytes_local for p in pulled),
        "errors": errors,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        state = "in sync" if result.in_sync else f"NOT in sync: {result.reason}"
        print(f"{folder}: {state}")
        print(
            f"received {plural(files, 'file')} "
            f"({human(sum(p.bytes_fetched for p in pulled))} over the wire, "
            f"{human(sum(p.bytes_local for p in pulled))} reused locally), "
            f"{summary['deleted']} deleted, {plural(conflicts, 'conflict')}"
        )
        for error in errors:
            print(f"refused  {error}", file=sys.stderr)
    return EXIT_OK if result.in_sync else EXIT_ERROR


def cmd_serve(home: Home, args: argparse.Namespace) -> int:
    folder = folder_path(home, args.dir, create=True)
    host, port = _address(args.listen)
    device = home.device_id()
    key = folder_key(home, folder)
    _warn_if_plaintext(key, folder)

    async def go() -> None:
        replica = await Replica.open(folder, device=device.short, key=key)

        async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = writer.get_extra_info("peername")
            await replica.scan()  # only what changed since the last scan is read
            result = await _session(home, replica, key, reader, writer, initiator=False)
            print(f"{peer[0]}:{peer[1]}: {_explained(result, key).reason}", flush=True)

        try:
            await replica.scan()
            server = await asyncio.start_server(session, host, port)
            bound = server.sockets[0].getsockname()
            print(f"serving {folder} on {bound[0]}:{bound[1]}", flush=True)
            async with server:
                await server.serve_forever()
        finally:
            await replica.close()

    try:
        asyncio.run(go())
    except OSError as exc:
        raise BackerError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from exc
    return EXIT_OK


def _explained(result: SessionResult, key: FolderKey | None) -> SessionResult:
    """The session's outcome, its reason put in a person's terms when the two sides disagree
    on whether the folder has a key: one speaks plaintext, the other Noise, and neither side's
    parser can say more than "malformed" on its own."""
    if result.peer_root is not None or result.pulls:
        return result  # the sides understood each other
    if key is None and "stream ended" in result.reason:
        reason = (
            "the peer hung up at once: it shares this folder with a key, this side has none. "
            "`backer join KEY DIR` here first, with the key `backer keys` prints there"
        )
    elif key is not None and "(malformed)" in result.reason:
        reason = (
            "wrong folder key: the peer speaks no folder key (an unshared folder, or one "
            "without `backer join`); the other side must `backer join` this folder's key first"
        )
    else:
        return result
    return dataclasses.replace(result, reason=reason)


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise BackerError(f"{text!r} is not HOST:PORT (for example 192.168.1.20:22000)")
    return host.strip("[]") or "127.0.0.1", int(port)


async def _session(
    home: Home,
    replica: Replica,
    key: FolderKey | None,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    initiator: bool,
) -> SessionResult:
    """An encrypted session when the folder is shared with a key, a plaintext one otherwise."""
    if key is None:
        return await sync_stream(
            replica,
            reader,
            writer,
            device=home.device_id().raw,
            folder=PLAIN_FOLDER,
            until_in_sync=initiator,
        )
    return await secure_session(
        replica,
        StreamLink(reader, writer),
        initiator=initiator,
        device_key=home.device_key(),
        key=key,
        until_in_sync=initiator,
    )


def _warn_if_plaintext(key: FolderKey | None, folder: Path) -> None:
    if key is None:
        print(
            f"backer: warning: {folder} has no folder key, so this connection is neither "
            "encrypted nor authenticated; `backer init` (or `backer join KEY`) shares it securely",
            file=sys.stderr,
        )
