"""The wire protocol (sans-IO): framing, strict message decoding, the session state machine.

Must not import sync, mesh, discovery, node or the faces; must not do I/O.
"""
