"""The encrypted gossip mesh: Noise handshake, the encrypted channel over any stream, peers.

Must not import discovery (the node wires the two together), node or the faces.
"""
