"""The folder index: entries, chunking, ignore rules, scanning, the SQLite store, the merkle tree.

Must not import protocol, sync, mesh, discovery, node or the faces.
"""
