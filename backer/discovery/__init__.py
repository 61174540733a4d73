"""Finding peers: mDNS on the LAN, a UDP beacon, the Kademlia DHT, static addresses.

Must not import mesh (the node wires the two together), node or the faces.
"""
