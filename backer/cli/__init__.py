"""The `backer` command line. `main` is the console script's entry point."""

from backer.cli.commands import main

__all__ = ["main"]
