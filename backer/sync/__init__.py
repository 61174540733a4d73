"""Replication: merge rules, plans from tree diffs, applying changes safely to disk, versions.

Must not import mesh, discovery, node or the faces.
"""
