"""backer: peer-to-peer folder mirroring.

The package is layered, lowest first (a test enforces it):
errors/ids -> keys/config -> index -> protocol -> sync -> mesh | discovery -> node -> cli/web.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
