"""The local web dashboard of a running node: folders, peers, transfers, conflicts and recent
changes, live; and the JSON API behind it (docs/web.md).

    server = await start_web(node)        # 127.0.0.1 only, a free port, a random token
    print(server.url)                     # http://127.0.0.1:PORT/#token=...
    ...
    await server.close()

Public API here; `routes` (pure request decisions), `views` (the JSON answers) and `server`
(the asyncio pump around h11) are its parts. The top layer, beside the CLI: imports node and
below, and nothing imports it but the CLI.
"""

from backer.web.server import WebServer, start_web

__all__ = ["WebServer", "start_web"]
